"""The NerVE paper's model variants, derived from torchtitan 0.2.2's llama3 Transformer.

``VariantArgs`` extends llama3's ``TransformerModelArgs`` with the variant keys (see
nerve_plugin/variants/config.py for their meaning); ``VariantTransformer`` builds torchtitan's llama3 and swaps
in what a key changes. With every key at its llama3 value, no module is swapped and every forward is
torchtitan's own: the same parameter names, shapes, initialisation and outputs, bitwise.

FFN module names are kept so NerVE's taps work: the pre-activation is the output of ``feed_forward.w1`` (the
gate projection of gated FFNs), the post-activation the input of ``feed_forward.w2``. Non-gated FFNs have no w3.

What each option builds:

- activation: swiglu (torchtitan's FeedForward), geglu = w2(gelu(w1 x) * w3 x) (exact, erf GELU); gelu (exact),
  relu, leaky_relu = w2(act(w1 x)). learnable_leaky_relu: F.prelu with a one-element slope, a parameter
  ``feed_forward.leaky_slope`` per layer or ``leaky_slope`` on the model (learnable_slope = "global"),
  initialised to leaky_slope. Non-gated hidden size: int(ffn_multiplier * dim); w1 init std 0.02, w2 the
  block's init std (torchtitan's rule for w1 and w2).
- norm: rmsnorm (nn.RMSNorm), layernorm (nn.LayerNorm, with bias), none (``NoNorm``, an identity: norm-free
  models carry no norm gains at all). The final norm follows the same choice.
- norm_placement: pre, post = norm(x + attention(x)) then norm(h + ffn(h)) (attention_norm and ffn_norm
  after each residual add), mixed: blocks 0 .. mixed_post_layers - 1 post, the rest pre.
- ffn_geometry (on w1, w2, w3; the weight keeps its name ``weight``):
  weight_norm: W = weight_gain[:, None] * V / |V_row|, gains initialised to the initial row norms (torch's
  weight_norm convention, so the initial effective weight is llama3's).
  spectral_norm: W / sigma_max(W). With spectral_iters = 0 (default) sigma is exact, the matrix 2-norm of
  every forward (an SVD per FFN weight and forward, differentiable): one power-iteration step per step, as
  torch's spectral_norm does, lags behind AdamW's updates by several percent within a few steps. With
  spectral_iters = n > 0, sigma = u^T W v from buffers ``sn_u``, ``sn_v`` (exact top singular vectors from an
  SVD at init) refined by n power-iteration steps per training forward (not in activation-checkpoint
  recomputation, which so sees the same u, v); gradients flow through sigma with u, v held fixed.
  hyperspherical: every FFN weight row has unit L2 norm, projected at init and after every optimizer step (a
  step post-hook, see train_spec.py).
  ngpt: the FFN of nGPT (Loshchilov et al. 2024, sec. 2.4): hyperspherical rows plus learned per-channel
  scalings s_v on w1 (applied inside w1, so the tap sees the scaled pre-activation) and s_u on w3 (gated FFNs),
  both ``weight_gain`` initialised to 1. nGPT multiplies s_v by sqrt(dim) because its block inputs have unit
  norm; here they are RMS/LayerNorm-normalised (norm sqrt(dim)), which already carries that factor, so
  s_v W1 x starts at nGPT's scale. (With the extra sqrt(dim) a norm-free model's residual stream grows ~10x per
  block: loss 5e9 at step 1, then NaN in bf16.) The rest of nGPT (normalised residual updates with eigen
  learning rates, normalised attention and embeddings, logit scaling) is NOT implemented.
- pos_encoding: rope; learned = ``pos_embeddings`` (max_seq_len x dim, init N(0, 0.02)) added to the token
  embeddings; none. With learned and none the RoPE table is all ones, so torchtitan's attention rotates by 1
  (an exact identity) and stays unchanged.

- weight_init (a flavor attribute, not a [variant] key): "llama3" (torchtitan's: token embeddings N(0, 1), wq/wk/wv
  and w1 N(0, 0.02), wo/w2/w3 0.02 / sqrt(2 (layer + 1)) with depth_init, the output head dim^-0.5 truncated at
  3 std) or "gpt2" (the gpt2_* flavors; GPT-2's init as HF GPT2LMHeadModel, nanoGPT and the NerVE paper's
  experiments use it: every weight, token embeddings and the output head included, N(0, 0.02); the two
  projections added into the residual stream, attention wo and FFN w2, N(0, 0.02 / sqrt(2 n_layers)); learned
  positions N(0, 0.02); norm weights 1, biases 0; w3 of a gated FFN is an input projection, 0.02). The
  variants' own parameters follow their rule under both (weight_norm gains = the rows' norms, spectral_norm
  vectors, hyperspherical projection, leaky slopes). The init matters for what NerVE measures: in issue 15's
  runs, a norm-free GELU model with llama3's std-1 token embeddings did not show the paper's "spectral inertia".

Gains that should not be weight-decayed (``weight_gain``, ``leaky_slope``) are listed by ``no_weight_decay``;
the TrainSpec's optimizer builder puts them in a group with weight_decay = 0 (AdamW/Adam only).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torchtitan.models.llama3 import Transformer, TransformerModelArgs
from torchtitan.models.llama3.model.model import FeedForward, TransformerBlock
from torchtitan.models.utils import trunc_normal_

from nerve_plugin.config_checks import SectionChecks

from nerve_plugin.variants.config import (
    ACTIVATIONS,
    FFN_GEOMETRIES,
    GATED_ACTIVATIONS,
    NORM_PLACEMENTS,
    NORMS,
    POS_ENCODINGS,
    SLOPE_SCOPES,
    VariantConfigError,
)

VARIANT_KEYS = (
    "activation",
    "leaky_slope",
    "learnable_slope",
    "ffn_multiplier",
    "norm",
    "norm_placement",
    "mixed_post_layers",
    "ffn_geometry",
    "spectral_iters",
    "pos_encoding",
)
NO_WEIGHT_DECAY_NAMES = ("weight_gain", "leaky_slope")
WEIGHT_INITS = ("llama3", "gpt2")
GPT2_INIT_STD = 0.02  # GPT-2's initializer_range


@dataclass
class VariantArgs(TransformerModelArgs):
    activation: str = "swiglu"
    leaky_slope: float = 0.01
    learnable_slope: str = "layer"
    ffn_multiplier: float = 4.0
    norm: str = "rmsnorm"
    norm_placement: str = "pre"
    mixed_post_layers: int = 1
    ffn_geometry: str = "none"
    spectral_iters: int = 0
    pos_encoding: str = "rope"
    # Not a [variant] key: the flavor's (gpt2_* flavors: "gpt2"), so a job's init follows its flavor.
    weight_init: str = "llama3"

    def __post_init__(self):
        # The flavor's own choices: update_from_config starts from them, so that a second job built in the same
        # process does not inherit the first one's [variant] (torchtitan mutates the flavor's args in place).
        object.__setattr__(self, "_flavor_variant", {k: getattr(self, k) for k in VARIANT_KEYS})

    @classmethod
    def from_llama3(cls, args: TransformerModelArgs, **variant) -> "VariantArgs":
        base = {f.name: copy.deepcopy(getattr(args, f.name)) for f in dataclasses.fields(args)}
        return cls(**{**base, **variant})

    def update_from_config(self, job_config, **kwargs) -> None:
        super().update_from_config(job_config, **kwargs)
        for key, value in self._flavor_variant.items():
            setattr(self, key, value)
        section = getattr(job_config, "variant", None)
        if section is not None:
            for key, value in section.overrides().items():
                setattr(self, key, value)
        self.validate()

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    def is_llama3(self) -> bool:
        return (
            self.activation == "swiglu"
            and self.norm == "rmsnorm"
            and self.norm_placement == "pre"
            and self.ffn_geometry == "none"
            and self.pos_encoding == "rope"
        )

    def validate(self) -> None:
        check = SectionChecks("variant", VariantConfigError)
        for key, allowed in (
            ("activation", ACTIVATIONS),
            ("learnable_slope", SLOPE_SCOPES),
            ("norm", NORMS),
            ("norm_placement", NORM_PLACEMENTS),
            ("ffn_geometry", FFN_GEOMETRIES),
            ("pos_encoding", POS_ENCODINGS),
        ):
            check.choice(key, getattr(self, key), allowed)
        if self.weight_init not in WEIGHT_INITS:  # set in code only (a flavor's), hence not a [variant] message
            raise VariantConfigError(
                f"VariantArgs.weight_init = {self.weight_init!r} is not allowed: expected one "
                f"of {', '.join(map(repr, WEIGHT_INITS))}"
            )
        flavor_multiplier = self._flavor_variant["ffn_multiplier"]
        if self.gated and self.ffn_multiplier != flavor_multiplier:
            check.fail(
                "ffn_multiplier",
                self.ffn_multiplier,
                f"0 (the flavor's sizing) with the gated activation {self.activation!r}: gated FFNs keep "
                "torchtitan's llama3 sizing (ffn_dim_multiplier, multiple_of)",
            )
        if self.ffn_multiplier <= 0:
            check.fail("ffn_multiplier", self.ffn_multiplier, "a number > 0")
        check.integer(
            "spectral_iters", self.spectral_iters, "an integer >= 0 (0: exact sigma every forward)", lambda v: v >= 0
        )
        if self.norm_placement == "mixed" and not 1 <= self.mixed_post_layers < self.n_layers:
            check.fail(
                "mixed_post_layers",
                self.mixed_post_layers,
                f"an integer in [1, {self.n_layers - 1}] (n_layers = {self.n_layers}) with norm_placement = 'mixed'",
            )


class NoNorm(nn.Identity):
    """norm = "none": an identity with the norm interface torchtitan's init calls."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def reset_parameters(self) -> None:
        pass


