"""Every key of every section nerve adds to torchtitan's config, tried with a wrong type, an out-of-range value and
an unknown key: each must stop torchtitan's ConfigManager at start-up with the key and what is allowed.

The table below has one row per dataclass field; a field without a row fails the coverage test, so a new key
cannot ship unchecked. The rows run in-process through torchtitan's own ConfigManager reading a TOML file (the
way jobs are launched); a few run through its command line (tyro), and one through two real torchtitan ranks.
"""

import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, fields

import pytest

from helpers import free_port
from nerve_plugin.solve import usable_cores
from torchtitan_harness import REPO_ROOT, TESTS_DIR, base_config, merge, to_toml

from nerve_plugin.torchtitan.config import Nerve, NerveConfigError
from nerve_plugin.torchtitan.muon import MuonConfigError, MuonSection
from nerve_plugin.variants.config import Variant, VariantConfigError

CONFIG_MODULE = "nerve_plugin.torchtitan.config"  # holds [nerve], [muon] and [variant]


@dataclass(frozen=True)
class AnyOfType:
    """The key has no out-of-range value: these values of its type, at the edges, must all be accepted."""

    values: tuple


@dataclass(frozen=True)
class Row:
    wrong_type: object  # a TOML value of another type
    out_of_range: object  # a value of the right type that is not allowed, or AnyOfType
    allowed: str  # what the message must say is allowed


FLAVORED = "'flavor', "  # [variant] choices start with "keep the flavor's"

TABLE: dict[str, tuple[type, type, dict[str, Row]]] = {
    "nerve": (
        Nerve,
        NerveConfigError,
        {
            "enable": Row(1, AnyOfType((True, False)), "true or false"),
            "log_freq": Row("100", 0, "an integer >= 1"),
            "taps": Row("pre", ["pre", "middle"], "a non-empty list of values from ['pre', 'post']"),
            "layers": Row([0.5], [3, -1], "a list of layer indices >= 0 (empty for all layers)"),
            "tokens_per_rank": Row(2.5, 1, "0 (all tokens) or an integer >= 2"),
            "solve_placement": Row(0, "gpu", "one of 'rank0', 'spread'"),
            "outputs": Row("jsonl", ["jsonl", "wandb"], "a list of values from ['tensorboard', 'jsonl']"),
            "spec": Row(["llama3"], "gpt2", "one of 'auto', 'llama3', 'llama4', 'qwen3', 'nerve_llama'"),
            # the seed is hashed into the sub-sampling generator's seed: any integer works
            "seed": Row("0", AnyOfType((-(2**63), 0, 2**63 - 1)), "an integer"),
            "solve_timing": Row(1, "async", "one of 'sync', 'overlap', 'stream'"),
            "max_layers_per_step": Row("2", -1, "0 (all layers) or an integer >= 1"),
            "memory_budget_gb": Row("16", 0.0, "a number of GiB > 0"),
            # bounded by the host: more threads than cores starved the host (and 2^40 killed the solver thread)
            "solver_threads": Row(
                1.5, 1099511627776, f"0 (automatic) or an integer from 1 to {usable_cores()} (this host's cores)"
            ),
            # a percentage where a fraction belongs (5 for 5%) is the likely mistake
            "max_overhead": Row("0.05", 5.0, "a fraction in [0, 1), e.g. 0.05 for 5% (0: no budget)"),
            "eigensolver": Row(1, "cusolver", "one of 'auto', 'batched', 'eigvalsh'"),
            "on_error": Row(True, "ignore", "one of 'warn', 'raise'"),
        },
    ),
    "muon": (
        MuonSection,
        MuonConfigError,
        {
            "momentum": Row("0.95", 1.0, "a number in [0, 1)"),
            "nesterov": Row("true", AnyOfType((True, False)), "true or false"),
            "ns_steps": Row(5.0, 0, "an integer in [1, 99]"),
            "ns_coefficients": Row(["3.4", "-4.7", "2.0"], [3.4445, -4.775], "a list of 3 finite numbers [a, b, c]"),
            "eps": Row("1e-7", 0.0, "a finite number > 0"),
            "adjust_lr": Row(1, "rms", "one of 'original', 'match_rms_adamw'"),
            "lr": Row("0.02", -0.1, "a finite number >= 0, or unset for [optimizer] lr"),
            "weight_decay": Row(True, -1.0, "a finite number >= 0, or unset for [optimizer] weight_decay"),
            "muon_params": Row(
                "layers.*", ["layers.*", ""], "a list of non-empty fnmatch patterns (empty for the default)"
            ),
            "ns_dtype": Row(16, "float16", "one of 'bfloat16', 'float32'"),
            "bucket_mb": Row("512", -1.0, "a finite number >= 0 (0: one bucket)"),
        },
    ),
    "variant": (
        Variant,
        VariantConfigError,
        {
            "activation": Row(
                1,
                "tanh",
                "one of " + FLAVORED + "'swiglu', 'geglu', 'gelu', 'relu', 'leaky_relu', 'learnable_leaky_relu'",
            ),
            "leaky_slope": Row("0.01", 1.0, "a number in [0, 1)"),
            "learnable_slope": Row(True, "head", "one of 'layer', 'global'"),
            "ffn_multiplier": Row("4", -1.0, "0 (the flavor's) or a number > 0"),
            "norm": Row(0, "batchnorm", "one of " + FLAVORED + "'rmsnorm', 'layernorm', 'none'"),
            "norm_placement": Row(0, "sandwich", "one of " + FLAVORED + "'pre', 'post', 'mixed'"),
            "mixed_post_layers": Row(1.0, 0, "an integer >= 1 (and < model.n_layers)"),
            "ffn_geometry": Row(
                0,
                "orthogonal",
                "one of " + FLAVORED + "'none', 'weight_norm', 'spectral_norm', 'hyperspherical', 'ngpt'",
            ),
            "spectral_iters": Row("0", -1, "an integer >= 0 (0: the exact sigma every forward)"),
            "pos_encoding": Row(0, "alibi", "one of " + FLAVORED + "'rope', 'learned', 'none'"),
        },
    ),
}

