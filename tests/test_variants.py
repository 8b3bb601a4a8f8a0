"""The paper's model variants (nerve_plugin/torchtitan/variants): identity with llama3, structure, validation,
(slow) torchtitan's real Trainer on 2 CPU processes with FSDP and NerVE on.

For the Trainer runs this module is also the job's custom import: with NERVE_VARIANT_TT=1 in the environment,
importing it registers "nerve_test_variant" (the nerve_llama spec with tt_synthetic's data, wrapped by nerve);
the jobs take nerve's own JobConfig ([nerve], [muon], [variant]) as their custom config module.
"""

import dataclasses
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nerve_plugin.variants.config import Variant, VariantConfigError

TT_SPEC = "nerve_test_variant"

if os.environ.get("NERVE_VARIANT_TT") == "1":  # inside a torchtitan worker: register the test spec
    import tt_synthetic
    from torchtitan.protocols.train_spec import register_train_spec

    import nerve_plugin.torchtitan  # noqa: F401  (CPU mode)
    from nerve_plugin.torchtitan.v0_2.train_spec import wrap_train_spec
    from nerve_plugin.torchtitan.v0_2.variant_spec import get_train_spec as _variant_spec

    from nerve_plugin.torchtitan.variants.model import hyperspherical_linears

    class _GeometryMetricsProcessor(tt_synthetic.JsonlMetricsProcessor):
        """Also records, per logged step, how far this rank's hyperspherical FFN rows are from unit norm."""

        def log(self, step, *args, **kwargs):
            super().log(step, *args, **kwargs)
            linears = [m for part in self.model_parts for m in hyperspherical_linears(part)]
            if linears:
                rows = [m.weight.to_local() if hasattr(m.weight, "to_local") else m.weight for m in linears]
                worst = max((r.detach().norm(dim=-1) - 1).abs().max().item() for r in rows)
                path = os.path.join(self.job_config.job.dump_folder, f"rows_rank{torch.distributed.get_rank()}.jsonl")
                with open(path, "a") as f:
                    f.write(json.dumps({"step": step, "max_row_norm_error": worst, "linears": len(rows)}) + "\n")

    try:
        register_train_spec(
            TT_SPEC,
            wrap_train_spec(
                dataclasses.replace(
                    _variant_spec(),
                    build_tokenizer_fn=None,
                    build_dataloader_fn=tt_synthetic.build_synthetic_dataloader,
                    build_metrics_processor_fn=lambda job_config, parallel_dims, model_args=None, tag=None: (
                        _GeometryMetricsProcessor(job_config, parallel_dims, tag)
                    ),
                ),
                "llama3",
            ),
        )
    except ValueError:
        pass

from torchtitan.components.optimizer import OptimizersContainer  # noqa: E402
from torchtitan.models.llama3 import Transformer, llama3_args  # noqa: E402

from nerve_plugin.taps import BUILTIN_SPECS, FFNTaps  # noqa: E402
from nerve_plugin.torchtitan.variants.model import FFNLinear, VariantArgs, VariantTransformer, no_weight_decay  # noqa: E402
from nerve_plugin.torchtitan.v0_2.variant_spec import (  # noqa: E402
    VariantParallelismError,
    build_variant_optimizers,
    check_parallelism,
    get_train_spec,
)

SEQ = 16


def small_args(**variant) -> VariantArgs:
    args = VariantArgs.from_llama3(llama3_args["debugmodel"], **variant)
    args.max_seq_len = 32
    return args


def build(args, seed=0, model_cls=VariantTransformer):
    """As torchtitan's Trainer: construct on meta, materialise, seed, init_weights."""
    with torch.device("meta"):
        model = model_cls(args)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    return model


def tokens(seed=1, batch=2):
    return torch.randint(0, 2048, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def job_config(variant=None, seq_len=32):
    return SimpleNamespace(
        training=SimpleNamespace(seq_len=seq_len),
        parallelism=SimpleNamespace(context_parallel_degree=1),
        variant=variant or Variant(),
    )


# -- identical to llama3 ---------------------------------------------------------------------------------------


def test_default_variant_is_llama3_bitwise():
    flavor = get_train_spec().model_args["debugmodel"]
    args = dataclasses.replace(flavor)
    args.update_from_config(job_config(Variant()))  # every key "flavor"
    ref_args = dataclasses.replace(llama3_args["debugmodel"])
    ref_args.max_seq_len = args.max_seq_len = 32
    ref, model = build(ref_args, seed=3, model_cls=Transformer), build(args, seed=3)
    ref_state, state = ref.state_dict(), model.state_dict()
    assert list(ref_state) == list(state)
    for name in ref_state:
        assert ref_state[name].shape == state[name].shape and torch.equal(ref_state[name], state[name]), name
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in model.named_parameters()]
    x = tokens()
    out_ref, out = ref(x), model(x)
    assert torch.equal(out_ref, out)
    out_ref.float().square().mean().backward()
    out.float().square().mean().backward()
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        assert torch.equal(p.grad, grads[name].grad), name


