"""FFN taps on plain nn.Modules and on torchtitan's llama3, with and without activation checkpointing."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import checkpoint

from helpers import hook_count
from nerve_plugin import BUILTIN_SPECS, FFNTaps, TapPoint, TapSpec, compute_covariance

DIM, HIDDEN, LAYERS = 8, 24, 3


class ToyFFN(nn.Module):
    def __init__(self, gated: bool, act):
        super().__init__()
        self.w1 = nn.Linear(DIM, HIDDEN)
        self.w2 = nn.Linear(HIDDEN, DIM)
        self.w3 = nn.Linear(DIM, HIDDEN) if gated else None
        self.act = act

    def forward(self, x):
        h = self.act(self.w1(x))
        if self.w3 is not None:
            h = h * self.w3(x)
        return self.w2(h)


class ToyBlock(nn.Module):
    def __init__(self, gated: bool, act):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.feed_forward = ToyFFN(gated, act)

    def forward(self, x):
        return x + self.feed_forward(self.norm(x))


class ToyModel(nn.Module):
    def __init__(self, gated=True, act=F.silu, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleDict({str(i): ToyBlock(gated, act) for i in range(LAYERS)})

    def forward(self, x):
        for layer in self.layers.values():
            x = layer(x)
        return x


def reentrant_checkpointed(block: nn.Module) -> nn.Module:
    """The block itself, its forward run under reentrant torch.utils.checkpoint (checkpoint_wrapper covers
    the non-reentrant kind)."""
    plain_forward = block.forward
    block.forward = lambda x: checkpoint(plain_forward, x, use_reentrant=True)
    return block


SPEC = BUILTIN_SPECS["llama3"]


@torch.no_grad()
def reference_activations(model: ToyModel, x: torch.Tensor) -> dict:
    """Each layer's pre and post rows, computed by hand from the weights (no hooks)."""
    out = {}
    for i, block in enumerate(model.layers.values()):
        ffn = block.feed_forward
        normed = F.layer_norm(x, (DIM,), block.norm.weight, block.norm.bias, block.norm.eps)
        pre = F.linear(normed, ffn.w1.weight, ffn.w1.bias)
        post = ffn.act(pre)
        if ffn.w3 is not None:
            post = post * F.linear(normed, ffn.w3.weight, ffn.w3.bias)
        out[(i, "pre")], out[(i, "post")] = pre.reshape(-1, HIDDEN), post.reshape(-1, HIDDEN)
        x = x + F.linear(post, ffn.w2.weight, ffn.w2.bias)
    return out


def assert_stats_match(taps: FFNTaps, reference: dict, rtol=1e-10):
    assert set(taps.stats) == set(reference)
    for key, rows in reference.items():
        stats = taps.stats[key]
        assert stats.count == rows.shape[0], key
        ref = compute_covariance(rows)
        err = (stats.covariance() - ref).norm() / ref.norm()
        assert err < rtol, (key, float(err))


def batches(seed=1, n=3, shape=(4, 10)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, DIM, generator=gen) for _ in range(n)]


def concat_reference(model, xs):
    parts = [reference_activations(model, x) for x in xs]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def test_taps_match_hand_computed_activations():
    model = ToyModel()
    xs = batches()
    taps = FFNTaps(model, SPEC).attach()
    with taps.capturing(step=1):
        for x in xs:
            model(x)
    assert taps.layers == [0, 1, 2]
    assert_stats_match(taps, concat_reference(model, xs))


def test_no_hook_until_attached_and_none_after_remove():
    model = ToyModel()

    taps = FFNTaps(model, SPEC)
    assert hook_count(model) == 0
    taps.attach()
    assert hook_count(model) == 2 * LAYERS
    taps.remove()
    assert hook_count(model) == 0


def test_disarmed_forwards_are_not_counted():
    model = ToyModel()
    xs = batches()
    taps = FFNTaps(model, SPEC).attach()
    model(xs[0])  # before any logging step
    with taps.capturing(step=5):
        model(xs[1])
    model(xs[2])  # after it
    assert_stats_match(taps, concat_reference(model, xs[1:2]))