def make_norm(args: VariantArgs) -> nn.Module:
    if args.norm == "rmsnorm":
        return nn.RMSNorm(args.dim, eps=args.norm_eps)
    if args.norm == "layernorm":
        return nn.LayerNorm(args.dim, eps=args.norm_eps)
    return NoNorm()


def _local_rows(weight: torch.Tensor) -> torch.Tensor:
    """The tensor whose rows are whole rows of ``weight``: the local shard under FSDP (Shard(0)) or replication."""
    if isinstance(weight, DTensor):
        if any(
            not isinstance(p, (Shard, Replicate)) or (isinstance(p, Shard) and p.dim != 0) for p in weight.placements
        ):
            raise RuntimeError(f"[variant] ffn_geometry needs whole weight rows on each rank, got {weight.placements}")
        return weight.to_local()
    return weight


def _full(weight: torch.Tensor) -> torch.Tensor:
    return weight.full_tensor() if isinstance(weight, DTensor) else weight


class FFNLinear(nn.Linear):
    """A bias-free Linear whose effective weight follows an ffn_geometry. ``weight`` keeps its name and shape."""

    def __init__(self, in_features: int, out_features: int, geometry: str, gain: bool = False, spectral_iters: int = 0):
        super().__init__(in_features, out_features, bias=False)
        self.geometry = geometry
        self.spectral_iters = spectral_iters
        if geometry == "weight_norm" or gain:
            self.weight_gain = nn.Parameter(torch.ones(out_features))
        if geometry == "spectral_norm" and spectral_iters > 0:
            self.register_buffer("sn_u", torch.zeros(out_features))
            self.register_buffer("sn_v", torch.zeros(in_features))

    @torch.no_grad()
    def init_geometry(self) -> None:
        """After the weight's own init: set gains, power-iteration vectors or unit rows."""
        if self.geometry == "weight_norm":
            # Under FSDP both are Shard(0) over the same rows: each rank sets its own gains.
            gain = self.weight_gain.to_local() if isinstance(self.weight_gain, DTensor) else self.weight_gain
            gain.copy_(torch.linalg.vector_norm(_local_rows(self.weight), dim=-1))
        elif self.geometry == "spectral_norm" and self.spectral_iters > 0:
            # Exact top singular vectors to start from (one SVD per weight, at init only); the forwards then
            # track them with one power-iteration step each.
            weight = _full(self.weight).float()
            left, _, right_t = torch.linalg.svd(weight, full_matrices=False)
            u, v = left[:, 0], right_t[0]
            self.sn_u.copy_(u)
            self.sn_v.copy_(v)
        elif hasattr(self, "weight_gain"):
            self.weight_gain.fill_(1.0)
        if self.geometry in ("hyperspherical", "ngpt"):
            self.project_rows()

    @torch.no_grad()
    def project_rows(self) -> None:
        rows = _local_rows(self.weight)
        rows.div_(torch.linalg.vector_norm(rows, dim=-1, keepdim=True).clamp_min(1e-12))

    def effective_weight(self) -> torch.Tensor:
        weight = self.weight
        if self.geometry == "weight_norm":
            return self.weight_gain.unsqueeze(1) * weight / torch.linalg.vector_norm(weight, dim=-1, keepdim=True)
        if self.geometry == "spectral_norm":
            if self.spectral_iters == 0:
                return weight / torch.linalg.matrix_norm(weight.float(), ord=2).to(weight.dtype)
            # Power-iteration steps per training forward; activation checkpointing's recomputation (inside
            # backward) reuses the vectors the forward used.
            if self.training and torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
                with torch.no_grad():
                    u = self.sn_u
                    for _ in range(self.spectral_iters):
                        v = F.normalize(weight.t().float() @ u, dim=0)
                        u = F.normalize(weight.float() @ v, dim=0)
                    self.sn_v.copy_(v)
                    self.sn_u.copy_(u)
            sigma = torch.dot(self.sn_u.to(weight.dtype), weight @ self.sn_v.to(weight.dtype))
            return weight / sigma
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.effective_weight())
        if self.geometry == "ngpt" and hasattr(self, "weight_gain"):
            out = out * self.weight_gain
        return out