def test_flavor_choices_do_not_leak_between_jobs():
    args = dataclasses.replace(get_train_spec().model_args["debugmodel"])
    args.update_from_config(job_config(Variant(activation="relu", norm="layernorm")))
    assert (args.activation, args.norm) == ("relu", "layernorm")
    args.update_from_config(job_config(Variant()))
    assert args.is_llama3()


def test_gpt2_flavor():
    args = dataclasses.replace(get_train_spec().model_args["gpt2_debugmodel"])
    args.update_from_config(job_config())
    model = build(args)
    ffn = model.layers["0"].feed_forward
    assert isinstance(model.norm, torch.nn.LayerNorm) and isinstance(model.layers["0"].ffn_norm, torch.nn.LayerNorm)
    assert ffn.activation == "gelu" and not hasattr(ffn, "w3") and ffn.w1.out_features == 4 * args.dim
    assert model.pos_embeddings.weight.shape == (32, args.dim)
    # [variant] overrides a flavor choice: back to swiglu (gated, torchtitan's sizing)
    args.update_from_config(job_config(Variant(activation="swiglu")))
    assert build(args).layers["0"].feed_forward.w3.out_features == 768


# -- initialisation: llama3's on the llama3 flavors, GPT-2's on the gpt2_* flavors --------------------------------

# Variants whose parameters (every one torchtitan's llama3 also has) draw from the RNG in llama3's order, so with
# the same seed they must equal llama3's bitwise; norm = "none" drops the norm gains, which drew nothing.
LLAMA3_INIT_VARIANTS = [
    {},
    {"norm": "layernorm"},
    {"norm": "none"},
    {"norm_placement": "post"},
    {"norm_placement": "mixed", "mixed_post_layers": 2},
    {"activation": "geglu"},
    {"pos_encoding": "learned"},
    {"pos_encoding": "none"},
    {"activation": "geglu", "ffn_geometry": "weight_norm"},
    {"ffn_geometry": "spectral_norm", "spectral_iters": 2},
]


# every variant on debugmodel; another llama3 flavor (flex attention: the same init path) as it comes
LLAMA3_INIT_CASES = [("debugmodel", v) for v in LLAMA3_INIT_VARIANTS] + [("debugmodel_flex_attn", {})]


@pytest.mark.parametrize(
    "flavor, variant",
    LLAMA3_INIT_CASES,
    ids=[f + ":" + (",".join(f"{k}={x}" for k, x in v.items()) or "llama3") for f, v in LLAMA3_INIT_CASES],
)
def test_llama3_flavors_keep_torchtitans_init_bitwise(flavor, variant):
    args = VariantArgs.from_llama3(llama3_args[flavor], **variant)
    ref_args = dataclasses.replace(llama3_args[flavor])
    ref_args.max_seq_len = args.max_seq_len = 32
    ref = dict(build(ref_args, seed=5, model_cls=Transformer).named_parameters())
    ours = dict(build(args, seed=5).named_parameters())
    missing = set(ref) - set(ours)
    assert missing == ({n for n in ref if "norm" in n} if variant.get("norm") == "none" else set())
    for name in set(ref) & set(ours):
        assert torch.equal(ref[name], ours[name]), name


GPT2_INIT_VARIANTS = [
    {},
    {"activation": "relu"},
    {"activation": "leaky_relu"},
    {"activation": "learnable_leaky_relu"},
    {"activation": "learnable_leaky_relu", "learnable_slope": "global"},
    {"activation": "geglu"},
    {"activation": "swiglu"},
    {"norm": "none"},
    {"norm": "rmsnorm"},
    {"norm_placement": "post"},
    {"norm_placement": "mixed", "mixed_post_layers": 2},
    {"pos_encoding": "rope"},
    {"pos_encoding": "none"},
    {"ffn_multiplier": 2.0},
    {"ffn_geometry": "weight_norm"},
    {"ffn_geometry": "spectral_norm", "spectral_iters": 2},
]


def _gpt2_model(flavor, variant, seed=0):
    args = dataclasses.replace(get_train_spec().model_args[flavor])
    args.update_from_config(job_config(Variant(**variant), seq_len=64))
    return args, build(args, seed=seed)


