"""train_configs/: every TOML loads through torchtitan's ConfigManager with nerve's config module, builds the model
its [variant] asks for (on the meta device) with NerVE taps on every block, covers the paper's experiments, keeps
the arms of an experiment comparable, is listed in the README; two of them train (tools/smoke_train_configs.py).
"""

import copy
import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from torchtitan.config import ConfigManager
from torchtitan.protocols.train_spec import get_train_spec

import nerve_plugin.torchtitan  # noqa: F401  (registers nerve_llama)
from nerve_plugin.taps import BUILTIN_SPECS, FFNTaps
from nerve_plugin.variants.config import VariantConfigError
from nerve_plugin.torchtitan.variants.model import FFNLinear, NoNorm

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "train_configs"
sys.path.insert(0, str(REPO / "tools"))
import smoke_train_configs  # noqa: E402

GPT2 = dict(
    activation="gelu",
    norm="layernorm",
    norm_placement="pre",
    ffn_geometry="none",
    pos_encoding="learned",
    ffn_multiplier=4.0,
    weight_init="gpt2",
    optimizer="AdamW",
)  # GPT-2's init in every arm (issue 15)
NORM_FREE = dict(GPT2, norm="none")
# experiment -> arm -> what the built job must be (VariantArgs values, plus the optimizer's name): written out
# here, independently of the files, so a file that drifts from its arm fails.
EXPERIMENTS = {
    "baseline": {"gpt2": GPT2},
    "activation": {"gelu": GPT2, "relu": dict(GPT2, activation="relu")},
    "norm_free": {
        "gelu": NORM_FREE,
        "relu": dict(NORM_FREE, activation="relu"),
        "leaky_relu": dict(NORM_FREE, activation="leaky_relu", leaky_slope=0.01),
        "learnable_leaky_relu": dict(NORM_FREE, activation="learnable_leaky_relu", learnable_slope="layer"),
    },
    "ffn_geometry": {
        "none": NORM_FREE,
        "weight_norm": dict(NORM_FREE, ffn_geometry="weight_norm"),
        "spectral_norm": dict(NORM_FREE, ffn_geometry="spectral_norm", spectral_iters=0),
        "hyperspherical": dict(NORM_FREE, ffn_geometry="hyperspherical"),
        "ngpt": dict(NORM_FREE, ffn_geometry="ngpt"),
    },
    "norm_placement": {
        "pre": GPT2,
        "post": dict(GPT2, norm_placement="post"),
        "mixed": dict(GPT2, norm_placement="mixed", mixed_post_layers=2),
    },
    "ffn_width": {f"{m}x": dict(GPT2, ffn_multiplier=float(m)) for m in (1, 2, 4, 8)},
    "positional_encoding": {
        "rope": dict(GPT2, pos_encoding="rope"),
        "learned": GPT2,
        "none": dict(GPT2, pos_encoding="none"),
    },
    "optimizer": {"adamw": GPT2, "muon": dict(GPT2, optimizer="Muon")},
}
FILES = sorted(CONFIGS.rglob("*.toml"))
IDS = [f.relative_to(CONFIGS).as_posix() for f in FILES]
# Keys that may differ between any two files: where a run writes, and what it is called.
PER_FILE = {("job", "dump_folder"), ("job", "description")}


def load(path: Path):
    return ConfigManager().parse_args(["--job.config_file", str(path)])


