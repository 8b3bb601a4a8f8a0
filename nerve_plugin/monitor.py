"""NerveMonitor: taps -> streaming statistics -> distributed merge -> float64 eigen-spectra -> per-layer records.

Framework-free: it works on any list of model parts with a tap spec, and the training loop drives it with
``begin_step(step)`` before the step's forwards and ``end_step(step)`` after its backwards. Every rank must
call both at every step; on logging steps ``end_step`` issues collectives. ``flush()`` returns what is still
pending (call it before a checkpoint and at the end); ``close()`` flushes and removes every hook.

Cost model. Steps that do not log run no NerVE code in the model: in eager mode the hooks exist only during logging
steps; compiled blocks keep them (adding a hook would recompile) but compile a graph without captures for steps that
do not log. A logging step adds the Gram products of its forwards and the merge; the float64 eigen-solves run either
there (``solve_timing="sync"``, on the statistics' device), on a side CUDA stream (``"stream"``) or on a host thread
(``"overlap"``) while the next steps train, their records returned by the ``end_step`` of the next logging step (or
by ``flush``). ``max_layers_per_step`` bounds the memory and work of one logging step by measuring a rotating subset
of the layers; ``max_overhead`` lowers that subset further, to what keeps the logging steps' cost, amortized over
``log_freq`` steps, within a fraction of training time (``budget.OverheadBudget``: the monitor times every step with
``clock`` and the ranks agree on the timings at each logging step).

Parallel layouts, given as process groups:
- ``token_group``: ranks holding different tokens of the same layers (data parallel, context parallel). Their
  statistics merge.
- ``feature_group``: ranks holding column shards of the FFN hidden dimension for the same tokens (tensor
  parallel). The taps gather the columns, so every rank of the group holds the full statistics.
- Pipeline stages own different layers. Records are keyed by global layer index and gathered, over the world
  group, to ``report_rank``.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch
import torch.distributed as dist
from torch import nn

from .budget import OverheadBudget, StepTimes
from .config_checks import SectionChecks, renamed_keys
from .solve import SOLVE_TIMINGS, Key, Solved, SolveScheduler, usable_cores, warn_if_not_ok

# The record schema lives in records.py; re-exported here, where callers have always imported it from.
from .records import FEW_TOKENS_RATIO, LayerRecord, TapResult, pair_js, records_by_step  # noqa: F401
from .stats import default_accumulate_dtype, reduce_stats
from .taps import TAPS, FFNTaps, TapSpec

logger = logging.getLogger(__name__)

SOLVE_PLACEMENTS = ("rank0", "spread")
# Keys renamed to say what they choose (old -> new): when the solves run, and on which ranks. The old names still
# work, in MonitorConfig and the [nerve] TOML section (and its command line), with a warning naming the new one.
RENAMED_KEYS = {"solve": "solve_timing", "eigen_solve": "solve_placement"}
SOLVE_MODES = SOLVE_TIMINGS
EIGENSOLVERS = ("auto", "batched", "eigvalsh")
ON_ERROR = ("warn", "raise")  # what a failing writer does at run time: report once and stop writing, or raise
REDUCE_BUCKET_BYTES = 512 << 20  # float64 M2 bytes merged per collective: bounds the merge's extra memory


def _accepts_renamed_keys(cls):
    """``cls(old_name=...)`` for the keys of RENAMED_KEYS, as ``cls(new_name=...)`` with a FutureWarning at the
    caller's line."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **renamed_keys(kwargs, RENAMED_KEYS, "nerve", ValueError, stacklevel=2))

    cls.__init__ = __init__
    return cls