def _assert_normal(name, value, std):
    """value looks like i.i.d. N(0, std) draws: mean, std and the share beyond 3 std (untruncated: 0.27%) each
    within 5 standard errors of their expectation for this many elements."""
    x = value.detach().double().flatten()
    n = x.numel()
    assert abs(x.mean().item()) < 5 * std / math.sqrt(n), (name, "mean", x.mean().item())
    # the standard error of a normal sample's std is std / sqrt(2 (n - 1))
    assert abs(x.std().item() - std) < 5 * std / math.sqrt(2 * (n - 1)), (name, "std", x.std().item(), std)
    tail, p = (x.abs() > 3 * std).double().mean().item(), 0.0027
    assert abs(tail - p) < 5 * math.sqrt(p * (1 - p) / n) + 1 / n, (name, "share beyond 3 std", tail)


# every variant on the small flavor; the experiments' flavor (8 blocks: another residual scale) as configured there
GPT2_INIT_CASES = [("gpt2_debugmodel", v) for v in GPT2_INIT_VARIANTS] + [
    ("gpt2_mini", {}),
    ("gpt2_mini", {"norm": "none"}),
]


@pytest.mark.parametrize(
    "flavor, variant",
    GPT2_INIT_CASES,
    ids=[f + ":" + (",".join(f"{k}={x}" for k, x in v.items()) or "gpt2") for f, v in GPT2_INIT_CASES],
)
def test_gpt2_flavors_initialise_as_gpt2(flavor, variant):
    """GPT-2's init (HF GPT2LMHeadModel, nanoGPT): every weight N(0, 0.02), the projections added into the
    residual stream (attention wo, FFN w2) N(0, 0.02 / sqrt(2 n_layers)), biases 0, norm weights 1; the
    variants' own parameters as the variant defines them."""
    args, model = _gpt2_model(flavor, variant)
    residual_std = 0.02 / math.sqrt(2 * args.n_layers)
    params = dict(model.named_parameters())
    norms = {
        f"{prefix}.{leaf}"
        for prefix, m in model.named_modules()
        if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))
        for leaf, _ in m.named_parameters(recurse=False)
    }
    assert bool(norms) == (args.norm != "none")
    for name, p in params.items():
        leaf = name.rsplit(".", 1)[-1]
        if name in norms:
            assert torch.equal(p, torch.ones_like(p) if leaf == "weight" else torch.zeros_like(p)), name
        elif leaf == "bias":
            assert torch.equal(p, torch.zeros_like(p)), name
        elif leaf == "leaky_slope":
            assert torch.equal(p, torch.full_like(p, args.leaky_slope)), name
        elif leaf == "weight_gain":  # weight_norm: the rows' norms, so the effective weight is the raw one
            assert torch.equal(p, torch.linalg.vector_norm(params[name[: -len("_gain")]], dim=-1)), name
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            _assert_normal(name, p, residual_std)
        elif leaf == "weight":
            _assert_normal(name, p, 0.02)
        else:
            raise AssertionError(f"{name}: no expected GPT-2 init for this parameter")
    assert model.tok_embeddings.weight is params["tok_embeddings.weight"]  # token embeddings were checked too
    assert ("pos_embeddings.weight" in params) == (args.pos_encoding == "learned")
    # the init is seeded: the same seed gives the same model
    _, again = _gpt2_model(flavor, variant)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


# -- activations -----------------------------------------------------------------------------------------------

ACTS = {
    "swiglu": lambda f, x: f.w2(F.silu(f.w1(x)) * f.w3(x)),
    "geglu": lambda f, x: f.w2(F.gelu(f.w1(x)) * f.w3(x)),
    "gelu": lambda f, x: f.w2(F.gelu(f.w1(x))),
    "relu": lambda f, x: f.w2(F.relu(f.w1(x))),
    "leaky_relu": lambda f, x: f.w2(F.leaky_relu(f.w1(x), 0.2)),
    "learnable_leaky_relu": lambda f, x: f.w2(F.leaky_relu(f.w1(x), 0.2)),
}


