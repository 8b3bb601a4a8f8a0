"""The ``[nerve]`` section: its keys, defaults, docstrings (torchtitan's --help) and checks, for every torchtitan.

A dataclass of the same shape serves torchtitan 0.2.2 (a field of the custom JobConfig that ``[job]
custom_config_module`` names, filled from TOML) and 0.3.0 (a field of a Trainer.Config subclass). Every value is
checked when the config is built, on every rank alike and before any collective, so a bad value stops the run at
start-up with the key, the value and what is allowed.
"""

# No `from __future__ import annotations` here: torchtitan merges config dataclasses by their real field types.

from dataclasses import dataclass, field

from nerve_plugin.config_checks import SectionChecks
from nerve_plugin.monitor import SOLVE_PLACEMENTS, check_solver_keys
from nerve_plugin.solve import SOLVE_TIMINGS
from nerve_plugin.taps import BUILTIN_SPECS, TAPS
from nerve_plugin.writers import OUTPUTS

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

    solve_placement: str = "rank0"
    """Where the float64 eigen-solves run: "rank0" (the first rank of each pipeline stage) or "spread" (each
    covariance is reduced to, and solved on, its own rank; results are gathered to the logging rank). Formerly
    eigen_solve (still accepted, with a warning)."""

    outputs: list[str] = field(default_factory=lambda: list(OUTPUTS))
    """Where metrics go: "tensorboard" (torchtitan's own run, needs metrics.enable_tensorboard) and "jsonl"
    (<dump_folder>/nerve/metrics.jsonl, one record per step and layer)."""

    spec: str = "auto"
    """Where the FFN taps are: "auto" picks the built-in spec of model.name."""

    seed: int = 0
    """Seed of the token sub-sampling."""

    solve_timing: str = "sync"
    """When the float64 eigen-solves run: "sync" (at the logging step, on the statistics' device; training
    waits), "stream" (the batched solver on a side CUDA stream of the same GPU, launched at the logging step
    while the next steps train: GPT-2 124M's logging step 1.5 normal steps instead of 3.9, its whole cost ~1/3
    less; the solves still share the GPU, so the next few steps run slower) or "overlap" (on a host thread while
    the next steps train; solves still queued when due run on the GPU then). With "stream" and "overlap" a
    logging step's records are written at the next logging step, before a checkpoint and at the end, with their
    own step. Overlap pays off when the host finishes the solves within log_freq steps: pair it with
    max_layers_per_step on large models (README, Performance). Formerly solve (still accepted, with a
    warning)."""

    max_layers_per_step: int = 0
    """Measure at most this many layers per logging step, a window that moves on with each logging step and
    wraps around (every layer at least every ceil(L / max_layers_per_step)-th logging step); 0 measures every
    layer every time. Bounds memory and work; max_overhead may lower it further."""

    max_overhead: float = 0.05
    """Budget of NerVE's amortized cost, as a fraction of training time (0.05: 5%): from the measured cost of
    logging steps and the time of normal steps, each logging step measures as many layers as keep
    (logging-step overhead) / (log_freq x step time) within it, at least one (rotating, as max_layers_per_step
    does). The first logging steps measure every layer. 0: no budget, every layer at every logging step."""

    memory_budget_gb: float = 16.0
    """Start-up check: the covariance buffers of one logging step (D x D per measured layer and tap, plus
    float64 working copies) must fit in this many GiB per rank, or the run stops and says what to set."""

    solver_threads: int = 0
    """Host threads for overlapped solves of GPU runs; 0: this rank's share of the cores minus one."""

    eigensolver: str = "auto"
    """Which float64 eigen-solver the sync solves of GPU statistics use: "batched" (nerve_plugin.eigen: all
    same-size covariances of a logging step at once, two-stage reduction and bisection, LAPACK accuracy; its
    first logging step compiles its kernels and captures a CUDA graph), "eigvalsh" (torch.linalg.eigvalsh, one
    covariance after another) or "auto" (batched on GPUs). Host statistics always use eigvalsh.
    solve_timing = "stream" needs the batched solver ("auto" or "batched")."""

    on_error: str = "warn"
    """What a writer failing during training (a full disk, a folder gone) does: "warn" reports it once and stops
    writing there while training goes on, as with NerVE off; "raise" stops the run. An output that cannot be
    written at start-up always stops the run, naming the path."""

    def __post_init__(self):
        check = SectionChecks("nerve", NerveConfigError)
        check.boolean("enable", self.enable)
        check.integer("log_freq", self.log_freq, "an integer >= 1", lambda v: v >= 1)
        check.choices("taps", self.taps, TAPS)
        if len(set(self.taps)) != len(self.taps):
            check.fail("taps", self.taps, f"distinct values from {list(TAPS)}")
        if not isinstance(self.layers, list) or any(
            isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.layers
        ):
            check.fail("layers", self.layers, "a list of layer indices >= 0 (empty for all layers)")
        check.integer(
            "tokens_per_rank", self.tokens_per_rank, "0 (all tokens) or an integer >= 2", lambda v: v == 0 or v >= 2
        )
        check.choice("solve_placement", self.solve_placement, SOLVE_PLACEMENTS)
        check.choices("outputs", self.outputs, OUTPUTS, allow_empty=True)
        check.choice("spec", self.spec, SPECS)
        check.integer("seed", self.seed, "an integer")
        check.choice("solve_timing", self.solve_timing, SOLVE_TIMINGS)
        check.integer(
            "max_layers_per_step", self.max_layers_per_step, "0 (all layers) or an integer >= 1", lambda v: v >= 0
        )
        check.number("memory_budget_gb", self.memory_budget_gb, "a number of GiB > 0", lambda v: v > 0)
        check_solver_keys(check, self)
