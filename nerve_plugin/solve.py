"""Eigen-solves of merged statistics: exact float64 spectra with fallbacks, inline or on a background thread.

A logging step must never take training down: a covariance that holds NaN/Inf gives NaN metrics for that
(layer, tap) only, and a solver error falls back to slower exact paths, recording which one answered.

Overlapped solves run on the host. Measured on an H100 (bench/solver_probe.py): a float64 eigvalsh of n = 8192
takes 0.58 s on the GPU, but run on a side stream next to training it slowed the training kernels by ~80% of its
own duration, so a GPU solve costs about the same overlapped or not. On the host's cores (MKL, 8-14 threads) the
same solve takes 5-7 s and training does not notice; the results arrive at a later step instead.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
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
    return launch_many(states, batched).results()


class PendingSolves:
    """A logging step's solves, started by ``launch_many``: the batched groups may still be running on a CUDA
    stream; ``done()`` asks without waiting, ``results()`` waits and never raises."""

    def __init__(self, results: dict[Key, Solved], groups: list[tuple[int, list, object]]):
        self._results = results  # what was solved at launch
        self._groups = groups  # (dim, [(key, count, m2)], eigen.PendingEigenvalues)

    def done(self) -> bool:
        return all(pending.done() for _, _, pending in self._groups)

    def results(self) -> dict[Key, Solved]:
        for dim, group, pending in self._groups:
            try:
                eigenvalues, fell_back, nonfinite = pending.result()
                eigenvalues = eigenvalues.numpy()
            except Exception as error:  # e.g. the eigvalsh of a matrix that failed its checks ran out of memory
                _solve_one_by_one(self._results, group, dim, error)
                continue
            for i, (key, count, _) in enumerate(group):
                if i in nonfinite:
                    self._results[key] = Solved(count, None, "non-finite statistics", dim)
                else:
                    status = "fallback: eigvalsh (batched solve failed its checks)" if i in fell_back else "ok"
                    self._results[key] = Solved(count, eigenvalues[i], status, dim)
        self._groups = []
        return self._results


def _solve_one_by_one(results: dict[Key, Solved], group, dim: int, error: Exception) -> None:
    logger.warning(
        f"nerve: batched eigen-solve of {len(group)} {dim} x {dim} states failed ({error}); solving one by one"
    )
    for key, count, m2 in group:
        solved = solve(m2, count)
        if solved.status == "ok":
            solved.status = f"fallback: eigvalsh (batched solver: {type(error).__name__})"
        results[key] = solved


def launch_many(states: list[tuple[Key, int, torch.Tensor]], batched=None) -> PendingSolves:
    """Start the solves of ``solve_many`` on the current CUDA stream: the batched groups are launched without
    waiting for the GPU (a matrix holding NaN or Inf is found on the GPU and reported, not solved); everything
    else is solved here. The caller keeps the states' tensors unchanged until ``results()``."""
    results: dict[Key, Solved] = {}
    groups: dict[tuple, list[tuple[Key, int, torch.Tensor]]] = {}
    for key, count, m2 in states:
        if batched is not None and batched.accepts(m2):
            groups.setdefault((m2.device, int(m2.shape[0])), []).append((key, count, m2))
        else:
            results[key] = solve(m2, count)
    launched = []
    for (_, dim), group in groups.items():
        try:
            pending = batched.launch([m2 for _, _, m2 in group], [1.0 / (c - 1) for _, c, _ in group])
        except Exception as error:  # e.g. out of memory for the batch's workspace: one by one instead
            _solve_one_by_one(results, group, dim, error)
            continue
        launched.append((dim, group, pending))
    return PendingSolves(results, launched)


def warn_if_not_ok(step: int, key: Key, solved: Solved) -> None:
    if solved.status != "ok":
        layer, tap = key
        logger.warning(f"nerve step {step}: layer {layer} {tap}: {solved.status}")