@pytest.mark.parametrize("activation", list(ACTS))
def test_activation_matches_functional(activation):
    args = small_args(
        activation=activation, leaky_slope=0.2, ffn_multiplier=3.0 if activation in ("gelu", "relu") else 4.0
    )
    model = build(args)
    ffn = model.layers["1"].feed_forward
    x = torch.randn(2, SEQ, args.dim)
    torch.testing.assert_close(ffn(x), ACTS[activation](ffn, x), rtol=0, atol=0)
    gated = activation in ("swiglu", "geglu")
    assert hasattr(ffn, "w3") == gated
    if not gated:
        expected = int((3.0 if activation in ("gelu", "relu") else 4.0) * args.dim)
        assert ffn.w1.out_features == ffn.w2.in_features == expected
    else:
        assert ffn.w1.out_features == 768  # torchtitan's llama3 sizing for dim 256


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_learnable_slope_learns_and_is_not_decayed(scope):
    model = build(small_args(activation="learnable_leaky_relu", learnable_slope=scope, leaky_slope=0.1))
    names = no_weight_decay(model)
    if scope == "layer":
        assert names == [f"layers.{i}.feed_forward.leaky_slope" for i in range(6)]
    else:
        assert names == ["leaky_slope"] and not any(
            "feed_forward.leaky_slope" in n for n, _ in model.named_parameters()
        )
    optimizers = _optimizers(model, weight_decay=0.1)
    inner = optimizers.optimizers[0]
    assert [g["weight_decay"] for g in inner.param_groups] == [0.1, 0.0]
    params = dict(model.named_parameters())
    assert {id(p) for p in inner.param_groups[1]["params"]} == {id(params[n]) for n in names}
    model(tokens()).float().square().mean().backward()
    assert params[names[0]].grad is not None and params[names[0]].grad.abs().item() > 0


# -- norms -----------------------------------------------------------------------------------------------------


def _block_io(model, layer, x):
    block = model.layers[str(layer)]
    return block, block(x, model.freqs_cis, None)


def test_post_norm_normalizes_after_the_residual_add():
    model = build(small_args(norm_placement="post"))
    x = torch.randn(2, SEQ, 256) * 3
    block, out = _block_io(model, 0, x)

    # by hand: h = norm(x + attn(x)); out = norm(h + ffn(h)), RMSNorm(v) = v / sqrt(mean(v^2) + eps) * weight
    def rms(v, norm):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight

    h = rms(x + block.attention(x, model.freqs_cis, None), block.attention_norm)
    want = rms(h + block.feed_forward(h), block.ffn_norm)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(2, SEQ), rtol=1e-4, atol=1e-4)
    # pre-norm keeps the residual stream unnormalized
    _, pre_out = _block_io(build(small_args()), 0, x)
    assert (pre_out.pow(2).mean(-1) - 1).abs().max() > 0.5


def test_mixed_switches_at_k():
    model = build(small_args(norm_placement="mixed", mixed_post_layers=2, norm="layernorm"))
    assert [model.layers[str(i)].post_norm for i in range(6)] == [True, True, False, False, False, False]
    x = torch.randn(2, SEQ, 256) * 3 + 1
    for layer in range(6):
        _, out = _block_io(model, layer, x)
        normalized = torch.allclose(out.mean(-1), torch.zeros(2, SEQ), atol=1e-4) and torch.allclose(
            out.var(-1, unbiased=False), torch.ones(2, SEQ), atol=1e-3
        )
        assert normalized == (layer < 2), layer


def test_norm_free_has_no_norm_parameters():
    model = build(small_args(norm="none"))
    assert not any("norm" in n for n, _ in model.named_parameters())
    x = torch.randn(2, SEQ, 256)
    block = model.layers["0"]
    h = x + block.attention(x, model.freqs_cis, None)
    torch.testing.assert_close(block(x, model.freqs_cis, None), h + block.feed_forward(h), rtol=0, atol=0)
    assert torch.isfinite(model(tokens())).all()


# -- FFN geometry ----------------------------------------------------------------------------------------------


def _ffn_linears(model):
    return [m for m in model.modules() if isinstance(m, FFNLinear)]


