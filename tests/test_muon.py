"""nerve_plugin.muon against torch's own optimizers, bitwise: one process, and FSDP2/HSDP over gloo with 1-4 ranks.

The reference is ``torch.optim.Muon`` on the hidden matrices plus ``torch.optim.AdamW`` on the rest of an unsharded
copy of the model, fed the same full gradients and driven by the same LR schedule. The sharded runs use real
``fully_shard`` parameters; the gradients are set directly (each rank keeps its rows of the full gradient), which
is what FSDP2's reduce-scatter leaves, without running a backward.

The model's shapes make every case of the exchange happen: tall and wide matrices (Newton-Schulz on the
transpose or not), row counts that do not divide by the world size, and a 3-row matrix that leaves the fourth
rank of four with no rows at all.
"""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import free_port
from nerve_plugin.muon import Muon, adjusted_lr, hidden_matrix_names, newton_schulz, split_params

STEPS = 6


class TinyLM(nn.Module):
    def __init__(self, vocab=37, dim=24):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, 40)  # tall: 40 x 24
        self.down = nn.Linear(40, dim, bias=False)  # wide: 24 x 40
        self.square = nn.Linear(dim, dim, bias=False)
        self.odd = nn.Linear(dim, 13)  # 13 rows: uneven for 2, 3, 4 ranks
        self.tiny = nn.Linear(13, 3, bias=False)  # 3 rows: rank 3 of 4 holds none
        self.norm = nn.LayerNorm(3)
        self.output = nn.Linear(3, vocab, bias=False)


def build(seed=0):
    torch.manual_seed(seed)
    return TinyLM()


def lr_lambda(step):  # warm-up then decay, like torchtitan's schedules
    return min(1.0, (step + 1) / 3) * (0.9**step)


# AdamW runs "foreach" and "for-loop" here: CPU's fused AdamW kernel rounds the tail of each tensor (past the last
# full SIMD vector) differently from the body, so a row shard and the full tensor disagree in the last bit. That is
# torch's AdamW under FSDP on CPU with or without Muon; on CUDA the fused kernel has no such tail.
CONFIGS = [
    dict(nesterov=True, adjust_lr_fn="match_rms_adamw", weight_decay=0.1, bucket_mb=0, foreach=True),
    dict(nesterov=False, adjust_lr_fn="original", weight_decay=0.05, bucket_mb=0.001, foreach=False),
    # float32 Newton-Schulz has no torch counterpart: the reference is this optimizer on the unsharded model.
    dict(
        nesterov=True,
        adjust_lr_fn="match_rms_adamw",
        weight_decay=0.1,
        bucket_mb=0,
        foreach=True,
        ns_dtype=torch.float32,
    ),
]


def make_optimizer(model, cfg):
    adamw = {"betas": (0.9, 0.95), "eps": 1e-8, "foreach": cfg["foreach"], "fused": cfg.get("fused")}
    return Muon(
        split_params(model),
        lr=0.01,
        weight_decay=cfg["weight_decay"],
        nesterov=cfg["nesterov"],
        adjust_lr_fn=cfg["adjust_lr_fn"],
        adamw=adamw,
        bucket_mb=cfg["bucket_mb"],
        ns_dtype=cfg.get("ns_dtype", torch.bfloat16),
    )


class Reference:
    """torch.optim.Muon + torch.optim.AdamW on an unsharded model, one LambdaLR each."""

    def __init__(self, model, cfg):
        self.model = model
        if cfg.get("ns_dtype", torch.bfloat16) != torch.bfloat16:
            self.optimizers = [make_optimizer(model, cfg)]
        else:
            groups = split_params(model)
            self.optimizers = [
                torch.optim.Muon(
                    groups[0]["params"],
                    lr=0.01,
                    weight_decay=cfg["weight_decay"],
                    nesterov=cfg["nesterov"],
                    adjust_lr_fn=cfg["adjust_lr_fn"],
                ),
                torch.optim.AdamW(
                    groups[1]["params"],
                    lr=0.01,
                    weight_decay=cfg["weight_decay"],
                    betas=(0.9, 0.95),
                    eps=1e-8,
                    foreach=cfg["foreach"],
                    fused=cfg.get("fused"),
                ),
            ]
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda) for o in self.optimizers]

    def step(self):
        for o in self.optimizers:
            o.step()
        for s in self.schedulers:
            s.step()

    def state(self, param):
        return {k: v for o in self.optimizers for k, v in o.state.get(param, {}).items()}