# How long the training thread waits for the background thread's last solve once it has taken over the rest:
# a float64 host solve of n = 16384 takes minutes; past this the state is reported failed, not waited for.
FINISH_TIMEOUT_S = 1800.0
# At interpreter exit, how long the solver thread may finish the solve it is in. A daemon thread still inside a
# torch call when the interpreter finalizes is torn down mid-call, which aborts the process ("terminate called
# without an active exception"); a program that ends without close() gets this bounded wait instead.
EXIT_JOIN_S = 30.0


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
                self.results[key] = Solved(
                    count, None, f"failed: the solver thread did not answer in {timeout_s:.0f} s", int(m2.shape[0])
                )
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
            atexit.register(self._stop_at_exit)
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
                logger.warning(
                    f"nerve: solver_threads = {self.threads} could not be set ({error}); using torch's default"
                )
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
        atexit.unregister(self._stop_at_exit)

    def _stop_at_exit(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)  # after the jobs queued before it: a job already running finishes
            self._thread.join(timeout=EXIT_JOIN_S)


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_solver_threads() -> int:
    """The cores this process may use, shared with the other local ranks, keeping one for the training loop."""
    cores = usable_cores()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // max(1, local_ranks) - 1)


def split_too_few(states: list[tuple[Key, int, torch.Tensor]]) -> tuple[list, dict[Key, Solved]]:
    """The states that can be solved, and a result for each one of fewer than 2 tokens, which has no covariance
    (N - 1 = 0 divides it): null metrics and a status saying why, instead of numbers."""
    solvable, too_few = [], {}
    for key, count, m2 in states:
        if count >= 2:
            solvable.append((key, count, m2))
        else:
            too_few[key] = Solved(
                count, None, f"too few tokens: {count} (a covariance needs at least 2)", int(m2.shape[0])
            )
    return solvable, too_few


SOLVE_TIMINGS = ("sync", "overlap", "stream")
# The timings whose records arrive at a later step (written on SIGTERM/SIGINT and at exit, nerve_plugin.shutdown).
DEFERRED_TIMINGS = ("overlap", "stream")