@pytest.mark.parametrize("iters", [0, 3])
def test_spectral_norm_top_singular_value_is_one(iters):
    model = build(small_args(ffn_geometry="spectral_norm", spectral_iters=iters, n_layers=2))
    linears = _ffn_linears(model)
    assert len(linears) == 6
    for linear in linears:
        top = torch.linalg.matrix_norm(linear.effective_weight().detach(), ord=2)
        assert top.item() == pytest.approx(1.0, abs=1e-4)
        assert abs(torch.linalg.matrix_norm(linear.weight.detach(), ord=2).item() - 1) > 0.05  # the raw weight's is not
    assert any(n.endswith("sn_u") for n, _ in model.named_buffers()) == (iters > 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(3):
        model(tokens()).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model(tokens())
    for linear in linears:
        top = torch.linalg.matrix_norm(linear.effective_weight().detach(), ord=2).item()
        # exact: 1 after any step; power iteration: a lagging estimate (documented), still close
        assert top == pytest.approx(1.0, abs=1e-4 if iters == 0 else 0.1)


def test_weight_norm_starts_at_the_flavor_init():
    model = build(small_args(ffn_geometry="weight_norm", activation="geglu"))
    for linear in _ffn_linears(model):
        torch.testing.assert_close(linear.effective_weight().detach(), linear.weight.detach(), rtol=1e-5, atol=1e-7)
    assert len(no_weight_decay(model)) == 18  # every FFN weight's gain


def _optimizers(model, weight_decay=0.0, lr=1e-2):
    def builder(parts, config, parallel_dims):
        return OptimizersContainer(parts, torch.optim.AdamW, {"lr": lr, "weight_decay": weight_decay})

    return build_variant_optimizers(builder)([model], None, None)


@pytest.mark.parametrize("geometry", ["hyperspherical", "ngpt"])
def test_unit_rows_after_an_optimizer_step(geometry):
    model = build(small_args(ffn_geometry=geometry))
    linears = _ffn_linears(model)
    for linear in linears:
        torch.testing.assert_close(linear.weight.norm(dim=-1), torch.ones(linear.out_features))
    optimizers = _optimizers(model, weight_decay=0.1)
    model(tokens()).float().square().mean().backward()
    before = [linear.weight.detach().clone() for linear in linears]
    optimizers.step()
    for linear, old in zip(linears, before):
        assert not torch.equal(linear.weight, old)  # the step moved it
        torch.testing.assert_close(linear.weight.norm(dim=-1), torch.ones(linear.out_features), rtol=1e-6, atol=1e-6)
    if geometry == "ngpt":
        gains = no_weight_decay(model)
        assert len(gains) == 12 and all(n.endswith(("w1.weight_gain", "w3.weight_gain")) for n in gains)
        assert optimizers.optimizers[0].param_groups[1]["weight_decay"] == 0.0


def test_ngpt_forward_by_hand():
    """nGPT's FFN: unit rows, s_v on the gate (w1) and s_u on w3, no further constant (the normalised block
    input already has norm sqrt(dim), the factor nGPT adds for its unit-norm inputs)."""
    model = build(small_args(ffn_geometry="ngpt", activation="geglu"))
    ffn = model.layers["1"].feed_forward
    with torch.no_grad():
        for linear in (ffn.w1, ffn.w3):
            linear.weight_gain.uniform_(0.5, 2.0)
    x = torch.nn.functional.rms_norm(torch.randn(2, SEQ, 256), (256,))
    unit = lambda w: w / w.norm(dim=-1, keepdim=True)  # noqa: E731
    gate = F.linear(x, unit(ffn.w1.weight)) * ffn.w1.weight_gain
    want = F.linear(F.gelu(gate) * (F.linear(x, unit(ffn.w3.weight)) * ffn.w3.weight_gain), unit(ffn.w2.weight))
    torch.testing.assert_close(ffn(x), want, rtol=1e-5, atol=1e-6)
    assert gate.abs().max() < 10  # pre-activations of order 1, not sqrt(dim) = 16 times that


def test_muon_gets_the_variant_rules_through_the_lr_scheduler_builder():
    """[optimizer] name = "Muon" replaces the whole optimizer builder (ours never runs); the LR scheduler builder
    applies the rules instead: gains in a weight_decay = 0 AdamW group, unit rows after every step, and no
    second application when our optimizer builder already ran."""
    from torchtitan.config.job_config import Optimizer

    from nerve_plugin.torchtitan.muon import MuonSection
    from nerve_plugin.torchtitan.muon import build_muon_optimizers
    from nerve_plugin.torchtitan.v0_2.variant_spec import build_variant_lr_schedulers

    model = build(small_args(ffn_geometry="ngpt", activation="learnable_leaky_relu", n_layers=2))
    container = build_muon_optimizers(
        [model],
        Optimizer(name="Muon", lr=1e-2, weight_decay=0.1),
        SimpleNamespace(tp_enabled=False),
        None,
        MuonSection(ns_dtype="float32"),
    )
    seen = []
    build_variant_lr_schedulers(
        lambda optimizers, *a: seen.append([len(o.param_groups) for o in optimizers.optimizers])
    )(container, None, 10)
    build_variant_lr_schedulers(lambda *a: None)(container, None, 10)  # once per container
    muon = container.optimizers[0]
    assert seen == [[3]] and len(muon.param_groups) == 3
    params = dict(model.named_parameters())
    gains = {id(params[n]) for n in no_weight_decay(model)}
    assert len(gains) == 2 * 2  # per block: w1's nGPT gain (non-gated: no w3) and the learned slope
    muon_group, adamw_group, exempt = muon.param_groups
    assert muon_group["use_muon"] and not adamw_group["use_muon"] and not exempt["use_muon"]
    assert {id(p) for p in exempt["params"]} == gains and exempt["weight_decay"] == 0.0
    assert adamw_group["weight_decay"] == 0.1 and not gains & {id(p) for p in adamw_group["params"]}
    assert exempt["betas"] == adamw_group["betas"] and exempt["lr"] == adamw_group["lr"]
    linears = _ffn_linears(model)
    assert all(id(m.weight) in {id(p) for p in muon_group["params"]} for m in linears)
    model(tokens()).float().square().mean().backward()
    before = [m.weight.detach().clone() for m in linears]
    container.step()
    for linear, old in zip(linears, before):
        assert not torch.equal(linear.weight, old)
        torch.testing.assert_close(linear.weight.norm(dim=-1), torch.ones(linear.out_features), rtol=1e-6, atol=1e-6)


def test_without_the_hook_rows_drift():
    """Guards the test above: a plain AdamW step does leave the unit sphere."""
    model = build(small_args(ffn_geometry="hyperspherical"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(tokens()).float().square().mean().backward()
    optimizer.step()
    w = model.layers["0"].feed_forward.w1.weight
    assert (w.norm(dim=-1) - 1).abs().max() > 1e-3


# -- positions -------------------------------------------------------------------------------------------------


def test_no_positions():
    model = build(small_args(pos_encoding="none"))
    assert model.pos_embeddings is None and not any("pos" in n for n, _ in model.named_parameters())
    assert torch.equal(model.freqs_cis, torch.ones_like(model.freqs_cis))
    rope = build(small_args())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in rope.named_parameters()]
    assert not torch.equal(rope.freqs_cis, model.freqs_cis)


def test_learned_positions():
    model = build(small_args(pos_encoding="learned"))
    assert model.pos_embeddings.weight.shape == (32, 256)
    assert torch.equal(model.freqs_cis, torch.ones_like(model.freqs_cis))
    x = tokens()
    out = model(x)
    # the embedding of position p reaches the output: by hand, tok + pos then the blocks
    h = model.tok_embeddings(x) + model.pos_embeddings.weight[:SEQ]
    for block in model.layers.values():
        h = block(h, model.freqs_cis, None)
    torch.testing.assert_close(out, model.output(model.norm(h)), rtol=0, atol=0)
    out.float().square().mean().backward()
    assert model.pos_embeddings.weight.grad[:SEQ].abs().sum() > 0


# -- NerVE taps ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [{}, {"activation": "relu", "ffn_multiplier": 2.0}, {"ffn_geometry": "ngpt"}])
def test_nerve_taps_see_the_nonlinearity(variant):
    model = build(small_args(**variant))
    taps = FFNTaps(model, BUILTIN_SPECS["llama3"]).attach()
    captured = {}
    ffn = model.layers["2"].feed_forward
    ffn.w1.register_forward_hook(lambda m, a, o: captured.__setitem__("pre", o.detach()))
    ffn.w2.register_forward_pre_hook(lambda m, a: captured.__setitem__("post", a[0].detach()))
    ffn.register_forward_pre_hook(lambda m, a: captured.__setitem__("in", a[0].detach()))
    with taps.capturing(1):
        model(tokens())
    assert taps.layers == list(range(6))
    hidden = ffn.w1.out_features
    for tap in ("pre", "post"):
        assert taps.stats[(2, tap)].dim == hidden and taps.stats[(2, tap)].count == 2 * SEQ
    gate = F.silu(captured["pre"]) if variant == {} else ffn.nonlinearity(captured["pre"])
    want_post = gate * ffn.w3(captured["in"]) if hasattr(ffn, "w3") else gate
    torch.testing.assert_close(captured["post"], want_post)
    for tap in ("pre", "post"):
        torch.testing.assert_close(
            taps.stats[(2, tap)].mean, captured[tap].reshape(-1, hidden).double().mean(0), rtol=1e-6, atol=1e-8
        )
    taps.remove()


# -- validation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("activation", "tanh", "'swiglu', 'geglu', 'gelu', 'relu', 'leaky_relu', 'learnable_leaky_relu'"),
        ("norm", "batchnorm", "'rmsnorm', 'layernorm', 'none'"),
        ("norm_placement", "sandwich", "'pre', 'post', 'mixed'"),
        ("ffn_geometry", "orthogonal", "'none', 'weight_norm', 'spectral_norm', 'hyperspherical', 'ngpt'"),
        ("pos_encoding", "alibi", "'rope', 'learned', 'none'"),
        ("learnable_slope", "head", "'layer', 'global'"),
        ("leaky_slope", 1.5, "[0, 1)"),
        ("leaky_slope", "0.1", "a number"),
        ("ffn_multiplier", -1.0, "0 (the flavor's) or a number > 0"),
        ("mixed_post_layers", 0, "an integer >= 1"),
        ("mixed_post_layers", True, "an integer >= 1"),
        ("spectral_iters", -1, "an integer >= 0"),
    ],
)
def test_bad_values_name_key_and_allowed(key, value, allowed):
    with pytest.raises(VariantConfigError) as info:
        Variant(**{key: value})
    message = str(info.value)
    assert message.startswith(f"[variant] {key} = {value!r} is not allowed: expected")
    assert allowed in message


