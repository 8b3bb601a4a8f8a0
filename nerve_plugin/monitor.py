"""NerveMonitor: taps -> streaming statistics -> distributed merge -> float64 eigen-spectra -> per-layer records.

Framework-free: it works on any list of model parts with a tap spec, and the training loop drives it with
``begin_step(step)`` before the step's forwards and ``end_step(step)`` after its backwards. Every rank must
call both at every step; on logging steps ``end_step`` issues collectives. ``flush()`` returns what is still
pending (call it before a checkpoint and at the end); ``close()`` flushes and removes every hook.

Cost model. Steps that do not log run no NerVE code in the model: in eager mode the hooks exist only during
logging steps; compiled blocks keep them (adding a hook would recompile) but compile a graph without captures
for steps that do not log. A logging step adds the Gram products of its forwards and the merge; the
float64 eigen-solves run either there (``solve="sync"``, on the statistics' device) or on a host thread while
the next steps train (``solve="overlap"``), their records returned by the ``end_step`` of the next logging
step (or by ``flush``). ``max_layers_per_step`` bounds the memory and work of one logging step by measuring a
rotating subset of the layers.

Parallel layouts, given as process groups:
- ``token_group``: ranks holding different tokens of the same layers (data parallel, context parallel). Their
  statistics merge.
- ``feature_group``: ranks holding column shards of the FFN hidden dimension for the same tokens (tensor
  parallel). The taps gather the columns, so every rank of the group holds the full statistics.
- Pipeline stages own different layers. Records are keyed by global layer index and gathered, over the world
  group, to ``report_rank``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Iterable, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .solve import BackgroundSolver, Job, Key, Solved, default_solver_threads, solve, warn_if_not_ok
from .spectrum import compute_js, normalize_eigs, spectrum_metrics_from_eigs
from .stats import default_accumulate_dtype, reduce_stats
from .taps import TAPS, FFNTaps, TapSpec

logger = logging.getLogger(__name__)

EIGEN_SOLVE_PLACEMENTS = ("rank0", "spread")
SOLVE_MODES = ("sync", "overlap")
REDUCE_BUCKET_BYTES = 512 << 20  # float64 M2 bytes merged per collective: bounds the merge's extra memory


@dataclass
class MonitorConfig:
    log_freq: int = 100
    taps: tuple[str, ...] = TAPS
    layers: list[int] | None = None  # None: every layer
    max_tokens_per_forward: int | None = None  # None: every token
    eigen_solve: Literal["rank0", "spread"] = "rank0"
    seed: int = 0
    accumulate_dtype: torch.dtype | None = None
    solve: Literal["sync", "overlap"] = "sync"
    max_layers_per_step: int = 0  # 0: every tracked layer at every logging step
    model_layers: int | None = None  # blocks in the whole model (pipeline stages see only theirs)
    solver_threads: int = 0  # overlap on GPUs: host threads for the solves; 0: this rank's share of the cores

    def __post_init__(self):
        if self.log_freq < 1:
            raise ValueError(f"log_freq must be >= 1, got {self.log_freq}")
        if self.eigen_solve not in EIGEN_SOLVE_PLACEMENTS:
            raise ValueError(f"eigen_solve must be one of {EIGEN_SOLVE_PLACEMENTS}, got {self.eigen_solve!r}")
        if self.solve not in SOLVE_MODES:
            raise ValueError(f"solve must be one of {SOLVE_MODES}, got {self.solve!r}")
        if self.max_layers_per_step < 0:
            raise ValueError(f"max_layers_per_step must be >= 0, got {self.max_layers_per_step}")

    def is_log_step(self, step: int) -> bool:
        # The same rule as torchtitan's own metrics: step 1, then every log_freq steps.
        return step == 1 or step % self.log_freq == 0


@dataclass
class TapResult:
    tokens: int
    spectral_entropy: float
    participation_ratio: float
    eee: float
    eigenvalues: np.ndarray  # float64, descending, clamped at 1e-12; empty when status says why not
    dim: int = 0
    status: str = "ok"

    def __post_init__(self):
        self.dim = self.dim or int(self.eigenvalues.shape[0])

    def to_json(self, spectrum_points: int = 64) -> dict:
        out = {
            "tokens": self.tokens,
            "spectral_entropy": _finite_or_none(self.spectral_entropy),
            "participation_ratio": _finite_or_none(self.participation_ratio),
            "eee": _finite_or_none(self.eee),
            "dim": self.dim,
            "spectrum": _log_spaced_spectrum(self.eigenvalues, spectrum_points),
        }
        if self.status != "ok":
            out["status"] = self.status
        return out


@dataclass
class LayerRecord:
    step: int
    layer: int
    pre: TapResult | None = None
    post: TapResult | None = None
    js: float | None = None  # JS(p_pre || p_post), when both taps are measured (NaN when one failed)

    def to_json(self) -> dict:
        out: dict = {"step": self.step, "layer": self.layer}
        for tap in TAPS:
            result = getattr(self, tap)
            if result is not None:
                out[tap] = result.to_json()
        if self.js is not None:
            out["js"] = _finite_or_none(self.js)
        return out


def _finite_or_none(value: float) -> float | None:
    # JSON has no NaN; null marks a metric that could not be computed (the record's status says why).
    return value if math.isfinite(value) else None


def records_by_step(records: list[LayerRecord]) -> dict[int, list[LayerRecord]]:
    """{step: its records}, steps ascending. Records carry their own step: overlapped solves return those of an
    earlier step, which must be written (and plotted) there."""
    by_step: dict[int, list[LayerRecord]] = {}
    for record in sorted(records, key=lambda r: r.step):
        by_step.setdefault(record.step, []).append(record)
    return by_step


def _log_spaced_spectrum(eigs: np.ndarray, points: int) -> dict:
    """Eigenvalues at log-spaced ranks: enough to redraw the spectrum on a log-log plot, small enough for JSONL."""
    d = eigs.shape[0]
    if d == 0:
        return {"rank": [], "eigenvalue": []}
    ranks = sorted({int(round(r)) for r in np.geomspace(1, d, num=min(points, d))})
    return {"rank": ranks, "eigenvalue": [float(eigs[r - 1]) for r in ranks]}


@dataclass
class ParallelGroups:
    token_group: dist.ProcessGroup | None = None
    feature_group: dist.ProcessGroup | None = None
    report_rank: int = 0  # global rank that receives the records


class NerveMonitor:
    def __init__(
        self,
        model_parts: nn.Module | Iterable[nn.Module],
        spec: TapSpec,
        config: MonitorConfig | None = None,
        groups: ParallelGroups | None = None,
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
        self._pending: list[Job] = []
        self._solver: BackgroundSolver | None = None
        self._copy_stream = None
        self._device: torch.device | None = None  # where overdue solves run: the statistics' GPU
        self.last_duration_s = 0.0  # the logging step's own NerVE time (merge, and solves when sync)

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
        return self._collect(before=None)

    def close(self) -> list[LayerRecord]:
        """Flush, stop the solver thread and remove every hook. Returns what ``flush`` returned."""
        try:
            return self.flush()
        finally:
            self._attached = False
            for t in self.taps:
                t.remove()
                t.release()
            if self._solver is not None:
                self._solver.close()
                self._solver = None

    @property
    def armed_step(self) -> int | None:
        return self._armed_step

    def selected_layers(self, step: int) -> list[int]:
        """The layers measured at logging step ``step``: all tracked ones, or with ``max_layers_per_step`` a
        window of them that rotates with each logging step (a function of the step alone, so it survives a
        resume and agrees across pipeline stages)."""
        tracked = self._tracked_layers()
        cap = self.config.max_layers_per_step
        if not cap or cap >= len(tracked):
            return tracked
        windows = math.ceil(len(tracked) / cap)
        index = 0 if step == 1 else step // self.config.log_freq
        start = (index % windows) * cap
        return tracked[start : start + cap]

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
        on ``report_rank`` ([] on other ranks): this step's own with ``solve="sync"``, earlier logging steps'
        with ``solve="overlap"``; None when nothing was due."""
        records = None
        if self._armed_step == step:
            self.pause()
            self._armed_step = None
            start = time.perf_counter()
            owned = self._reduce_owned()
            for t in self.taps:
                t.release()
                if self._hooks_on_demand:
                    t.remove()
            if self.config.solve == "sync":
                records = self._gather(step, {key: solve(m2, count) for key, count, m2 in owned})
            else:
                self._pending.append(self._submit(step, owned))
            self.last_duration_s = time.perf_counter() - start
        if self._pending and self.config.is_log_step(step):
            collected = self._collect(before=step)
            records = collected if records is None else records + collected
        return records

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
            if self.config.eigen_solve == "rank0":
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
            if stats.count >= 2:
                owned.append((key, stats.count, stats.m2))
        return owned

    # -- solves -----------------------------------------------------------------------------------------------

    def _submit(self, step: int, owned) -> Job:
        """Queue the step's merged states for the host solver; device states are copied to pinned host memory
        on a side stream, so the training stream never waits for the copy."""
        states, ready = [], None
        cuda = [m2 for _, _, m2 in owned if m2.is_cuda]
        if cuda:
            self._device = cuda[0].device
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(device=cuda[0].device)
            self._copy_stream.wait_stream(torch.cuda.current_stream(cuda[0].device))
        for key, count, m2 in owned:
            if m2.is_cuda:
                with torch.cuda.stream(self._copy_stream):
                    host = torch.empty(m2.shape, dtype=m2.dtype, pin_memory=True)
                    host.copy_(m2, non_blocking=True)
                # The caching allocator may hand m2's memory to training once we drop it: not before the copy.
                m2.record_stream(self._copy_stream)
                m2 = host
            states.append((key, count, m2))
        if cuda:
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        if self._solver is None:
            threads = self.config.solver_threads or (default_solver_threads() if cuda else None)
            self._solver = BackgroundSolver(threads)
        return self._solver.submit(Job(step, states, ready))

    def _collect(self, before: int | None) -> list[LayerRecord]:
        """Records of the pending steps < ``before`` (all with None), waiting for their solves."""
        due = [job for job in self._pending if before is None or job.step < before]
        self._pending = [job for job in self._pending if job not in due]
        records = []
        for job in due:
            results = job.finish(self._device)
            if job.taken_by_caller:
                logger.info(
                    f"nerve step {job.step}: {job.taken_by_caller} of {len(results)} solves were still queued "
                    f"when due and ran at step {before or 'flush'} (more log_freq or max_layers_per_step avoids that)"
                )
            records.extend(self._gather(job.step, results))
        return records

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
        by_layer: dict[int, LayerRecord] = {}
        for (layer, tap), solved in sorted(merged.items()):
            record = by_layer.setdefault(layer, LayerRecord(step=step, layer=layer))
            setattr(record, tap, tap_result(solved))
        for record in by_layer.values():
            record.js = pair_js(record.pre, record.post)
        return [by_layer[layer] for layer in sorted(by_layer)]

    # -- memory -----------------------------------------------------------------------------------------------

    def buffer_bytes(self, device: torch.device | str | None = None) -> int:
        """Peak bytes of covariance buffers one logging step needs on this rank: the D x D second moments of
        the layers measured at once (the largest rotation window), plus the float64 working copies of the
        merge and of one solve."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        itemsize = (self.config.accumulate_dtype or default_accumulate_dtype(device)).itemsize
        per_layer: dict[int, int] = {}
        largest = 0
        for t in self.taps:
            for (layer, _), dim in t.dims().items():
                per_layer[layer] = per_layer.get(layer, 0) + dim * dim * itemsize
                largest = max(largest, dim)
        cap = self.config.max_layers_per_step or len(per_layer)
        window = sum(sorted(per_layer.values(), reverse=True)[:cap])
        working = 2 * largest * largest * 8
        return window + working


def pair_js(pre: TapResult | None, post: TapResult | None) -> float | None:
    """JS(p_pre || p_post): None without both taps or when their dimensions differ, NaN when one has no
    spectrum (its statistics were non-finite or every solve failed)."""
    if pre is None or post is None or pre.dim != post.dim:
        return None
    if not len(pre.eigenvalues) or not len(post.eigenvalues):
        return math.nan
    return compute_js(normalize_eigs(torch.from_numpy(pre.eigenvalues)), normalize_eigs(torch.from_numpy(post.eigenvalues)))


def tap_result(solved: Solved) -> TapResult:
    """The metrics of one solved spectrum; NaN metrics, and the reason in ``status``, when there is none."""
    if solved.eigenvalues is None:
        nan = math.nan
        return TapResult(solved.count, nan, nan, nan, np.zeros(0), dim=solved.dim, status=solved.status)
    metrics = spectrum_metrics_from_eigs(torch.from_numpy(solved.eigenvalues))
    return TapResult(
        solved.count, metrics.spectral_entropy, metrics.participation_ratio, metrics.eee, solved.eigenvalues,
        status=solved.status,
    )


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


def _distributed(group) -> bool:
    # None means "no such parallelism" here, not torch.distributed's default (world) group.
    return group is not None and dist.is_initialized() and dist.get_world_size(group) > 1
