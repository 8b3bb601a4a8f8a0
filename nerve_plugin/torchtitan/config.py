"""The ``[nerve]`` TOML section, merged into torchtitan's JobConfig through ``[job] custom_config_module``.

    [job]
    custom_config_module = "nerve_plugin.torchtitan.config"

    [nerve]
    enable = true

Every value is checked when the config is built, on every rank alike and before any collective, so a bad value
stops the run at start-up with the key, the value and what is allowed.
"""

# No `from __future__ import annotations` here: torchtitan merges config dataclasses by their real field types.

import sys
from dataclasses import dataclass, field, fields, is_dataclass

from torchtitan.config.manager import ConfigManager

from nerve_plugin.config_checks import SectionChecks, renamed_keys
from nerve_plugin.solve import SOLVE_TIMINGS
from nerve_plugin.monitor import RENAMED_KEYS, SOLVE_PLACEMENTS, check_solver_keys
from nerve_plugin.taps import BUILTIN_SPECS, TAPS
from nerve_plugin.torchtitan.muon import Muon, MuonConfigError
from nerve_plugin.variants.config import Variant, VariantConfigError

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
    waits) or "overlap" (on a host thread while the next steps train; a logging step's records are written at
    the next logging step, before a checkpoint and at the end, with their own step; solves still queued when
    due run on the GPU then). Overlap pays off when the host finishes the solves within log_freq steps: pair it
    with max_layers_per_step on large models (README, Performance). Formerly solve (still accepted, with a
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
    covariance after another) or "auto" (batched on GPUs). Host statistics always use eigvalsh."""

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


@dataclass
class JobConfig:
    nerve: Nerve = field(default_factory=Nerve)
    muon: Muon = field(default_factory=Muon)  # read when [optimizer] name = "Muon"
    variant: Variant = field(default_factory=Variant)  # options of the nerve_llama model family


def _nerve_sections(config_cls) -> list[str]:
    # a custom JobConfig that extends [nerve] gets a merged subclass of Nerve from torchtitan
    return [f.name for f in fields(config_cls) if isinstance(f.type, type) and issubclass(f.type, Nerve)]


def rename_keys_in_toml(config_cls, toml: dict) -> None:
    """The [nerve] keys that were renamed (RENAMED_KEYS), put under their new names in the parsed TOML, with a
    warning naming the new key."""
    for name in _nerve_sections(config_cls):
        if isinstance(toml.get(name), dict):
            toml[name] = renamed_keys(toml[name], RENAMED_KEYS, name, NerveConfigError, stacklevel=3)


def rename_options(config_cls, args: list[str]) -> list[str]:
    """The command line with the renamed [nerve] keys' options (``--nerve.solve overlap``,
    ``--nerve.eigen-solve=spread``) spelled with their new names, with a warning naming the new key."""
    sections = set(_nerve_sections(config_cls))
    out, given = [], {}
    for i, arg in enumerate(args):
        option, equals, value = arg.partition("=")
        section, _, key = option[2:].replace("-", "_").partition(".") if option.startswith("--") else ("", "", "")
        if section in sections and (key in RENAMED_KEYS or key in RENAMED_KEYS.values()):
            # the value, for the warning: "--nerve.solve=overlap" or "--nerve.solve overlap"
            given.setdefault(section, {})[key] = value if equals or i + 1 == len(args) else args[i + 1]
            if key in RENAMED_KEYS:
                arg = f"--{section}.{RENAMED_KEYS[key]}{equals}{value}"
        out.append(arg)
    for section, keys in given.items():
        renamed_keys(keys, RENAMED_KEYS, section, NerveConfigError, stacklevel=4)  # warns, refuses both names
    return out


def check_sections(config_cls, toml: dict) -> None:
    """The keys of nerve's sections in a TOML table, before torchtitan reads them: torchtitan names an unknown
    key but not the allowed ones, and silently drops a section that is not a table (`nerve = true`)."""
    errors = {Nerve: NerveConfigError, Muon: MuonConfigError, Variant: VariantConfigError}
    for f in fields(config_cls):
        # a custom JobConfig that extends a section gets a merged subclass of it from torchtitan
        section = next((c for c in errors if isinstance(f.type, type) and issubclass(f.type, c)), None)
        if section is None or f.name not in toml:
            continue
        keys = ", ".join(k.name for k in fields(section))
        if not isinstance(toml[f.name], dict):
            raise errors[section](
                f"{f.name} = {toml[f.name]!r} is not allowed: expected a [{f.name}] table with keys from {keys}"
            )
        for key in toml[f.name]:
            if key not in {k.name for k in fields(f.type)}:
                raise errors[section](f"[{f.name}] {key} is not a key of [{f.name}]: expected one of {keys}")


def check_flag_values(config_cls, args: list[str]) -> None:
    """The command line's bool keys of nerve's sections, before tyro reads them. tyro makes each one a flag pair
    that takes no value (``--nerve.enable`` / ``--nerve.no-enable``), so in ``--nerve.enable 3`` or
    ``--nerve.enable=true`` the value is left over and tyro names only it ("Unrecognized options: 3").
    Stops like tyro does (the message on stderr, exit status 2), naming the option and what it accepts."""
    sections = (Nerve, Muon, Variant)
    flags: dict[str, set[str]] = {}
    for f in fields(config_cls):
        if isinstance(f.type, type) and issubclass(f.type, sections):
            flags[f.name] = {k.name for k in fields(f.type) if k.type in (bool, "bool")}
    for i, arg in enumerate(args):
        option, has_value, value = arg.partition("=")
        if not option.startswith("--") or "." not in option:
            continue
        section, _, key = option[2:].replace("-", "_").partition(".")
        name = key[3:] if key.startswith("no_") and key[3:] in flags.get(section, ()) else key
        if name not in flags.get(section, ()):
            continue
        given = arg
        if not has_value and i + 1 < len(args) and not args[i + 1].startswith("-"):
            has_value, given = True, f"{arg} {args[i + 1]}"
        if has_value:
            on, off = f"--{section}.{name}", f"--{section}.no-{name.replace('_', '-')}"
            print(
                f"{given}: {option} is a flag and takes no value: expected {on} (true) or {off} "
                f"(false); in a TOML, [{section}] {name} = true or false",
                file=sys.stderr,
            )
            raise SystemExit(2)


class _FlagCheckingTyro:
    """tyro as torchtitan's ConfigManager sees it: the same module, whose cli() first checks nerve's flags."""

    def __init__(self, tyro):
        self.tyro = tyro

    def __getattr__(self, name):
        return getattr(self.tyro, name)

    def cli(self, config_cls, *args, **kwargs):
        args_ = kwargs.get("args")
        kwargs["args"] = rename_options(config_cls, list(sys.argv[1:] if args_ is None else args_))
        check_flag_values(config_cls, kwargs["args"])
        return self.tyro.cli(config_cls, *args, **kwargs)


def _install_cli_check() -> None:
    # ConfigManager.parse_args imports this module (custom_config_module) and then hands its raw arguments to
    # tyro.cli, which it looks up in its own module at that moment: the one place where nerve sees them first.
    import torchtitan.config.manager as manager

    if not isinstance(manager.tyro, _FlagCheckingTyro):
        manager.tyro = _FlagCheckingTyro(manager.tyro)


def _install_section_check() -> None:
    # torchtitan imports this module (custom_config_module) before it turns the TOML into dataclasses, on every
    # rank alike and before any collective; checking there stops every rank at start-up with the same message.
    original = ConfigManager._dict_to_dataclass
    if getattr(original, "nerve_checks_sections", False):
        return

    def _dict_to_dataclass(self, cls, data):
        if is_dataclass(cls) and isinstance(data, dict):
            rename_keys_in_toml(cls, data)
            check_sections(cls, data)
        return original(self, cls, data)

    _dict_to_dataclass.nerve_checks_sections = True
    ConfigManager._dict_to_dataclass = _dict_to_dataclass


_install_section_check()
_install_cli_check()
