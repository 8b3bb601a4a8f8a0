"""What a logging step produces, defined once: the metric registry, TapResult, LayerRecord and their JSON.

Every reader and writer of metrics (writers.py, report/, analyze/) takes the metric names, titles, labels and
number formats from ``METRICS``, so a new metric is its function (spectrum.py) and one ``Metric`` entry here:

    Metric("stable_rank", "Stable rank", "SR", ".1f", per_tap=True, of=compute_stable_rank)

Per-tap metrics (``per_tap=True``) are computed from one tap's eigenvalues and live on its TapResult
(``record.pre.stable_rank``, ``"pre": {"stable_rank": ...}`` in the JSONL, ``nerve/stable_rank_pre/layer_NNN``
in TensorBoard); per-layer metrics (JS) from the pre and post eigenvalues of one layer, on its LayerRecord
(``record.js``, ``"js"``, ``nerve/js/layer_NNN``). The JSONL fields are README's "Outputs" table.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields
from typing import Callable, ClassVar, Iterator

import numpy as np
import torch

from .spectrum import compute_eee, compute_js, compute_participation_ratio, compute_spectral_entropy, normalize_eigs
from .taps import TAPS

# A covariance of N tokens has rank < N: with N < D / FEW_TOKENS_RATIO most of its spectrum is the EIG_FLOOR and
# SE / PR / EEE describe the token sample more than the layer. Such records say so ("few_tokens": true).
FEW_TOKENS_RATIO = 4
SPECTRUM_POINTS = 64  # log-spaced ranks of a spectrum kept in the JSONL


@dataclass(frozen=True)
class Metric:
    """One metric of the records. ``of`` takes float64 eigenvalues (descending, floored at EIG_FLOOR, a torch
    tensor): one tap's for a per-tap metric, ``(pre, post)`` for a per-layer one; it returns a float."""

    name: str  # the JSONL field, the TensorBoard tag's stem, the report's and analyzer's key
    title: str  # figure and chart titles: "Spectral entropy"
    short: str  # axis labels, table columns that have no room for the title: "SE"
    fmt: str  # number format of tables and heatmap cells: ".3f"
    per_tap: bool  # True: one value per tap; False: one value per layer, from both taps (JS)
    of: Callable[..., float]


class MetricRegistry:
    """The metrics in their order of appearance (JSONL fields, TensorBoard charts, table columns, figures)."""

    def __init__(self, metrics: tuple[Metric, ...] = ()):
        self._metrics: dict[str, Metric] = {}
        for metric in metrics:
            self.register(metric)

    def register(self, metric: Metric) -> Metric:
        if metric.name in self._metrics or _taken(metric.name, metric.per_tap) or not metric.name.isidentifier():
            raise ValueError(f"metric name {metric.name!r} is taken or not an identifier")
        self._metrics[metric.name] = metric
        return metric

    def unregister(self, name: str) -> None:
        del self._metrics[name]

    @contextlib.contextmanager
    def added(self, metric: Metric) -> Iterator[Metric]:
        """``metric`` registered for the ``with`` block only (tests, experiments)."""
        self.register(metric)
        try:
            yield metric
        finally:
            self.unregister(metric.name)

    def get(self, name: str) -> Metric | None:
        return self._metrics.get(name)

    def __getitem__(self, name: str) -> Metric:
        return self._metrics[name]

    def __iter__(self) -> Iterator[Metric]:
        return iter(tuple(self._metrics.values()))

    @property
    def per_tap(self) -> tuple[Metric, ...]:
        return tuple(m for m in self._metrics.values() if m.per_tap)

    @property
    def per_layer(self) -> tuple[Metric, ...]:
        return tuple(m for m in self._metrics.values() if not m.per_tap)


class MetricValues:
    """The registered metrics of one kind as attributes (``result.eee``, ``record.js = ...``), held in
    ``self.values``, so a record class names no metric itself. A per-tap metric not in ``values`` reads as NaN
    (not computed), a per-layer one as None (not measured)."""

    _per_tap: ClassVar[bool]
    _missing: ClassVar[float | None]

    def __getattr__(self, name: str):
        # Only called when normal lookup fails; "values" and private names must fail plainly (copy and
        # pickle probe them on an instance whose __dict__ is still empty).
        if not name.startswith("_") and name != "values":
            metric = METRICS.get(name)
            if metric is not None and metric.per_tap == self._per_tap:
                return self.values.get(name, self._missing)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        metric = METRICS.get(name)
        if metric is not None and metric.per_tap == self._per_tap:
            self.values[name] = value
        else:
            object.__setattr__(self, name, value)

    def _take_metrics(self, values: dict | None, metrics: dict) -> None:
        self.values = dict(values or {})
        for name, value in metrics.items():
            metric = METRICS.get(name)
            if metric is None or metric.per_tap != self._per_tap:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {name!r}")
            self.values[name] = value