def check_solver_keys(check: SectionChecks, section) -> None:
    """The checks of the solver and writer keys MonitorConfig and the [nerve] TOML section share (same names,
    same messages): solver_threads, eigensolver (and its pairing with solve_timing), max_overhead, on_error."""
    cores = usable_cores()
    check.integer(
        "solver_threads",
        section.solver_threads,
        f"0 (automatic) or an integer from 1 to {cores} (this host's cores)",
        lambda v: 0 <= v <= cores,
    )
    check.choice("eigensolver", section.eigensolver, EIGENSOLVERS)
    if section.solve_timing == "stream" and section.eigensolver == "eigvalsh":
        # eigvalsh waits for the GPU inside every call: nothing would run beside training.
        check.fail(
            "eigensolver",
            section.eigensolver,
            '"auto" or "batched" with solve_timing = "stream" (the batched solver is what runs on the side stream)',
        )
    check.number(
        "max_overhead",
        section.max_overhead,
        "a fraction in [0, 1), e.g. 0.05 for 5% (0: no budget)",
        lambda v: 0 <= v < 1,
    )
    check.choice("on_error", section.on_error, ON_ERROR)


@_accepts_renamed_keys
@dataclass
class MonitorConfig:
    log_freq: int = 100
    taps: tuple[str, ...] = TAPS
    layers: list[int] | None = None  # None: every layer
    max_tokens_per_forward: int | None = None  # None: every token
    # Where the float64 eigen-solves run: "rank0" (the first rank of each pipeline stage) or "spread" (each
    # covariance on its own rank). Formerly eigen_solve.
    solve_placement: Literal["rank0", "spread"] = "rank0"
    seed: int = 0
    accumulate_dtype: torch.dtype | None = None
    # When they run: "sync" (at the logging step), "overlap" (on a host thread while training goes on) or
    # "stream" (the batched GPU solver on a side CUDA stream while training goes on). Formerly solve.
    solve_timing: Literal["sync", "overlap", "stream"] = "sync"
    max_layers_per_step: int = 0  # 0: every tracked layer at every logging step
    model_layers: int | None = None  # blocks in the whole model (pipeline stages see only theirs)
    solver_threads: int = 0  # overlap on GPUs: host threads for the solves; 0: this rank's share of the cores
    # Sync solves of GPU statistics: "batched" (nerve_plugin.eigen, all same-size covariances at once) or
    # "eigvalsh" (one torch.linalg.eigvalsh each); "auto" is batched. Host statistics always use eigvalsh.
    eigensolver: Literal["auto", "batched", "eigvalsh"] = "auto"
    max_overhead: float = 0.05  # amortized NerVE time / training time the layer choice keeps to; 0: no budget
    # A writer failing at run time (full disk, folder gone): "warn" reports it once and stops writing there,
    # training goes on; "raise" stops the run. Read by the writers' owner (NerveLoop, the torchtitan session).
    on_error: Literal["warn", "raise"] = "warn"

    def __post_init__(self):
        # The checks (and messages) of the [nerve] TOML section, so NerveLoop and the torchtitan route refuse
        # the same values the same way.
        check = SectionChecks("nerve", ValueError)
        check.integer("log_freq", self.log_freq, "an integer >= 1", lambda v: v >= 1)
        if (
            not isinstance(self.taps, (tuple, list))
            or not self.taps
            or any(t not in TAPS for t in self.taps)
            or len(set(self.taps)) != len(self.taps)
        ):
            check.fail("taps", self.taps, f"distinct values from {list(TAPS)}")
        if self.layers is not None and (
            not isinstance(self.layers, (list, tuple))
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.layers)
        ):
            check.fail("layers", self.layers, "a list of layer indices >= 0 (None for all layers)")
        if self.max_tokens_per_forward is not None:
            check.integer(
                "max_tokens_per_forward",
                self.max_tokens_per_forward,
                "None (all tokens) or an integer >= 2",
                lambda v: v >= 2,
            )
        check.choice("solve_placement", self.solve_placement, SOLVE_PLACEMENTS)
        check.integer("seed", self.seed, "an integer")
        check.choice("solve_timing", self.solve_timing, SOLVE_TIMINGS)
        check.integer(
            "max_layers_per_step", self.max_layers_per_step, "0 (all layers) or an integer >= 1", lambda v: v >= 0
        )
        if self.model_layers is not None:
            check.integer("model_layers", self.model_layers, "None or an integer >= 1", lambda v: v >= 1)
        check_solver_keys(check, self)

    def is_log_step(self, step: int) -> bool:
        # The same rule as torchtitan's own metrics: step 1, then every log_freq steps.
        return step == 1 or step % self.log_freq == 0


