"""NerVE's JSONL output under faults, through NerveLoop and the writers: outputs that cannot be written at
start-up, two runs in one folder, a disk that fills up mid-line, the resume rewrite's temporary file, and the
records already solved when a signal stops the process. (The torchtitan route: tests/test_torchtitan_faults.py.)
"""

import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from helpers import read_jsonl
from nerve_plugin import NerveLoop
from nerve_plugin.writers import JsonlWriter, NerveOutputError
from toy_model import ToyModel

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = REPO_ROOT / "tests"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)]), "OMP_NUM_THREADS": "1"}


def loop(path, **options):
    return NerveLoop(ToyModel(8, 12, 3), blocks="layers", up="w1", down="w2", log_freq=2, jsonl=str(path), **options)


def train(nerve, steps):
    logged = []
    for step in range(1, steps + 1):
        nerve.begin_step(step)
        nerve.monitor.parts[0](torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(step))).sum().backward()
        if nerve.end_step(step):
            logged.append(step)
    return logged


def keys(path) -> Counter:
    return Counter((r["step"], r["layer"]) for r in read_jsonl(path))


# -- start-up ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["a folder", "a read-only folder"])
def test_an_unwritable_jsonl_stops_at_start_up_naming_the_path(tmp_path, where):
    # these used to pass start-up and fail (or be dropped) at the first logging step
    if where == "a folder":
        path = tmp_path / "metrics.jsonl"
        path.mkdir()
        expected = f"nerve: cannot write its JSONL output {path}: it is a folder"
    elif os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        path = folder / "metrics.jsonl"
        expected = f"nerve: cannot write its JSONL output {path}: its folder {folder} is not writable (PermissionError"
    else:
        # root writes into a read-only folder anyway: a regular file where the folder goes cannot be written either
        (tmp_path / "nerve").write_text("")
        path = tmp_path / "nerve" / "metrics.jsonl"
        expected = f"nerve: cannot write its JSONL output {path}: its folder {path.parent} cannot be made"
    try:
        with pytest.raises(NerveOutputError) as error:
            loop(path)
    finally:
        if where == "a read-only folder" and os.geteuid() != 0:
            folder.chmod(0o755)
    assert str(error.value).startswith(expected)


def _hold(path: Path) -> subprocess.Popen:
    """Another run writing `path`: a process holding nerve's lock on it, until killed."""
    code = (
        "import sys, time; from nerve_plugin.writers import open_jsonl; lock = open_jsonl(sys.argv[1]); "
        "print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True, env=ENV)
    ready, _, _ = select.select([holder.stdout], [], [], 60)
    assert ready and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_one_jsonl_is_refused_and_a_dead_runs_lock_is_not(tmp_path):
    path = tmp_path / "nerve" / "metrics.jsonl"
    holder = _hold(path)
    try:
        with pytest.raises(NerveOutputError) as error:
            loop(path)
        assert str(error.value).startswith(
            f"nerve: another run is writing {path.parent} (pid {holder.pid} on host {socket.gethostname()}, "
            f"lock {path}.lock)"
        )
    finally:
        holder.kill()  # SIGKILL: no clean-up ran, its pid is still in the lock file
        holder.wait(timeout=30)
    assert str(holder.pid) in (tmp_path / "nerve" / "metrics.jsonl.lock").read_text()
    nerve = loop(path)
    assert train(nerve, 2) == [1, 2]
    nerve.close()
    assert keys(path) == Counter({(s, layer): 1 for s in (1, 2) for layer in range(3)})


def test_a_second_loop_in_one_process_waits_for_the_first_to_close(tmp_path):
    path = tmp_path / "m.jsonl"
    first = loop(path)
    with pytest.raises(NerveOutputError, match=rf"pid {os.getpid()} on host .* \(this process\)"):
        loop(path)
    first.close()
    loop(path).close()


# -- run time ---------------------------------------------------------------------------------------------------


def test_on_error_raise_stops_at_the_failing_write(tmp_path):
    path = tmp_path / "m.jsonl"
    nerve = loop(path, on_error="raise")
    path.mkdir()  # after start-up: the folder was fine then
    nerve.begin_step(1)
    nerve.monitor.parts[0](torch.randn(4, 16, 8)).sum().backward()
    with pytest.raises(
        NerveOutputError,
        match=rf"nerve: writing step 1 to {path} failed \(IsADirectoryError.*"
        r"on_error = 'raise' stops the run",
    ):
        nerve.end_step(1)
    nerve.close()


def test_nerve_loop_refuses_an_unknown_on_error():
    with pytest.raises(
        ValueError, match=r"^\[nerve\] on_error = 'ignore' is not allowed: expected one of 'warn', 'raise'$"
    ):
        loop("unused.jsonl", on_error="ignore")


FULL_DISK = r"""
import json, os, resource, signal, sys
from nerve_plugin.monitor import LayerRecord
from nerve_plugin.writers import JsonlWriter

path = sys.argv[1]
writer = JsonlWriter(path)
writer.write(1, [LayerRecord(step=1, layer=layer, js=0.5) for layer in range(3)])
size = os.path.getsize(path)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the kernel then fails the write (EFBIG) instead of killing us
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, hard))  # room for part of the next records, not all
try:
    writer.write(2, [LayerRecord(step=2, layer=layer, js=0.5) for layer in range(3)])
    print("no error")
except OSError as error:
    print("error", error.errno)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
writer.write(3, [LayerRecord(step=3, layer=0, js=0.5)])
"""


def test_a_disk_that_fills_up_mid_line_leaves_whole_lines(tmp_path):
    # a file-size limit is a full disk the kernel enforces byte-exactly (root included): the write takes what
    # fits, then fails; a buffered file kept the rest and wrote it after the cut, leaving half a record
    path = tmp_path / "m.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(path)], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "error"
    assert keys(path) == Counter({(1, 0): 1, (1, 1): 1, (1, 2): 1, (3, 0): 1})


def test_the_resume_rewrite_uses_a_temporary_file_of_its_own(tmp_path):
    # one fixed "<path>.tmp" for every process: a second run's rewrite would overwrite (and rename away) this one's
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s, "layer": 0}) + "\n" for s in (1, 2, 3)))
    other = tmp_path / "m.jsonl.tmp"
    other.write_text("another process's rewrite\n")
    JsonlWriter(str(path)).truncate_from(2)
    assert keys(path) == Counter({(1, 0): 1})
    assert other.read_text() == "another process's rewrite\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl", "m.jsonl.tmp"]  # no temporary left behind


