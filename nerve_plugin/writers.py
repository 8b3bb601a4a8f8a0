"""Where NerVE records go: TensorBoard (scalars, a custom-scalars layout, a spectrum picture) and JSONL."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Sequence

import numpy as np

from .monitor import LayerRecord
from .taps import TAPS

METRICS = ("spectral_entropy", "participation_ratio", "eee")
METRIC_TITLES = {"spectral_entropy": "Spectral entropy", "participation_ratio": "Participation ratio", "eee": "EEE"}

logger = logging.getLogger(__name__)


def scalar_tag(metric: str, tap: str | None, layer: int) -> str:
    # Zero-padded layer numbers keep TensorBoard's alphabetical order equal to depth order.
    return f"nerve/{metric}/layer_{layer:03d}" if tap is None else f"nerve/{metric}_{tap}/layer_{layer:03d}"


def record_scalars(record: LayerRecord) -> dict[str, float]:
    out = {}
    for tap in TAPS:
        result = getattr(record, tap)
        if result is not None:
            for metric in METRICS:
                out[scalar_tag(metric, tap, record.layer)] = getattr(result, metric)
    if record.js is not None:
        out[scalar_tag("js", None, record.layer)] = record.js
    return out


def format_layer_table(records: list[dict]) -> list[str]:
    """Header, rule and one row per layer: SE, PR and EEE as pre -> post, then JS, from JSON-shaped records
    (``LayerRecord.to_json``, the analyzer's ``to_dict``). A tap, metric or JS that is missing or null (a
    failed layer) prints as "-"."""

    def value(tap: dict | None, metric: str, fmt: str) -> str:
        return "-" if not tap or tap.get(metric) is None else format(tap[metric], fmt)

    def pair(record: dict, metric: str, fmt: str) -> str:
        return f"{value(record.get('pre'), metric, fmt):>8} -> {value(record.get('post'), metric, fmt):<8}"

    header = f"{'layer':>5}  {'spectral entropy':^20}  {'participation ratio':^20}  {'EEE':^20}  {'JS':>7}"
    lines = [header, "-" * len(header)]
    for r in sorted(records, key=lambda r: r["layer"]):
        js = f"{r['js']:7.4f}" if r.get("js") is not None else f"{'-':>7}"
        lines.append(
            f"{r['layer']:>5}  {pair(r, 'spectral_entropy', '.3f')}  {pair(r, 'participation_ratio', '.1f')}  "
            f"{pair(r, 'eee', '.3f')}  {js}"
        )
    return lines


def custom_scalars_layout(taps: Sequence[str] = TAPS) -> dict:
    """One chart per metric and tap holding every layer, so depth trends read at a glance."""
    charts = {}
    for metric in METRICS:
        for tap in taps:
            charts[f"{METRIC_TITLES[metric]} ({tap})"] = ["Multiline", [rf"nerve/{metric}_{tap}/layer_.*"]]
    if set(TAPS) <= set(taps):
        charts["Jensen-Shannon divergence (pre vs post)"] = ["Multiline", [r"nerve/js/layer_.*"]]
    return {"NerVE": charts}


class TensorBoardWriter:
    """Writes into an existing SummaryWriter (torchtitan's own run), so NerVE sits next to the loss."""

    def __init__(self, summary_writer, taps: Sequence[str] = TAPS):
        self.writer = summary_writer
        self.writer.add_custom_scalars(custom_scalars_layout(taps))

    def write(self, step: int, records: list[LayerRecord]) -> None:
        for record in records:
            for tag, value in record_scalars(record).items():
                self.writer.add_scalar(tag, value, step)
        if records:
            self.writer.add_image("nerve/eigenspectrum", spectrum_picture(records), step, dataformats="HWC")
        self.writer.flush()

    def truncate_from(self, step: int) -> None:
        """After a resume at ``step``: TensorBoard hides this run's events at steps >= ``step`` written before
        this marker (its purge rule for a restarted run), so a run directory reused by the restart holds each
        point once."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self.writer.file_writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))


def write_all(writers: list, step: int, records: list[LayerRecord]) -> list:
    """Hand a step's records to every writer; the writers that still work. A writer that raises (an unwritable
    folder, a full disk, a path that is a folder) is reported once, naming why, and dropped: training goes on
    without it, as it would with NerVE off."""
    working = []
    for writer in writers:
        try:
            writer.write(step, records)
            working.append(writer)
        except Exception as error:
            where = getattr(writer, "path", type(writer).__name__)
            logger.error(f"nerve: writing step {step} to {where} failed ({type(error).__name__}: {error}); "
                         f"nerve stops writing there, training goes on")
    return working


class JsonlWriter:
    """One JSON object per (step, layer), appended and flushed at each logging step."""

    def __init__(self, path: str):
        self.path = path
        self._tail_checked = False

    def write(self, step: int, records: list[LayerRecord]) -> None:
        if not self._tail_checked:
            # Here, not in __init__: a folder that cannot be made is then one failed write (see write_all).
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._drop_partial_last_line()
            self._tail_checked = True
        text = "".join(json.dumps(record.to_json(), allow_nan=False) + "\n" for record in records)
        with open(self.path, "a") as f:
            start = f.tell()
            try:
                f.write(text)
                f.flush()
            except OSError:
                # A full disk may have taken part of the text: leave whole lines only.
                try:
                    f.truncate(start)
                except OSError:
                    pass
                raise

    def _drop_partial_last_line(self) -> None:
        """A crash mid-write leaves a last line without its newline; appending to it would glue the next record
        onto it, so it is cut off (it was unreadable anyway)."""
        if not os.path.isfile(self.path) or os.path.getsize(self.path) == 0:
            return
        with open(self.path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            size = f.seek(0, os.SEEK_END)
            keep = 0
            while size > 0:  # back to the last newline, a block at a time
                start = max(0, size - 65536)
                f.seek(start)
                block = f.read(size - start)
                newline = block.rfind(b"\n")
                if newline >= 0:
                    keep = start + newline + 1
                    break
                size = start
            f.truncate(keep)
        logger.warning(f"nerve: dropped a partial last line of {self.path} (an interrupted write)")

    def start_fresh(self) -> str | None:
        """A run starting at step 1 into a folder that already holds records (an earlier attempt that crashed
        before its first checkpoint, or another run): keep them aside, under a new name that is returned, and
        start an empty file, so the new run's steps are not mixed with stale ones."""
        if not os.path.isfile(self.path) or os.path.getsize(self.path) == 0:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside, n = f"{self.path}.{stamp}", 1
        while os.path.exists(aside):
            n += 1
            aside = f"{self.path}.{stamp}-{n}"
        os.replace(self.path, aside)
        logger.warning(f"nerve: a fresh run (step 1): the records already in {self.path} are kept as {aside}")
        return aside

    def truncate_from(self, step: int) -> None:
        """After a resume at ``step``: drop the records of steps >= ``step`` that an interrupted attempt wrote
        (they are logged again), keeping the file valid at every moment (write aside, then rename)."""
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] < step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by the crash
        aside = self.path + ".tmp"
        with open(aside, "w") as f:
            f.writelines(kept)
        os.replace(aside, self.path)