def flat(table: dict, prefix=()) -> dict:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(flat(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = tuple(value) if isinstance(value, list) else value
    return out


def arm_keys(path: Path) -> set:
    """The (section, key) pairs a file marks with "# arm"."""
    keys, section = set(), ()
    for line in path.read_text().splitlines():
        if m := re.match(r"\s*\[([\w.]+)\]", line):
            section = tuple(m[1].split("."))
        elif m := re.match(r"\s*(\w+)\s*=.*#\s*arm\b", line):
            keys.add(section + (m[1],))
    return keys


def build_meta(config):
    """The model torchtitan's Trainer would build for this job, on the meta device, with NerVE's taps."""
    spec = get_train_spec(config.model.name)
    args = copy.deepcopy(spec.model_args[config.model.flavor])
    args.update_from_config(config)
    with torch.device("meta"):
        model = spec.model_cls(args)
    return args, model


def test_every_experiment_and_arm_has_a_file():
    found = {}
    for f in FILES:
        found.setdefault(f.parent.name, set()).add(f.stem)
    assert found == {name: set(arms) for name, arms in EXPERIMENTS.items()}


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_config_loads_builds_and_taps_every_layer(path):
    config = load(path)
    want = EXPERIMENTS[path.parent.name][path.stem]
    # runs as is, offline, with NerVE writing TensorBoard and JSONL
    assert config.model.name == "nerve_llama" and config.model.hf_assets_path == ""
    assert config.training.dataset == "python_stdlib" and config.training.dataset_path in (None, "")
    assert config.experimental.custom_import == "nerve_plugin.torchtitan"
    assert config.job.custom_config_module == "nerve_plugin.torchtitan.config"
    assert config.nerve.enable and set(config.nerve.outputs) == {"tensorboard", "jsonl"}
    assert config.metrics.enable_tensorboard and config.training.mixed_precision_param == "bfloat16"
    assert config.job.dump_folder == f"./outputs/{path.parent.name}/{path.stem}"
    assert config.optimizer.name == want["optimizer"]

    args, model = build_meta(config)
    for key, value in want.items():
        if key != "optimizer":
            assert getattr(args, key) == value, (key, getattr(args, key), value)
    taps = FFNTaps(model, BUILTIN_SPECS["nerve_llama"])
    assert taps.layers == list(range(args.n_layers)) == list(range(8))
    hidden = int(want["ffn_multiplier"] * args.dim)
    for layer in taps.layers:
        block = model.layers[str(layer)]
        ffn = block.feed_forward
        pre, post = taps._points[(layer, "pre")], taps._points[(layer, "post")]
        assert pre is ffn.w1 and post is ffn.w2 and pre.out_features == post.in_features == hidden
        assert not hasattr(ffn, "w3") and ffn.activation == want["activation"]
        assert all(isinstance(m, FFNLinear) and m.geometry == want["ffn_geometry"] for m in (ffn.w1, ffn.w2))
        norm_kind = {"layernorm": torch.nn.LayerNorm, "none": NoNorm}[want["norm"]]
        assert isinstance(block.attention_norm, norm_kind) and isinstance(block.ffn_norm, norm_kind)
        placement = want["norm_placement"]
        assert block.post_norm == (placement == "post" or (placement == "mixed" and layer < want["mixed_post_layers"]))
        assert hasattr(ffn, "leaky_slope") == (want["activation"] == "learnable_leaky_relu")
    assert (model.pos_embeddings is not None) == (want["pos_encoding"] == "learned")


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_arms_differ_only_in_marked_keys(experiment):
    """Every file is the baseline's job; an arm differs from it only in the keys it marks "# arm" and the
    [variant] keys shared by its experiment (e.g. norm = "none")."""
    base = flat(tomllib.loads((CONFIGS / "baseline" / "gpt2.toml").read_text()))
    files = sorted((CONFIGS / experiment).glob("*.toml"))
    tables = {f: flat(tomllib.loads(f.read_text())) for f in files}
    shared = set.intersection(*(set(t.items()) for t in tables.values()))
    for f, table in tables.items():
        changed = {k for k in set(base) | set(table) if base.get(k) != table.get(k)} - PER_FILE
        marked = arm_keys(f)
        common = {k for k in changed if (k, table.get(k)) in shared and k[0] == "variant"}
        assert changed <= marked | common, (f.name, sorted(changed - marked - common))
        assert marked <= set(table), (f.name, marked - set(table))
    dumps = [t[("job", "dump_folder")] for t in tables.values()]
    assert len(set(dumps)) == len(dumps)


def test_readme_lists_every_file():
    readme = (CONFIGS / "README.md").read_text()
    listed = set(re.findall(r"^\| `([\w/]+\.toml)` \|", readme, flags=re.M))
    assert listed == set(IDS)


def test_bad_keys_and_values_fail_to_load(tmp_path):
    text = (CONFIGS / "activation" / "relu.toml").read_text()
    typo = tmp_path / "typo.toml"
    typo.write_text(text.replace('activation = "relu"', 'activaton = "relu"'))
    with pytest.raises(ValueError, match="activaton"):
        load(typo)
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('activation = "relu"', 'activation = "tanh"'))
    with pytest.raises(VariantConfigError, match=r"\[variant\] activation = 'tanh' is not allowed"):
        load(bad)
    gated = tmp_path / "gated.toml"  # ffn_multiplier with a gated FFN: caught when the model args are built
    gated.write_text(text.replace('activation = "relu"', 'activation = "swiglu"\nffn_multiplier = 2.0'))
    with pytest.raises(VariantConfigError, match=r"ffn_multiplier = 2.0 is not allowed"):
        build_meta(load(gated))


# -- training (slow): torchtitan's real Trainer through tools/smoke_train_configs.py ------------------------------

TRAINED = ["ffn_width/1x", "ffn_width/2x"]  # the two cheapest (NerVE solves 384- and 768-dim spectra); the
# variants themselves train in tests/test_variants.py


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINED)
def test_smoke_trains_config(tmp_path, name):
    import json

    path = CONFIGS / f"{name}.toml"
    result = smoke_train_configs.run_config(
        path, tmp_path / "run", steps=2, nproc=1, gpu=False, seq_len=64, batch=2, timeout=300, extra=[]
    )
    assert result.ok, result.error
    assert result.layers_logged == result.layers_expected == 8
    # the run used the file's model: 8 blocks of its FFN width, measured on all 2 x 64 tokens, at steps 1 and 2
    hidden = int(EXPERIMENTS[path.parent.name][path.stem]["ffn_multiplier"] * 384)
    lines = [json.loads(x) for x in (tmp_path / "run" / "nerve" / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["step"], r["layer"]) for r in lines) == [(s, layer) for s in (1, 2) for layer in range(8)]
    assert {(r["pre"]["dim"], r["post"]["dim"], r["pre"]["tokens"]) for r in lines} == {(hidden, hidden, 128)}
    assert list((tmp_path / "run" / "tb").rglob("events.out.tfevents.*")), "no TensorBoard run"
    assert "[variant]" not in result.error and result.final_loss < 9.0  # a finite, sane first loss


def test_smoke_cli_keeps_its_options_after_config_names():
    args, extra = smoke_train_configs.parse_args(["norm_free", "--steps", "0", "--", "--muon.ns_dtype", "float32"])
    assert args.configs == ["norm_free"] and args.steps == 0 and extra == ["--muon.ns_dtype", "float32"]
    assert [p.stem for p in smoke_train_configs.find_configs(["ffn_width/*x"])] == ["1x", "2x", "4x", "8x"]
    assert (
        smoke_train_configs.last_logging_step(2000, 100) == 2000
        and smoke_train_configs.last_logging_step(7, 5) == 5
        and smoke_train_configs.last_logging_step(3, 10) == 1
    )
