"""NerveMonitor: taps -> streaming statistics -> distributed merge -> float64 eigen-spectra -> per-layer records.

Framework-free: it works on any list of model parts with a tap spec, and the training loop drives it with
``begin_step(step)`` before the step's forwards and ``end_step(step)`` after its backwards. Every rank must
call both at every step; on logging steps ``end_step`` issues collectives.

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
import time
from dataclasses import dataclass
from typing import Iterable, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .spectrum import compute_js, compute_sorted_eigs, normalize_eigs, spectrum_metrics_from_eigs
from .stats import reduce_stats
from .taps import TAPS, FFNTaps, TapSpec

logger = logging.getLogger(__name__)

EIGEN_SOLVE_PLACEMENTS = ("rank0", "spread")


@dataclass
class MonitorConfig:
    log_freq: int = 100
    taps: tuple[str, ...] = TAPS
    layers: list[int] | None = None  # None: every layer
    max_tokens_per_forward: int | None = None  # None: every token
    eigen_solve: Literal["rank0", "spread"] = "rank0"
    seed: int = 0
    accumulate_dtype: torch.dtype | None = None

    def __post_init__(self):
        if self.log_freq < 1:
            raise ValueError(f"log_freq must be >= 1, got {self.log_freq}")
        if self.eigen_solve not in EIGEN_SOLVE_PLACEMENTS:
            raise ValueError(f"eigen_solve must be one of {EIGEN_SOLVE_PLACEMENTS}, got {self.eigen_solve!r}")

    def is_log_step(self, step: int) -> bool:
        # The same rule as torchtitan's own metrics: step 1, then every log_freq steps.
        return step == 1 or step % self.log_freq == 0


@dataclass
class TapResult:
    tokens: int
    spectral_entropy: float
    participation_ratio: float
    eee: float
    eigenvalues: np.ndarray  # float64, descending, clamped at 1e-12

    def to_json(self, spectrum_points: int = 64) -> dict:
        return {
            "tokens": self.tokens,
            "spectral_entropy": self.spectral_entropy,
            "participation_ratio": self.participation_ratio,
            "eee": self.eee,
            "dim": int(self.eigenvalues.shape[0]),
            "spectrum": _log_spaced_spectrum(self.eigenvalues, spectrum_points),
        }


@dataclass
class LayerRecord:
    step: int
    layer: int
    pre: TapResult | None = None
    post: TapResult | None = None
    js: float | None = None  # JS(p_pre || p_post), when both taps are measured

    def to_json(self) -> dict:
        out: dict = {"step": self.step, "layer": self.layer}
        for tap in TAPS:
            result = getattr(self, tap)
            if result is not None:
                out[tap] = result.to_json()
        if self.js is not None:
            out["js"] = self.js
        return out


def _log_spaced_spectrum(eigs: np.ndarray, points: int) -> dict:
    """Eigenvalues at log-spaced ranks: enough to redraw the spectrum on a log-log plot, small enough for JSONL."""
    d = eigs.shape[0]
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
        parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
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
            for part in parts
        ]
        self._armed_step: int | None = None
        self.last_duration_s = 0.0

    @property
    def layers(self) -> list[int]:
        return sorted({layer for t in self.taps for layer in t.layers})

    def attach(self) -> "NerveMonitor":
        for t in self.taps:
            t.attach()
        return self

    def close(self) -> None:
        for t in self.taps:
            t.remove()

    @property
    def armed_step(self) -> int | None:
        return self._armed_step

    def begin_step(self, step: int) -> None:
        """Call before each of the step's forwards (calling it again for the same step keeps what was captured);
        arms the taps if ``step`` is a logging step."""
        if not self.config.is_log_step(step):
            self.pause()
            return
        if self._armed_step != step:
            for t in self.taps:
                t.reset()
            self._armed_step = step
        for t in self.taps:
            if t.armed_step != step:
                t.arm(step)

    def pause(self) -> None:
        """Stop capturing until the next ``begin_step``, e.g. around forwards that are not training forwards."""
        for t in self.taps:
            t.disarm()

    def end_step(self, step: int) -> list[LayerRecord] | None:
        """Call after the step's last backward on every rank. On a logging step: merge, solve, and return the
        records on ``report_rank`` ([] on other ranks); None when ``step`` was not captured."""
        if self._armed_step != step:
            return None
        self.pause()
        self._armed_step = None
        start = time.perf_counter()
        results = self._solve_owned()
        records = self._gather(step, results)
        for t in self.taps:
            t.reset()
        self.last_duration_s = time.perf_counter() - start
        return records

    # -- reduction and eigen-solves -------------------------------------------------------------------------

    def _local_stats(self):
        """(key, stats) for this rank's layers, in the same order on every rank of a token group."""
        found = {}
        for t in self.taps:
            found.update(t.stats)
        return sorted(found.items())

    def _solve_owned(self) -> dict[tuple[int, str], tuple[int, np.ndarray]]:
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
        if dp > 1:
            mine = reduce_stats([s for _, s in participating], token_group, owners)
        else:
            mine = list(range(len(participating)))
        results = {}
        for i in mine:
            key, stats = participating[i]
            if stats.count < 2:
                continue
            eigs = compute_sorted_eigs(stats.covariance())
            results[key] = (stats.count, eigs.cpu().numpy())
        return results

    def _gather(self, step: int, results) -> list[LayerRecord]:
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
        for (layer, tap), (count, eigs) in sorted(merged.items()):
            metrics = spectrum_metrics_from_eigs(torch.from_numpy(eigs))
            record = by_layer.setdefault(layer, LayerRecord(step=step, layer=layer))
            setattr(
                record,
                tap,
                TapResult(count, metrics.spectral_entropy, metrics.participation_ratio, metrics.eee, eigs),
            )
        for record in by_layer.values():
            if record.pre is not None and record.post is not None and len(record.pre.eigenvalues) == len(
                record.post.eigenvalues
            ):
                record.js = compute_js(
                    normalize_eigs(torch.from_numpy(record.pre.eigenvalues)),
                    normalize_eigs(torch.from_numpy(record.post.eigenvalues)),
                )
        return [by_layer[layer] for layer in sorted(by_layer)]


def _distributed(group) -> bool:
    # None means "no such parallelism" here, not torch.distributed's default (world) group.
    return group is not None and dist.is_initialized() and dist.get_world_size(group) > 1
