"""NerVE inside torchtitan's real Trainer on CPU: 2-process torchrun runs against a 1-process reference.

tt_synthetic's data is one global token stream and its weights do not depend on the parallelism, so at step 1
every layout below sees the same tokens with the same weights as the 1-process reference: the metrics must agree
to 1e-5 relative. (Later steps differ by the rounding of gradient reductions, so only step 1 is compared.)
"""

import math
import shutil
from pathlib import Path

import pytest
from test_tensorboard_runs import points
from torch.utils.tensorboard import SummaryWriter
from helpers import assert_metrics_close, hook_count, read_jsonl
from torchtitan_harness import base_config, merge, read_metrics, run_torchtitan

# Every test here runs torchtitan in torchrun subprocesses: the slow part of the suite.
pytestmark = pytest.mark.slow

GLOBAL_BATCH = 4  # sequences per step, whatever the layout
N_LAYERS = 6  # debugmodel
SEQ_LEN = 64


def nerve_config(tmp_path, overrides=None, nerve=None):
    cfg = merge(
        base_config(tmp_path),
        {
            "experimental": {"custom_import": "tt_nerve"},
            "job": {"custom_config_module": "nerve_plugin.torchtitan.config"},
            "model": {"name": "nerve_test_llama3_nerve"},
            "training": {"local_batch_size": GLOBAL_BATCH, "steps": 2},
            "nerve": {"enable": True, "log_freq": 1, **(nerve or {})},
        },
    )
    return merge(cfg, overrides or {})


def read_nerve(cfg) -> dict[int, dict[int, dict]]:
    """{step: {layer: record}} from the run's JSONL."""
    out: dict[int, dict[int, dict]] = {}
    path = Path(cfg["job"]["dump_folder"]) / "nerve" / "metrics.jsonl"
    for record in read_jsonl(path):
        out.setdefault(record["step"], {})[record["layer"]] = record
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    cfg = nerve_config(tmp)
    run_torchtitan(tmp, cfg, nproc=1)
    return read_nerve(cfg)


def test_reference_covers_every_layer_with_every_token(reference):
    assert sorted(reference) == [1, 2]
    for step in (1, 2):
        assert sorted(reference[step]) == list(range(N_LAYERS))
        for record in reference[step].values():
            for tap in ("pre", "post"):
                assert record[tap]["tokens"] == GLOBAL_BATCH * SEQ_LEN
                assert 0 <= record[tap]["spectral_entropy"] <= math.log(record[tap]["dim"])
                assert 1 <= record[tap]["participation_ratio"] <= record[tap]["dim"]
                assert 0 <= record[tap]["eee"] <= 1
            assert 0 <= record["js"] <= math.log(2)


