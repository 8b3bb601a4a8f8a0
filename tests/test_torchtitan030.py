"""NerVE on torchtitan 0.3.0 (its config-registry route, nerve_plugin/torchtitan/v0_3), on CPU under torchrun.

Runs where torchtitan 0.3.x is installed (.ci/run's second environment) and is skipped elsewhere. The jobs are
tests/tt030.py's ``tiny`` config: llama3 debugmodel on synthetic tokens, weights independent of the parallelism.
"""

import copy
import re
import shutil
from pathlib import Path

import pytest
import torch

from helpers import assert_metrics_close, read_jsonl
from nerve_plugin.demo import torchtitan_version
from torchtitan_harness import read_metrics, run_torchtitan_args


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not torchtitan_version().startswith("0.3."), reason="needs torchtitan 0.3.x (.ci/run's second environment)"
    ),
]

N_LAYERS = 6  # debugmodel
JOB = ["--module", "tt030", "--config", "tiny"]
NERVE = ["--nerve.enable", "--nerve.log_freq", "1"]
LAYOUTS = {
    "fsdp": ["--parallelism.data_parallel_shard_degree", "2", "--training.local_batch_size", "2"],
    "tp": ["--parallelism.tensor_parallel_degree", "2"],
    "fsdp_full_ac": [
        "--parallelism.data_parallel_shard_degree",
        "2",
        "--training.local_batch_size",
        "2",
        "activation-checkpoint:full",
    ],
    "fsdp_compile": [
        "--parallelism.data_parallel_shard_degree",
        "2",
        "--training.local_batch_size",
        "2",
        "--compile.enable",
        "--compile.backend",
        "aot_eager",
    ],
}
# PP is not among them: torchtitan 0.3.0's own PP fails on CPU with torch 2.13, NerVE off ("Decoder.forward() got
# an unexpected keyword argument 'arg_mbs'").


def run(tmp_path, *args, nproc=1, check=True):
    folder = Path(tmp_path) / "outputs"
    proc = run_torchtitan_args(tmp_path, [*JOB, "--dump_folder", str(folder), *args], nproc=nproc, check=check)
    return folder, proc


def nerve_records(folder) -> dict[int, dict[int, dict]]:
    out: dict[int, dict[int, dict]] = {}
    for record in read_jsonl(folder / "nerve" / "metrics.jsonl"):
        out.setdefault(record["step"], {})[record["layer"]] = record
    return out


def tyro_text(stdout: str) -> str:
    """torchtitan 0.3.0's error as one line: tyro prints it in a box, wrapped, each line with its rank prefix."""
    return " ".join(re.sub(r"\[rank\d+\]:|[│╭╮╰╯─]", " ", stdout).split())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder, _ = run(tmp_path_factory.mktemp("reference030"), *NERVE)
    return nerve_records(folder)


def test_every_tap_sees_every_token_of_each_logging_step(reference):
    # one process, 4 sequences x 64 tokens a step (the metrics' float64 references are the core's tests; here
    # the 0.3.0 route is what is tested: the taps, the step source, the end of a step)
    assert sorted(reference) == [1, 2]
    for step in (1, 2):
        for layer in range(N_LAYERS):
            for tap in ("pre", "post"):
                assert reference[step][layer][tap]["tokens"] == 4 * 64
                assert reference[step][layer][tap]["dim"] == 768


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parallel_layouts_match_one_process(layout, reference, tmp_path):
    folder, _ = run(tmp_path, *NERVE, *LAYOUTS[layout], nproc=2)
    got = nerve_records(folder)
    assert sorted(got) == [1, 2]
    assert_metrics_close(got[1], reference[1])


