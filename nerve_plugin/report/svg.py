"""Small SVG figures for the report: heatmaps with colorbars, line plots (linear or log-log) with legends.

Every figure is one ``<svg>`` whose ``<title>`` is its title, so it reads as a figure to browsers, screen readers
and tests. Heatmap cells are a PNG (one flat rectangle per cell, drawn by PIL) inside the SVG: a long run has
thousands of cells per map, which as SVG elements would make the page slow; axes, labels and colorbar stay SVG.
"""

import base64
import io
import math
from dataclasses import dataclass, field
from html import escape

import numpy as np

# Colormap anchors, interpolated linearly: viridis (sequential) and a red-blue diverging map, both the
# colour-blind-safe maps matplotlib and ColorBrewer publish.
VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"]
DIVERGING = ["#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582", "#d6604d", "#b2182b"]
# Distinct line colours (Tableau 10), one per layer.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
GAP_FILL = "url(#nerve-gap)"  # the hatch pattern page.py defines once: a cell with no value


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))


def colormap(anchors: list[str], t: np.ndarray) -> np.ndarray:
    """RGB uint8 [..., 3] for t in [0, 1] (clipped)."""
    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0)
    points = np.linspace(0.0, 1.0, len(anchors))
    channels = np.array([_rgb(a) for a in anchors], dtype=np.float64)
    return np.stack([np.interp(t, points, channels[:, c]) for c in range(3)], axis=-1).round().astype(np.uint8)


def hex_colour(rgb) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


# -- numbers ------------------------------------------------------------------------------------------------------


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    k = 0
    while first + k * step <= hi + 1e-9 * step:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def fmt(value: float, step: float | None = None) -> str:
    """A tick label: as many decimals as the tick spacing needs, else 4 significant digits."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if step is not None and step > 0:
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        if decimals <= 4 and abs(value) < 1e6:
            return f"{value:.{decimals}f}" if value != 0 else "0"
    return f"{value:.4g}"


def value_range(values: np.ndarray, symmetric: bool = False) -> tuple[float, float]:
    """The colour scale of a heatmap: the finite values' range (symmetric about 0 for differences)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return (-1.0, 1.0) if symmetric else (0.0, 1.0)
    if symmetric:
        bound = float(np.abs(finite).max()) or 1.0
        return -bound, bound
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        lo, hi = lo - 0.5, hi + 0.5  # a constant map still gets a readable scale
    return lo, hi


# -- heatmap ------------------------------------------------------------------------------------------------------


@dataclass
class Heatmap:
    title: str
    values: np.ndarray  # [rows, columns], NaN: no value
    columns: list[int]  # the steps
    rows: list[int]  # the layers
    anchors: list[str] = field(default_factory=lambda: VIRIDIS)
    vrange: tuple[float, float] | None = None  # default: value_range
    key: str = ""  # names the data behind it (data-key), for the tooltip script and tests


HEATMAP_SIZE = (430, 250)  # the whole figure, pixels
HEATMAP_PLOT = (54, 30, 300, 172)  # x, y, width, height of the cell area