LAYOUTS = {
    "fsdp": {"training": {"local_batch_size": GLOBAL_BATCH // 2}, "parallelism": {"data_parallel_shard_degree": 2}},
    "tp": {"parallelism": {"data_parallel_shard_degree": 1, "tensor_parallel_degree": 2}},
    "pp": {
        "parallelism": {
            "data_parallel_shard_degree": 1,
            "pipeline_parallel_degree": 2,
            "pipeline_parallel_schedule": "1F1B",
            "pipeline_parallel_microbatch_size": 1,
        }
    },
    "fsdp_ac_full": {
        "training": {"local_batch_size": GLOBAL_BATCH // 2},
        "parallelism": {"data_parallel_shard_degree": 2},
        "activation_checkpoint": {"mode": "full"},
    },
    "fsdp_compile": {
        "training": {"local_batch_size": GLOBAL_BATCH // 2},
        "parallelism": {"data_parallel_shard_degree": 2},
        "compile": {"enable": True, "backend": "aot_eager"},
    },
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parallel_layouts_match_one_process(layout, reference, tmp_path):
    cfg = nerve_config(tmp_path, LAYOUTS[layout], nerve={"solve_placement": "spread" if layout == "fsdp" else "rank0"})
    run_torchtitan(tmp_path, cfg, nproc=2)
    got = read_nerve(cfg)
    assert sorted(got) == [1, 2]
    assert_metrics_close(got[1], reference[1])


def test_gradient_accumulation_counts_every_microbatch(reference, tmp_path):
    # Two micro-batches of 2 sequences make the reference's step of 4.
    cfg = nerve_config(
        tmp_path, {"training": {"local_batch_size": GLOBAL_BATCH // 2, "global_batch_size": GLOBAL_BATCH}}
    )
    run_torchtitan(tmp_path, cfg, nproc=1)
    assert_metrics_close(read_nerve(cfg)[1], reference[1])


def test_training_is_bitwise_unchanged_and_metrics_reach_torchtitans_event_file(tmp_path):
    steps = 5
    on = nerve_config(
        tmp_path / "on",
        {
            "training": {"local_batch_size": GLOBAL_BATCH // 2, "steps": steps},
            "parallelism": {"data_parallel_shard_degree": 2},
            "metrics": {"enable_tensorboard": True},
        },
    )
    off = merge(on, {"job": {"dump_folder": str(tmp_path / "off" / "outputs")}, "nerve": {"enable": False}})
    run_torchtitan(tmp_path / "on", on, nproc=2)
    run_torchtitan(tmp_path / "off", off, nproc=2)
    metrics_on, metrics_off = read_metrics(on), read_metrics(off)
    assert [m["step"] for m in metrics_on[0]] == list(range(1, steps + 1))
    # float repr round-trips exactly: equal means bitwise equal loss and grad norm at every step.
    assert metrics_on == metrics_off
    assert not (Path(off["job"]["dump_folder"]) / "nerve").exists()

    tags, plugins = event_file_tags(on)
    assert "loss_metrics/global_avg_loss" in tags  # the very run that holds the loss
    for layer in range(N_LAYERS):
        for metric in ("spectral_entropy", "participation_ratio", "eee"):
            for tap in ("pre", "post"):
                assert tags[f"nerve/{metric}_{tap}/layer_{layer:03d}"] == steps
        assert tags[f"nerve/js/layer_{layer:03d}"] == steps
    assert tags["nerve/eigenspectrum"] == steps
    assert "custom_scalars" in plugins


def event_file_tags(cfg):
    """{tag: number of points} and the plugin names found in the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted(Path(cfg["job"]["dump_folder"]).glob("tb/*/events.out.tfevents.*"))
    assert len(files) == 1, files
    tags, plugins = {}, set()
    for event in EventFileLoader(str(files[0])).Load():
        for value in event.summary.value:
            tags[value.tag] = tags.get(value.tag, 0) + 1
            if value.metadata.plugin_data.plugin_name:
                plugins.add(value.metadata.plugin_data.plugin_name)
    return tags, plugins


def test_resume_logs_at_the_same_steps(tmp_path):
    overrides = {"training": {"steps": 5}, "checkpoint": {"enable": True, "interval": 2, "last_save_model_only": False}}
    # overlapped solves: step 1's records arrive at step 4, and step 4's are flushed before its checkpoint
    nerve = {"log_freq": 4, "solve_timing": "overlap"}
    full = nerve_config(tmp_path / "full", overrides, nerve=nerve)
    run_torchtitan(tmp_path / "full", full, nproc=1)
    assert sorted(read_nerve(full)) == [1, 4]

    # A second job resumes from the first one's step-2 checkpoint: it must log step 4 (not its own second
    # step) and measure exactly what the uninterrupted run measured there.
    resumed = nerve_config(tmp_path / "resumed", overrides, nerve=nerve)
    source = Path(full["job"]["dump_folder"]) / "checkpoint" / "step-2"
    shutil.copytree(source, Path(resumed["job"]["dump_folder"]) / "checkpoint" / "step-2")
    # ...where an interrupted attempt had already written the JSONL of steps 1 and 4 before dying after step 4
    jsonl = Path(resumed["job"]["dump_folder"]) / "nerve" / "metrics.jsonl"
    jsonl.parent.mkdir(parents=True)
    shutil.copy(Path(full["job"]["dump_folder"]) / "nerve" / "metrics.jsonl", jsonl)
    # ...and its TensorBoard run, in a folder of an earlier minute than the one torchtitan opens now
    resumed = merge(resumed, {"metrics": {"enable_tensorboard": True}})
    tb = Path(resumed["job"]["dump_folder"]) / "tb"
    stale = SummaryWriter(str(tb / "20000101-0000"))
    for step in range(1, 6):
        stale.add_scalar("loss_metrics/global_avg_loss", 100.0 + step, step)
    for step in (1, 4):
        stale.add_scalar("nerve/js/layer_000", 9.0, step)
    stale.close()
    run_torchtitan(tmp_path / "resumed", resumed, nproc=1)
    lines = read_jsonl(jsonl)
    steps = [line["step"] for line in lines]
    assert steps == [1] * 6 + [4] * 6  # step 4 once: the stale copy was dropped, the new one written
    assert_metrics_close({rec["layer"]: rec for rec in lines if rec["step"] == 4}, read_nerve(full)[4], rel=1e-12)

    # One TensorBoard run: the resumed steps replace the attempt's from step 3 on, for TensorBoard's readers.
    assert sorted(p.name for p in tb.iterdir()) == ["20000101-0000"]
    loss = {m["step"]: m["loss"] for m in read_metrics(resumed)[0]}
    for shown in points(tb / "20000101-0000", "loss_metrics/global_avg_loss"):
        assert [s for s, _ in shown] == [1, 2, 3, 4, 5]
        assert shown[:2] == [(1, 101.0), (2, 102.0)]  # before the resume: the attempt's own
        assert [v for _, v in shown[2:]] == pytest.approx([loss[s] for s in (3, 4, 5)], rel=1e-6)
    js = next(rec["js"] for rec in lines if rec["step"] == 4 and rec["layer"] == 0)
    for shown in points(tb / "20000101-0000", "nerve/js/layer_000"):
        assert shown[0] == (1, 9.0) and [s for s, _ in shown] == [1, 4] and shown[1][1] == pytest.approx(js, rel=1e-6)


@pytest.mark.parametrize(
    "nerve, message",
    [
        # checks that need the model: after config parsing (tests/test_config_validation.py has those), still
        # before the first step and alike on every rank
        ({"layers": [0, 99]}, "[nerve] layers = [0, 99] is not allowed: expected indices of the model's 6 blocks"),
        # debugmodel: 6 layers x 2 taps of D = 768, float64 on the CPU: 9.4 MB a layer + 9.4 MB working copies
        ({"memory_budget_gb": 0.03}, "[nerve] memory_budget_gb = 0.03 is too small: one logging step needs 0.06 GiB"),
    ],
)
def test_model_dependent_nerve_errors_stop_the_run_at_start_up(tmp_path, nerve, message):
    cfg = nerve_config(tmp_path, nerve=nerve)
    proc = run_torchtitan(tmp_path, cfg, nproc=2, check=False, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stdout
    if "memory_budget_gb" in nerve:
        assert "set [nerve] max_layers_per_step = 2" in proc.stdout  # 2 x 9.4 + 9.4 MB fit in 0.03 GiB
    assert "step:" not in proc.stdout  # stopped before training


def test_disabled_nerve_registers_no_hook_and_changes_no_builder(tmp_path, monkeypatch):
    import torch
    from torchtitan.config import ConfigManager
    from torchtitan.distributed import ParallelDims
    from torchtitan.models.llama3 import Transformer, llama3_args

    import nerve_plugin.torchtitan  # noqa: F401  (registers the wrapped specs)
    from nerve_plugin.torchtitan import session as sessions
    from nerve_plugin.torchtitan.v0_2.train_spec import new_session
    from torchtitan.protocols.train_spec import get_train_spec

    base = ["--job.custom_config_module", "nerve_plugin.torchtitan.config", "--job.dump_folder", str(tmp_path)]
    job_config = ConfigManager().parse_args(base)
    assert job_config.nerve.enable is False
    spec = get_train_spec("llama3")
    dims = ParallelDims(dp_shard=1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    # An enabled job's session where the builders look for one, ready to hook whatever they hand it: without it,
    # a wrapper that ignored `enable` would have no session to attach to and this test could not fail.
    enabled = ConfigManager().parse_args([*base, "--nerve.enable"])
    session = new_session(enabled, dims, "llama3", llama3_args["debugmodel"])
    monkeypatch.setattr(job_config, sessions.SESSION_ATTRIBUTE, session, raising=False)
    with torch.device("meta"):
        model = Transformer(llama3_args["debugmodel"])
    spec.parallelize_fn(model, dims, job_config)
    assert hook_count(model) == 0
    assert session.monitor is None  # the model was not handed to the session
    # ... nor the session to the model, where the LR scheduler builder looks for one to hook the optimizer step
    assert not hasattr(model, sessions.SESSION_ATTRIBUTE)
    processor = spec.build_metrics_processor_fn(job_config, dims, llama3_args["debugmodel"])
    assert sessions.session_of(job_config) is session  # no new session for a disabled job
    assert "close" not in vars(processor)  # torchtitan's own close, not the one that also ends a session
    processor.close()


def test_model_without_a_tap_spec_is_refused_at_start_up():
    from torchtitan.config import ConfigManager

    from nerve_plugin.torchtitan.v0_2.train_spec import new_session

    job_config = ConfigManager().parse_args(
        [
            "--job.custom_config_module",
            "nerve_plugin.torchtitan.config",
            "--nerve.enable",
            "--model.name",
            "deepseek_v3",
        ]
    )
    with pytest.raises(ValueError, match="no tap spec for model.name = 'deepseek_v3': set \\[nerve\\] spec"):
        new_session(job_config, parallel_dims=None, model_name="deepseek_v3")


@pytest.mark.parametrize(
    "args, budget", [([], 0.05), (["--nerve.max_overhead", "0.01"], 0.01), (["--nerve.max_overhead", "0"], 0)]
)
def test_max_overhead_reaches_the_monitor(args, budget):
    from torchtitan.config import ConfigManager
    from torchtitan.distributed import ParallelDims

    from nerve_plugin.torchtitan.v0_2.train_spec import new_session

    job_config = ConfigManager().parse_args(
        ["--job.custom_config_module", "nerve_plugin.torchtitan.config", "--nerve.enable", *args]
    )
    dims = ParallelDims(dp_shard=1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    session = new_session(job_config, dims, model_name="llama3")
    assert session.monitor_config.max_overhead == budget