@pytest.mark.parametrize("wrap", ["checkpoint_wrapper", "reentrant"])
def test_activation_checkpoint_recompute_is_not_counted_twice(wrap):
    model = ToyModel()
    xs = batches()
    reference = concat_reference(model, xs)
    for name, block in list(model.layers.named_children()):
        model.layers[name] = (
            checkpoint_wrapper(block) if wrap == "checkpoint_wrapper" else reentrant_checkpointed(block)
        )
    taps = FFNTaps(model, SPEC).attach()
    with taps.capturing(step=1):
        for x in xs:
            model(x.requires_grad_()).square().sum().backward()
    assert_stats_match(taps, reference)


def test_layer_selection_and_custom_spec():
    model = ToyModel(gated=False, act=F.gelu)
    spec = TapSpec(
        blocks="layers", pre=TapPoint("feed_forward.w1", "output"), post=TapPoint("feed_forward.w2", "input")
    )
    taps = FFNTaps(model, spec, layers=[0, 2]).attach()
    xs = batches()
    with taps.capturing(step=1):
        for x in xs:
            model(x)
    reference = {k: v for k, v in concat_reference(model, xs).items() if k[0] in (0, 2)}
    assert_stats_match(taps, reference)


def test_bad_spec_is_reported():
    with pytest.raises(ValueError, match="no module at blocks path 'blocks'"):
        FFNTaps(ToyModel(), TapSpec("blocks", SPEC.pre, SPEC.post))
    with pytest.raises(ValueError, match="found no FFN"):
        FFNTaps(ToyModel(), TapSpec("layers", TapPoint("mlp.fc", "output"), SPEC.post))
    with pytest.raises(ValueError, match="'input' or 'output'"):
        TapPoint("feed_forward.w1", "inputs")


def test_subsampling_keeps_pre_and_post_on_the_same_tokens():
    # With an identity nonlinearity and no gate, post == pre row for row: equal statistics prove that both
    # taps kept the same tokens.
    model = ToyModel(gated=False, act=nn.Identity())
    xs = batches(n=4)
    reference = concat_reference(model, xs)

    def run(step, seed=3):
        taps = FFNTaps(model, SPEC, max_tokens_per_forward=7, seed=seed).attach()
        with taps.capturing(step=step):
            for x in xs:
                model(x)
        taps.remove()
        return taps

    taps = run(step=2)
    for layer in range(LAYERS):
        pre, post = taps.stats[(layer, "pre")], taps.stats[(layer, "post")]
        assert pre.count == post.count == 7 * len(xs)
        assert torch.equal(pre.mean, post.mean) and torch.equal(pre.m2, post.m2)
        # ... and it really sub-sampled rather than taking the first rows of each forward.
        first_rows = torch.cat([r[:7] for r in reference[(layer, "pre")].split(40)])
        assert not torch.allclose(pre.mean, first_rows.double().mean(0))
    # Deterministic for a (seed, step), different across steps and seeds.
    assert torch.equal(run(step=2).stats[(0, "pre")].m2, taps.stats[(0, "pre")].m2)
    assert not torch.equal(run(step=3).stats[(0, "pre")].m2, taps.stats[(0, "pre")].m2)
    assert not torch.equal(run(step=2, seed=4).stats[(0, "pre")].m2, taps.stats[(0, "pre")].m2)


def test_subsampled_pre_and_post_are_the_same_tokens_of_a_gated_ffn():
    # 7 tokens, 5 kept: find by brute force which subsets reproduce the pre and the post statistics. Exactly
    # one subset must explain each, and it must be the same one.
    model = ToyModel(gated=True, act=F.silu)
    x = torch.randn(1, 7, DIM, generator=torch.Generator().manual_seed(4))
    taps = FFNTaps(model, SPEC, max_tokens_per_forward=5, seed=9).attach()
    with taps.capturing(step=1):
        model(x)
    reference = reference_activations(model, x)
    for layer in range(LAYERS):
        explaining = {}
        for tap in ("pre", "post"):
            rows, stats = reference[(layer, tap)].double(), taps.stats[(layer, tap)]
            explaining[tap] = [
                subset
                for subset in itertools.combinations(range(7), 5)
                if torch.allclose(rows[list(subset)].mean(0), stats.mean, atol=1e-6)
                and torch.allclose(compute_covariance(rows[list(subset)]), stats.covariance(), atol=1e-6)
            ]
        assert len(explaining["pre"]) == 1 and explaining["pre"] == explaining["post"], explaining


# -- torchtitan's llama3 and its activation checkpointing, in one process ------------------------------------