def cell_png(values: np.ndarray, anchors: list[str], vrange: tuple[float, float], size: tuple[int, int]) -> bytes:
    """The cells as a PNG of ``size`` (width, height): one flat rectangle per value, transparent where NaN.

    With more steps than pixel columns the picture samples them (nearest); the tooltip and the page's JSON keep
    every value."""
    from PIL import Image

    lo, hi = vrange
    t = (values - lo) / (hi - lo)
    rgba = np.zeros(values.shape + (4,), dtype=np.uint8)
    finite = np.isfinite(values)
    rgba[..., :3] = colormap(anchors, np.where(finite, t, 0.0))
    rgba[..., 3] = np.where(finite, 255, 0)
    image = Image.fromarray(rgba, "RGBA").resize(size, Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def heatmap_svg(h: Heatmap) -> str:
    width, height = HEATMAP_SIZE
    px, py, pw, ph = HEATMAP_PLOT
    vrange = h.vrange or value_range(h.values)
    n_rows, n_cols = h.values.shape
    png = base64.b64encode(cell_png(h.values, h.anchors, vrange, (pw, ph))).decode("ascii")
    out = [
        f'<svg class="figure heatmap" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" data-key="{escape(h.key)}" data-plot="{px} {py} {pw} {ph}" '
        f'data-shape="{n_rows} {n_cols}">',
        f"<title>{escape(h.title)}</title>",
        f'<text class="fig-title" x="{width / 2}" y="17" text-anchor="middle">{escape(h.title)}</text>',
        f'<rect x="{px}" y="{py}" width="{pw}" height="{ph}" fill="{GAP_FILL}"/>',
        f'<image class="cells" x="{px}" y="{py}" width="{pw}" height="{ph}" preserveAspectRatio="none" '
        f'href="data:image/png;base64,{png}"/>',
        f'<rect x="{px}" y="{py}" width="{pw}" height="{ph}" fill="none" stroke="#555"/>',
    ]
    # x: steps (one column per logged step), y: layers (first layer on top)
    for j in _label_indices(h.columns, 6):
        x = px + (j + 0.5) * pw / n_cols
        out.append(_tick(x, py + ph, x, py + ph + 4))
        out.append(f'<text class="tick" x="{x:.1f}" y="{py + ph + 15}" text-anchor="middle">{h.columns[j]}</text>')
    for i in _label_indices(h.rows, 8):
        y = py + (i + 0.5) * ph / n_rows
        out.append(_tick(px - 4, y, px, y))
        out.append(f'<text class="tick" x="{px - 6}" y="{y + 3.5:.1f}" text-anchor="end">{h.rows[i]}</text>')
    out.append(f'<text class="label" x="{px + pw / 2}" y="{py + ph + 32}" text-anchor="middle">step</text>')
    out.append(
        f'<text class="label" transform="translate(14 {py + ph / 2}) rotate(-90)" text-anchor="middle">layer</text>'
    )
    out.append(colorbar(px + pw + 14, py, 12, ph, h.anchors, vrange))
    out.append("</svg>")
    return "\n".join(out)


def colorbar(x: float, y: float, w: float, h: float, anchors: list[str], vrange: tuple[float, float]) -> str:
    lo, hi = vrange
    bands = 64
    out = ['<g class="colorbar">']
    colours = colormap(anchors, np.linspace(0.0, 1.0, bands))
    for k, rgb in enumerate(colours):  # bottom: lo, top: hi
        top = y + h - (k + 1) * h / bands
        out.append(f'<rect x="{x}" y="{top:.2f}" width="{w}" height="{h / bands + 0.3:.2f}" fill="{hex_colour(rgb)}"/>')
    out.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" fill="none" stroke="#555"/>')
    ticks = nice_ticks(lo, hi, 5)
    spacing = ticks[1] - ticks[0] if len(ticks) > 1 else None
    for t in ticks:
        ty = y + h - (t - lo) / (hi - lo) * h
        out.append(_tick(x + w, ty, x + w + 4, ty))
        out.append(f'<text class="tick" x="{x + w + 6}" y="{ty + 3.5:.1f}">{fmt(t, spacing)}</text>')
    out.append("</g>")
    return "\n".join(out)


def _label_indices(values: list[int], most: int) -> list[int]:
    """Which of a heatmap's rows or columns get a label: all when few, else those whose layer or step is a
    multiple of a round number (1, 2 or 5 times a power of ten), at most ``most`` of them."""
    if len(values) <= most:
        return list(range(len(values)))
    for multiple in (m * 10**power for power in range(19) for m in (1, 2, 5)):
        picked = [i for i, v in enumerate(values) if v % multiple == 0]
        if len(picked) <= most:
            if len(picked) >= 2:
                return picked
            break
    n = len(values)  # irregular values: evenly spread, first and last included
    return sorted({round(k * (n - 1) / (most - 1)) for k in range(most)})


def _tick(x1, y1, x2, y2) -> str:
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#555"/>'


# -- line plots ---------------------------------------------------------------------------------------------------


@dataclass
class Series:
    label: str
    x: list[float]
    y: list[float]  # NaN: a gap in the line
    colour: str
    dashed: bool = False


@dataclass
class LinePlot:
    title: str
    series: list[Series]
    xlabel: str
    ylabel: str
    log: bool = False  # log-log axes (the eigen-spectra)
    size: tuple[int, int] = (430, 280)
    key: str = ""


def line_plot_svg(p: LinePlot) -> str:
    width, height = p.size
    px, py = 62, 30
    pw, ph = width - px - 14, height - py - 46
    transform = (lambda v: math.log10(v)) if p.log else (lambda v: v)
    xs = [transform(x) for s in p.series for x, y in zip(s.x, s.y) if _plottable(x, y, p.log)]
    ys = [transform(y) for s in p.series for x, y in zip(s.x, s.y) if _plottable(x, y, p.log)]
    out = [
        f'<svg class="figure lineplot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" data-key="{escape(p.key)}">',
        f"<title>{escape(p.title)}</title>",
        f'<text class="fig-title" x="{width / 2}" y="17" text-anchor="middle">{escape(p.title)}</text>',
        f'<rect x="{px}" y="{py}" width="{pw}" height="{ph}" fill="#fff" stroke="#555"/>',
    ]
    if not xs:
        out.append(f'<text class="label" x="{px + pw / 2}" y="{py + ph / 2}" text-anchor="middle">no values</text>')
        out.append("</svg>")
        return "\n".join(out)
    x0, x1 = _pad(min(xs), max(xs), 0.02)  # room for the dot of a value between gaps at an end
    y0, y1 = _pad(min(ys), max(ys), 0.06)

    def sx(v):
        return px + (v - x0) / (x1 - x0) * pw

    def sy(v):
        return py + ph - (v - y0) / (y1 - y0) * ph

    for axis, (lo, hi) in (("x", (x0, x1)), ("y", (y0, y1))):
        decades = _decades(lo, hi) if p.log else []
        ticks = decades if len(decades) >= 2 else nice_ticks(lo, hi, 5 if axis == "y" else 6)
        spacing = ticks[1] - ticks[0] if len(ticks) > 1 else None
        for t in ticks:
            if decades is ticks:
                label = _power_of_ten(t)
            else:  # less than two decades: plain numbers (log10 units on a log axis)
                label = escape(fmt(10**t) if p.log else fmt(t, spacing))
            if axis == "x":
                out.append(f'<line class="grid" x1="{sx(t):.1f}" y1="{py}" x2="{sx(t):.1f}" y2="{py + ph}"/>')
                out.append(f'<text class="tick" x="{sx(t):.1f}" y="{py + ph + 15}" text-anchor="middle">{label}</text>')
            else:
                out.append(f'<line class="grid" x1="{px}" y1="{sy(t):.1f}" x2="{px + pw}" y2="{sy(t):.1f}"/>')
                out.append(f'<text class="tick" x="{px - 6}" y="{sy(t) + 3.5:.1f}" text-anchor="end">{label}</text>')
    out.append(
        f'<text class="label" x="{px + pw / 2}" y="{py + ph + 34}" text-anchor="middle">{escape(p.xlabel)}</text>'
    )
    out.append(
        f'<text class="label" transform="translate(14 {py + ph / 2}) rotate(-90)" text-anchor="middle">'
        f"{escape(p.ylabel)}</text>"
    )
    out.append(f'<clipPath id="clip-{escape(p.key)}"><rect x="{px}" y="{py}" width="{pw}" height="{ph}"/></clipPath>')
    out.append(f'<g clip-path="url(#clip-{escape(p.key)})">')
    for s in p.series:
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        for run in _runs(s.x, s.y, p.log):
            points = [(sx(transform(x)), sy(transform(y))) for x, y in run]
            if len(points) == 1:  # a value between two gaps: a dot, or it would not show
                out.append(f'<circle cx="{points[0][0]:.1f}" cy="{points[0][1]:.1f}" r="2.5" fill="{s.colour}"/>')
                continue
            d = " ".join(f"{'M' if k == 0 else 'L'}{x:.1f},{y:.1f}" for k, (x, y) in enumerate(points))
            out.append(
                f'<path d="{d}" fill="none" stroke="{s.colour}" stroke-width="1.8"{dash}>'
                f"<title>{escape(s.label)}</title></path>"
            )
    out.append("</g>")
    out.append("</svg>")
    return "\n".join(out)


def _plottable(x, y, log: bool) -> bool:
    if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
        return False
    return not log or (x > 0 and y > 0)


def _runs(xs, ys, log):
    """The stretches of a series between its gaps."""
    run = []
    for x, y in zip(xs, ys):
        if _plottable(x, y, log):
            run.append((x, y))
        elif run:
            yield run
            run = []
    if run:
        yield run


def _pad(lo: float, hi: float, fraction: float) -> tuple[float, float]:
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        return lo - 0.5, hi + 0.5
    margin = (hi - lo) * fraction
    return lo - margin, hi + margin


def _decades(lo: float, hi: float) -> list[int]:
    """Integer exponents in [lo, hi] (log10 units), thinned to at most 7 labels."""
    exps = list(range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1))
    stride = math.ceil(len(exps) / 7)
    return exps[::stride]


def _power_of_ten(exponent: float) -> str:
    e = int(round(exponent))
    if e == 0:
        return "1"
    if e == 1:
        return "10"
    return f'10<tspan dy="-5" font-size="8">{e}</tspan>'