@dataclass(init=False)
class TapResult(MetricValues):
    """One tap's spectrum and its per-tap metrics. Built by keyword:
    ``TapResult(tokens=N, eigenvalues=e, spectral_entropy=..., participation_ratio=..., eee=...)``, or from a
    spectrum with ``TapResult.measured``."""

    _per_tap: ClassVar[bool] = True
    _missing: ClassVar[float] = math.nan

    tokens: int
    eigenvalues: np.ndarray  # float64, descending, clamped at EIG_FLOOR; empty when status says why not
    dim: int
    status: str
    values: dict[str, float]  # per-tap metric name -> value; NaN when it could not be computed
    spectrum: dict | None  # the JSONL's log-spaced sample, for a result read back from JSON (no eigenvalues)

    def __init__(
        self,
        *,
        tokens: int,
        eigenvalues: np.ndarray,
        dim: int = 0,
        status: str = "ok",
        values: dict[str, float] | None = None,
        spectrum: dict | None = None,
        **metrics: float,
    ):
        self.tokens = tokens
        self.eigenvalues = eigenvalues
        self.dim = dim or int(eigenvalues.shape[0])
        self.status = status
        self.spectrum = spectrum
        self._take_metrics(values, metrics)

    @classmethod
    def measured(cls, *, tokens: int, eigenvalues: np.ndarray | None, dim: int = 0, status: str = "ok"):
        """Every per-tap metric of a solved spectrum; NaN metrics when there is none (``status`` says why)."""
        if eigenvalues is None:
            return cls(
                tokens=tokens,
                eigenvalues=np.zeros(0),
                dim=dim,
                status=status,
                values={m.name: math.nan for m in METRICS.per_tap},
            )
        eigs = torch.from_numpy(eigenvalues)
        return cls(
            tokens=tokens, eigenvalues=eigenvalues, status=status, values={m.name: m.of(eigs) for m in METRICS.per_tap}
        )

    @property
    def few_tokens(self) -> bool:
        """Fewer tokens than D / FEW_TOKENS_RATIO: the metrics are numbers, but of a covariance of low rank."""
        return self.tokens * FEW_TOKENS_RATIO < self.dim

    def to_json(self, spectrum_points: int = SPECTRUM_POINTS) -> dict:
        # The one definition of a tap's JSONL fields (README, "Outputs", lists them).
        out = {"tokens": self.tokens}
        for metric in METRICS.per_tap:
            out[metric.name] = finite_or_none(getattr(self, metric.name))
        out["dim"] = self.dim
        out["few_tokens"] = self.few_tokens
        if self.spectrum is not None and not len(self.eigenvalues):
            out["spectrum"] = self.spectrum
        else:
            out["spectrum"] = log_spaced_spectrum(self.eigenvalues, spectrum_points)
        if self.status != "ok":
            out["status"] = self.status
        return out

    @classmethod
    def from_json(cls, data: dict) -> "TapResult":
        """The inverse of ``to_json``: null metrics become NaN; the eigenvalues are not in the JSON (only their
        log-spaced sample, kept as ``spectrum``), so ``eigenvalues`` is empty."""
        return cls(
            tokens=data["tokens"],
            eigenvalues=np.zeros(0),
            dim=data["dim"],
            status=data.get("status", "ok"),
            spectrum=data.get("spectrum"),
            values={m.name: _number(data.get(m.name)) for m in METRICS.per_tap if m.name in data},
        )


