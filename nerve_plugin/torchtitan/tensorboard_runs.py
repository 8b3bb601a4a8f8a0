"""A resumed torchtitan job goes on in the TensorBoard run of the attempt it resumes.

torchtitan names a process's TensorBoard folder by the minute it starts (``<dump_folder>/<save_tb_folder>/
%Y%m%d-%H%M``, then ``replica_<i>`` / ``rank_<r>`` folders), so a resumed job opens a new run next to the
interrupted attempt's, and that run keeps its points from the resume step on: stale, shown next to the new ones.
A restart marker (a ``SessionLog.START`` event at the resume step) cannot help from the new folder: readers
apply it only to the run folder it is in. So at the resumed process's first step, before torchtitan logs any
point, its TensorBoard logger is moved to the latest earlier run folder of the same layout and the marker is
written there, ahead of every new point. What each reader then shows, one run with each step once:

- TensorBoard's Python loader (``tensorboard --load_fast=false``) and EventAccumulator readers (nerve-report's
  loss curve): the marker hides every earlier point at steps >= the resume step. The plugin loader takes the
  first START of a run for its start, not a restart, so the marker is written twice.
- TensorBoard's default fast loader (RustBoard, ``tensorboard-data-server``) ignores markers, but within one run
  a series logged again at step s drops its points from s on: the resumed points replace the stale ones as the
  resumed job reaches their steps.
"""

from __future__ import annotations

import os
import re
import time

STAMP = re.compile(r"^\d{8}-\d{4}$")  # torchtitan's run folder names, datetime.now().strftime("%Y%m%d-%H%M")


def earlier_run_dir(log_dir: str, root: str) -> str | None:
    """The folder of the latest run before ``log_dir`` under ``root`` with the same replica/rank layout that
    holds event files; None if there is none (or ``log_dir`` itself is the earlier run: a resume within the
    same minute)."""
    parts = os.path.relpath(log_dir, root).split(os.sep)
    if not parts or not STAMP.match(parts[0]) or not os.path.isdir(root):
        return None
    for name in sorted(os.listdir(root), reverse=True):  # the stamps sort by time
        if STAMP.match(name) and name < parts[0]:
            folder = os.path.join(root, name, *parts[1:])
            if os.path.isdir(folder) and any(".tfevents." in f for f in os.listdir(folder)):
                return folder
    return None


def mark_restart(summary_writer, step: int) -> None:
    """Write the restart marker at ``step`` into ``summary_writer``'s run: twice, see the module docstring."""
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    for _ in range(2):
        summary_writer.file_writer.add_event(
            Event(step=step, wall_time=time.time(), session_log=SessionLog(status=SessionLog.START))
        )
    summary_writer.flush()


def continue_run(tb_logger, root: str, step: int) -> str | None:
    """Move torchtitan's ``TensorBoardLogger`` to the run it resumes (when that run is in another folder) and mark
    the restart there. Call before the process logs any point. Returns the earlier run's folder, or None when
    the logger stays where it is (its own folder then gets the marker)."""
    from torch.utils.tensorboard import SummaryWriter

    opened = tb_logger.writer
    previous = earlier_run_dir(opened.log_dir, root)
    if previous is not None:
        tb_logger.writer = SummaryWriter(previous, max_queue=1000)  # torchtitan's own setting
        opened.close()
        _remove_if_unused(opened.log_dir, root)
    mark_restart(tb_logger.writer, step)
    return previous


def _remove_if_unused(folder: str, root: str) -> None:
    """The folder torchtitan opened for this process, left with nothing but the header of its event file: removed
    with its empty parents (up to ``root``), so TensorBoard lists no empty run. Anything else in it stays."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if ".tfevents." in name and os.path.isfile(path):
            if all(event.WhichOneof("what") == "file_version" for event in EventFileLoader(path).Load()):
                os.remove(path)
    root = os.path.abspath(root)
    folder = os.path.abspath(folder)
    while folder != root and folder.startswith(root + os.sep) and not os.listdir(folder):
        os.rmdir(folder)
        folder = os.path.dirname(folder)