class VariantFeedForward(FeedForward):
    """torchtitan's FeedForward for swiglu; otherwise act(w1 x) [* w3 x] -> w2, with the same module names."""

    def __init__(self, args: VariantArgs, root: "VariantTransformer | None" = None):
        if args.gated:
            super().__init__(
                dim=args.dim,
                hidden_dim=4 * args.dim,
                multiple_of=args.multiple_of,
                ffn_dim_multiplier=args.ffn_dim_multiplier,
            )
            hidden = self.w1.out_features
        else:
            nn.Module.__init__(self)
            hidden = int(args.ffn_multiplier * args.dim)
        self.activation = args.activation
        self.gated = args.gated
        self.geometry = args.ffn_geometry
        self.negative_slope = args.leaky_slope
        if self.geometry != "none" or not self.gated:
            ngpt = self.geometry == "ngpt"
            iters = args.spectral_iters
            self.w1 = FFNLinear(args.dim, hidden, self.geometry, gain=ngpt, spectral_iters=iters)
            self.w2 = FFNLinear(hidden, args.dim, self.geometry, spectral_iters=iters)
            if self.gated:
                self.w3 = FFNLinear(args.dim, hidden, self.geometry, gain=ngpt, spectral_iters=iters)
        # learnable_leaky_relu: the slope is this layer's, or the model's (global); the model is held outside
        # the module tree, so the parameter has one owner.
        self._root = [root] if root is not None else []
        if args.activation == "learnable_leaky_relu" and args.learnable_slope == "layer":
            self.leaky_slope = nn.Parameter(torch.full((1,), float(args.leaky_slope)))

    def nonlinearity(self, pre: torch.Tensor) -> torch.Tensor:
        match self.activation:
            case "swiglu":
                return F.silu(pre)
            case "geglu" | "gelu":
                return F.gelu(pre)
            case "relu":
                return F.relu(pre)
            case "leaky_relu":
                return F.leaky_relu(pre, self.negative_slope)
            case "learnable_leaky_relu":
                slope = self._root[0].leaky_slope if self._root else self.leaky_slope
                return F.prelu(pre, slope.to(pre.dtype))
        raise ValueError(self.activation)

    def forward(self, x):
        if self.activation == "swiglu" and self.geometry == "none":
            return super().forward(x)
        hidden = self.nonlinearity(self.w1(x))
        if self.gated:
            hidden = hidden * self.w3(x)
        return self.w2(hidden)

    def init_weights(self, init_std: float):
        trunc_normal_(self.w1.weight, mean=0.0, std=0.02)
        for linear in (self.w2, self.w3) if self.gated else (self.w2,):
            trunc_normal_(linear.weight, mean=0.0, std=init_std)
        self.init_variant_parameters()

    def init_variant_parameters(self) -> None:
        """What the variant adds after the weights are drawn (either init scheme): slope, gains, unit rows."""
        if hasattr(self, "leaky_slope"):
            with torch.no_grad():
                self.leaky_slope.fill_(self.negative_slope)
        for linear in self.linears():
            if isinstance(linear, FFNLinear):
                linear.init_geometry()

    def linears(self) -> list[nn.Linear]:
        return [self.w1, self.w2, self.w3] if self.gated else [self.w1, self.w2]