def full_grads(model, step):
    g = torch.Generator().manual_seed(1000 + step)
    return {name: torch.randn(p.shape, generator=g) for name, p in model.named_parameters()}


def set_grads(model, grads):
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in model.named_parameters():
        full = grads[name].clone()
        if isinstance(p, DTensor):  # this rank's rows, no communication
            p.grad = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
        else:
            p.grad = full


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def assert_bitwise(model, opt, ref, where):
    ref_params = dict(ref.model.named_parameters())
    for name, p in model.named_parameters():
        q = ref_params[name]
        assert torch.equal(full(p), q), f"{where}: parameter {name} differs by {(full(p) - q).abs().max()}"
        mine, theirs = opt.state[p], ref.state(q)
        assert sorted(mine) == sorted(theirs), (name, sorted(mine), sorted(theirs))
        for key in theirs:
            assert torch.equal(full(mine[key]), theirs[key]), f"{where}: state {name}.{key} differs"


# -- one process, plain tensors ------------------------------------------------------------------------------------


# One process: every tensor is whole, so fused AdamW (torchtitan's default) is exact too.
FUSED = dict(nesterov=True, adjust_lr_fn="match_rms_adamw", weight_decay=0.1, bucket_mb=0, foreach=False, fused=True)


@pytest.mark.parametrize("cfg", [*CONFIGS[:2], FUSED], ids=["nesterov-match_rms", "plain-original", "fused-adamw"])
def test_single_process_matches_torch_muon_and_adamw_bitwise(cfg):
    model, ref_model = build(), build()
    opt, ref = make_optimizer(model, cfg), Reference(ref_model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    for step in range(STEPS):
        grads = full_grads(model, step)
        set_grads(model, grads)
        set_grads(ref_model, grads)
        opt.step()
        scheduler.step()
        ref.step()
        assert opt.last_collectives == 0
    assert_bitwise(model, opt, ref, "single process")


def test_default_split_and_patterns():
    model = build()
    assert hidden_matrix_names(model) == {"up.weight", "down.weight", "square.weight", "odd.weight", "tiny.weight"}
    with pytest.raises(ValueError, match="Muon needs 2-D matrices"):
        split_params(model, ["up.*"])  # up.bias is 1-D
    groups = split_params(model, ["down.weight", "square.*"])
    assert groups[0]["params"] == [model.down.weight, model.square.weight]
    with pytest.raises(ValueError, match="2-D"):
        Muon([model.norm.weight])


def test_newton_schulz_and_lr_rules_follow_torch():
    g = torch.randn(40, 24)
    x = newton_schulz(g.bfloat16().contiguous())
    assert x.shape == (24, 40)  # worked on the transpose
    assert adjusted_lr(0.1, "original", (40, 24)) == 0.1 * (40 / 24) ** 0.5
    assert adjusted_lr(0.1, "match_rms_adamw", (24, 40)) == 0.1 * (0.2 * 40**0.5)


def test_state_dict_round_trip_continues_bitwise():
    cfg = CONFIGS[0]
    model, other = build(), build(seed=1)
    opt = make_optimizer(model, cfg)
    for step in range(3):
        set_grads(model, full_grads(model, step))
        opt.step()
    other.load_state_dict(model.state_dict())
    restored = make_optimizer(other, cfg)
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step in range(3, 6):
        for m, o in ((model, opt), (other, restored)):
            set_grads(m, full_grads(m, step))
            o.step()
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)


# -- FSDP2 / HSDP over gloo ------------------------------------------------------------------------------------------


class CountCollectives(TorchDispatchMode):
    """Counts every collective that reaches the dispatcher: the c10d ops behind torch.distributed's functions and
    the functional collectives DTensor uses (what CommDebugMode counts, without importing torch._dynamo)."""

    def __enter__(self):
        super().__enter__()
        return self.counts

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd"):
            self.counts[str(func)] = self.counts.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def _worker(rank, world, port, mesh_shapes, checkpoint_dir):
    torch.set_num_threads(1)  # ranks share the cores; the reference runs in this very process
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for mesh_shape in mesh_shapes:
            folder = checkpoint_dir and os.path.join(checkpoint_dir, "x".join(map(str, mesh_shape)))
            _check_layout(rank, mesh_shape, folder)
    finally:
        dist.destroy_process_group()