def test_training_is_bitwise_unchanged_and_metrics_reach_torchtitans_event_file(tmp_path):
    fsdp = LAYOUTS["fsdp"]
    on, _ = run(tmp_path / "on", *NERVE, *fsdp, "--metrics.enable_tensorboard", nproc=2)
    off, _ = run(tmp_path / "off", *fsdp, "--metrics.enable_tensorboard", nproc=2)
    metrics_on, metrics_off = read_metrics(on), read_metrics(off)
    assert [m["step"] for m in metrics_on[0]] == [1, 2]
    assert metrics_on == metrics_off  # float repr round-trips: equal means bitwise equal loss and grad norm
    assert not (off / "nerve").exists()

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (events,) = sorted(on.glob("tb/*/events.out.tfevents.*"))
    tags = {}
    for event in EventFileLoader(str(events)).Load():
        for value in event.summary.value:
            tags[value.tag] = tags.get(value.tag, 0) + 1
    assert "loss_metrics/global_avg_loss" in tags  # the very run that holds the loss
    for layer in range(N_LAYERS):
        for metric in ("spectral_entropy", "participation_ratio", "eee"):
            for tap in ("pre", "post"):
                assert tags[f"nerve/{metric}_{tap}/layer_{layer:03d}"] == 2
        assert tags[f"nerve/js/layer_{layer:03d}"] == 2


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--nerve.log_freq", "0", "[nerve] log_freq = 0 is not allowed: expected an integer >= 1"),
        ("--nerve.taps", "mid", "[nerve] taps = ['mid'] is not allowed"),
        ("--nerve.layers", "7", "[nerve] layers = [7] is not allowed: expected indices of the model's 6 blocks"),
    ],
)
def test_a_bad_value_stops_every_rank_before_step_1_naming_the_key(flag, value, message, tmp_path):
    _, proc = run(tmp_path, "--nerve.enable", flag, value, *LAYOUTS["fsdp"], nproc=2, check=False)
    assert proc.returncode != 0
    assert message in tyro_text(proc.stdout)
    assert "step:" not in proc.stdout


def test_resume_logs_each_step_once_and_measures_what_the_uninterrupted_run_measured(tmp_path):
    # overlapped solves: step 1's records arrive at step 4, and step 4's are flushed before its checkpoint
    job = [
        *NERVE[:1],
        "--nerve.log_freq",
        "4",
        "--nerve.solve_timing",
        "overlap",
        "--training.steps",
        "5",
        "--checkpoint.enable",
        "--checkpoint.interval",
        "2",
        "--checkpoint.no-last-save-model-only",
    ]
    full, _ = run(tmp_path / "full", *job)
    assert sorted(nerve_records(full)) == [1, 4]

    # A second job resumes from the first one's step-2 checkpoint, where an interrupted attempt had already
    # written the JSONL of steps 1 and 4: it must log step 4 once, measured as the uninterrupted run measured it.
    resumed = tmp_path / "resumed" / "outputs"
    shutil.copytree(full / "checkpoint" / "step-2", resumed / "checkpoint" / "step-2")
    (resumed / "nerve").mkdir(parents=True)
    shutil.copy(full / "nerve" / "metrics.jsonl", resumed / "nerve" / "metrics.jsonl")
    _, proc = run(tmp_path / "resumed", *job)
    assert "Training starts at step 3" in proc.stdout
    lines = read_jsonl(resumed / "nerve" / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1] * N_LAYERS + [4] * N_LAYERS
    again = {record["layer"]: record for record in lines if record["step"] == 4}
    assert_metrics_close(again, nerve_records(full)[4], rel=1e-12)


def test_nerve_demo_trains_offline_on_0_3_and_prints_the_last_metrics(tmp_path):
    from test_demo import run_demo

    from nerve_plugin.demo import format_table

    dump = tmp_path / "demo"
    proc = run_demo(tmp_path, dump)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step:  3  loss:" in proc.stdout
    assert f"TensorBoard run: {dump / 'tb'}" in proc.stdout
    records = read_jsonl(dump / "nerve" / "metrics.jsonl")
    assert sorted({r["step"] for r in records}) == [1, 2]
    assert [r["layer"] for r in records if r["step"] == 2] == list(range(N_LAYERS))
    assert format_table([r for r in records if r["step"] == 2], 2) in proc.stdout
    log = (dump / "demo.log").read_text()
    assert "torchtitan version: 0.3." in log  # the route the installed torchtitan takes
    assert "Corpus: " in log and "stdlib_bpe.tiktoken" in log  # nerve's corpus and shipped vocabulary, offline