# -- signals ----------------------------------------------------------------------------------------------------


def stopped(tmp_path, mode):
    """(returncode, stdout, JSONL keys) of tests/loop_signals.py in ``mode``."""
    path = tmp_path / f"{mode}.jsonl"
    proc = subprocess.run(
        [sys.executable, str(TESTS_DIR / "loop_signals.py"), str(path), mode],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout, keys(path)


BOTH_STEPS = Counter({(s, layer): 1 for s in (1, 2) for layer in range(3)})  # step 2 was solved in memory only


def test_sigterm_writes_what_is_solved_and_still_stops_the_process(tmp_path):
    returncode, stdout, written = stopped(tmp_path, "sigterm")
    assert returncode == -signal.SIGTERM, stdout  # the default action, as without nerve
    assert "not stopped" not in stdout
    assert "nerve: SIGTERM: wrote the 3 records already solved (steps [2])" in stdout
    assert written == BOTH_STEPS


@pytest.mark.parametrize("mode", ["sigterm_chained", "sigint"])
def test_a_signal_goes_on_to_the_programs_own_handler_and_nothing_is_written_twice(tmp_path, mode):
    returncode, stdout, written = stopped(tmp_path, mode)
    if mode == "sigterm_chained":
        assert returncode == 3 and "own handler" in stdout, stdout
    else:
        assert returncode == 4 and "interrupted" in stdout, stdout
        # written by the handler before KeyboardInterrupt reached the program; close() then flushed step 2 again
        assert "lines before close: 6" in stdout
    assert written == BOTH_STEPS


def _record_lines(path, steps):
    return "".join(json.dumps({"step": s, "layer": 0}) + "\n" for s in steps)


def test_build_writers_is_the_one_factory_and_prepares_the_jsonl_by_the_first_step(tmp_path):
    from nerve_plugin.writers import OUTPUTS, TensorBoardWriter, build_writers

    path = tmp_path / "metrics.jsonl"
    with pytest.raises(ValueError, match=r"\['wandb'\] not known; expected a subset of \['tensorboard', 'jsonl'\]"):
        build_writers(["jsonl", "wandb"], jsonl=str(path))
    # a target that is not given builds no writer; each output builds its own
    assert build_writers(OUTPUTS) == []
    (writer,) = build_writers(OUTPUTS, jsonl=str(path))
    assert isinstance(writer, JsonlWriter) and writer.path == str(path)

    class Summary:  # the SummaryWriter surface TensorBoardWriter touches at construction
        def add_custom_scalars(self, layout):
            self.layout = layout

    summary = Summary()
    (tb,) = build_writers(["tensorboard"], summary_writer=summary, jsonl=str(path))
    assert isinstance(tb, TensorBoardWriter) and tb.writer is summary and "NerVE" in summary.layout

    # first_step None: the file as it is; 3 (a resume): steps >= 3 dropped; 1 (a fresh run): kept aside, new file
    path.write_text(_record_lines(path, [1, 2, 3, 4]))
    build_writers(["jsonl"], jsonl=str(path))
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4]
    build_writers(["jsonl"], jsonl=str(path), first_step=3)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    build_writers(["jsonl"], jsonl=str(path), first_step=1)
    assert not path.exists()
    (aside,) = tmp_path.glob("metrics.jsonl.*")
    assert [r["step"] for r in read_jsonl(aside)] == [1, 2]


def test_build_writers_leaves_out_a_jsonl_it_cannot_prepare_unless_told_to_raise(tmp_path):
    from nerve_plugin.writers import build_writers

    path = tmp_path / "metrics.jsonl"
    path.mkdir()  # the resume rewrite cannot read a folder (root or not)
    assert build_writers(["jsonl"], jsonl=str(path), first_step=2) == []
    with pytest.raises(NerveOutputError, match=f"preparing {path} failed .*on_error = 'raise' stops the run"):
        build_writers(["jsonl"], jsonl=str(path), first_step=2, on_error="raise")