# NaN fails every comparison and inf passes "> 0": the float keys must refuse both.
NON_FINITE = [
    ("nerve", "memory_budget_gb", math.nan),
    ("nerve", "memory_budget_gb", math.inf),
    ("nerve", "max_overhead", math.nan),
    ("nerve", "max_overhead", -math.inf),
    ("muon", "momentum", math.nan),
    ("muon", "eps", math.inf),
    ("muon", "lr", math.inf),
    ("muon", "weight_decay", math.nan),
    ("muon", "bucket_mb", math.inf),
    ("muon", "ns_coefficients", [3.0, math.nan, 2.0]),
    ("variant", "leaky_slope", math.nan),
    ("variant", "ffn_multiplier", math.inf),
    ("variant", "ffn_multiplier", math.nan),
]

ROWS = [(section, key) for section, (_, _, rows) in TABLE.items() for key in rows]


def parse_toml(tmp_path, toml: str):
    """torchtitan's ConfigManager on a job file holding `toml`, the way `torchtitan.train` starts."""
    from torchtitan.config import ConfigManager

    job = tmp_path / "job.toml"
    job.write_text(f'{toml}\n[job]\ncustom_config_module = "{CONFIG_MODULE}"\n')
    return ConfigManager().parse_args(["--job.config_file", str(job)])


def parse_value(tmp_path, section: str, key: str, value):
    return parse_toml(tmp_path, to_toml({section: {key: value}}))


def expected_message(section: str, key: str, value) -> str:
    return f"[{section}] {key} = {value!r} is not allowed: expected {TABLE[section][2][key].allowed}"


