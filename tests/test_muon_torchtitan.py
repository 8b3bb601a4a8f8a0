"""``[optimizer] name = "Muon"`` in torchtitan's real Trainer on CPU (2 processes, FSDP over gloo), with NerVE on.

The runs use tt_nerve's synthetic llama3 spec wrapped by ``nerve_plugin.torchtitan.v0_2.train_spec.wrap_muon``, and a
config module holding both ``[nerve]`` and ``[muon]`` (nerve's own, once it has a ``muon`` field).
"""

import dataclasses
import math
import os
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import read_jsonl
from torchtitan_harness import REPO_ROOT, TESTS_DIR, base_config, merge, read_metrics, run_torchtitan

# Every test here runs torchtitan in torchrun subprocesses: the slow part of the suite.
pytestmark = pytest.mark.slow

STEPS = 6
SPEC = "nerve_test_llama3_nerve_muon"

CUSTOM_IMPORT = f"""
import tt_nerve
from torchtitan.protocols.train_spec import get_train_spec, register_train_spec
from nerve_plugin.torchtitan.v0_2.train_spec import wrap_muon

try:
    register_train_spec({SPEC!r}, wrap_muon(get_train_spec(tt_nerve.SPEC_NAME)))
except ValueError:  # already registered
    pass
"""

CONFIG_MODULE = """
from dataclasses import dataclass, field

from nerve_plugin.torchtitan.config import Nerve
from nerve_plugin.torchtitan.muon import MuonSection


@dataclass
class JobConfig:
    nerve: Nerve = field(default_factory=Nerve)
    muon: MuonSection = field(default_factory=MuonSection)
"""


def config_module() -> str:
    """nerve's config module once it carries [muon]; until then the test's own (written by `modules`)."""
    from nerve_plugin.torchtitan import config

    if "muon" in {f.name for f in dataclasses.fields(config.JobConfig)}:
        return "nerve_plugin.torchtitan.config"
    return "tt_muon_config"


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    folder = tmp_path_factory.mktemp("modules")
    (folder / "tt_muon.py").write_text(textwrap.dedent(CUSTOM_IMPORT))
    (folder / "tt_muon_config.py").write_text(textwrap.dedent(CONFIG_MODULE))
    sys.path.insert(0, str(folder))
    yield {"PYTHONPATH": os.pathsep.join(map(str, (REPO_ROOT, TESTS_DIR, folder)))}
    sys.path.remove(str(folder))


def muon_job(tmp_path, overrides=None):
    cfg = merge(
        base_config(tmp_path),
        {
            "experimental": {"custom_import": "tt_muon"},
            "job": {"custom_config_module": config_module()},
            "model": {"name": SPEC},
            "training": {"steps": STEPS},
            "optimizer": {"name": "Muon", "lr": 3e-3},
            # float32 Newton-Schulz: bf16 matmuls are ~40x slower on this kind of CPU (tests/test_muon.py checks the
            # bf16 default bitwise against torch.optim.Muon)
            "muon": {"momentum": 0.9, "adjust_lr": "match_rms_adamw", "ns_dtype": "float32"},
            "parallelism": {"data_parallel_shard_degree": 2},
            "nerve": {"enable": True, "log_freq": 3},
        },
    )
    return merge(cfg, overrides or {})


def test_fsdp_training_with_muon_learns_and_resumes_bitwise(modules, tmp_path):
    checkpoint = {"checkpoint": {"enable": True, "interval": 3, "last_save_model_only": False}}
    full = muon_job(tmp_path / "full", checkpoint)
    proc = run_torchtitan(tmp_path / "full", full, nproc=2, env=modules)
    # The start-up line of the container: the split and the exchange of this debugmodel.
    assert "with Muon" in proc.stdout and "2 all-to-alls per step" in proc.stdout

    metrics = read_metrics(full)
    assert sorted(metrics) == [0, 1]
    losses = [m["loss"] for m in metrics[0]]
    assert [m["step"] for m in metrics[0]] == list(range(1, STEPS + 1))
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] - 0.1, losses  # synthetic tokens: it learns their unigram statistics
    jsonl = Path(full["job"]["dump_folder"]) / "nerve" / "metrics.jsonl"
    records = read_jsonl(jsonl)
    assert sorted({r["step"] for r in records}) == [1, 3, 6]

    # torchtitan's checkpointer saves and loads both optimizer states (DCP, flattened keys): a job resuming from
    # step 3 trains steps 4-6 exactly as the uninterrupted one did.
    resumed = muon_job(tmp_path / "resumed", checkpoint)
    shutil.copytree(
        Path(full["job"]["dump_folder"]) / "checkpoint" / "step-3",
        Path(resumed["job"]["dump_folder"]) / "checkpoint" / "step-3",
    )
    run_torchtitan(tmp_path / "resumed", resumed, nproc=2, env=modules)
    assert read_metrics(resumed)[0] == metrics[0][3:]  # float repr round-trips: bitwise loss and grad norm