class VariantBlock(TransformerBlock):
    def __init__(self, layer_id: int, args: VariantArgs, root: "VariantTransformer | None" = None):
        super().__init__(layer_id, args)
        if not (args.activation == "swiglu" and args.ffn_geometry == "none"):
            self.feed_forward = VariantFeedForward(args, root)
        if args.norm != "rmsnorm":
            self.attention_norm = make_norm(args)
            self.ffn_norm = make_norm(args)
        self.post_norm = args.norm_placement == "post" or (
            args.norm_placement == "mixed" and layer_id < args.mixed_post_layers
        )

    def forward(self, x, freqs_cis, attention_masks, positions=None):
        if not self.post_norm:
            return super().forward(x, freqs_cis, attention_masks, positions)
        h = self.attention_norm(x + self.attention(x, freqs_cis, attention_masks, positions))
        return self.ffn_norm(h + self.feed_forward(h))

    def init_weights(self):
        for norm in (self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        self.attention.init_weights(self.weight_init_std)
        self.feed_forward.init_weights(self.weight_init_std)

    def init_gpt2_weights(self, residual_std: float) -> None:
        """GPT-2's init (weight_init = "gpt2"): plain N(0, 0.02) weights; wo and w2 (their outputs are added into
        the residual stream) N(0, residual_std); norms weight 1, bias 0. Also for torchtitan's own FeedForward
        (swiglu): its w3 is an input projection, 0.02 as in GPT-2, not llama3's init_std."""
        for norm in (self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        attention, ffn = self.attention, self.feed_forward
        for linear in (attention.wq, attention.wk, attention.wv, ffn.w1, getattr(ffn, "w3", None)):
            if linear is not None:
                nn.init.normal_(linear.weight, mean=0.0, std=GPT2_INIT_STD)
        for linear in (attention.wo, ffn.w2):
            nn.init.normal_(linear.weight, mean=0.0, std=residual_std)
        if isinstance(ffn, VariantFeedForward):
            ffn.init_variant_parameters()


class VariantTransformer(Transformer):
    """torchtitan's llama3 Transformer with the blocks, norms and positions of a ``VariantArgs``."""

    def __init__(self, model_args: VariantArgs):
        if not isinstance(model_args, VariantArgs):
            model_args = VariantArgs.from_llama3(model_args)
        model_args.validate()
        super().__init__(model_args)
        global_slope = model_args.activation == "learnable_leaky_relu" and model_args.learnable_slope == "global"
        # Replaced in place: the ModuleDict keeps llama3's names and order.
        for layer_id in range(model_args.n_layers):
            self.layers[str(layer_id)] = VariantBlock(layer_id, model_args, self if global_slope else None)
        if model_args.norm != "rmsnorm":
            self.norm = make_norm(model_args)
        if model_args.pos_encoding == "learned":
            self.pos_embeddings = nn.Embedding(model_args.max_seq_len, model_args.dim)
        else:
            self.pos_embeddings = None
        if global_slope:
            self.leaky_slope = nn.Parameter(torch.full((1,), float(model_args.leaky_slope)))

    def _precompute_freqs_cis(self) -> torch.Tensor:
        freqs_cis = super()._precompute_freqs_cis()
        if self.model_args.pos_encoding != "rope":
            freqs_cis = torch.ones_like(freqs_cis)  # a rotation by 1: the attention's RoPE is an exact no-op
        return freqs_cis

    def init_weights(self, buffer_device: torch.device | None = None):
        if self.model_args.weight_init == "gpt2":
            self._init_gpt2_weights(buffer_device)
        else:
            super().init_weights(buffer_device=buffer_device)
        with torch.no_grad():
            if self.pos_embeddings is not None:
                nn.init.normal_(self.pos_embeddings.weight, mean=0.0, std=0.02)
            if getattr(self, "leaky_slope", None) is not None:
                self.leaky_slope.fill_(self.model_args.leaky_slope)

    def _init_gpt2_weights(self, buffer_device: torch.device | None) -> None:
        """llama3's init_weights with GPT-2's distributions (see VariantBlock.init_gpt2_weights); the parts are
        None on pipeline stages that do not hold them, as in torchtitan's. The residual scale counts every block
        of the model (model_args.n_layers), not those of this stage."""
        buffer_device = buffer_device or self.freqs_cis.device
        with torch.device(buffer_device):  # the RoPE table, recomputed as torchtitan's init_weights does
            self.freqs_cis = self._precompute_freqs_cis()
        residual_std = GPT2_INIT_STD / math.sqrt(2 * self.model_args.n_layers)
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=GPT2_INIT_STD)
        for layer in self.layers.values():
            if layer is not None:
                layer.init_gpt2_weights(residual_std)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None:  # untied here; GPT-2 ties it to the token embeddings' N(0, 0.02)
            nn.init.normal_(self.output.weight, mean=0.0, std=GPT2_INIT_STD)

    def forward(self, tokens, attention_masks=None, positions=None):
        if self.pos_embeddings is None:
            return super().forward(tokens, attention_masks, positions)
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        index = positions if positions is not None else torch.arange(tokens.shape[1], device=tokens.device)
        h = h + self.pos_embeddings(index)
        for layer in self.layers.values():
            h = layer(h, self.freqs_cis, attention_masks=attention_masks, positions=positions)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h


def no_weight_decay(model: nn.Module) -> list[str]:
    """Names of the variant's gains (weight-norm / nGPT gains, learned leaky-ReLU slopes)."""
    return [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in NO_WEIGHT_DECAY_NAMES]


def hyperspherical_linears(model: nn.Module) -> list[FFNLinear]:
    return [m for m in model.modules() if isinstance(m, FFNLinear) and m.geometry in ("hyperspherical", "ngpt")]


def project_hyperspherical(model_parts) -> None:
    """Unit-norm rows for every hyperspherical / ngpt FFN weight (the optimizer step post-hook)."""
    for part in model_parts:
        for linear in hyperspherical_linears(part):
            linear.project_rows()