def torchtitan_llama3(ac_mode: str | None):
    from torchtitan.config.job_config import ActivationCheckpoint
    from torchtitan.distributed.activation_checkpoint import apply_ac
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs
    from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list

    torch.manual_seed(0)
    args = TransformerModelArgs(dim=64, n_layers=3, n_heads=4, vocab_size=256, max_seq_len=32)
    model = Transformer(args)
    with torch.no_grad():
        model.init_weights()
    if ac_mode is not None:
        mode, option = (ac_mode, "op") if ac_mode != "selective-layer" else ("selective", "1")
        apply_ac(model, ActivationCheckpoint(mode=mode, selective_ac_option=option), op_sac_save_list=_op_sac_save_list)
    return model


def raw_ffn_rows(model, tokens_list):
    """Reference by a different mechanism: store every raw activation, as the original NerVE callback does."""
    rows, handles = {}, []
    for i, block in model.layers.items():
        ffn = block.feed_forward
        handles.append(
            ffn.w1.register_forward_hook(lambda m, a, o, i=int(i): rows.setdefault((i, "pre"), []).append(o.detach()))
        )
        handles.append(
            ffn.w2.register_forward_pre_hook(
                lambda m, a, i=int(i): rows.setdefault((i, "post"), []).append(a[0].detach())
            )
        )
    with torch.no_grad():
        for tokens in tokens_list:
            model(tokens)
    for h in handles:
        h.remove()
    return {k: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]) for k, v in rows.items()}


@pytest.mark.parametrize("ac_mode", [None, "full", "selective", "selective-layer"])
def test_torchtitan_llama3_taps_under_activation_checkpointing(ac_mode):
    gen = torch.Generator().manual_seed(5)
    tokens_list = [torch.randint(0, 256, (2, 32), generator=gen) for _ in range(2)]
    reference = raw_ffn_rows(torchtitan_llama3(None), tokens_list)
    model = torchtitan_llama3(ac_mode)
    if ac_mode:
        assert any("_checkpoint_wrapped_module" in name for name, _ in model.named_modules())
    taps = FFNTaps(model, BUILTIN_SPECS["llama3"]).attach()
    with taps.capturing(step=1):
        for tokens in tokens_list:
            model(tokens).float().square().mean().backward()
    assert taps.layers == [0, 1, 2]
    for key, rows in reference.items():
        assert taps.stats[key].count == 2 * 2 * 32, key
        ref = compute_covariance(rows)
        assert float((taps.stats[key].covariance() - ref).norm() / ref.norm()) < 1e-6, key


# -- torch.compile as torchtitan applies it: per block, fullgraph=True, after AC ---------------------------


def compiled_run(ac_mode, tokens_list, steps=(1, 2, 3)):
    """Train-like forward/backward passes over ``steps`` (odd steps armed); returns taps and graph counts."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from torchtitan.config.job_config import Compile
    from torchtitan.models.llama3.infra.parallelize import apply_compile

    torch._dynamo.reset()
    counters.clear()
    model = torchtitan_llama3(ac_mode)
    taps = FFNTaps(model, BUILTIN_SPECS["llama3"]).attach()
    apply_compile(model, Compile(enable=True, backend="aot_eager"))
    for step in steps:
        taps.reset()
        taps.arm(step) if step % 2 else taps.disarm()
        for tokens in tokens_list:
            model(tokens).float().square().mean().backward()
    return taps, counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())


@pytest.mark.parametrize("ac_mode", [None, "full", "selective"])
def test_compiled_blocks_capture_exactly_with_one_extra_graph(ac_mode):
    gen = torch.Generator().manual_seed(5)
    tokens_list = [torch.randint(0, 256, (2, 32), generator=gen) for _ in range(2)]
    reference = raw_ffn_rows(torchtitan_llama3(None), tokens_list)
    taps, graphs, recompiles = compiled_run(ac_mode, tokens_list, steps=(1, 2, 3, 4, 5))
    # Three blocks, five steps, arming toggled at every step: at most one graph with the captures (logging
    # steps) and one without (the others), each shared by every block. A per-layer or per-step recompile
    # would make 3 or more. (Without taps the same blocks compile to one graph.)
    assert graphs <= 2 and recompiles <= 1, (graphs, recompiles)
    for key, rows in reference.items():
        assert taps.stats[key].count == 2 * 2 * 32, key
        ref = compute_covariance(rows)
        assert float((taps.stats[key].covariance() - ref).norm() / ref.norm()) < 1e-6, key