class SolveScheduler:
    """When a logging step's merged states are solved, behind one interface: ``submit`` a step's states, take
    the results ``due`` at a later step, ``ready`` for a process being stopped, ``close``.

    "sync": solved at ``submit``, on the device the states live on (same-size GPU states together by the
    batched solver), due at once. "overlap": device states are copied to pinned host memory on a side stream (the
    training stream never waits for the copy) and solved by a host thread while training goes on; a step's
    results are due at the next logging step, or at ``due(None)`` (a flush), and what the thread has not started
    by then is solved on the statistics' GPU by the caller (``Job.finish``). "stream": the batched solver is
    launched at ``submit`` on a side CUDA stream of the statistics' GPU (after the step's work) and runs while the
    next steps train; its results are due as with "overlap", when the stream has finished them or by waiting
    for it. States the batched solver does not take (host statistics, small ones, ``eigensolver = "eigvalsh"``)
    are solved at ``submit``; a step's results are due together, as with "overlap"."""

    def __init__(self, timing: str, threads: int | None = None, batched=None):
        """``threads``: the host solver thread's torch threads (None: the cores left, see
        ``default_solver_threads``, when the statistics are on a GPU). ``batched``: a callable returning the
        batched GPU solver (or None) for sync solves, made on first use."""
        if timing not in SOLVE_TIMINGS:
            raise ValueError(f"solve timing must be one of {SOLVE_TIMINGS}, got {timing!r}")
        self.timing = timing
        self._threads = threads
        self._batched = batched or (lambda: None)
        self._done: list[tuple[int, dict[Key, Solved]]] = []  # sync results not yet taken
        self._jobs: list[tuple[Job, dict[Key, Solved]]] = []  # overlapped jobs and their < 2-token results
        self._streamed: list[tuple[int, PendingSolves, dict[Key, Solved]]] = []  # "stream" steps in flight
        self._solve_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._thread: BackgroundSolver | None = None
        self._copy_stream = None
        self._device: torch.device | None = None  # where overdue solves run: the statistics' GPU

    @property
    def pending(self) -> bool:
        return bool(self._done or self._jobs or self._streamed)

    def submit(self, step: int, states: list[tuple[Key, int, torch.Tensor]]) -> None:
        states, too_few = split_too_few(states)
        if self.timing == "sync":
            self._done.append((step, {**solve_many(states, self._batched()), **too_few}))
        elif self.timing == "stream":
            self._streamed.append((step, self._launch_on_side_stream(states), too_few))
        else:
            self._jobs.append((self._thread_for(states).submit(self._host_job(step, states)), too_few))

    def due(self, before: int | None) -> list[tuple[int, dict[Key, Solved]]]:
        """(step, results) of every sync step, and of the overlapped steps < ``before`` (all with None), waiting
        for their solves; in step order."""
        out, self._done = self._done, []
        streamed = [item for item in self._streamed if before is None or item[0] < before]
        self._streamed = [item for item in self._streamed if not (before is None or item[0] < before)]
        for step, pending, too_few in streamed:
            out.append((step, {**pending.results(), **too_few}))  # waits for the stream where it is not done
        due = [(job, too_few) for job, too_few in self._jobs if before is None or job.step < before]
        self._jobs = [item for item in self._jobs if item not in due]
        for job, too_few in due:
            results = {**job.finish(self._device), **too_few}
            if job.taken_by_caller:
                logger.info(
                    f"nerve step {job.step}: {job.taken_by_caller} of {len(results)} solves were still queued "
                    f"when due and ran at step {before or 'flush'} (more log_freq or max_layers_per_step avoids that)"
                )
            out.append((job.step, results))
        return sorted(out, key=lambda item: item[0])

    def ready(self, wait_s: float = 0.0) -> list[tuple[int, dict[Key, Solved]]]:
        """(step, results so far) of the overlapped steps, without taking any over or waiting more than
        ``wait_s`` in all for solves still running: for a process being stopped. The steps stay pending."""
        deadline = time.monotonic() + wait_s
        out = []
        for step, pending, too_few in self._streamed:
            while not pending.done() and time.monotonic() < deadline:
                time.sleep(0.005)
            if pending.done():  # results() caches: the step stays pending with the same results
                out.append((step, {**pending.results(), **too_few}))
        for job, too_few in list(self._jobs):
            job.done.wait(timeout=max(0.0, deadline - time.monotonic()))
            out.append((job.step, {**dict(job.results), **too_few}))  # a copy: the thread may still add to it
        return out

    def in_flight(self) -> bool:
        """Whether a side-stream solve is still running on the GPU (asked without waiting)."""
        return any(not pending.done() for _, pending, _ in self._streamed)

    def poll(self) -> None:
        """Take the results of the side-stream solves that have finished, without waiting (an event query
        each), so their statistics are freed now rather than when they are due; they stay pending."""
        for _, pending, _ in self._streamed:
            if pending.done():
                pending.results()

    def close(self) -> None:
        """Stop the host thread (after its queued jobs). Results not taken are dropped: ``due(None)`` first."""
        if self._thread is not None:
            self._thread.close()
            self._thread = None

    def _launch_on_side_stream(self, states) -> PendingSolves:
        """``launch_many`` on a side stream of the statistics' GPU, ordered after the work queued so far on the
        training stream (the merge that produced the states); the training stream never waits for it."""
        cuda = [m2 for _, _, m2 in states if m2.is_cuda]
        if not cuda:
            return launch_many(states, None)  # solved here: nothing to overlap with on the host's own stream
        device = cuda[0].device
        stream = self._solve_streams.get(device)
        if stream is None:
            stream = self._solve_streams[device] = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            pending = launch_many(states, self._batched())
        for m2 in cuda:
            # The caching allocator may hand m2's memory to training once the caller drops it: not before
            # the side stream has read it.
            m2.record_stream(stream)
        return pending

    def _thread_for(self, states) -> BackgroundSolver:
        if self._thread is None:
            on_gpu = any(m2.is_cuda for _, _, m2 in states)
            self._thread = BackgroundSolver(self._threads or (default_solver_threads() if on_gpu else None))
        return self._thread

    def _host_job(self, step: int, states) -> Job:
        host_states, ready = [], None
        cuda = [m2 for _, _, m2 in states if m2.is_cuda]
        if cuda:
            self._device = cuda[0].device
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(device=cuda[0].device)
            self._copy_stream.wait_stream(torch.cuda.current_stream(cuda[0].device))
        for key, count, m2 in states:
            if m2.is_cuda:
                with torch.cuda.stream(self._copy_stream):
                    host = torch.empty(m2.shape, dtype=m2.dtype, pin_memory=True)
                    host.copy_(m2, non_blocking=True)
                # The caching allocator may hand m2's memory to training once we drop it: not before the copy.
                m2.record_stream(self._copy_stream)
                m2 = host
            host_states.append((key, count, m2))
        if cuda:
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        return Job(step, host_states, ready)
