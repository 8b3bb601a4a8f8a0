"""torchtitan's real Trainer on CPU (nerve_plugin.torchtitan.cpu_mode), under torchrun.

Every 2-rank run trains on the same global batches (4 synthetic samples a step) from the
same initial weights as a 1-process reference run (see tests/tt_synthetic.py), so each
parallelism must reproduce the reference's losses and gradient norms, not just finish.
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest

from torchtitan_harness import REPO_ROOT, TESTS_DIR, base_config, merge, parse_steps, read_metrics, run_torchtitan

# Every test here runs torchtitan in torchrun subprocesses: the slow part of the suite.
pytestmark = pytest.mark.slow

STEPS = 3
GLOBAL_BATCH = 4  # samples a step, whatever the dp degree
SEQ_LEN = 64


def _config(tmp_path, dp: int, overrides: dict | None = None) -> dict:
    cfg = merge(
        base_config(tmp_path),
        {"training": {"steps": STEPS, "seq_len": SEQ_LEN, "local_batch_size": GLOBAL_BATCH // dp}},
    )
    return merge(cfg, overrides or {})


def _train(tmp_path, nproc: int, dp: int, overrides: dict | None = None):
    """Run, check it logged every step with a finite loss, return the exact metrics
    ({step: {"loss", "grad_norm", ...}}) of the rank that holds the real loss."""
    cfg = _config(tmp_path, dp, overrides)
    proc = run_torchtitan(tmp_path, cfg, nproc=nproc)
    logged = parse_steps(proc.stdout)
    assert sorted(logged) == list(range(nproc)), "every rank logs its metrics"
    for rank, by_step in logged.items():
        assert sorted(by_step) == list(range(1, STEPS + 1)), f"rank {rank} stopped early"
    for step in range(1, STEPS + 1):
        # ranks without PP's last stage log a loss of -1
        losses = [s[step]["loss"] for s in logged.values() if s[step]["loss"] != -1]
        assert losses and all(math.isfinite(x) for x in losses), (step, losses)
        assert all(math.isfinite(s[step]["grad_norm"]) for s in logged.values())
    exact = {r: {m["step"]: m for m in ms} for r, ms in read_metrics(cfg).items()}
    rank = max(r for r in exact if exact[r][1]["loss"] != -1)
    return exact[rank]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, no parallelism, the whole global batch."""
    return _train(tmp_path_factory.mktemp("ref"), nproc=1, dp=1)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return _train(
        tmp_path_factory.mktemp("fsdp"), nproc=2, dp=2, overrides={"parallelism": {"data_parallel_shard_degree": 2}}
    )


def _assert_matches(run, ref, loss_tol=1e-5, grad_rtol=1e-3):
    # losses agree to ~1e-6 in practice. grad_norm: torch's fp32 CPU norm of a 6M-element
    # gradient is itself only good to ~1e-4 relative; a wrong divide factor is off 2x or more
    for step in range(1, STEPS + 1):
        assert run[step]["loss"] == pytest.approx(ref[step]["loss"], abs=loss_tol), step
        assert run[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=grad_rtol), step


def test_fsdp_matches_single_process(fsdp, reference):
    # steps 2-3 depend on the reduced gradients. AdamW is almost scale-invariant: a divide
    # factor of 2 (tried) moved the step-3 loss by 5e-6 only, but halved the grad norm.
    assert reference[1]["loss"] > 7  # ~ln(vocab) at init: random tokens, a fresh model
    _assert_matches(fsdp, reference)


def test_fsdp_max_loss_is_per_rank(fsdp):
    # global_max_loss is a max over ranks' local losses: above the mean, from a real all-reduce
    assert all(fsdp[s]["max_loss"] > fsdp[s]["loss"] for s in range(1, STEPS + 1))


def test_fsdp_with_full_activation_checkpointing(tmp_path, reference):
    run = _train(
        tmp_path,
        nproc=2,
        dp=2,
        overrides={"parallelism": {"data_parallel_shard_degree": 2}, "activation_checkpoint": {"mode": "full"}},
    )
    _assert_matches(run, reference)


def test_tensor_parallel_with_selective_activation_checkpointing(tmp_path, reference):
    run = _train(
        tmp_path,
        nproc=2,
        dp=1,
        overrides={
            "parallelism": {"data_parallel_shard_degree": 1, "tensor_parallel_degree": 2},
            "activation_checkpoint": {"mode": "selective"},
        },
    )
    _assert_matches(run, reference)


