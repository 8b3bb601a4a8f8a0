"""The README's first command: nerve-demo trains offline and prints a per-layer table."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli
from helpers import read_jsonl
from torchtitan_harness import REPO_ROOT

from nerve_plugin.demo import failure_report, format_table


def run_demo(tmp_path, dump):
    return subprocess.run(
        [sys.executable, "-m", "nerve_plugin.demo", "--steps", "3", "--dump-folder", str(dump),
         "--", "--nerve.log_freq", "2", "--metrics.log_freq", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "2"},
    )  # fmt: skip


# The demo trains torchtitan's Trainer: the slow part of the suite.
@pytest.mark.slow
def test_demo_trains_offline_and_prints_the_last_metrics(tmp_path):
    dump = tmp_path / "demo"
    proc = run_demo(tmp_path, dump)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "step:  3  loss:" in out  # progress
    assert f"TensorBoard run: {dump / 'tb'}" in out
    records = read_jsonl(dump / "nerve" / "metrics.jsonl")
    assert sorted({r["step"] for r in records}) == [1, 2]
    # The table is the last logged step's records, one row per layer of the debug model.
    assert format_table([r for r in records if r["step"] == 2], 2) in out
    assert [r["layer"] for r in records if r["step"] == 2] == list(range(6))
    # Trained on the stdlib corpus with nerve's vocabulary, no network.
    log = (dump / "demo.log").read_text()
    assert "Corpus:" in log and "stdlib_bpe.tiktoken" in log

    # Seeded: a second run gives the same metrics, bit for bit (the README's table is what a user gets).
    again = run_demo(tmp_path, tmp_path / "again")
    assert again.returncode == 0, again.stdout + again.stderr
    metrics = read_jsonl(tmp_path / "again" / "nerve" / "metrics.jsonl")
    assert metrics == records


def test_help_does_not_import_torchtitan():
    # the installed command's module, as pyproject names it
    target = tomli.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]["nerve-demo"]
    module, function = target.split(":")
    code = (
        f"import sys; sys.argv = ['nerve-demo', '--help']\nfrom {module} import {function}\n"
        f"try:\n    {function}()\nexcept SystemExit:\n    pass\n"
        "assert 'torchtitan' not in sys.modules, 'nerve-demo --help imported torchtitan'\n"
    )
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: nerve-demo" in proc.stdout and time.monotonic() - start < 15


def test_a_failure_shows_the_lines_that_name_its_cause():
    # torchrun's log: the failing rank's traceback first, then pages of other output and torchrun's summary
    log = "\n".join(
        [
            "[rank0]: Traceback (most recent call last):",
            '[rank0]:   File "torchtitan/train.py", line 254, in __init__',
            "[rank0]: nerve_plugin.torchtitan.sections.NerveConfigError: [nerve] memory_budget_gb = 0.001 is too small",
            *[f"[titan] 2026-01-01 00:00:{i % 60:02d},000 - root - INFO - shutting down {i}" for i in range(200)],
            "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:",
            "torchtitan.train FAILED",
            "Root Cause (first observed failure):",
            "  exitcode  : 1 (pid: 123)",
        ]
    )
    report = failure_report(log, 1, Path("dump/demo.log")).splitlines()
    assert report[:3] == [
        "nerve-demo: torchtitan exited with 1.",
        "The lines of the log that say what went wrong:",
        "  nerve_plugin.torchtitan.sections.NerveConfigError: [nerve] memory_budget_gb = 0.001 is too small",
    ]
    assert report[3] == "The last 15 lines of dump/demo.log:" and report[-1] == "  exitcode  : 1 (pid: 123)"
    assert not any("ChildFailedError" in line for line in report[:4])  # torchrun's summary never says why


def test_format_table_rows():
    record = {
        "layer": 3,
        "pre": {"spectral_entropy": 1.23456, "participation_ratio": 10.04, "eee": 0.5},
        "post": {"spectral_entropy": 2.0, "participation_ratio": 20.0, "eee": 0.25},
        "js": 0.0123,
    }
    table = format_table([record], 7).splitlines()
    assert table[0] == "step 7 (pre -> post)"
    assert table[-1].split() == ["3", "1.235", "->", "2.000", "10.0", "->", "20.0", "0.500", "->", "0.250", "0.0123"]


def test_format_table_shows_a_failed_tap_as_a_dash():
    # a tap with non-finite statistics has null metrics in the JSONL (and no JS)
    record = {
        "layer": 2,
        "pre": {"spectral_entropy": None, "participation_ratio": None, "eee": None, "status": "non-finite statistics"},
        "post": {"spectral_entropy": 2.0, "participation_ratio": 20.0, "eee": 0.25},
        "js": None,
    }
    row = format_table([record], 7).splitlines()[-1].split()
    assert row == ["2", "-", "->", "2.000", "-", "->", "20.0", "-", "->", "0.250", "-"]
