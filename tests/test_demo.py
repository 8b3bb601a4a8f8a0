"""The README's first command: nerve-demo trains offline and prints a per-layer table."""

import json
import subprocess
import sys

import pytest
from torchtitan_harness import REPO_ROOT

from nerve_plugin.torchtitan.demo import format_table

# The demo trains torchtitan's Trainer: the slow part of the suite.
pytestmark = pytest.mark.slow


def test_demo_trains_offline_and_prints_the_last_metrics(tmp_path):
    dump = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "nerve_plugin.torchtitan.demo", "--steps", "3", "--dump-folder", str(dump),
         "--", "--nerve.log_freq", "2", "--metrics.log_freq", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "2"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "step:  3  loss:" in out  # progress
    assert f"TensorBoard run: {dump / 'tb'}" in out
    records = [json.loads(line) for line in (dump / "nerve" / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in records}) == [1, 2]
    # The table is the last logged step's records, one row per layer of the debug model.
    assert format_table([r for r in records if r["step"] == 2], 2) in out
    assert [r["layer"] for r in records if r["step"] == 2] == list(range(6))
    # Trained on the stdlib corpus with nerve's vocabulary, no network.
    log = (dump / "demo.log").read_text()
    assert "Corpus:" in log and "stdlib_bpe.tiktoken" in log


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