def test_combinations_checked_against_the_flavor():
    args = dataclasses.replace(get_train_spec().model_args["debugmodel"])
    with pytest.raises(VariantConfigError, match=r"\[variant\] ffn_multiplier = 3.0 is not allowed: .*gated"):
        args.update_from_config(job_config(Variant(ffn_multiplier=3.0)))
    args.update_from_config(job_config(Variant(ffn_multiplier=3.0, activation="relu")))  # fine non-gated
    with pytest.raises(VariantConfigError, match=r"\[variant\] mixed_post_layers = 6 is not allowed: .*\[1, 5\]"):
        args.update_from_config(job_config(Variant(norm_placement="mixed", mixed_post_layers=6)))


def test_torchtitan_config_manager_reads_the_section(capsys):
    from torchtitan.config import ConfigManager

    config = ConfigManager().parse_args(
        [
            "--job.custom_config_module",
            "nerve_plugin.variants.config",
            "--variant.activation",
            "relu",
            "--variant.ffn_multiplier",
            "2",
        ]
    )
    assert config.variant.activation == "relu" and config.variant.ffn_multiplier == 2
    with pytest.raises(SystemExit):  # torchtitan's CLI (tyro) prints the error and exits
        ConfigManager().parse_args(
            ["--job.custom_config_module", "nerve_plugin.variants.config", "--variant.norm", "batch"]
        )
    assert "[variant] norm = 'batch' is not allowed" in " ".join(capsys.readouterr().err.split())