@pytest.mark.parametrize("section", TABLE)
def test_table_has_a_row_for_every_field(section):
    cls, _, rows = TABLE[section]
    assert sorted(rows) == sorted(f.name for f in fields(cls)), (
        f"every [{section}] key needs a row in TABLE (wrong type, out-of-range value, allowed values)"
    )


def assert_refused(tmp_path, section, key, value):
    with pytest.raises(TABLE[section][1]) as error:
        parse_value(tmp_path, section, key, value)
    assert str(error.value) == expected_message(section, key, value)


@pytest.mark.parametrize("section, key", ROWS)
def test_wrong_type_stops_with_key_and_allowed_values(tmp_path, section, key):
    assert_refused(tmp_path, section, key, TABLE[section][2][key].wrong_type)


@pytest.mark.parametrize("section, key", ROWS)
def test_out_of_range_stops_with_key_and_allowed_values(tmp_path, section, key):
    cls, _, rows = TABLE[section]
    value = rows[key].out_of_range
    if isinstance(value, AnyOfType):
        for ok in value.values:  # the claim that no value of the type is out of range
            assert getattr(getattr(parse_value(tmp_path, section, key, ok), section), key) == ok
        return
    assert isinstance(value, type(getattr(cls(), key)) if getattr(cls(), key) is not None else float), (
        "an out-of-range value must have the key's type, or the row tests the type twice"
    )
    assert_refused(tmp_path, section, key, value)


@pytest.mark.parametrize("section, key, value", NON_FINITE)
def test_non_finite_numbers_are_refused(tmp_path, section, key, value):
    assert_refused(tmp_path, section, key, value)


@pytest.mark.parametrize("section, key", ROWS)
def test_unknown_key_stops_with_the_known_keys(tmp_path, section, key):
    cls, error_type, _ = TABLE[section]
    typo = key[:-1]  # a misspelling of a real key
    with pytest.raises(error_type) as error:
        parse_value(tmp_path, section, typo, 1)
    keys = ", ".join(f.name for f in fields(cls))
    assert str(error.value) == f"[{section}] {typo} is not a key of [{section}]: expected one of {keys}"


@pytest.mark.parametrize("section", TABLE)
def test_section_that_is_not_a_table_stops(tmp_path, section):
    # torchtitan alone would drop it silently and run with the defaults
    cls, error_type, _ = TABLE[section]
    with pytest.raises(
        error_type,
        match=rf"^{section} = True is not allowed: expected a \[{section}\] table with keys from "
        + re.escape(", ".join(f.name for f in fields(cls)))
        + "$",
    ):
        parse_toml(tmp_path, f"{section} = true\n")


def test_valid_sections_still_parse(tmp_path):
    config = parse_toml(
        tmp_path,
        to_toml(
            {
                "nerve": {"enable": True, "log_freq": 7, "layers": [0, 2], "tokens_per_rank": 2, "max_overhead": 0},
                "muon": {"momentum": 0, "lr": 0.02, "ns_coefficients": [1, 2, 3]},
                "variant": {"activation": "relu", "ffn_multiplier": 2},
            }
        ),
    )
    assert (config.nerve.enable, config.nerve.log_freq, config.nerve.layers) == (True, 7, [0, 2])
    assert config.nerve.max_overhead == 0
    assert (config.muon.momentum, config.muon.lr, config.muon.ns_coefficients) == (0, 0.02, [1, 2, 3])
    assert (config.variant.activation, config.variant.ffn_multiplier) == ("relu", 2)