def test_pipeline_parallel(tmp_path, reference):
    run = _train(
        tmp_path,
        nproc=2,
        dp=1,
        overrides={
            "parallelism": {
                "data_parallel_shard_degree": 1,
                "pipeline_parallel_degree": 2,
                "pipeline_parallel_schedule": "1F1B",
                "pipeline_parallel_microbatch_size": 1,
            }
        },
    )
    # torchtitan 0.2.2 backpropagates PP's summed loss without dividing by the global
    # token count (pytorch/torchtitan#2972): gradients are that many times larger. Both
    # runs clip to max_norm=1 and AdamW is scale-invariant, so the losses still agree.
    tokens = GLOBAL_BATCH * SEQ_LEN
    ref = {s: {**m, "grad_norm": m["grad_norm"] * tokens} for s, m in reference.items()}
    _assert_matches(run, ref)


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (REPO_ROOT, TESTS_DIR)))}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_no_op_with_gpu_and_idempotent():
    _python("""
        from unittest import mock
        import torch
        with mock.patch("torch.cuda.is_available", return_value=True):
            from nerve_plugin.torchtitan.cpu_mode import enable_cpu_mode
            assert enable_cpu_mode() is False and enable_cpu_mode() is False

        import torch.distributed.fsdp._fully_shard._fsdp_collectives as fc
        import torchtitan.components.metrics as metrics
        import torchtitan.distributed.parallel_dims as parallel_dims
        import torchtitan.distributed.utils as dist_utils
        import torchtitan.tools.utils as tt_utils
        original = (metrics.build_device_memory_monitor, dist_utils.set_pg_timeouts,
                    fc._get_gradient_divide_factors)
        assert tt_utils.device_type == parallel_dims.device_type == "cuda"
        assert dist_utils.device_module is torch.cuda
        assert all(f.__module__.startswith(("torchtitan.", "torch.")) for f in original)
        assert not hasattr(fc._get_gradient_divide_factors, "__wrapped__")

        assert enable_cpu_mode() is True and enable_cpu_mode() is True
        for m in (tt_utils, metrics, dist_utils, parallel_dims):
            assert m.device_type == "cpu", m
        assert tt_utils.device_module is metrics.device_module is torch.cpu
        assert fc._get_gradient_divide_factors.__wrapped__ is original[2]  # wrapped once

        # gloo has no AVG / PREMUL_SUM: CPU reductions are SUM plus an explicit divide
        from torch.distributed import ReduceOp
        class G:
            def size(self): return 4
        pre, post, rs_op, ar_op = fc._get_gradient_divide_factors(G(), None, torch.float32, "cpu")
        assert (pre, post, rs_op, ar_op) == (None, 4.0, ReduceOp.SUM, ReduceOp.SUM)
        pre, post, rs_op, _ = fc._get_gradient_divide_factors(G(), None, torch.float32, "cpu", 1.0)
        assert (pre, post, rs_op) == (None, 1.0, ReduceOp.SUM)
        assert fc._get_gradient_divide_factors(G(), None, torch.float32, "cuda")[2] == ReduceOp.AVG

        stats = metrics.build_device_memory_monitor().get_peak_stats()
        assert isinstance(stats, metrics.DeviceMemStats) and stats.max_reserved_gib > 0
    """)


def test_synthetic_dataloader_resumes_from_state_dict():
    _python("""
        import torch
        from torchtitan.config import JobConfig
        import tt_synthetic

        job = JobConfig()
        job.training.seq_len, job.training.local_batch_size = 16, 2

        def loader(rank, world):
            return tt_synthetic.build_synthetic_dataloader(world, rank, None, job)

        a = loader(0, 1)
        it = iter(a)
        first = [next(it) for _ in range(2)]
        state = a.state_dict()
        expected = next(it)
        b = loader(0, 1)
        b.load_state_dict(state)
        resumed = next(iter(b))
        assert torch.equal(resumed[0]["input"], expected[0]["input"])
        assert torch.equal(resumed[1], expected[1])
        assert torch.equal(first[0][0]["input"][:, 1:], first[0][1][:, :-1])  # labels: next token
        assert int(first[0][1].max()) < tt_synthetic.VOCAB

        # two dp ranks together see exactly the 1-rank stream
        ranks = [next(iter(loader(r, 2)))[0]["input"] for r in (0, 1)]
        whole = first[0][0]["input"]
        assert torch.equal(ranks[0][0], whole[0]) and torch.equal(ranks[1][0], whole[1])
    """)
