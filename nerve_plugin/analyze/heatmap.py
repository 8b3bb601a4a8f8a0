"""A PNG heatmap of an analysis: layers (rows) x metrics (SE, PR, EEE) for pre, post and post - pre, plus the
per-layer metrics (JS) in a last panel.

Each metric has its own scale, so colours are normalised per column: pre and post share one range (their
colours compare), the difference uses a symmetric diverging range, JS runs from 0. Cells carry their values.
Drawn with matplotlib when it is installed, else with PIL (a dependency already).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..records import METRICS, Metric
from ..report.svg import DIVERGING, VIRIDIS, colormap
from .results import AnalysisResults

PANELS = ("pre", "post", "post - pre")


def layer_panel() -> str:
    """The last panel's name: the per-layer metrics' labels ("JS")."""
    return " / ".join(m.short for m in METRICS.per_layer)


@dataclass
class Grid:
    """The numbers of the picture and their colour positions in [0, 1] (0.5 = no change in the diff panel)."""

    layers: list[int]
    values: dict[str, np.ndarray]  # panel -> [layers, per-tap metrics]; layer_panel() -> [layers, per-layer ones]
    shades: dict[str, np.ndarray]


def build_grid(results: AnalysisResults) -> Grid:
    pre = np.array([[getattr(r.pre, m.name) for m in METRICS.per_tap] for r in results.layers], dtype=float)
    post = np.array([[getattr(r.post, m.name) for m in METRICS.per_tap] for r in results.layers], dtype=float)
    diff = post - pre
    js = np.array(
        [
            [np.nan if getattr(r, m.name) is None else getattr(r, m.name) for m in METRICS.per_layer]
            for r in results.layers
        ],
        dtype=float,
    )
    low = np.minimum(pre.min(axis=0), post.min(axis=0))
    span = np.maximum(pre.max(axis=0), post.max(axis=0)) - low
    span[span == 0] = 1.0
    reach = np.abs(diff).max(axis=0)
    reach[reach == 0] = 1.0
    # Per column, from 0 to the largest value (1 when there is none).
    finite = np.where(np.isfinite(js), js, -np.inf)
    js_top = finite.max(axis=0, initial=-np.inf)
    js_top[~(js_top > 0)] = 1.0
    return Grid(
        layers=[r.layer for r in results.layers],
        values={"pre": pre, "post": post, "post - pre": diff, layer_panel(): js},
        shades={
            "pre": (pre - low) / span,
            "post": (post - low) / span,
            "post - pre": 0.5 + 0.5 * diff / reach,
            layer_panel(): js / js_top,
        },
    )


def write_heatmap(results: AnalysisResults, path) -> str:
    """Write the picture to ``path``; returns the backend used ("matplotlib" or "pil")."""
    grid = build_grid(results)
    title = f"NerVE: {results.model} ({results.tokens} tokens)"
    try:
        import matplotlib
    except ImportError:
        _draw_pil(grid, title, path)
        return "pil"
    matplotlib.use("Agg", force=False)
    _draw_matplotlib(grid, title, path)
    return "matplotlib"


def _cell_text(value: float, metric: Metric) -> str:
    return format(value, metric.fmt) if np.isfinite(value) else "-"


def _metrics(panel: str) -> tuple[Metric, ...]:
    return METRICS.per_tap if panel in PANELS else METRICS.per_layer


def _draw_matplotlib(grid: Grid, title: str, path) -> None:
    import matplotlib.pyplot as plt

    n = len(grid.layers)
    panels = (*PANELS, layer_panel())
    fig, axes = plt.subplots(
        1, 4, figsize=(12, 1.2 + 0.32 * n), gridspec_kw={"width_ratios": [3, 3, 3, 1]}, squeeze=False
    )
    for ax, panel in zip(axes[0], panels):
        cmap = "RdBu_r" if panel == "post - pre" else "viridis"
        ax.imshow(np.nan_to_num(grid.shades[panel], nan=0.0), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        metrics = _metrics(panel)
        ax.set_xticks(range(len(metrics)), [m.short if m.short != panel else "" for m in metrics])
        ax.set_yticks(range(n), [str(layer) for layer in grid.layers] if ax is axes[0][0] else [""] * n)
        ax.set_title(panel)
        ax.xaxis.tick_top()
        for row in range(n):
            for col, metric in enumerate(metrics):
                shade = grid.shades[panel][row, col]
                dark = panel == "post - pre" and abs(shade - 0.5) > 0.3 or panel != "post - pre" and shade < 0.6
                ax.text(
                    col,
                    row,
                    _cell_text(grid.values[panel][row, col], metric),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                )
    axes[0][0].set_ylabel("layer")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- PIL ---------------------------------------------------------------------------------------------------------


def _colour(anchors: list[str], t: float) -> tuple[int, int, int]:
    if not np.isfinite(t):
        return (200, 200, 200)
    return tuple(int(c) for c in colormap(anchors, t))


def _draw_pil(grid: Grid, title: str, path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        font = ImageFont.load_default()
    cell_w, cell_h, label_w, gap, top = 64, 22, 64, 16, 58
    panels = (*PANELS, layer_panel())
    widths = [len(_metrics(p)) * cell_w for p in panels]
    width = label_w + sum(widths) + gap * (len(panels) - 1) + 12
    height = top + cell_h * len(grid.layers) + 12
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill="black", font=font)
    for row, layer in enumerate(grid.layers):
        draw.text((8, top + row * cell_h + 4), f"layer {layer}", fill="black", font=font)
    x = label_w
    for panel, panel_w in zip(panels, widths):
        anchors = DIVERGING if panel == "post - pre" else VIRIDIS
        draw.text((x + 2, 24), panel, fill="black", font=font)
        for col, metric in enumerate(_metrics(panel)):
            if metric.short != panel:
                draw.text((x + col * cell_w + 4, 40), metric.short, fill="black", font=font)
            for row in range(len(grid.layers)):
                shade = grid.shades[panel][row, col]
                fill = _colour(anchors, shade)
                box = (x + col * cell_w, top + row * cell_h, x + (col + 1) * cell_w - 1, top + (row + 1) * cell_h - 1)
                draw.rectangle(box, fill=fill)
                luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
                draw.text(
                    (box[0] + 4, box[1] + 4),
                    _cell_text(grid.values[panel][row, col], metric),
                    fill="black" if luminance > 140 else "white",
                    font=font,
                )
        x += panel_w + gap
    image.save(path, format="PNG")
