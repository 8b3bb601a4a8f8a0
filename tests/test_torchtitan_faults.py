"""Faults around NerVE's outputs in torchtitan's real Trainer on CPU: a crash before the first checkpoint and a
restart into the same dump folder, two runs in one folder, SIGTERM with overlapped solves, outputs that cannot
be written at start-up or stop being writable during the run. Faults are injected by tests/tt_faults.py."""

import os
import select
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import read_jsonl
from torchtitan_harness import REPO_ROOT, run_torchtitan
from test_torchtitan_nerve import N_LAYERS, nerve_config

pytestmark = pytest.mark.slow


def faulty(tmp_path, fault: str, overrides=None, nerve=None):
    cfg = nerve_config(tmp_path, overrides, nerve={"max_overhead": 0, **(nerve or {})})
    cfg["experimental"]["custom_import"] = "tt_faults"
    return cfg, {"NERVE_TEST_FAULT": fault}


def jsonl(cfg) -> Path:
    return Path(cfg["job"]["dump_folder"]) / "nerve" / "metrics.jsonl"


def keys(path: Path) -> Counter:
    """(step, layer) -> how often; every line must parse."""
    return Counter((r["step"], r["layer"]) for r in read_jsonl(path))


def test_a_restart_after_a_crash_before_the_first_checkpoint_logs_each_step_once(tmp_path):
    # attempt 1 dies (SIGKILL) after step 2, in the middle of a line, before any checkpoint
    cfg, env = faulty(tmp_path, "kill:2", {"training": {"steps": 3}})
    proc = run_torchtitan(tmp_path, cfg, nproc=1, env=env, check=False)
    assert proc.returncode != 0 and "step:  3" not in proc.stdout
    assert "nerve step 2: 6 layers" in proc.stdout, proc.stdout[-5000:]
    crashed = jsonl(cfg).read_text()
    assert crashed.endswith('"pre": {"tok') and crashed.count("\n") == 2 * N_LAYERS

    # attempt 2, the same job into the same folder (its lock is the dead process's: no obstacle)
    again = nerve_config(tmp_path, {"training": {"steps": 3}}, nerve={"max_overhead": 0})
    proc = run_torchtitan(tmp_path, again, nproc=1)
    assert keys(jsonl(again)) == Counter({(step, layer): 1 for step in (1, 2, 3) for layer in range(N_LAYERS)})
    (aside,) = jsonl(cfg).parent.glob("metrics.jsonl.2*")  # kept aside, with a date-time suffix
    assert aside.read_text() == crashed
    assert f"are kept as {aside}" in proc.stdout


def _hold_the_folder(path: Path) -> subprocess.Popen:
    """Another run writing `path`: a process holding nerve's lock on it, until killed."""
    code = (
        "import sys, time; from nerve_plugin.writers import open_jsonl; lock = open_jsonl(sys.argv[1]); "
        "print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    ready, _, _ = select.select([holder.stdout], [], [], 60)
    assert ready and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_into_the_same_folder_is_refused_at_start_up(tmp_path):
    cfg = nerve_config(tmp_path)
    holder = _hold_the_folder(jsonl(cfg))
    try:
        proc = run_torchtitan(tmp_path, cfg, nproc=2, check=False, timeout=180)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert proc.returncode != 0
    assert (
        f"nerve: another run is writing {jsonl(cfg).parent} (pid {holder.pid} on host {socket.gethostname()}"
        in proc.stdout
    )
    assert "step:" not in proc.stdout  # refused before step 1
    assert not jsonl(cfg).exists()


@pytest.mark.parametrize("timing", ["overlap", "stream"])
def test_sigterm_writes_the_records_already_solved(tmp_path, timing):
    # deferred: step 2's records are written at step 4, step 4's would wait for step 6; SIGTERM comes after step 4
    cfg, env = faulty(tmp_path, "sigterm:4", {"training": {"steps": 10}}, nerve={"log_freq": 2, "solve_timing": timing})
    start = time.monotonic()
    proc = run_torchtitan(tmp_path, cfg, nproc=1, env=env, check=False, timeout=240)
    assert "tt_faults: SIGTERM to torchrun after step 4" in proc.stdout
    assert "still running 60 s after SIGTERM" not in proc.stdout  # the signal still stopped the worker
    assert proc.returncode != 0 and "step:  5" not in proc.stdout
    assert keys(jsonl(cfg)) == Counter({(step, layer): 1 for step in (1, 2, 4) for layer in range(N_LAYERS)})
    assert "nerve: SIGTERM: wrote the 6 records already solved (steps [4])" in proc.stdout
    assert time.monotonic() - start < 200


@pytest.mark.parametrize("where", ["metrics.jsonl is a folder", "nerve is a file"])
def test_an_unwritable_output_stops_the_run_before_step_1(tmp_path, where):
    cfg = nerve_config(tmp_path)
    path = jsonl(cfg)
    if where == "metrics.jsonl is a folder":
        path.mkdir(parents=True)
        expected = f"nerve: cannot write its JSONL output {path}: it is a folder"
    else:
        # the read-only folder of a root user (chmod does not stop root): a regular file where the folder goes
        path.parent.parent.mkdir(parents=True)
        path.parent.write_text("")
        expected = f"nerve: cannot write its JSONL output {path}: its folder {path.parent} cannot be made"
    proc = run_torchtitan(tmp_path, cfg, nproc=2, check=False, timeout=180)
    assert proc.returncode != 0
    assert expected in proc.stdout
    assert "step:" not in proc.stdout


@pytest.mark.parametrize("on_error", ["warn", "raise"])
def test_a_write_failing_during_the_run_stops_only_nerve_unless_asked(tmp_path, on_error):
    cfg, env = faulty(tmp_path, "jsonl_folder:2", {"training": {"steps": 4}}, nerve={"on_error": on_error})
    proc = run_torchtitan(tmp_path, cfg, nproc=1, env=env, check=False)
    failure = f"nerve: writing step 3 to {jsonl(cfg)} failed (IsADirectoryError"
    assert failure in proc.stdout
    if on_error == "warn":
        assert proc.returncode == 0 and "step:  4" in proc.stdout  # training went on
        assert proc.stdout.count("nerve stops writing there") == 1
    else:
        assert proc.returncode != 0 and "step:  4" not in proc.stdout
        assert "[nerve] on_error = 'raise' stops the run" in proc.stdout
