"""Optimizer step time under FSDP2: nerve's Muon vs AdamW vs torch.optim.Muon, on the same sharded model.

    torchrun --standalone --nproc_per_node=2 bench/muon_step.py [--layers 8 --dim 4096 --hidden 14336 ...]

A Llama-shaped stack (embedding, per block wq/wk/wv/wo and w1/w2/w3, RMSNorm weights, output head; defaults:
Llama-3-8B's shapes with 8 blocks) is sharded with ``fully_shard`` per block. Gradients are set once (random,
DTensors like FSDP2's), then each optimizer steps on them; variants alternate round by round so drift hits all
alike, and every step is timed between device synchronisations. Prints medians and the ratios, the all-to-alls
per step, and whether nerve's Muon is bitwise torch.optim.Muon + AdamW on a small model (full tensors, one GPU).

Variants: "AdamW" (fused, torchtitan's default); "nerve Muon" (Muon on hidden matrices, owner-computed
Newton-Schulz, AdamW on the rest); "torch Muon" (torch.optim.Muon stepping the DTensor matrices directly, plus
fused AdamW on the rest: every Newton-Schulz matmul then runs through DTensor sharding propagation; a failure is
reported, not raised). A benchmark, not a test; it needs no torchtitan.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nerve_plugin.muon import Muon, split_params  # noqa: E402


class Block(nn.Module):
    def __init__(self, dim, hidden, kv_dim):
        super().__init__()
        self.attention_norm = nn.RMSNorm(dim)
        self.wq, self.wk = nn.Linear(dim, dim, bias=False), nn.Linear(dim, kv_dim, bias=False)
        self.wv, self.wo = nn.Linear(dim, kv_dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.ffn_norm = nn.RMSNorm(dim)
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)


class LlamaShaped(nn.Module):
    def __init__(self, layers, dim, hidden, kv_dim, vocab):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, hidden, kv_dim) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)


def build(args, device, mesh=None, seed=0):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaShaped(args.layers, args.dim, args.hidden, args.kv_dim, args.vocab)
    if mesh is not None:
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def set_random_grads(model, seed):
    from torch.distributed.tensor import DTensor, distribute_tensor

    g = torch.Generator(device="cpu").manual_seed(seed)
    for p in model.parameters():
        full = torch.randn(p.shape, generator=g).to(p.device if not isinstance(p, DTensor) else p.to_local().device)
        if isinstance(p, DTensor):
            p.grad = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
        else:
            p.grad = full


class Pair:
    """Two optimizers stepped as one (torch.optim.Muon needs AdamW beside it)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    def step(self):
        for o in self.optimizers:
            o.step()


def make(variant, model, args):
    fused = model.output.weight.device.type == "cuda"
    if variant == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    if variant == "nerve Muon":
        return Muon(
            split_params(model),
            lr=args.lr,
            weight_decay=0.1,
            bucket_mb=args.bucket_mb,
            adamw={"betas": (0.9, 0.95), "fused": fused},
        )
    matrices, rest = (g["params"] for g in split_params(model))
    return Pair(
        torch.optim.Muon(matrices, lr=args.lr, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW(rest, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=fused),
    )


def exactness(args, device) -> str:
    """nerve's Muon, sharded, against torch.optim.Muon + AdamW on full copies on every rank (small model)."""
    small = argparse.Namespace(**{**vars(args), "layers": 2, "dim": 512, "hidden": 1536, "kv_dim": 128, "vocab": 1000})
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    sharded, reference = build(small, device, mesh), build(small, device)
    ours, theirs = make("nerve Muon", sharded, small), make("torch Muon", reference, small)
    for step in range(3):
        set_random_grads(sharded, step)
        set_random_grads(reference, step)
        ours.step()
        theirs.step()
    worst = max((p.full_tensor() - q).abs().max().item() for p, q in zip(sharded.parameters(), reference.parameters()))
    return "bitwise equal" if worst == 0 else f"max |diff| {worst:.3e}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=14336)
    parser.add_argument("--kv-dim", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--bucket-mb", type=float, default=512)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="AdamW,nerve Muon,torch Muon")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    variants = args.variants.split(",")
    model = build(args, device, mesh)
    set_random_grads(model, 0)
    optimizers, times, failed = {}, {v: [] for v in variants}, {}
    for v in variants:
        try:
            optimizers[v] = make(v, model, args)
        except Exception as e:  # noqa: BLE001 - reported
            failed[v] = f"{type(e).__name__}: {e}"
    for _ in range(args.rounds):
        for v in variants:
            if v in failed:
                continue
            try:
                for i in range(args.warmup + args.steps):
                    sync()
                    start = time.perf_counter()
                    optimizers[v].step()
                    sync()
                    if i >= args.warmup:
                        times[v].append(time.perf_counter() - start)
            except Exception as e:  # noqa: BLE001 - reported (every rank fails alike)
                failed[v] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    check = exactness(args, device) if "nerve Muon" in optimizers else "not run"

    if rank == 0:
        name = torch.cuda.get_device_name() if cuda else "cpu"
        n = sum(p.numel() for p in model.parameters())
        print(
            f"\noptimizer step, {name} x {dist.get_world_size()} (FSDP2), {args.layers} blocks of dim {args.dim}, "
            f"hidden {args.hidden}, vocab {args.vocab}: {n / 1e9:.2f}B parameters; "
            f"{args.rounds} rounds x {args.steps} steps per variant"
        )
        if "nerve Muon" in optimizers:
            print(f"nerve Muon: {optimizers['nerve Muon'].describe()}")
        medians = {v: statistics.median(t) for v, t in times.items() if t and v not in failed}
        for v in variants:
            if v in medians:
                spread = max(times[v]) - min(times[v])
                low = min(times[v])
                print(f"  {v:<12} {medians[v] * 1e3:9.2f} ms  (min {low * 1e3:.2f}, spread {spread * 1e3:.2f})")
            else:
                print(f"  {v:<12} failed: {failed.get(v, 'no timings')}")
        base = medians.get("AdamW")
        for v, m in medians.items():
            if v != "AdamW" and base:
                print(f"  ratio {v} / AdamW: {m / base:.2f}")
        if "nerve Muon" in medians and "torch Muon" in medians:
            print(f"  ratio torch Muon / nerve Muon: {medians['torch Muon'] / medians['nerve Muon']:.2f}")
        print(f"exactness (2-block model, 3 steps): nerve Muon vs torch.optim.Muon + AdamW: {check}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
