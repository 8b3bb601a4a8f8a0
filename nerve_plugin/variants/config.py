"""The ``[variant]`` TOML section: the model variants of the NerVE paper, for ``model.name = "nerve_llama"``.

    [model]
    name = "nerve_llama"
    flavor = "debugmodel"          # torchtitan's llama3 flavors, or gpt2_* (see train_spec.py)

    [variant]
    activation = "relu"
    ffn_multiplier = 4.0

Every key defaults to ``"flavor"`` (or 0 for numbers): keep what the flavor says. On the llama3 flavors that is
swiglu, rmsnorm, pre-norm, no FFN geometry, RoPE: with nothing set the model is torchtitan's llama3, bitwise.
Values are checked when torchtitan builds its config, so a bad one stops the run at start-up, naming the key and
what is allowed; combinations that need the flavor (e.g. ``ffn_multiplier`` with a gated FFN) are checked when
the model args are built.
"""

# No `from __future__ import annotations` here: torchtitan merges config dataclasses by their real field types.

from dataclasses import dataclass, field

from nerve_plugin.config_checks import SectionChecks

FLAVOR = "flavor"  # keep the flavor's choice

GATED_ACTIVATIONS = ("swiglu", "geglu")
PLAIN_ACTIVATIONS = ("gelu", "relu", "leaky_relu", "learnable_leaky_relu")
ACTIVATIONS = GATED_ACTIVATIONS + PLAIN_ACTIVATIONS
SLOPE_SCOPES = ("layer", "global")
NORMS = ("rmsnorm", "layernorm", "none")
NORM_PLACEMENTS = ("pre", "post", "mixed")
FFN_GEOMETRIES = ("none", "weight_norm", "spectral_norm", "hyperspherical", "ngpt")
POS_ENCODINGS = ("rope", "learned", "none")


class VariantConfigError(ValueError):
    pass


@dataclass
class Variant:
    activation: str = FLAVOR
    """FFN nonlinearity: gated "swiglu" (llama3) or "geglu" (w2(act(w1 x) * w3 x)); non-gated "gelu", "relu",
    "leaky_relu" (slope leaky_slope), "learnable_leaky_relu" (a learned slope, initialised to leaky_slope, per
    layer or global: learnable_slope) (w2(act(w1 x)), no w3)."""

    leaky_slope: float = 0.01
    """Negative slope of leaky_relu, and the initial slope of learnable_leaky_relu."""

    learnable_slope: str = "layer"
    """learnable_leaky_relu only: one slope per layer ("layer") or one for the whole model ("global")."""

    ffn_multiplier: float = 0.0
    """Non-gated FFNs: hidden size = ffn_multiplier x dim (0: the flavor's, 4 on every flavor). Gated FFNs keep
    torchtitan's llama3 sizing (ffn_dim_multiplier, multiple_of); setting it with them is an error."""

    norm: str = FLAVOR
    """"rmsnorm" (llama3), "layernorm" (with bias, GPT-2) or "none" (norm-free: the norms become identities)."""

    norm_placement: str = FLAVOR
    """"pre" (x + f(norm(x))), "post" (norm(x + f(x))) or "mixed" (the first mixed_post_layers blocks post, the
    rest pre). The final norm before the output projection is kept in every placement."""

    mixed_post_layers: int = 1
    """norm_placement = "mixed": how many leading blocks are post-norm (1 .. n_layers - 1)."""

    ffn_geometry: str = FLAVOR
    """Constraint on the FFN weights (w1, w2, w3): "none"; "weight_norm" (W = g * V / |V_row|, g initialised to
    the row norms, so the initial W is the flavor's); "spectral_norm" (W / sigma_max(W), see spectral_iters);
    "hyperspherical" (rows re-projected to unit norm at init and after every optimizer step); "ngpt"
    (hyperspherical plus nGPT's learned per-channel scalings: see model.py)."""

    spectral_iters: int = 0
    """ffn_geometry = "spectral_norm": 0 divides by the exact largest singular value every forward (an SVD per
    FFN weight); n > 0 estimates it with n power-iteration steps per training forward (cheaper, lags behind
    fast-moving weights)."""

    pos_encoding: str = FLAVOR
    """"rope" (llama3), "learned" (absolute position embeddings added to the token embeddings, GPT-2) or "none"."""

    def __post_init__(self):
        check = SectionChecks("variant", VariantConfigError)
        check.choice("activation", self.activation, (FLAVOR, *ACTIVATIONS))
        check.number("leaky_slope", self.leaky_slope, "a number in [0, 1)", lambda v: 0 <= v < 1)
        check.choice("learnable_slope", self.learnable_slope, SLOPE_SCOPES)
        check.number("ffn_multiplier", self.ffn_multiplier, "0 (the flavor's) or a number > 0", lambda v: v >= 0)
        check.choice("norm", self.norm, (FLAVOR, *NORMS))
        check.choice("norm_placement", self.norm_placement, (FLAVOR, *NORM_PLACEMENTS))
        check.integer(
            "mixed_post_layers", self.mixed_post_layers, "an integer >= 1 (and < model.n_layers)", lambda v: v >= 1
        )
        check.choice("ffn_geometry", self.ffn_geometry, (FLAVOR, *FFN_GEOMETRIES))
        check.integer(
            "spectral_iters",
            self.spectral_iters,
            "an integer >= 0 (0: the exact sigma every forward)",
            lambda v: v >= 0,
        )
        check.choice("pos_encoding", self.pos_encoding, (FLAVOR, *POS_ENCODINGS))

    def overrides(self) -> dict:
        """The model-arg values this section sets (keys left at "flavor" / 0 are omitted)."""
        out = {
            k: getattr(self, k)
            for k in ("activation", "norm", "norm_placement", "ffn_geometry", "pos_encoding")
            if getattr(self, k) != FLAVOR
        }
        if self.ffn_multiplier:
            out["ffn_multiplier"] = float(self.ffn_multiplier)
        out["leaky_slope"] = float(self.leaky_slope)
        out["learnable_slope"] = self.learnable_slope
        out["mixed_post_layers"] = self.mixed_post_layers
        out["spectral_iters"] = self.spectral_iters
        return out


@dataclass
class JobConfig:
    variant: Variant = field(default_factory=Variant)