class Toy(torch.nn.Module):
    """An embedding, two hidden matrices (Muon's) and an output head, a norm weight and a bias (AdamW's)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tok_embeddings = torch.nn.Embedding(16, 8)
        self.w1 = torch.nn.Linear(8, 12)
        self.w2 = torch.nn.Linear(12, 8, bias=False)
        self.norm = torch.nn.LayerNorm(8)
        self.output = torch.nn.Linear(8, 16, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))


def _set_grads(model, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_muon_container_is_torch_muon_plus_adamw_bitwise_and_checkpoints_by_name():
    from torchtitan.components.optimizer import default_adamw

    from nerve_plugin.torchtitan.muon import MuonSection
    from nerve_plugin.torchtitan.v0_3.muon import MuonContainer

    base = default_adamw(lr=0.01)
    config = MuonContainer.Config(param_groups=base.param_groups, implementation="foreach", muon=MuonSection())
    model, ref_model = Toy(), Toy()
    container = config.build(model_parts=[model])
    hidden = {"w1.weight", "w2.weight"}
    ref_params = dict(ref_model.named_parameters())
    muon_kw = {"lr": 0.01, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True, "adjust_lr_fn": "match_rms_adamw"}
    reference = [
        torch.optim.Muon([ref_params[n] for n in sorted(hidden)], **muon_kw),
        torch.optim.AdamW(
            [p for n, p in ref_params.items() if n not in hidden],
            lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=True,
        ),
    ]  # fmt: skip
    for step in range(3):
        _set_grads(model, step)
        _set_grads(ref_model, step)
        container.step()
        for optimizer in reference:
            optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, ref_params[name]), name

    # 0.3.0's checkpoint format: one flat state dict keyed by parameter name; a fresh container continues bitwise
    state = copy.deepcopy(container.state_dict())  # as saving and loading a checkpoint copies it
    assert "state.w1.weight.momentum_buffer" in state and "state.norm.weight.exp_avg_sq" in state
    resumed_model = Toy()
    with torch.no_grad():
        for p, q in zip(resumed_model.parameters(), model.parameters()):
            p.copy_(q)
    resumed = config.build(model_parts=[resumed_model])
    resumed.load_state_dict(state)
    for step in range(3, 5):
        _set_grads(model, step)
        _set_grads(resumed_model, step)
        container.step()
        resumed.step()
    for p, q in zip(resumed_model.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_muon_container_refuses_param_groups_it_cannot_split():
    from torchtitan.components.optimizer import ParamGroupConfig, default_adamw

    from nerve_plugin.torchtitan.muon import MuonConfigError
    from nerve_plugin.torchtitan.v0_3.muon import MuonContainer

    groups = [ParamGroupConfig(pattern=r"norm", optimizer_name="Adam", optimizer_kwargs={"lr": 1e-3})]
    config = MuonContainer.Config(param_groups=groups + default_adamw().param_groups)
    with pytest.raises(MuonConfigError, match="expected one catch-all AdamW group"):
        config.build(model_parts=[Toy()])


def test_muon_trains_under_fsdp_with_nerve_and_takes_its_keys_from_the_command_line(tmp_path):
    folder, proc = run(tmp_path, "--config", "tiny_muon", *NERVE, *LAYOUTS["fsdp"], "--training.steps", "3", nproc=2)
    assert "Muon (model part 0)" in proc.stdout
    losses = [m["loss"] for m in read_metrics(folder)[0]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert sorted(nerve_records(folder)) == [1, 2, 3]
    _, bad = run(tmp_path / "bad", "--config", "tiny_muon", "--optimizer.muon.momentum", "1.0", check=False)
    text = tyro_text(bad.stdout)
    assert bad.returncode != 0 and "[muon] momentum = 1.0 is not allowed: expected a number in [0, 1)" in text


@pytest.mark.parametrize("enable", [False, True])
def test_the_parallelize_wrapper_hooks_the_model_only_with_nerve_on(enable):
    # In one process, without a Trainer: what NerveTrainer hands torchtitan as parallelize_fn, on the model
    # torchtitan would give it. Off, nothing is hooked and no session exists; on, the taps' hooks are there (the
    # same check fails if the wrapper ignored enable).
    from torchtitan.distributed import ParallelDims

    from helpers import hook_count
    from nerve_plugin.torchtitan.v0_3.trainer import NerveTrainer
    from tt030 import tiny

    config = tiny()
    config.nerve.enable = enable
    trainer = NerveTrainer.__new__(NerveTrainer)  # the wrapper needs only the session slot
    trainer.nerve_session = None
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, world_size=1)
    with torch.device("meta"):
        model = config.model_spec.model.build()
    handed = []
    parallelize = trainer._parallelizing(config, lambda m, **kwargs: handed.append(m) or m)
    assert parallelize(model, parallel_dims=dims) is model and handed == [model]
    if enable:
        assert trainer.nerve_session is not None and hook_count(model) > 0
    else:
        assert trainer.nerve_session is None and hook_count(model) == 0
