"""The ``[nerve]`` TOML section, merged into torchtitan's JobConfig through ``[job] custom_config_module``.

    [job]
    custom_config_module = "nerve_plugin.torchtitan.config"

    [nerve]
    enable = true

Every value is checked when the config is built, on every rank alike and before any collective, so a bad value
stops the run at start-up with the key, the value and what is allowed.
"""

# No `from __future__ import annotations` here: torchtitan merges config dataclasses by their real field types.

from dataclasses import dataclass, field

from nerve_plugin.monitor import EIGEN_SOLVE_PLACEMENTS
from nerve_plugin.taps import BUILTIN_SPECS, TAPS
from nerve_plugin.torchtitan.muon import Muon
from nerve_plugin.variants.config import Variant

OUTPUTS = ("tensorboard", "jsonl")
SPECS = ("auto", *BUILTIN_SPECS)


class NerveConfigError(ValueError):
    pass


@dataclass
class Nerve:
    enable: bool = False
    """Measure the FFN eigen-spectra. When false, nothing is hooked and training runs exactly as without nerve."""

    log_freq: int = 100
    """Measure every log_freq steps (and at step 1), like torchtitan's metrics.log_freq."""

    taps: list[str] = field(default_factory=lambda: list(TAPS))
    """Which activations: "pre" (the nonlinearity's input) and/or "post" (W_down's input). JS needs both."""

    layers: list[int] = field(default_factory=list)
    """Global indices of the blocks to measure; empty means every block."""

    tokens_per_rank: int = 0
    """Token budget per rank and logging step, sub-sampled evenly over its forwards; 0 keeps every token."""

    eigen_solve: str = "rank0"
    """Where the float64 eigen-solves run: "rank0" (the first rank of each pipeline stage) or "spread" (each
    covariance is reduced to, and solved on, its own rank; results are gathered to the logging rank)."""

    outputs: list[str] = field(default_factory=lambda: list(OUTPUTS))
    """Where metrics go: "tensorboard" (torchtitan's own run, needs metrics.enable_tensorboard) and "jsonl"
    (<dump_folder>/nerve/metrics.jsonl, one record per step and layer)."""

    spec: str = "auto"
    """Where the FFN taps are: "auto" picks the built-in spec of model.name."""

    seed: int = 0
    """Seed of the token sub-sampling."""

    def __post_init__(self):
        _check_type("enable", self.enable, bool)
        _check_type("log_freq", self.log_freq, int)
        if self.log_freq < 1:
            _fail("log_freq", self.log_freq, "an integer >= 1")
        _check_list("taps", self.taps, TAPS)
        if len(set(self.taps)) != len(self.taps):
            _fail("taps", self.taps, f"distinct values from {list(TAPS)}")
        if not isinstance(self.layers, list) or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.layers):
            _fail("layers", self.layers, "a list of layer indices >= 0 (empty for all layers)")
        _check_type("tokens_per_rank", self.tokens_per_rank, int)
        if self.tokens_per_rank < 0 or self.tokens_per_rank == 1:
            _fail("tokens_per_rank", self.tokens_per_rank, "0 (all tokens) or an integer >= 2")
        _check_choice("eigen_solve", self.eigen_solve, EIGEN_SOLVE_PLACEMENTS)
        _check_list("outputs", self.outputs, OUTPUTS, allow_empty=True)
        _check_choice("spec", self.spec, SPECS)
        _check_type("seed", self.seed, int)


@dataclass
class JobConfig:
    nerve: Nerve = field(default_factory=Nerve)
    muon: Muon = field(default_factory=Muon)  # read when [optimizer] name = "Muon"
    variant: Variant = field(default_factory=Variant)  # options of the nerve_llama model family


def _fail(key: str, value, allowed: str):
    raise NerveConfigError(f"[nerve] {key} = {value!r} is not allowed: expected {allowed}")


def _check_type(key: str, value, kind: type):
    # bool is an int in Python; a TOML `log_freq = true` must not pass as 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        _fail(key, value, f"a value of type {kind.__name__}")


def _check_choice(key: str, value, choices):
    if value not in choices:
        _fail(key, value, "one of " + ", ".join(repr(c) for c in choices))


def _check_list(key: str, value, choices, allow_empty: bool = False):
    if not isinstance(value, list) or (not value and not allow_empty) or any(v not in choices for v in value):
        _fail(key, value, ("a list" if allow_empty else "a non-empty list") + f" of values from {list(choices)}")