# The command line goes through tyro: it parses strings into the field's type itself, so a wrong type or an
# unknown option is its error (exit 2, naming the option and its type); values it parses reach our checks.
CLI = [
    (["--nerve.log_freq", "often"], "Error parsing --nerve.log-freq: invalid literal for int()"),
    (["--nerve.log_freq", "0"], "[nerve] log_freq = 0 is not allowed: expected an integer >= 1"),
    (["--nerve.log_frq", "3"], "Unrecognized options: --nerve.log_frq"),
    (["--nerve.taps", "pre,middle"], "[nerve] taps = ['pre', 'middle'] is not allowed"),
    (["--nerve.max_overhead", "1"], "[nerve] max_overhead = 1.0 is not allowed: expected a fraction in [0, 1)"),
    (["--muon.momentum", "fast"], "Error parsing --muon.momentum"),
    (["--muon.ns_steps", "0"], "[muon] ns_steps = 0 is not allowed: expected an integer in [1, 99]"),
    (["--variant.leaky_slope", "nan"], "[variant] leaky_slope = nan is not allowed: expected a number in [0, 1)"),
    (["--variant.activaton", "relu"], "Unrecognized options: --variant.activaton"),
    # bool keys are tyro flags without a value: a value after one is named with its option, not left over
    (
        ["--nerve.enable", "3"],
        "--nerve.enable 3: --nerve.enable is a flag and takes no value: expected "
        "--nerve.enable (true) or --nerve.no-enable (false); in a TOML, [nerve] enable = true or false",
    ),
    (["--nerve.enable=true"], "--nerve.enable=true: --nerve.enable is a flag and takes no value"),
    (
        ["--muon.no-nesterov", "yes"],
        "--muon.no-nesterov yes: --muon.no-nesterov is a flag and takes no value: "
        "expected --muon.nesterov (true) or --muon.no-nesterov (false)",
    ),
]


@pytest.mark.parametrize("args, message", CLI)
def test_command_line_errors_name_the_option(monkeypatch, capsys, args, message):
    from torchtitan.config import ConfigManager

    monkeypatch.setenv("COLUMNS", "400")  # tyro's box would wrap the message
    with pytest.raises(SystemExit) as exit_:
        ConfigManager().parse_args(["--job.custom_config_module", CONFIG_MODULE, *args])
    assert exit_.value.code != 0
    assert message in " ".join(capsys.readouterr().err.split())


def test_command_line_flags_still_parse():
    from torchtitan.config import ConfigManager

    base = ["--job.custom_config_module", CONFIG_MODULE]
    config = ConfigManager().parse_args([*base, "--nerve.enable", "--nerve.log_freq", "50", "--muon.no-nesterov"])
    assert (config.nerve.enable, config.nerve.log_freq, config.muon.nesterov) == (True, 50, False)
    assert ConfigManager().parse_args([*base, "--nerve.no-enable"]).nerve.enable is False


@pytest.mark.slow
def test_every_rank_stops_at_start_up_on_its_own(tmp_path):
    # Two ranks of torchtitan.train with the environment torchrun gives them, but no torchrun: its agent ends the
    # other ranks as soon as one fails, which would hide a rank left waiting in a collective. Here a waiting rank
    # would sit in the process-group rendezvous until the timeout. The bad key is an unknown one (the check
    # torchtitan lacks); every rank reads the same file before any process group exists.
    cfg = merge(
        base_config(tmp_path),
        {"job": {"custom_config_module": CONFIG_MODULE}, "nerve": {"enable": True, "log_frequency": 10}},
    )
    (tmp_path / "job.toml").write_text(to_toml(cfg))
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "PYTHONUNBUFFERED": "1",
    }
    start = time.monotonic()
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "torchtitan.train", "--job.config_file", str(tmp_path / "job.toml")],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            cwd=tmp_path,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    elapsed = time.monotonic() - start
    message = "NerveConfigError: [nerve] log_frequency is not a key of [nerve]: expected one of enable, log_freq,"
    for rank, (p, out) in enumerate(zip(ranks, outputs)):
        assert p.returncode == 1, (rank, out[-3000:])
        assert message in out, (rank, out[-3000:])
        assert "step:" not in out
    assert elapsed < 60, elapsed


# -- renamed keys: solve -> solve_timing, eigen_solve -> solve_placement --------------------------------------