def test_pipeline_parallel_steps_each_stage_with_its_own_muon(modules, tmp_path):
    cfg = muon_job(
        tmp_path,
        {
            "training": {"steps": 4},
            "parallelism": {
                "data_parallel_shard_degree": 1,
                "pipeline_parallel_degree": 2,
                "pipeline_parallel_schedule": "1F1B",
                "pipeline_parallel_microbatch_size": 1,
            },
            "nerve": {"enable": False},
        },
    )
    proc = run_torchtitan(tmp_path, cfg, nproc=2, env=modules)
    # Each stage holds its own blocks (3 of the 6, 7 matrices each), unsharded: no collective.
    assert proc.stdout.count("21 matrices") == 2 and "0 all-to-alls per step" in proc.stdout
    losses = [m["loss"] for m in read_metrics(cfg)[1]]  # the last stage holds the loss
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("momentum", 1.5, "[muon] momentum = 1.5 is not allowed: expected a number in [0, 1)"),
        ("adjust_lr", "rms", "[muon] adjust_lr = 'rms' is not allowed: expected one of 'original', 'match_rms_adamw'"),
        ("ns_coefficients", [3.0, 4.0], "[muon] ns_coefficients = [3.0, 4.0] is not allowed: expected a list of 3"),
        ("muon_params", "layers.*", "[muon] muon_params = 'layers.*' is not allowed: expected a list of non-empty"),
    ],
)
def test_bad_muon_values_stop_the_run_at_start_up(modules, tmp_path, key, value, message):
    from torchtitan.config import ConfigManager
    from torchtitan_harness import to_toml

    from nerve_plugin.torchtitan.muon import MuonConfigError

    job = tmp_path / "job.toml"
    job.write_text(to_toml(merge(muon_job(tmp_path), {"muon": {key: value}})))
    # torchtitan builds the config on every rank, before any process group exists: every rank stops alike.
    with pytest.raises(MuonConfigError) as error:
        ConfigManager().parse_args(["--job.config_file", str(job)])
    assert message in str(error.value)


def test_config_defaults_and_builder_checks(modules):
    from torchtitan.config import ConfigManager
    from torchtitan.distributed import ParallelDims

    from nerve_plugin.torchtitan.muon import MuonConfigError, build_muon_optimizers

    job_config = ConfigManager().parse_args(["--job.custom_config_module", config_module(), "--optimizer.name", "Muon"])
    assert job_config.muon.adjust_lr == "match_rms_adamw"
    assert job_config.muon.ns_coefficients == [3.4445, -4.775, 2.0315]
    assert job_config.muon.lr is None and job_config.muon.weight_decay is None

    tp = ParallelDims(dp_shard=1, dp_replicate=1, cp=1, tp=2, pp=1, ep=1, etp=1, world_size=2)
    with pytest.raises(MuonConfigError, match=r"tensor_parallel_degree = 2: expected tensor_parallel_degree = 1"):
        build_muon_optimizers([], job_config.optimizer, tp, muon_config=job_config.muon)


def test_moe_spec_keeps_torchtitans_load_balancing_hook(modules):
    import torch
    from torchtitan.config import ConfigManager
    from torchtitan.distributed import ParallelDims
    from torchtitan.models.llama4 import Transformer, get_train_spec, llama4_args

    from nerve_plugin.muon import Muon
    from nerve_plugin.torchtitan.muon import MuonOptimizersContainer
    from nerve_plugin.torchtitan.v0_2.train_spec import wrap_muon

    job_config = ConfigManager().parse_args(["--job.custom_config_module", config_module(), "--optimizer.name", "Muon"])
    dims = ParallelDims(dp_shard=1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    with torch.device("meta"):
        model = Transformer(llama4_args["debugmodel"])
    container = wrap_muon(get_train_spec()).build_optimizers_fn([model], job_config.optimizer, dims)
    assert isinstance(container, MuonOptimizersContainer) and isinstance(container.optimizers[0], Muon)
    assert len(container._optimizer_step_pre_hooks) == 1  # torchtitan's expert-bias update
    kinds = {g["use_muon"]: g["params"] for g in container.optimizers[0].param_groups}
    assert all(p.ndim == 2 for p in kinds[True])
    assert any(p.ndim == 3 for p in kinds[False])  # grouped experts go to AdamW