@dataclass(init=False)
class LayerRecord(MetricValues):
    """One (step, layer): its taps' results and its per-layer metrics (``record.js``: JS(p_pre || p_post) when
    both taps are measured, NaN when one failed, None otherwise)."""

    _per_tap: ClassVar[bool] = False
    _missing: ClassVar[None] = None

    step: int
    layer: int
    pre: TapResult | None
    post: TapResult | None
    values: dict[str, float | None]  # per-layer metric name -> value

    def __init__(
        self,
        step: int,
        layer: int,
        pre: TapResult | None = None,
        post: TapResult | None = None,
        *,
        values: dict[str, float | None] | None = None,
        **metrics: float | None,
    ):
        self.step, self.layer, self.pre, self.post = step, layer, pre, post
        self._take_metrics(values, metrics)

    def measure_pair(self) -> "LayerRecord":
        """Set every per-layer metric from the record's taps (``layer_metrics``)."""
        self.values.update(layer_metrics(self.pre, self.post))
        return self

    def to_json(self) -> dict:
        out: dict = {"step": self.step, "layer": self.layer}
        for tap in TAPS:
            result = getattr(self, tap)
            if result is not None:
                out[tap] = result.to_json()
        for metric in METRICS.per_layer:
            value = getattr(self, metric.name)
            if value is not None:
                out[metric.name] = finite_or_none(value)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "LayerRecord":
        """The inverse of ``to_json`` (one parsed JSONL line); a null per-layer metric becomes NaN."""
        taps = {tap: TapResult.from_json(data[tap]) for tap in TAPS if isinstance(data.get(tap), dict)}
        return cls(
            data["step"],
            data["layer"],
            **taps,
            values={m.name: _number(data[m.name]) for m in METRICS.per_layer if m.name in data},
        )


def _taken(name: str, per_tap: bool) -> bool:
    """Whether the records already use ``name`` (a field, a method, the analyzer's module names): a metric of
    that name would be shadowed by it."""
    cls = TapResult if per_tap else LayerRecord
    return name in {f.name for f in fields(cls)} or hasattr(cls, name) or name in ("pre_module", "post_module")


# The metrics of every record, in the order the JSONL, TensorBoard, tables and figures show them. A new metric is
# one entry here (and its function in spectrum.py); nothing else names them.
METRICS = MetricRegistry(
    (
        Metric(
            "spectral_entropy",
            "Spectral entropy",
            "SE",
            ".3f",
            True,
            lambda eigs: compute_spectral_entropy(normalize_eigs(eigs)),
        ),
        Metric("participation_ratio", "Participation ratio", "PR", ".1f", True, compute_participation_ratio),
        Metric(
            "eee", "Eigenvalue early enrichment", "EEE", ".3f", True, lambda eigs: compute_eee(normalize_eigs(eigs))
        ),
        Metric(
            "js",
            "JS divergence",
            "JS",
            ".4f",
            False,
            lambda pre, post: compute_js(normalize_eigs(pre), normalize_eigs(post)),
        ),
    )
)


def layer_metrics(pre: TapResult | None, post: TapResult | None) -> dict[str, float | None]:
    """Every per-layer metric of one layer: None without both taps or when their dimensions differ, NaN when one
    has no spectrum (its statistics were non-finite or every solve failed)."""
    if pre is None or post is None or pre.dim != post.dim:
        return {m.name: None for m in METRICS.per_layer}
    if not len(pre.eigenvalues) or not len(post.eigenvalues):
        return {m.name: math.nan for m in METRICS.per_layer}
    a, b = torch.from_numpy(pre.eigenvalues), torch.from_numpy(post.eigenvalues)
    return {m.name: m.of(a, b) for m in METRICS.per_layer}


def pair_js(pre: TapResult | None, post: TapResult | None) -> float | None:
    """JS(p_pre || p_post), as ``layer_metrics`` gives it."""
    return layer_metrics(pre, post)["js"]


def records_by_step(records: list[LayerRecord]) -> dict[int, list[LayerRecord]]:
    """{step: its records}, steps ascending. Records carry their own step: overlapped solves return those of an
    earlier step, which must be written (and plotted) there."""
    by_step: dict[int, list[LayerRecord]] = {}
    for record in sorted(records, key=lambda r: r.step):
        by_step.setdefault(record.step, []).append(record)
    return by_step


def finite_or_none(value: float) -> float | None:
    # JSON has no NaN; null marks a metric that could not be computed (the record's status says why).
    return value if math.isfinite(value) else None


def _number(value) -> float:
    return math.nan if value is None else value


def log_spaced_spectrum(eigs: np.ndarray, points: int) -> dict:
    """Eigenvalues at log-spaced ranks: enough to redraw the spectrum on a log-log plot, small enough for JSONL."""
    d = eigs.shape[0]
    if d == 0:
        return {"rank": [], "eigenvalue": []}
    ranks = sorted({int(round(r)) for r in np.geomspace(1, d, num=min(points, d))})
    return {"rank": ranks, "eigenvalue": [float(eigs[r - 1]) for r in ranks]}
