"""Where NerVE records go: TensorBoard (scalars, a custom-scalars layout, a spectrum picture) and JSONL."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import socket
import tempfile
import time
from typing import Sequence

import numpy as np

from .records import METRICS, LayerRecord, Metric
from .spectrum import EIG_FLOOR
from .taps import TAPS

logger = logging.getLogger(__name__)


def scalar_tag(metric: str, tap: str | None, layer: int) -> str:
    # Zero-padded layer numbers keep TensorBoard's alphabetical order equal to depth order.
    return f"nerve/{metric}/layer_{layer:03d}" if tap is None else f"nerve/{metric}_{tap}/layer_{layer:03d}"


def record_scalars(record: LayerRecord) -> dict[str, float]:
    out = {}
    for tap in TAPS:
        result = getattr(record, tap)
        if result is not None:
            for metric in METRICS.per_tap:
                out[scalar_tag(metric.name, tap, record.layer)] = getattr(result, metric.name)
    for metric in METRICS.per_layer:
        value = getattr(record, metric.name)
        if value is not None:
            out[scalar_tag(metric.name, None, record.layer)] = value
    return out


TAP_COLUMN, LAYER_COLUMN = 20, 7  # widths of the table's "pre -> post" and per-layer columns


def _label(metric: Metric, width: int, lower: bool = False) -> str:
    # The title where it fits the column ("Spectral entropy"), else the short label ("EEE", "JS").
    if len(metric.title) > width:
        return metric.short
    return metric.title.lower() if lower else metric.title


def format_layer_table(records: list[dict]) -> list[str]:
    """Header, rule and one row per layer: the per-tap metrics (SE, PR, EEE) as pre -> post, then the per-layer
    ones (JS), from JSON-shaped records (``LayerRecord.to_json``, the analyzer's ``to_dict``). A tap, metric or
    JS that is missing or null (a failed layer) prints as "-"."""

    def value(tap: dict | None, metric: Metric) -> str:
        return "-" if not tap or tap.get(metric.name) is None else format(tap[metric.name], metric.fmt)

    def pair(record: dict, metric: Metric) -> str:
        return f"{value(record.get('pre'), metric):>8} -> {value(record.get('post'), metric):<8}"

    def single(record: dict, metric: Metric) -> str:
        got = record.get(metric.name)
        return f"{'-' if got is None else format(got, metric.fmt):>{LAYER_COLUMN}}"

    header = "  ".join(
        [
            f"{'layer':>5}",
            *(f"{_label(m, TAP_COLUMN, True):^{TAP_COLUMN}}" for m in METRICS.per_tap),
            *(f"{_label(m, LAYER_COLUMN, True):>{LAYER_COLUMN}}" for m in METRICS.per_layer),
        ]
    )
    lines = [header, "-" * len(header)]
    for r in sorted(records, key=lambda r: r["layer"]):
        lines.append(
            "  ".join(
                [f"{r['layer']:>5}", *(pair(r, m) for m in METRICS.per_tap), *(single(r, m) for m in METRICS.per_layer)]
            )
        )
    return lines


def custom_scalars_layout(taps: Sequence[str] = TAPS) -> dict:
    """One chart per metric and tap holding every layer, so depth trends read at a glance."""
    charts = {}
    for metric in METRICS.per_tap:
        for tap in taps:
            charts[f"{_label(metric, TAP_COLUMN)} ({tap})"] = ["Multiline", [rf"nerve/{metric.name}_{tap}/layer_.*"]]
    if set(TAPS) <= set(taps):
        for metric in METRICS.per_layer:
            charts[f"{metric.title} (pre vs post)"] = ["Multiline", [rf"nerve/{metric.name}/layer_.*"]]
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


OUTPUTS = ("tensorboard", "jsonl")  # the writers build_writers knows, by the name a config gives them


def build_writers(
    outputs: Sequence[str],
    *,
    summary_writer=None,
    jsonl: str | None = None,
    taps: Sequence[str] = TAPS,
    first_step: int | None = None,
    on_error: str = "warn",
) -> list:
    """The writers of one run, the one place that makes them (NerveLoop, torchtitan, and any new output).

    ``outputs`` names them (a subset of OUTPUTS); each is built only when its target is given:
    ``summary_writer`` (an open SummaryWriter, e.g. torchtitan's own run) for "tensorboard", ``jsonl`` (a path)
    for "jsonl". ``first_step`` is the first step this process trains: 1 starts a fresh JSONL (records already
    there are kept aside), > 1 (a resume) drops what an interrupted attempt logged from that step on; None leaves
    the file as it is. A writer that cannot be prepared is reported and left out (``on_error = "raise"``: raises
    NerveOutputError), as ``write_all`` does for one that fails later.
    """
    unknown = [name for name in outputs if name not in OUTPUTS]
    if unknown:
        raise ValueError(f"nerve outputs = {list(outputs)}: {unknown} not known; expected a subset of {list(OUTPUTS)}")
    writers = []
    if "tensorboard" in outputs and summary_writer is not None:
        writers.append(TensorBoardWriter(summary_writer, taps))
    if "jsonl" in outputs and jsonl is not None:
        writers.append(JsonlWriter(jsonl))
    usable = []
    for writer in writers:
        try:
            if isinstance(writer, JsonlWriter) and first_step is not None:
                # A resumed run: what an earlier attempt logged from here on is stale and is logged again. (A
                # TensorBoard run gets its restart marker from whoever owns it, before its first points.)
                if first_step > 1:
                    writer.truncate_from(first_step)
                else:
                    # A fresh run: records already there belong to an attempt this run does not continue.
                    writer.start_fresh()
            usable.append(writer)
        except OSError as error:
            _writer_failed(writer, "preparing", error, on_error)
    return usable


def _writer_failed(writer, doing: str, error: BaseException, on_error: str) -> None:
    """A writer failed ``doing`` (preparing its file, writing a step): NerveOutputError with ``on_error =
    "raise"``, otherwise one error in the log, naming where and why; the caller then drops the writer."""
    where = getattr(writer, "path", type(writer).__name__)
    what = f"nerve: {doing} {where} failed ({type(error).__name__}: {error})"
    if on_error == "raise":
        raise NerveOutputError(f"{what}; [nerve] on_error = 'raise' stops the run") from error
    logger.error(f"{what}; nerve stops writing there, training goes on")


class NerveOutputError(RuntimeError):
    """nerve cannot write where it was told to: at start-up (an unwritable folder, a path that is a folder,
    another run writing there), or at run time with ``[nerve] on_error = "raise"``."""


def write_all(writers: list, step: int, records: list[LayerRecord], on_error: str = "warn") -> list:
    """Hand a step's records to every writer; the writers that still work. A writer that raises (an unwritable
    folder, a full disk, a path that is a folder) is reported once, naming why, and dropped: training goes on
    without it, as it would with NerVE off. ``on_error = "raise"`` raises NerveOutputError instead, for runs
    that would rather stop than lose records."""
    working = []
    for writer in writers:
        try:
            writer.write(step, records)
            working.append(writer)
        except Exception as error:
            _writer_failed(writer, f"writing step {step} to", error, on_error)
    return working


class OutputLock:
    """Exclusive use of a JSONL file by one process, so two runs pointed at one dump folder cannot interleave
    their records: an flock on ``<path>.lock`` (beside the JSONL: the JSONL itself is replaced by its rewrites,
    which would drop a lock on it), holding the owner's ``pid host`` for the refusal message.

    The kernel releases an flock when its process dies, however it dies (SIGKILL included), so a crashed run
    never blocks its restart. The file is left in place at release (unlinking a lock file lets a third process
    lock a new file while a second still holds the old one)."""

    def __init__(self, jsonl: str):
        self.path = jsonl + ".lock"
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        folder = os.path.dirname(os.path.abspath(self.path))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise NerveOutputError(
                    f"nerve: another run is writing {folder} ({_describe_owner(_read_owner(fd))}, lock "
                    f"{self.path}); two runs in one folder would interleave their records: give this run its own "
                    f"job.dump_folder (or JSONL path), or stop the other run"
                ) from None
            except OSError as error:  # a filesystem without flock (some network filesystems)
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._refuse_if_owner_alive(_read_owner(fd), folder)
                logger.warning(f"nerve: {folder} cannot be locked ({error}); only a run on this host is detected")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _refuse_if_owner_alive(self, owner: tuple[int, str] | None, folder: str) -> None:
        # Without flock only the pid the file names can tell: alive on this host means another run.
        if owner is None or owner[1] != socket.gethostname() or owner[0] == os.getpid():
            return
        try:
            os.kill(owner[0], 0)
        except ProcessLookupError:
            return  # a run that died: its lock is stale
        except PermissionError:
            pass  # alive, another user's
        raise NerveOutputError(
            f"nerve: another run is writing {folder} ({_describe_owner(owner)}, lock {self.path}): "
            f"give this run its own job.dump_folder (or JSONL path), or stop the other run"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # no owner any more
        except OSError:
            pass
        os.close(fd)  # closing the last descriptor releases the flock

    def __del__(self):
        try:
            self.release()
        except Exception:  # at interpreter shutdown os may be half torn down; the kernel releases it anyway
            pass


def _read_owner(fd: int) -> tuple[int, str] | None:
    try:
        pid, host = os.pread(fd, 4096, 0).decode(errors="replace").split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None  # empty (just created, or released) or not ours


def _describe_owner(owner: tuple[int, str] | None) -> str:
    if owner is None:
        return "pid unknown"
    pid, host = owner
    return f"pid {pid} on host {host}" + (
        " (this process)" if pid == os.getpid() and host == socket.gethostname() else ""
    )


def open_jsonl(path: str) -> OutputLock:
    """The start-up check of a JSONL output: its folder made and writable, the path a file that can be appended
    to (or none yet), and no other run writing it; the lock returned is held until released (or the process
    ends). Raises NerveOutputError naming the path, before any step runs."""

    def fail(what: str, error: BaseException | None = None) -> NerveOutputError:
        why = f" ({type(error).__name__}: {error})" if error is not None else ""
        return NerveOutputError(
            f"nerve: cannot write its JSONL output {path}: {what}{why}; make it writable, "
            f"point job.dump_folder (or the JSONL path) elsewhere, or drop 'jsonl' from [nerve] outputs"
        )

    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise fail(f"its folder {folder} cannot be made", error) from error
    if os.path.isdir(path):
        raise fail("it is a folder")
    try:
        lock = OutputLock(path).acquire()
    except NerveOutputError:
        raise
    except OSError as error:
        raise fail(f"its folder {folder} is not writable", error) from error
    # Making the lock file proved the folder writable; a JSONL already there must take appends too (a
    # read-only file, or one on a read-only mount).
    if os.path.exists(path):
        try:
            with open(path, "a"):
                pass
        except OSError as error:
            lock.release()
            raise fail("it cannot be opened for appending", error) from error
    return lock


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
        data = "".join(json.dumps(record.to_json(), allow_nan=False) + "\n" for record in records).encode()
        # Unbuffered: a buffered file keeps what a full disk refused and writes it again at close (or at the
        # truncate's own flush), after the cut; os.write leaves nothing behind.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                # A full disk may have taken part of the text: leave whole lines only.
                try:
                    os.ftruncate(fd, start)
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)

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
        # A name of its own (not one fixed ".tmp"): two processes rewriting at once must not share a file.
        fd, aside = tempfile.mkstemp(
            prefix=os.path.basename(self.path) + ".", suffix=".tmp", dir=os.path.dirname(os.path.abspath(self.path))
        )
        try:
            with os.fdopen(fd, "w") as f:
                f.writelines(kept)
            os.chmod(aside, os.stat(self.path).st_mode & 0o7777)  # mkstemp's 0600 would hide it from others
            os.replace(aside, self.path)
        except BaseException:
            try:
                os.unlink(aside)
            except OSError:
                pass
            raise


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
        floor, top = EIG_FLOOR, 1.0
    else:
        floor = max(min(float(s.eigenvalues[s.eigenvalues > EIG_FLOOR].min(initial=1.0)) for s in spectra), EIG_FLOOR)
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
        draw.text(
            (x0 + margin + 2, y0 + 1),
            f"layer {record.layer}"
            + (f"  JS {record.js:.3f}" if record.js is not None and math.isfinite(record.js) else ""),
            fill="black",
        )
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