def _check_layout(rank, mesh_shape, checkpoint_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = ("replicate", "shard") if len(mesh_shape) == 2 else ("shard",)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)

    def sharded(seed=0):
        model = build(seed)
        for module in (model.tok_embeddings, model.up, model.down, model.square, model.odd, model.tiny):
            fully_shard(module, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    # Layouts Muon cannot gather (tensor-parallel column shards, FSDP over TP) are refused at construction.
    from torch.distributed.tensor import Shard, distribute_tensor

    placements = [Shard(1)] if len(mesh_shape) == 1 else [Shard(0), Shard(1)]
    with pytest.raises(ValueError, match="Tensor parallelism and other shardings are not supported"):
        Muon([nn.Parameter(distribute_tensor(torch.zeros(8, 8), mesh, placements))])

    for ci, cfg in enumerate(CONFIGS):
        model, ref = sharded(), Reference(build(), cfg)
        opt = make_optimizer(model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        buckets = len(opt._plan([p for g in opt.param_groups if g["use_muon"] for p in g["params"]])[0])
        save_at = 3 if ci == 0 and checkpoint_dir else None
        for step in range(STEPS):
            if step == save_at:
                save_checkpoint(model, opt, scheduler, checkpoint_dir)
            grads = full_grads(ref.model, step)
            set_grads(model, grads)
            set_grads(ref.model, grads)
            with CountCollectives() as counts:
                opt.step()
            # The count per step: one gather and one scatter all-to-all per bucket, nothing else.
            expected = 2 * buckets if mesh_shape[-1] > 1 else 0
            assert sum(counts.values()) == expected == opt.last_collectives, (counts, expected)
            assert set(counts) <= {"c10d.alltoall_base_.default"}, counts
            scheduler.step()
            ref.step()
        assert_bitwise(model, opt, ref, f"mesh {mesh_shape} config {ci}")
        if rank == 0:
            print(f"mesh {mesh_shape} config {ci}: {buckets} bucket(s), {2 * buckets} all-to-alls per step")

        if save_at is not None:
            # A fresh job (other weights) resumes from the checkpoint and must end bitwise where this one did.
            resumed = sharded(seed=7)
            opt2 = make_optimizer(resumed, cfg)
            scheduler2 = torch.optim.lr_scheduler.LambdaLR(opt2, lr_lambda)
            load_checkpoint(resumed, opt2, scheduler2, checkpoint_dir)
            for step in range(save_at, STEPS):
                set_grads(resumed, full_grads(ref.model, step))
                opt2.step()
                scheduler2.step()
            for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
                assert torch.equal(p.to_local(), q.to_local()), f"resume: {name}"
                assert sorted(opt.state[p]) == sorted(opt2.state[q])
                for key, value in opt.state[p].items():
                    assert torch.equal(full(value), full(opt2.state[q][key])), f"resume: {name}.{key}"


# What torchtitan's CheckpointManager does with the model and an OptimizersContainer: DCP with flattened keys.
def _flatten():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def save_checkpoint(model, opt, scheduler, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=_flatten())}
    dcp.save(state, checkpoint_id=path)
    torch.save(scheduler.state_dict(), f"{path}.lr.{dist.get_rank()}")


def load_checkpoint(model, opt, scheduler, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=_flatten())}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"], options=_flatten())
    scheduler.load_state_dict(torch.load(f"{path}.lr.{dist.get_rank()}"))


# (world size, meshes): 4 ranks run FSDP over all four, then HSDP 2 x 2 (each replica's exchange is a 2-rank FSDP
# one: no separate 2-rank run, spawning costs more than stepping), in one set of processes.
LAYOUTS = {
    "fsdp1": (1, [(1,)]),
    "fsdp3-uneven-checkpoint": (3, [(3,)]),
    "fsdp4-empty-rank+hsdp2x2-checkpoint": (4, [(4,), (2, 2)]),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fsdp_matches_torch_muon_and_adamw_bitwise(layout, tmp_path):
    world, mesh_shapes = LAYOUTS[layout]
    checkpoint_dir = str(tmp_path / "checkpoint") if "checkpoint" in layout else ""
    if world == 1:  # no need for a process of its own
        _worker(0, 1, free_port(), mesh_shapes, checkpoint_dir)
        return
    mp.spawn(_worker, args=(world, free_port(), mesh_shapes, checkpoint_dir), nprocs=world, join=True)