@dataclass
class ParallelGroups:
    token_group: dist.ProcessGroup | None = None
    feature_group: dist.ProcessGroup | None = None
    report_rank: int = 0  # global rank that receives the records


class NerveMonitor:
    """``clock``: seconds, monotonic (``time.perf_counter``); the step times the ``max_overhead`` budget and
    ``last_duration_s`` are read from it, so a test can run the budget on a clock it advances itself."""

    def __init__(
        self,
        model_parts: nn.Module | Iterable[nn.Module],
        spec: TapSpec,
        config: MonitorConfig | None = None,
        groups: ParallelGroups | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.config = config or MonitorConfig()
        self.groups = groups or ParallelGroups()
        self.parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
        self.taps = [
            FFNTaps(
                part,
                spec,
                taps=self.config.taps,
                layers=self.config.layers,
                max_tokens_per_forward=self.config.max_tokens_per_forward,
                seed=self.config.seed,
                accumulate_dtype=self.config.accumulate_dtype,
                feature_group=self.groups.feature_group,
            )
            for part in self.parts
        ]
        self._armed_step: int | None = None
        self._selected: set[int] = set()  # the armed step's layers
        self._attached = False
        self._hooks_on_demand: bool | None = None  # decided at the first step: eager models hook per logging step
        self._solves = SolveScheduler(
            self.config.solve_timing, self.config.solver_threads, batched=self._batched_solver
        )
        self._batched = None  # eigen.BatchedEigensolver, made at the first sync logging step on a GPU
        # The checked memory budget (bytes) of a logging step's buffers, when the caller has one (torchtitan's
        # memory_budget_gb): the batched solver's larger one-off chunks stay within it.
        self.memory_budget_bytes: float | None = None
        self.last_duration_s = 0.0  # the logging step's own NerVE time (merge, and solves when sync)
        self._clock = clock
        self._budget = OverheadBudget(self.config.max_overhead, self.config.log_freq)
        self._normal_steps = StepTimes()
        self._last_end: tuple[int, float] | None = None  # (step, clock) when the last end_step returned
        self._timed_logging_step = False  # this process has timed a logging step (the first one is warm-up)
        # solve_timing = "stream": a logging step's solves slow the steps that train beside them, so its cost is
        # its own overhead plus theirs over a normal step (the tail), known only at the next logging step.
        self._solve_in_flight = False  # a side-stream solve was still running when the last step ended
        self._stream_tail: list[float] = []  # the times of those steps, compared with the normal step when observed
        self._deferred_observation: tuple[int, float, bool] | None = None  # (layers, overhead, warm-up)
        self._told_untimeable = False
        self._told_few_tokens = False  # the few-tokens warning is given once per monitor
        # The rotation: at logging index i a window of W = _window_size() layers starts at tracked position
        # (_rotation_start + (i - _rotation_index) * W) % L. With a constant window that is a function of
        # the step alone (resumes and pipeline stages agree); when the budget changes the window, the anchor
        # moves to where the last window ended, so the windows go on round the layers without a gap.
        self._budget_window: int | None = None  # layers per logging step chosen by the budget; None: the cap
        self._rotation_index = 0
        self._rotation_start = 0

    def add_part(self, other: "NerveMonitor") -> None:
        """Take over another monitor's model part (a second pipeline stage held by this rank)."""
        self.parts.extend(other.parts)
        self.taps.extend(other.taps)
        if self._attached:
            for t in other.taps:
                t.attach()

    @property
    def layers(self) -> list[int]:
        return sorted({layer for t in self.taps for layer in t.layers})

    def attach(self) -> "NerveMonitor":
        """Register the hooks now: before ``torch.compile`` wraps the blocks, so compiled graphs include them.
        Eager models drop them again at the first step and hook only logging steps."""
        self._attached = True
        for t in self.taps:
            t.attach()
        return self

    def flush(self) -> list[LayerRecord]:
        """Wait for every pending solve and return its records (on ``report_rank``; [] elsewhere). Every rank
        must call it at the same step."""
        return self._records(self._solves.due(before=None))

    def ready_records(self, wait_s: float = 0.0) -> list[LayerRecord]:
        """The records of overlapped solves already finished on this rank, for a process that is being stopped
        (a signal, an exit): no collective and no solve taken over, so it works on one rank alone and its time
        is bounded, at most ``wait_s`` for solves still running. Layers with every measured tap solved only;
        pending steps stay pending (``flush`` would still return them). Under ``solve_placement = "spread"`` or
        pipeline stages a rank holds only its share of a step: that share."""
        records = []
        for step, results in self._solves.ready(wait_s):
            solved_taps: dict[int, set[str]] = {}
            for layer, tap in results:
                solved_taps.setdefault(layer, set()).add(tap)
            complete = {
                (layer, tap): solved
                for (layer, tap), solved in results.items()
                if set(self.config.taps) <= solved_taps[layer]
            }
            records.extend(self._layer_records(step, complete))
        return records

    def close(self) -> list[LayerRecord]:
        """Flush, stop the solver thread and remove every hook. Returns what ``flush`` returned."""
        try:
            return self.flush()
        finally:
            self._attached = False
            for t in self.taps:
                t.remove()
                t.release()
            self._solves.close()
            if self._batched is not None:
                self._batched.release()
                self._batched = None

    @property
    def armed_step(self) -> int | None:
        return self._armed_step

    def selected_layers(self, step: int) -> list[int]:
        """The layers measured at logging step ``step``: all tracked ones, or a window of them (at most
        ``max_layers_per_step``, fewer when ``max_overhead`` says so) that moves on with each logging step and
        wraps around, so successive logging steps cover every layer. With a constant window size it is a
        function of the step alone (it survives a resume); every rank agrees on the size, so pipeline stages
        agree on the window."""
        tracked = self._tracked_layers()
        size = self._window_size(len(tracked))
        if size >= len(tracked):
            return tracked
        start = self._window_start(step, len(tracked))
        return sorted(tracked[(start + i) % len(tracked)] for i in range(size))

    def _window_size(self, tracked: int) -> int:
        size = min(self.config.max_layers_per_step or tracked, tracked)
        return size if self._budget_window is None else min(size, self._budget_window)

    def _window_start(self, step: int, tracked: int) -> int:
        offset = (self._log_index(step) - self._rotation_index) * self._window_size(tracked)
        return (self._rotation_start + offset) % tracked

    def _log_index(self, step: int) -> int:
        return 0 if step == 1 else step // self.config.log_freq

    def _tracked_layers(self) -> list[int]:
        if self.config.layers is not None:
            return sorted(set(self.config.layers))
        if self.config.model_layers is not None:
            return list(range(self.config.model_layers))
        return self.layers

    def begin_step(self, step: int) -> None:
        """Call before each of the step's forwards (calling it again for the same step keeps what was captured);
        arms the taps if ``step`` is a logging step."""
        if self._hooks_on_demand is None and self._attached:
            self._hooks_on_demand = not any(_is_compiled(part) for part in self.parts)
            if self._hooks_on_demand:
                for t in self.taps:
                    t.remove()
        if not self.config.is_log_step(step):
            self.pause()
            return
        if self._armed_step != step:
            for t in self.taps:
                t.release()
            self._armed_step = step
            self._selected = set(self.selected_layers(step))
        for t in self.taps:
            if self._attached and not t.attached:
                t.attach()
            if t.armed_step != step:
                t.arm(step, layers=self._selected)

    def pause(self) -> None:
        """Stop capturing until the next ``begin_step``, e.g. around forwards that are not training forwards."""
        for t in self.taps:
            t.disarm()

    def end_step(self, step: int) -> list[LayerRecord] | None:
        """Call after the step's last backward on every rank. Returns the records that became ready at this step
        on ``report_rank`` ([] on other ranks): this step's own with ``solve_timing="sync"``, earlier logging steps'
        with ``"overlap"`` and ``"stream"``; None when nothing was due."""
        if self._armed_step == step:
            self.pause()
            self._armed_step = None
            start = self._clock()
            owned = self._reduce_owned()
            for t in self.taps:
                t.release()
                if self._hooks_on_demand:
                    t.remove()
            self._solves.submit(step, owned)  # sync: solved here, so their time counts in last_duration_s
            self.last_duration_s = self._clock() - start
        records = None
        self._solves.poll()  # finished side-stream solves let go of their statistics' memory
        if self._solves.pending and self.config.is_log_step(step):
            records = self._records(self._solves.due(before=step))
        self._time_step(step)
        return records

    # -- overhead budget --------------------------------------------------------------------------------------

    def _time_step(self, step: int) -> None:
        """Time the step that just ended (from the previous ``end_step`` to now) and, at a logging step, let
        the budget choose the next logging step's layers. A step's time is only known when the previous step
        ended in this process (not for the first step, nor the first after a resume)."""
        now = self._clock()
        seconds = now - self._last_end[1] if self._last_end and self._last_end[0] == step - 1 else None
        if not self.config.is_log_step(step):
            if seconds is not None and self._solve_in_flight and self._budget.active:
                # It trained beside a logging step's solves; the next logging step's budget update takes (and
                # clears) these, so they are kept only while there is a budget.
                self._stream_tail.append(seconds)
            elif seconds is not None:
                self._normal_steps.add(seconds)
        elif self._budget.active:
            self._budget_step(step, seconds)
        elif self.config.max_overhead > 0 and not self._told_untimeable:
            self._told_untimeable = True
            if self._announces():
                logger.info(
                    f"nerve: max_overhead = {self.config.max_overhead:g} needs steps that do not log to time, and "
                    f"log_freq = 1 has none: every logging step measures "
                    f"{len(self.selected_layers(step))} of {len(self._tracked_layers())} layers"
                )
        self._solve_in_flight = self._solves.in_flight()
        self._last_end = (step, self._clock())  # the budget's own collective counts in no step

    def _budget_step(self, step: int, seconds: float | None) -> None:
        """Feed the budget this logging step's cost and choose the next logging step's window. Every rank runs
        it at every logging step with the same collective, and the budget sees only agreed (maximum over the
        ranks) numbers, so every rank makes the same choice."""
        normal = self._normal_steps.median()
        warm_up = not self._timed_logging_step
        self._timed_logging_step = True
        if seconds is not None and normal is not None:
            overhead = seconds - normal
        else:  # no step time to compare with: NerVE's own time at this step is what can be measured
            overhead, warm_up = self.last_duration_s, True
        # -1: no normal step timed yet; whether one was is the same on every rank (same steps, same rule).
        tail = sum(max(0.0, t - normal) for t in self._stream_tail) if normal is not None else 0.0
        self._stream_tail = []
        overhead, normal, tail = _agree_max([overhead, -1.0 if normal is None else normal, tail])
        tracked = self._tracked_layers()
        measured = len(self.selected_layers(step))
        if self.config.solve_timing == "stream":
            # The previous logging step's cost is complete now: its own overhead plus the tail of its solves.
            previous, self._deferred_observation = self._deferred_observation, (measured, overhead, warm_up)
            if previous is not None:
                self._budget.observe(previous[0], previous[1] + tail, warm_up=previous[2])
        else:
            self._budget.observe(measured, overhead, warm_up=warm_up)
        size = self._budget.update(
            len(tracked),
            normal if normal >= 0 else None,
            cap=self.config.max_layers_per_step,
            announce=self._announces(),
        )
        if size is None or size == self._window_size(len(tracked)):
            return
        if tracked:
            # The next logging step's window starts where this step's ended.
            self._rotation_start = (self._window_start(step, len(tracked)) + measured) % len(tracked)
            self._rotation_index = self._log_index(self._next_log_step(step))
        self._budget_window = size

    def _next_log_step(self, step: int) -> int:
        return self.config.log_freq * (step // self.config.log_freq + 1)

    def _announces(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == self.groups.report_rank

    # -- reduction ------------------------------------------------------------------------------------------

    def _local_stats(self):
        """(key, stats) for this rank's layers, in the same order on every rank of a token group."""
        found = {}
        for t in self.taps:
            found.update(t.stats)
        return sorted(found.items())

    def _reduce_owned(self) -> list[tuple[Key, int, torch.Tensor]]:
        """Merge the step's statistics over the token group; (key, count, M2) of the states this rank solves."""
        keyed = self._local_stats()
        token_group, feature_group = self.groups.token_group, self.groups.feature_group
        dp = dist.get_world_size(token_group) if _distributed(token_group) else 1
        tp = dist.get_world_size(feature_group) if _distributed(feature_group) else 1
        tp_rank = dist.get_rank(feature_group) if tp > 1 else 0

        # Which states this tensor-parallel rank reduces, and to which token-group rank. Ranks of one
        # tensor-parallel group hold identical full statistics, so each state needs only one of them.
        participating, owners = [], []
        for i, (key, stats) in enumerate(keyed):
            if self.config.solve_placement == "rank0":
                tp_owner, dp_owner = 0, 0
            else:
                linear = i % (tp * dp)
                tp_owner, dp_owner = divmod(linear, dp)
            if tp_owner == tp_rank:
                participating.append((key, stats))
                owners.append(dp_owner)
        mine = []
        if dp > 1:
            # Buckets bound the float64 copies the merge makes; every rank cuts the same buckets.
            for lo, hi in _buckets([stats.dim**2 * 8 for _, stats in participating], REDUCE_BUCKET_BYTES):
                got = reduce_stats([s for _, s in participating[lo:hi]], token_group, owners[lo:hi])
                mine.extend(lo + i for i in got)
        else:
            mine = list(range(len(participating)))
        owned = []
        for i in mine:
            key, stats = participating[i]
            owned.append((key, stats.count, stats.m2))  # states of < 2 tokens: see solve.split_too_few
        return owned

    # -- solves -----------------------------------------------------------------------------------------------

    def _batched_solver(self):
        """The batched GPU eigen-solver (made on first use: it keeps its captured CUDA graphs), or None."""
        if self.config.eigensolver == "eigvalsh" or not torch.cuda.is_available():
            return None
        if self._batched is None:
            from .eigen import DEFAULT_EAGER_WORKSPACE_BYTES, BatchedEigensolver

            eager = DEFAULT_EAGER_WORKSPACE_BYTES
            if self.memory_budget_bytes is not None:
                # Larger one-off chunks may use what the checked budget leaves beside the step's other buffers.
                window, working, _ = self._buffer_parts(torch.device("cuda", torch.cuda.current_device()))
                eager = int(max(0, min(eager, self.memory_budget_bytes - window - working)))
            self._batched = BatchedEigensolver(eager_workspace_bytes=eager)
        return self._batched

    def _records(self, due: list[tuple[int, dict[Key, Solved]]]) -> list[LayerRecord]:
        """The records of the solved steps (on ``report_rank``; [] elsewhere), in step order."""
        return [record for step, results in due for record in self._gather(step, results)]

    def _gather(self, step: int, results: dict[Key, Solved]) -> list[LayerRecord]:
        for key, solved in results.items():
            warn_if_not_ok(step, key, solved)
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size() if dist.get_rank() == self.groups.report_rank else None
            dist.gather_object(results, gathered, dst=self.groups.report_rank)
            if dist.get_rank() != self.groups.report_rank:
                return []
            merged = {}
            for part in gathered:
                merged.update(part)
        else:
            merged = results
        records = self._layer_records(step, merged)
        self._warn_if_few_tokens(step, records)
        return records

    @staticmethod
    def _layer_records(step: int, merged: dict[Key, Solved]) -> list[LayerRecord]:
        by_layer: dict[int, LayerRecord] = {}
        for (layer, tap), solved in sorted(merged.items()):
            record = by_layer.setdefault(layer, LayerRecord(step=step, layer=layer))
            setattr(record, tap, tap_result(solved))
        for record in by_layer.values():
            record.measure_pair()
        return [by_layer[layer] for layer in sorted(by_layer)]

    def _warn_if_few_tokens(self, step: int, records: list[LayerRecord]) -> None:
        few = [
            (r.layer, tap, result)
            for r in records
            for tap in TAPS
            if (result := getattr(r, tap)) is not None and len(result.eigenvalues) and result.few_tokens
        ]
        if not few or self._told_few_tokens:
            return
        self._told_few_tokens = True
        layer, tap, result = few[0]
        logger.warning(
            f"nerve step {step}: {len(few)} covariance(s) hold fewer tokens than D / {FEW_TOKENS_RATIO} (e.g. layer "
            f"{layer} {tap}: {result.tokens} tokens for D = {result.dim}): their SE, PR and EEE describe the token "
            f'sample more than the layer; their records say "few_tokens": true. More tokens per logging step: '
            f"raise [nerve] tokens_per_rank (0: every token) or the batch (said once)"
        )

    # -- memory -----------------------------------------------------------------------------------------------

    def buffer_bytes(self, device: torch.device | str | None = None, layers_at_once: int | None = None) -> int:
        """Peak bytes of covariance buffers one logging step needs on this rank: the D x D second moments of
        the layers measured at once (the largest rotation window), plus the float64 working copies of the
        merge and of the solves (on GPUs with the batched solver: a chunk of float64 covariances, kept by its
        CUDA graph between logging steps). ``layers_at_once`` overrides max_layers_per_step."""
        return sum(self._buffer_parts(device, layers_at_once))

    def _buffer_parts(self, device, layers_at_once: int | None = None) -> tuple[int, int, int]:
        """(second moments of the window, float64 working copies, the batched solver's held chunk) in bytes."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        itemsize = (self.config.accumulate_dtype or default_accumulate_dtype(device)).itemsize
        per_layer: dict[int, int] = {}
        largest = 0
        for t in self.taps:
            for (layer, _), dim in t.dims().items():
                per_layer[layer] = per_layer.get(layer, 0) + dim * dim * itemsize
                largest = max(largest, dim)
        cap = layers_at_once or self.config.max_layers_per_step or len(per_layer)
        window = sum(sorted(per_layer.values(), reverse=True)[:cap])
        working = 2 * largest * largest * 8
        held = 0
        if device.type == "cuda" and self.config.eigensolver != "eigvalsh" and largest:
            from .eigen import BatchedEigensolver

            solver = self._batched or BatchedEigensolver()
            states = sum(len(t.dims()) for t in self.taps)
            states = min(states, cap * len(self.config.taps))
            held = solver.chunk_size(max(1, states), largest) * largest * largest * 8
        return window, working, held

    def layers_that_fit(self, budget_bytes: float, device: torch.device | str | None = None) -> int:
        """The most layers one logging step can measure within ``budget_bytes`` (0 if not even one fits)."""
        tracked = len(self._tracked_layers()) or 1
        fits = 0
        for layers in range(1, tracked + 1):
            if self.buffer_bytes(device, layers_at_once=layers) > budget_bytes:
                break
            fits = layers
        return fits


def tap_result(solved: Solved) -> TapResult:
    """The metrics of one solved spectrum; NaN metrics, and the reason in ``status``, when there is none."""
    return TapResult.measured(tokens=solved.count, eigenvalues=solved.eigenvalues, dim=solved.dim, status=solved.status)


def _buckets(sizes: list[int], limit: int) -> list[tuple[int, int]]:
    """Consecutive [lo, hi) ranges whose sizes sum to at most ``limit`` (a single larger item gets its own)."""
    out, lo, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > lo and total + size > limit:
            out.append((lo, i))
            lo, total = i, 0
        total += size
    if lo < len(sizes):
        out.append((lo, len(sizes)))
    return out


def _is_compiled(module: nn.Module) -> bool:
    return any(
        isinstance(m, torch._dynamo.eval_frame.OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
        for m in module.modules()
    )


def _agree_max(values: list[float]) -> list[float]:
    """The element-wise maximum of ``values`` over every rank (one small all-reduce; every rank calls it at the
    same step): the numbers all ranks decide from, the slowest rank's."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    # NCCL reduces only GPU tensors; gloo (and a mixed cpu:gloo backend) takes host ones.
    on_gpu = torch.cuda.is_available() and "nccl" in str(dist.get_backend()) and "cpu:" not in str(dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def _distributed(group) -> bool:
    # None means "no such parallelism" here, not torch.distributed's default (world) group.
    return group is not None and dist.is_initialized() and dist.get_world_size(group) > 1
