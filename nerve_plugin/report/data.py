"""A run's NerVE records, read from its JSONL (and its loss from TensorBoard) into layer x step arrays.

The JSONL holds one record per (step, layer) (``LayerRecord.to_json``). A restarted run may log a (step, layer)
again: the last record wins, as it is the one the run continued from. Values that are null or NaN (a layer whose
statistics failed) become NaN here and gaps in the pictures; fields the report does not know are ignored, and a
line cut short by a crash is skipped and counted.
"""

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from ..records import METRICS
from ..spectrum import EIG_FLOOR  # the monitor clamps eigenvalues here: at the floor they are zeros, not a spectrum
from ..taps import TAPS

LOSS_TAG = "loss_metrics/global_avg_loss"


@dataclass
class Spectrum:
    ranks: list[int]
    eigenvalues: list[float]


@dataclass
class RunData:
    steps: list[int]  # logged steps, ascending: the heatmaps' columns
    layers: list[int]  # layer indices, ascending: the heatmaps' rows
    # "<metric>_<tap>" of per-tap metrics and "<metric>" of per-layer ones ("js") -> float64 [layers, steps],
    # NaN where missing
    values: dict[str, np.ndarray]
    dims: dict[str, dict[int, int]]  # tap -> {layer: dim}
    tokens: dict[str, dict[int, int]]  # tap -> {step: tokens of that step's first layer}
    raw_spectra: dict[tuple[int, int, str], tuple]  # (step, layer, tap) -> (the record's spectrum, dim)
    records: int = 0  # distinct (step, layer) records
    duplicates: int = 0  # records replaced by a later one for the same (step, layer)
    unreadable: int = 0  # lines that are not a record
    status: dict[str, int] = field(default_factory=dict)  # a tap's "status" (when not ok) -> how many
    loss: dict[int, float] = field(default_factory=dict)  # step -> loss, from TensorBoard
    taps: list[str] = field(default_factory=list)  # the taps some record holds

    def spectrum(self, step: int, layer: int, tap: str) -> "Spectrum | None":
        # read on demand: a long run holds thousands of spectra and the report draws a few
        return _spectrum(*self.raw_spectra[(step, layer, tap)]) if (step, layer, tap) in self.raw_spectra else None

    def column(self, step: int) -> int:
        return self.steps.index(step)

    def row(self, layer: int) -> int:
        return self.layers.index(layer)


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan  # null, or anything else a future writer might put there
    return float(value)


def read_records(path: str) -> tuple[dict[tuple[int, int], dict], int, int]:
    """{(step, layer): record} (the last of each), the number of replaced records and of unreadable lines."""
    records, duplicates, unreadable = {}, 0, 0
    # Bytes: a line of invalid UTF-8 (a crash mid-write, a corrupted disk) is one unreadable line, not the end.
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))  # Python reads NaN and Infinity too
                key = (record["step"], record["layer"])
                if not all(isinstance(k, int) and not isinstance(k, bool) for k in key):
                    raise TypeError(key)
            except (ValueError, KeyError, TypeError, RecursionError):  # UnicodeDecodeError is a ValueError
                unreadable += 1
                continue
            duplicates += key in records
            records[key] = record
    return records, duplicates, unreadable


def load_run(path: str) -> RunData:
    records, duplicates, unreadable = read_records(path)
    steps = sorted({s for s, _ in records})
    layers = sorted({layer for _, layer in records})
    col, row = {s: i for i, s in enumerate(steps)}, {layer: i for i, layer in enumerate(layers)}
    values = {f"{m.name}_{t}": np.full((len(layers), len(steps)), np.nan) for m in METRICS.per_tap for t in TAPS}
    values.update({m.name: np.full((len(layers), len(steps)), np.nan) for m in METRICS.per_layer})
    dims: dict[str, dict[int, int]] = {t: {} for t in TAPS}
    tokens: dict[str, dict[int, int]] = {t: {} for t in TAPS}
    raw_spectra, status, seen = {}, {}, set()
    for (step, layer), record in sorted(records.items()):
        i, j = row[layer], col[step]
        for metric in METRICS.per_layer:
            values[metric.name][i, j] = _number(record.get(metric.name))
        for tap in TAPS:
            result = record.get(tap)
            if not isinstance(result, dict):
                continue
            seen.add(tap)
            for metric in METRICS.per_tap:
                values[f"{metric.name}_{tap}"][i, j] = _number(result.get(metric.name))
            if isinstance(result.get("dim"), int):
                dims[tap][layer] = result["dim"]
            if isinstance(result.get("tokens"), int):
                tokens[tap].setdefault(step, result["tokens"])
            if result.get("status", "ok") != "ok":
                status[str(result["status"])] = status.get(str(result["status"]), 0) + 1
            raw_spectra[(step, layer, tap)] = (result.get("spectrum"), result.get("dim"))
    return RunData(
        steps,
        layers,
        values,
        dims,
        tokens,
        raw_spectra,
        len(records),
        duplicates,
        unreadable,
        status,
        taps=[tap for tap in TAPS if tap in seen],
    )


def _spectrum(spectrum, dim) -> Spectrum | None:
    """{"rank": [...], "eigenvalue": [...]}, or a bare list of eigenvalues at log-spaced ranks; values above the
    floor only (a log-log plot has no place for zeros)."""
    if isinstance(spectrum, dict):
        ranks, eigs = spectrum.get("rank"), spectrum.get("eigenvalue")
    elif isinstance(spectrum, list) and isinstance(dim, int) and dim >= 1:
        eigs = spectrum
        ranks = sorted({int(round(r)) for r in np.geomspace(1, dim, num=min(len(spectrum), dim))})
    else:
        return None
    if not isinstance(ranks, list) or not isinstance(eigs, list) or len(ranks) != len(eigs):
        return None
    points = [(r, _number(e)) for r, e in zip(ranks, eigs) if isinstance(r, int) and r >= 1]
    points = [(r, e) for r, e in points if e > EIG_FLOOR * (1 + 1e-9) and math.isfinite(e)]
    return Spectrum([r for r, _ in points], [e for _, e in points]) if points else None


def load_loss(tensorboard_dir: str, tag: str = LOSS_TAG) -> dict[int, float]:
    """step -> loss from every TensorBoard run under ``tensorboard_dir``; a step logged twice keeps the later point."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = []
    for folder, _, files in os.walk(tensorboard_dir):
        if not any(".tfevents." in name for name in files):
            continue
        events = EventAccumulator(folder, size_guidance={"scalars": 0})  # 0: keep every point
        events.Reload()
        if tag in events.Tags().get("scalars", []):
            points.extend((e.wall_time, e.step, e.value) for e in events.Scalars(tag))
    return {step: value for _, step, value in sorted(points)}