def _dims(tp=1, cp=1, pp=1):
    return SimpleNamespace(tp_enabled=tp > 1, cp_enabled=cp > 1, pp_enabled=pp > 1)


def _jc(compile=False):
    return SimpleNamespace(compile=SimpleNamespace(enable=compile, components=["model"]))


@pytest.mark.parametrize(
    "variant, dims, compile, message",
    [
        ({"activation": "relu"}, _dims(tp=2), False, "activation = 'relu' is not supported with tensor parallelism"),
        (
            {"ffn_geometry": "weight_norm"},
            _dims(tp=2),
            False,
            "ffn_geometry = 'weight_norm' is not supported with tensor",
        ),
        ({"pos_encoding": "learned"}, _dims(pp=2), False, "pos_encoding = 'learned' is not supported with pipeline"),
        ({"pos_encoding": "learned"}, _dims(cp=2), False, "pos_encoding = 'learned' is not supported with context"),
        (
            {"activation": "learnable_leaky_relu", "learnable_slope": "global"},
            _dims(pp=2),
            False,
            "learnable_slope = 'global' is not supported with pipeline",
        ),
        (
            {"ffn_geometry": "spectral_norm"},
            _dims(),
            True,
            "ffn_geometry = 'spectral_norm' is not supported with torch.compile",
        ),
    ],
)
def test_unsupported_parallelism_stops_at_start_up(variant, dims, compile, message):
    with pytest.raises(VariantParallelismError, match=r"\[variant\] " + message.replace("(", r"\(")):
        check_parallelism(small_args(**variant), dims, _jc(compile))
    check_parallelism(small_args(), _dims(tp=2, cp=2, pp=2), _jc(True))  # llama3 runs everywhere


# -- torchtitan's Trainer, 2 processes, FSDP, NerVE on (slow) ----------------------------------------------------

