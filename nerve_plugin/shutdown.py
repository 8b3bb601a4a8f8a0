"""Records already solved in memory are written when the process is stopped: SIGTERM (how schedulers stop jobs),
SIGINT, and interpreter exit.

With ``solve_timing = "overlap"`` or ``"stream"`` a logging step's records wait, solved on the host or a side CUDA
stream, for the next logging step, a checkpoint or the end. A stop before then would lose them. ``WriteOnStop``
installs handlers that write what is ready (``NerveMonitor.ready_records``: no collective, the other ranks may be
gone already) and then hand the signal on: to the handler that was there before (chained), or to the default action,
re-raised, so the job still stops as it would have. Every wait is bounded: on SIGTERM at most ``SIGTERM_WAIT_S`` for
solves still running (schedulers grant some seconds before their SIGKILL: torchrun and Slurm 30 s by default); on
SIGINT (an interactive Ctrl-C, which should stop at once) and at exit, none. Nothing runs on SIGKILL: what it can
lose is the records not yet written, up to the last two logging steps' with overlap (README, Outputs).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from typing import Callable

from .records import LayerRecord

logger = logging.getLogger(__name__)

SIGTERM_WAIT_S = 10.0  # how long a SIGTERM waits for solves still running before writing what it has
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class WritesOnce:
    """The one way a run's records reach its writers, shared by its normal writes and a stop handler's:
    ``write(records)`` passes on those a stop handler has not written already (a chained handler may let the
    run go on to its own flush), and ``write_on_stop(records, why)`` writes unless a write is in progress (a
    signal landing inside one would cut into its lines)."""

    def __init__(self, write: Callable[[list[LayerRecord]], None]):
        self._write = write
        self._busy = False
        self._written: set[tuple[int, int]] = set()  # (step, layer) a stop handler wrote

    def write(self, records: list[LayerRecord]) -> None:
        records = [r for r in records if (r.step, r.layer) not in self._written]
        if not records:
            return
        self._busy = True
        try:
            self._write(records)
        finally:
            self._busy = False

    def write_on_stop(self, records: list[LayerRecord], why: str) -> None:
        if self._busy:
            logger.warning(f"nerve: {why} during a write; {len(records)} solved records are not written")
            return
        records = [r for r in records if (r.step, r.layer) not in self._written]
        if not records:
            return
        self.write(records)
        self._written.update((r.step, r.layer) for r in records)
        logger.warning(
            f"nerve: {why}: wrote the {len(records)} records already solved (steps {sorted({r.step for r in records})})"
        )


class WriteOnStop:
    """``ready(wait_s)`` returns the records that can be written now; ``write(records, why)`` writes them (and
    must skip what it wrote before: a chained handler may let the run go on to its own flush)."""

    def __init__(self, ready: Callable[[float], list[LayerRecord]], write: Callable[[list[LayerRecord], str], None]):
        self._ready = ready
        self._write = write
        self._previous: dict[int, object] = {}
        self._at_exit_registered = False

    def install(self) -> "WriteOnStop":
        # signal.signal works in the main thread only; a loop driven from another thread keeps exit's write.
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._on_signal)
        atexit.register(self._at_exit)
        self._at_exit_registered = True
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            # Put back what was there only if nobody replaced us since (they may have chained to us).
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        if self._at_exit_registered:
            atexit.unregister(self._at_exit)
            self._at_exit_registered = False

    def write_ready(self, wait_s: float, why: str) -> None:
        try:
            records = self._ready(wait_s)
            if records:
                self._write(records, why)
        except Exception as error:  # the process is stopping: report, never mask the stop
            logger.error(f"nerve: writing the records ready at {why} failed ({type(error).__name__}: {error})")

    def _at_exit(self) -> None:
        self.write_ready(0.0, "exit")

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        self.write_ready(SIGTERM_WAIT_S if signum == signal.SIGTERM else 0.0, name)
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)  # e.g. Python's SIGINT handler, which raises KeyboardInterrupt
        elif previous != signal.SIG_IGN:
            # The default action (or a handler not set from Python, which cannot be called): stop as the
            # process would have without nerve, with the signal's own exit status.
            self.uninstall()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
