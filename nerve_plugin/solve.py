"""Eigen-solves of merged statistics: exact float64 spectra with fallbacks, inline or on a background thread.

A logging step must never take training down: a covariance that holds NaN/Inf gives NaN metrics for that
(layer, tap) only, and a solver error falls back to slower exact paths, recording which one answered.

Overlapped solves run on the host. Measured on an H100 (bench/solver_probe.py): a float64 eigvalsh of n = 8192
takes 0.58 s on the GPU, but run on a side stream next to training it slowed the training kernels by ~80% of its
own duration, so a GPU solve costs about the same overlapped or not. On the host's cores (MKL, 8-14 threads) the
same solve takes 5-7 s and training does not notice; the results arrive at a later step instead.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from .spectrum import compute_sorted_eigs
from .stats import covariance_from_m2

logger = logging.getLogger(__name__)

Key = tuple[int, str]  # (global layer, tap)


@dataclass
class Solved:
    count: int
    eigenvalues: np.ndarray | None  # float64, descending, clamped; None when no exact spectrum exists
    status: str = "ok"  # "ok", "fallback: <path>", "non-finite statistics", "failed: <error>"
    dim: int = 0


def solve(m2: torch.Tensor, count: int) -> Solved:
    """The spectrum of one merged state, on the device ``m2`` lives on, never raising."""
    dim = int(m2.shape[0])
    try:
        cov = covariance_from_m2(m2, count)
        if not bool(torch.isfinite(cov).all()):
            return Solved(count, None, "non-finite statistics", dim)
    except Exception as error:  # e.g. out of memory for the float64 copy
        return Solved(count, None, f"failed: {type(error).__name__}: {error}", dim)
    paths = [("eigvalsh", lambda: compute_sorted_eigs(cov))]
    if cov.device.type != "cpu":
        paths.append(("host eigvalsh", lambda: compute_sorted_eigs(cov.cpu())))
    # A covariance is positive semi-definite, so its singular values are its eigenvalues (up to rounding of
    # tiny ones, which the clamp absorbs); SVD converges where the symmetric QR/divide-and-conquer may not.
    paths.append(("svd", lambda: torch.linalg.svdvals(cov.cpu()).sort(descending=True).values.clamp_min(1e-12)))
    errors = []
    for name, path in paths:
        try:
            eigs = path()
            if not bool(torch.isfinite(eigs).all()):
                raise FloatingPointError("non-finite eigenvalues")
            status = "ok" if not errors else f"fallback: {name} ({errors[0]})"
            return Solved(count, eigs.cpu().numpy(), status, dim)
        except Exception as error:
            errors.append(f"{name}: {type(error).__name__}: {error}")
    return Solved(count, None, "failed: " + "; ".join(errors), dim)


def solve_many(states: list[tuple[Key, int, torch.Tensor]], batched=None) -> dict[Key, Solved]:
    """The spectra of a logging step's merged states, never raising. With a ``batched`` solver
    (``eigen.BatchedEigensolver``), same-size GPU states are solved together by it; everything else, and any
    state it cannot take, goes through ``solve`` one by one."""
    results: dict[Key, Solved] = {}
    groups: dict[tuple, list[tuple[Key, int, torch.Tensor]]] = {}
    for key, count, m2 in states:
        if batched is not None and batched.accepts(m2):
            groups.setdefault((m2.device, int(m2.shape[0])), []).append((key, count, m2))
        else:
            results[key] = solve(m2, count)
    for (_, dim), group in groups.items():
        # One host synchronisation for the whole group instead of one per state.
        finite = torch.stack([torch.isfinite(m2).all() for _, _, m2 in group]).tolist()
        for (key, count, _), ok in zip(group, finite):
            if not ok:
                results[key] = Solved(count, None, "non-finite statistics", dim)
        group = [item for item, ok in zip(group, finite) if ok]
        if not group:
            continue
        try:
            eigenvalues, fell_back = batched.eigvalsh([m2 for _, _, m2 in group], [1.0 / (c - 1) for _, c, _ in group])
            eigenvalues = eigenvalues.cpu().numpy()
        except Exception as error:  # e.g. out of memory for the batch's workspace: one by one instead
            logger.warning(f"nerve: batched eigen-solve of {len(group)} {dim} x {dim} states failed ({error}); solving one by one")
            for key, count, m2 in group:
                solved = solve(m2, count)
                if solved.status == "ok":
                    solved.status = f"fallback: eigvalsh (batched solver: {type(error).__name__})"
                results[key] = solved
            continue
        for i, (key, count, _) in enumerate(group):
            status = "fallback: eigvalsh (batched solve failed its checks)" if i in fell_back else "ok"
            results[key] = Solved(count, eigenvalues[i], status, dim)
    return results


def warn_if_not_ok(step: int, key: Key, solved: Solved) -> None:
    if solved.status != "ok":
        layer, tap = key
        logger.warning(f"nerve step {step}: layer {layer} {tap}: {solved.status}")


# How long the training thread waits for the background thread's last solve once it has taken over the rest:
# a float64 host solve of n = 16384 takes minutes; past this the state is reported failed, not waited for.
FINISH_TIMEOUT_S = 1800.0


@dataclass
class Job:
    """One logging step's merged states, solved in order by the background thread; ``take`` hands out each
    state once, so the training thread can take over what is left when the results are due."""

    step: int
    states: list[tuple[Key, int, torch.Tensor]]  # (key, count, M2) with M2 on the host (or being copied there)
    ready: torch.cuda.Event | None = None  # the device-to-host copies are done once this fires
    results: dict[Key, Solved] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)
    taken_by_caller: int = 0  # states the training thread solved itself because they were due

    def __post_init__(self):
        self._lock = threading.Lock()
        self._next = 0
        self._in_flight: tuple[Key, int, torch.Tensor] | None = None  # the state the thread is solving
        self.thread: threading.Thread | None = None  # the solver thread, set when submitted

    def take(self, by_thread: bool = False) -> tuple[Key, int, torch.Tensor] | None:
        with self._lock:
            if self._next == len(self.states):
                if by_thread:  # the thread finished its last state
                    self._in_flight = None
                return None
            item, self.states[self._next] = self.states[self._next], None  # drop our reference once solved
            self._next += 1
            if by_thread:
                self._in_flight = item
            return item

    def finish(self, device: torch.device | None, timeout_s: float = FINISH_TIMEOUT_S) -> dict[Key, Solved]:
        """The results, now: the states the thread has not started are solved here, on ``device`` (the GPU the
        statistics came from: seconds there instead of minutes on the host), then the thread's last one is
        awaited - while the thread lives and at most ``timeout_s``. A state the thread died on is solved here;
        one it still holds after the timeout is reported failed."""
        if self.ready is not None:
            self.ready.synchronize()
        while (item := self.take()) is not None:
            key, count, m2 = item
            self.results[key] = solve(m2.to(device) if device is not None else m2, count)
            self.taken_by_caller += 1
        waited = 0.0
        while not self.done.wait(timeout=1.0):
            waited += 1.0
            if self.thread is not None and not self.thread.is_alive():
                break
            if waited >= timeout_s:
                break
        with self._lock:
            stuck, self._in_flight = self._in_flight, None
        if stuck is not None and stuck[0] not in self.results:
            key, count, m2 = stuck
            if self.done.is_set() or (self.thread is not None and not self.thread.is_alive()):
                self.results[key] = solve(m2.to(device) if device is not None else m2, count)
                self.taken_by_caller += 1
            else:
                self.results[key] = Solved(count, None, f"failed: the solver thread did not answer in {timeout_s:.0f} s",
                                           int(m2.shape[0]))
        return self.results


class BackgroundSolver:
    """One daemon thread solving queued jobs in order, on the host."""

    def __init__(self, threads: int | None = None):
        self.threads = threads  # None: leave torch's thread settings alone (CPU training shares them)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def submit(self, job: Job) -> Job:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="nerve-solver", daemon=True)
            self._thread.start()
        job.thread = self._thread
        self._queue.put(job)
        return job

    def _run(self) -> None:
        # MKL/OpenMP thread counts set here apply to this thread's solves; torchrun's OMP_NUM_THREADS=1 would
        # otherwise make an n = 8192 solve take minutes.
        if self.threads:
            try:
                torch.set_num_threads(self.threads)
            except Exception as error:  # solve with what torch has rather than not at all
                logger.warning(f"nerve: solver_threads = {self.threads} could not be set ({error}); using torch's default")
        while (job := self._queue.get()) is not None:
            try:
                if job.ready is not None:
                    job.ready.synchronize()
                while (item := job.take(by_thread=True)) is not None:
                    key, count, m2 = item
                    job.results[key] = solve(m2, count)
            except Exception as error:  # never let the thread die with a job unanswered
                logger.warning(f"nerve step {job.step}: background solve failed: {error}")
            finally:
                job.done.set()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_solver_threads() -> int:
    """The cores this process may use, shared with the other local ranks, keeping one for the training loop."""
    cores = usable_cores()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // max(1, local_ranks) - 1)