FSDP = {"parallelism": {"data_parallel_shard_degree": 2}}
TP = {"parallelism": {"data_parallel_shard_degree": 1, "tensor_parallel_degree": 2}}
PP = {
    "parallelism": {
        "data_parallel_shard_degree": 1,
        "pipeline_parallel_degree": 2,
        "pipeline_parallel_schedule": "1F1B",
        "pipeline_parallel_microbatch_size": 1,
    }
}
COMPILE = {"compile": {"enable": True, "backend": "aot_eager"}}  # inductor's C++ builds take minutes on CPU
MUON = {"optimizer": {"name": "Muon"}, "muon": {"ns_dtype": "float32"}}
AC_FULL = {"activation_checkpoint": {"mode": "full"}}
AC_OP = {"activation_checkpoint": {"mode": "selective", "selective_ac_option": "op"}}
# name: (flavor, [variant], layout, ranks of data parallelism, more of the job). Compile, AC (full and op-level
# selective) and Muon ride along with one run each rather than adding runs.
TT_VARIANTS = {
    # layernorm, gelu, learned positions, 4x width; torch.compile of the blocks, taps inside
    "fsdp_gpt2_compile": ("gpt2_debugmodel", {}, FSDP, 2, COMPILE),
    # Muon: the hyperspherical re-projection must still follow every optimizer step
    "fsdp_relu_hyperspherical_mixed_muon": (
        "debugmodel",
        {"activation": "relu", "ffn_geometry": "hyperspherical", "norm_placement": "mixed", "mixed_post_layers": 3},
        FSDP,
        2,
        MUON,
    ),
    # full AC: the SVD of the spectral norm and the model-wide slope are recomputed in backward
    "fsdp_global_slope_spectral_normfree_acfull": (
        "debugmodel",
        {
            "activation": "learnable_leaky_relu",
            "learnable_slope": "global",
            "ffn_geometry": "spectral_norm",
            "norm": "none",
            "pos_encoding": "none",
        },
        FSDP,
        2,
        AC_FULL,
    ),
    # op-level selective AC (saves matmul outputs by their order) with TP
    "tp_geglu_layernorm_acop": (
        "debugmodel",
        {"activation": "geglu", "norm": "layernorm", "pos_encoding": "none"},
        TP,
        1,
        AC_OP,
    ),
    "pp_layer_slope_post_layernorm": (
        "debugmodel",
        {"activation": "learnable_leaky_relu", "norm": "layernorm", "norm_placement": "post"},
        PP,
        1,
        {},
    ),
}


def variant_job(tmp_path, flavor, variant, layout, extra=None):
    from torchtitan_harness import base_config, merge

    return merge(
        merge(
            merge(
                base_config(tmp_path),
                {
                    "experimental": {"custom_import": "test_variants"},
                    "job": {"custom_config_module": "nerve_plugin.torchtitan.config"},
                    "model": {"name": TT_SPEC, "flavor": flavor},
                    "training": {"steps": 3, "local_batch_size": 2},
                    "optimizer": {"lr": 3e-3},
                    "nerve": {"enable": True, "log_freq": 1},
                    "variant": variant,
                },
            ),
            layout,
        ),
        extra or {},
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TT_VARIANTS))
def test_training_with_nerve(tmp_path, name):
    from torchtitan_harness import read_metrics, run_torchtitan

    flavor, variant, layout, dp, extra = TT_VARIANTS[name]
    cfg = variant_job(tmp_path, flavor, variant, layout, extra)
    proc = run_torchtitan(tmp_path, cfg, nproc=2, env={"NERVE_VARIANT_TT": "1"})
    losses = [r["loss"] for r in read_metrics(cfg)[1 if layout is PP else 0]]  # PP: the last stage logs
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
    records = [
        json.loads(line)
        for line in (Path(cfg["job"]["dump_folder"]) / "nerve" / "metrics.jsonl").read_text().splitlines()
    ]
    hidden = 1024 if flavor.startswith("gpt2") or variant.get("activation") in ("relu", "learnable_leaky_relu") else 768
    for step in (1, 2, 3):
        layers = {r["layer"]: r for r in records if r["step"] == step}
        assert sorted(layers) == list(range(6)), (step, sorted(layers))
        for record in layers.values():
            for tap in ("pre", "post"):
                assert record[tap]["dim"] == hidden and record[tap]["tokens"] == dp * 2 * 64
                assert math.isfinite(record[tap]["spectral_entropy"])
            assert math.isfinite(record["js"])
    # the extra settings took effect (each leaves its own trace in the log)
    if extra is COMPILE:
        assert "Compiling each TransformerBlock with torch.compile" in proc.stdout
    if extra is MUON:
        assert "with Muon" in proc.stdout
    if extra in (AC_FULL, AC_OP):
        assert f"Applied {extra['activation_checkpoint']['mode']} activation checkpointing" in proc.stdout
    if variant.get("ffn_geometry") == "hyperspherical":  # the step post-hook ran on FSDP shards, every step
        for rank in (0, 1):
            rows = [
                json.loads(line)
                for line in (Path(cfg["job"]["dump_folder"]) / f"rows_rank{rank}.jsonl").read_text().splitlines()
            ]
            assert [r["step"] for r in rows] == [1, 2, 3] and all(r["linears"] == 12 for r in rows)
            assert all(r["max_row_norm_error"] < 1e-5 for r in rows), rows


@pytest.mark.slow
def test_trainer_refuses_unsupported_parallelism_at_start_up(tmp_path):
    from torchtitan_harness import run_torchtitan

    cfg = variant_job(tmp_path, "gpt2_debugmodel", {}, PP)
    proc = run_torchtitan(tmp_path, cfg, nproc=2, env={"NERVE_VARIANT_TT": "1"}, check=False)
    assert proc.returncode != 0
    assert "[variant] pos_encoding = 'learned' is not supported with pipeline parallelism" in proc.stdout