OLD_NAMES = {"solve": ("solve_timing", "overlap"), "eigen_solve": ("solve_placement", "spread")}


def assert_renamed(warned, config) -> None:
    """One FutureWarning per old name, naming the new key, and the value under the new name."""
    messages = [str(w.message) for w in warned if issubclass(w.category, FutureWarning)]
    for old, (new, value) in OLD_NAMES.items():
        assert sum(m.startswith(f"[nerve] {old} is deprecated: it is now called {new} ") for m in messages) == 1, (
            messages
        )
        assert getattr(config, new) == value


def test_old_key_names_in_the_toml_still_work_with_a_warning(tmp_path):
    with pytest.warns(FutureWarning) as warned:
        config = parse_toml(tmp_path, to_toml({"nerve": {"solve": "overlap", "eigen_solve": "spread"}}))
    assert_renamed(warned, config.nerve)


@pytest.mark.parametrize(
    "args",
    [
        ["--nerve.solve", "overlap", "--nerve.eigen_solve", "spread"],
        ["--nerve.solve=overlap", "--nerve.eigen-solve=spread"],
    ],
)
def test_old_key_names_on_the_command_line_still_work_with_a_warning(args):
    from torchtitan.config import ConfigManager

    with pytest.warns(FutureWarning) as warned:
        config = ConfigManager().parse_args(["--job.custom_config_module", CONFIG_MODULE, *args])
    assert_renamed(warned, config.nerve)


def test_a_key_under_its_old_and_new_name_is_refused(tmp_path):
    with pytest.raises(
        NerveConfigError,
        match=r"^\[nerve\] solve and solve_timing are both set: solve is the old "
        r"name of solve_timing; keep solve_timing only$",
    ):
        parse_toml(tmp_path, to_toml({"nerve": {"solve": "overlap", "solve_timing": "sync"}}))
    from nerve_plugin.monitor import MonitorConfig

    with pytest.raises(ValueError, match="eigen_solve and solve_placement are both set"):
        MonitorConfig(eigen_solve="spread", solve_placement="rank0")


def test_old_argument_names_of_monitor_config_and_nerve_loop_warn_once_at_the_callers_line():
    import warnings

    from nerve_plugin import NerveLoop
    from nerve_plugin.monitor import MonitorConfig
    from toy_model import ToyModel

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("default")  # Python's default for FutureWarning: once per place it comes from
        configs = [MonitorConfig(solve="overlap", eigen_solve="spread") for _ in range(3)]
    assert_renamed(warned, configs[-1])
    assert {w.filename for w in warned} == {__file__}  # the line to change, not nerve's
    assert configs[0] == MonitorConfig(solve_timing="overlap", solve_placement="spread")

    with pytest.warns(FutureWarning, match="solve is deprecated: it is now called solve_timing"):
        loop = NerveLoop(ToyModel(4, 6, 2), blocks="layers", up="w1", down="w2", solve="overlap")
    try:
        assert loop.monitor.config.solve_timing == "overlap"
    finally:
        loop.close()


def test_stream_solves_need_the_batched_solver():
    """eigvalsh waits for the GPU inside every call: with solve_timing = "stream" nothing would run beside
    training, so the pairing is refused, the same way by the [nerve] section and MonitorConfig."""
    from nerve_plugin.monitor import MonitorConfig

    expected = (
        r"""^\[nerve\] eigensolver = 'eigvalsh' is not allowed: expected "auto" or "batched" with """
        r"""solve_timing = "stream" """
    )
    for config, error in ((Nerve, NerveConfigError), (MonitorConfig, ValueError)):
        with pytest.raises(error, match=expected.strip()):
            config(solve_timing="stream", eigensolver="eigvalsh")
        for solver in ("auto", "batched"):
            assert config(solve_timing="stream", eigensolver=solver).eigensolver == solver
        assert config(solve_timing="sync", eigensolver="eigvalsh").eigensolver == "eigvalsh"