# -- the spectrum picture -------------------------------------------------------------------------------------

PRE_COLOUR, POST_COLOUR = (31, 119, 180), (255, 127, 14)


def spectrum_picture(records: list[LayerRecord], panel: tuple[int, int] = (220, 150)) -> np.ndarray:
    """A grid with one log-log panel per layer: eigenvalue against rank, pre in blue, post in orange.

    Returns an RGB uint8 array [H, W, 3]. Every panel shares the y range, so layers compare directly.
    """
    from PIL import Image, ImageDraw

    spectra = [s for r in records for s in (r.pre, r.post) if s is not None and len(s.eigenvalues)]
    if not spectra:  # every measured tap failed: nothing to draw, but keep the picture's place in the run
        spectra = [None]
        floor, top = 1e-12, 1.0
    else:
        floor = max(min(float(s.eigenvalues[s.eigenvalues > 1e-12].min(initial=1.0)) for s in spectra), 1e-12)
        top = max(float(s.eigenvalues[0]) for s in spectra)
    lo, hi = math.log10(floor), math.log10(top) if top > floor else math.log10(floor) + 1
    columns = min(4, len(records))
    rows = math.ceil(len(records) / columns)
    width, height = panel
    image = Image.new("RGB", (columns * width, rows * height + 18), "white")
    draw = ImageDraw.Draw(image)
    draw.text(
        (4, rows * height + 4),
        f"eigenvalue vs rank, log-log, y from 1e{lo:.0f} to 1e{hi:.0f} in every panel; blue: pre, orange: post",
        fill="black",
    )
    margin = 22
    for i, record in enumerate(records):
        x0, y0 = (i % columns) * width, (i // columns) * height
        draw.rectangle([x0 + margin, y0 + 14, x0 + width - 6, y0 + height - 6], outline=(180, 180, 180))
        draw.text((x0 + 2, y0 + 14), f"{hi:.0f}", fill="gray")
        draw.text((x0 + 2, y0 + height - 18), f"{lo:.0f}", fill="gray")
        dims = [t.dim for t in (record.pre, record.post) if t is not None]
        draw.text((x0 + width - 40, y0 + height - 20), f"D={max(dims)}", fill="gray")
        draw.text((x0 + margin + 2, y0 + 1), f"layer {record.layer}" + (f"  JS {record.js:.3f}" if record.js is not None and math.isfinite(record.js) else ""), fill="black")
        for result, colour in ((record.pre, PRE_COLOUR), (record.post, POST_COLOUR)):
            if result is None or not len(result.eigenvalues):
                continue
            eigs = result.eigenvalues
            d = len(eigs)
            ranks = np.unique(np.geomspace(1, d, num=min(d, 2 * width)).round().astype(int))
            xs = x0 + margin + (np.log10(ranks) / max(math.log10(d), 1e-9)) * (width - margin - 8)
            ys = y0 + height - 8 - (np.log10(np.maximum(eigs[ranks - 1], floor)) - lo) / (hi - lo) * (height - 24)
            draw.line(list(zip(xs.tolist(), ys.tolist())), fill=colour, width=2)
    return np.asarray(image)
