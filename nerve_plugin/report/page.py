"""The report page: run facts, heatmaps (layer x step), per-layer curves and eigen-spectra, in one HTML file.

Self-contained: inline CSS, inline SVG (heatmap cells as base64 PNG inside it), one small inline script for
tooltips, and the plotted values as JSON in the page; nothing is fetched.
"""

import json
import math
from dataclasses import dataclass
from html import escape

import numpy as np

from ..records import METRICS
from ..spectrum import EIG_FLOOR
from .data import RunData
from .svg import DIVERGING, PALETTE, VIRIDIS, Heatmap, LinePlot, Series, heatmap_svg, line_plot_svg, value_range

MINUS = "\u2212"


class ReportError(ValueError):
    pass


@dataclass
class Choice:
    layers: list[int]  # the line plots' and spectra's layers
    steps: list[int]  # the spectra's steps


def default_layers(layers: list[int], count: int = 4) -> list[int]:
    """A few layers spread over depth: the first, the last and evenly between."""
    if len(layers) <= count:
        return list(layers)
    return [layers[round(k * (len(layers) - 1) / (count - 1))] for k in range(count)]


def default_steps(steps: list[int]) -> list[int]:
    """The first, middle and last logged steps."""
    return sorted({steps[0], steps[len(steps) // 2], steps[-1]}) if steps else []


def choose(run: RunData, layers: list[int] | None, steps: list[int] | None) -> Choice:
    for name, wanted, have in (("--layers", layers, run.layers), ("--steps", steps, run.steps)):
        missing = [v for v in wanted or [] if v not in have]
        if missing:
            raise ReportError(
                f"{name} {','.join(map(str, missing))}: not in the run; expected values from {_abbreviate(have)}"
            )
    return Choice(layers or default_layers(run.layers), steps or default_steps(run.steps))


def _abbreviate(values: list[int], most: int = 12) -> str:
    if len(values) <= most:
        return ", ".join(map(str, values))
    return ", ".join(map(str, values[: most // 2])) + ", ..., " + ", ".join(map(str, values[-most // 2 :]))


# -- figures ------------------------------------------------------------------------------------------------------


def heatmaps(run: RunData) -> list[str]:
    """Per per-tap metric: pre, post (one colour scale for both), post - pre (diverging, centred on 0); then the
    per-layer metrics (JS)."""
    figures = []
    for metric in METRICS.per_tap:
        name = f"{metric.title} ({metric.short})"
        maps = {tap: run.values[f"{metric.name}_{tap}"] for tap in run.taps}
        shared = value_range(np.concatenate([m.ravel() for m in maps.values()])) if maps else (0.0, 1.0)
        for tap, values in maps.items():
            figures.append(
                heatmap_svg(
                    Heatmap(
                        f"{name}, {tap}", values, run.steps, run.layers, VIRIDIS, shared, key=f"{metric.name}_{tap}"
                    )
                )
            )
        if len(maps) == 2:
            diff = maps["post"] - maps["pre"]
            figures.append(
                heatmap_svg(
                    Heatmap(
                        f"{name}, post {MINUS} pre",
                        diff,
                        run.steps,
                        run.layers,
                        DIVERGING,
                        value_range(diff, symmetric=True),
                        key=f"{metric.name}_diff",
                    )
                )
            )
    if len(run.taps) == 2:
        for metric in METRICS.per_layer:
            figures.append(
                heatmap_svg(
                    Heatmap(
                        f"{metric.title} (pre \u2016 post)",
                        run.values[metric.name],
                        run.steps,
                        run.layers,
                        VIRIDIS,
                        key=metric.name,
                    )
                )
            )
    return figures


def curves(run: RunData, choice: Choice) -> list[str]:
    """Each metric over steps, one colour per chosen layer; post solid, pre dashed."""
    figures = []
    for metric in METRICS:
        series = []
        for k, layer in enumerate(choice.layers):
            i = run.row(layer)
            for tap in run.taps if metric.per_tap else [None]:
                key = metric.name if tap is None else f"{metric.name}_{tap}"
                label = f"layer {layer}" + (f", {tap}" if tap else "")
                series.append(
                    Series(
                        label, run.steps, run.values[key][i].tolist(), PALETTE[k % len(PALETTE)], dashed=tap == "pre"
                    )
                )
        if not metric.per_tap and len(run.taps) < 2:
            continue
        figures.append(
            line_plot_svg(
                LinePlot(
                    f"{metric.title} ({metric.short}) over steps",
                    series,
                    "step",
                    metric.short,
                    size=(660, 270),
                    key=f"curve-{metric.name}",
                )
            )
        )
    return figures


def loss_curve(run: RunData) -> str | None:
    if not run.loss:
        return None
    steps = sorted(run.loss)
    return line_plot_svg(
        LinePlot(
            "Training loss (TensorBoard loss_metrics/global_avg_loss)",
            [Series("loss", steps, [run.loss[s] for s in steps], "#333333")],
            "step",
            "loss",
            size=(660, 270),
            key="loss",
        )
    )


def spectra(run: RunData, choice: Choice) -> list[str]:
    """Eigenvalue against rank, log-log, at each chosen step: one colour per chosen layer; post solid, pre dashed."""
    figures = []
    for step in choice.steps:
        series = []
        for k, layer in enumerate(choice.layers):
            for tap in run.taps:
                spectrum = run.spectrum(step, layer, tap)
                if spectrum is not None:
                    series.append(
                        Series(
                            f"layer {layer}, {tap}",
                            spectrum.ranks,
                            spectrum.eigenvalues,
                            PALETTE[k % len(PALETTE)],
                            dashed=tap == "pre",
                        )
                    )
        figures.append(
            line_plot_svg(
                LinePlot(
                    f"Eigen-spectrum at step {step}",
                    series,
                    "rank",
                    "eigenvalue",
                    log=True,
                    size=(430, 300),
                    key=f"spectrum-{step}",
                )
            )
        )
    return figures


def legend(run: RunData, choice: Choice) -> str:
    items = [
        f'<span class="item"><svg width="26" height="10"><line x1="0" y1="5" x2="26" y2="5" '
        f'stroke="{PALETTE[k % len(PALETTE)]}" stroke-width="3"/></svg>layer {layer}</span>'
        for k, layer in enumerate(choice.layers)
    ]
    if len(run.taps) == 2:
        items.append(
            '<span class="item"><svg width="26" height="10"><line x1="0" y1="5" x2="26" y2="5" '
            'stroke="#333" stroke-width="2"/></svg>post</span>'
        )
        items.append(
            '<span class="item"><svg width="26" height="10"><line x1="0" y1="5" x2="26" y2="5" '
            'stroke="#333" stroke-width="2" stroke-dasharray="5 3"/></svg>pre</span>'
        )
    return f'<div class="legend">{"".join(items)}</div>'


# -- facts --------------------------------------------------------------------------------------------------------


def facts(run: RunData, source: str, tensorboard: str | None) -> list[tuple[str, str]]:
    rows = [("JSONL", source)]
    if run.steps:
        gaps = sorted({b - a for a, b in zip(run.steps[1:], run.steps[2:])})
        every = f", every {gaps[0]}" if len(gaps) == 1 else ""
        span = f"{run.steps[0]} \u2026 {run.steps[-1]}" if len(run.steps) > 1 else str(run.steps[0])
        rows.append(("logged steps", f"{len(run.steps)}: {span}{every}"))
    rows.append(("layers", f"{len(run.layers)}: {_abbreviate(run.layers)}"))
    rows.append(("taps", ", ".join(run.taps) or "none"))
    for tap in run.taps:
        rows.append((f"dim {tap}", _span(run.dims[tap].values())))
        rows.append((f"tokens {tap} (per step)", _span(run.tokens[tap].values())))
    note = f"{run.records}"
    if run.duplicates:
        note += f" ({run.duplicates} repeated (step, layer) records replaced by the later one)"
    if run.unreadable:
        note += f"; {run.unreadable} unreadable lines skipped"
    rows.append(("records", note))
    missing = [
        f"{key.replace('_', ' ')}: {int(np.isnan(v).sum())}"
        for key, v in run.values.items()
        if _measured(run, key) and np.isnan(v).any()
    ]
    absent = len(run.steps) * len(run.layers) - run.records
    if absent:
        missing.insert(0, f"{absent} (step, layer) pairs without a record")
    if run.status:
        missing.append("status " + ", ".join(f"{s}: {n}" for s, n in sorted(run.status.items())))
    rows.append(("missing values", "; ".join(missing) if missing else "none"))
    if tensorboard is not None:
        if run.loss:
            first, last = min(run.loss), max(run.loss)
            rows.append(
                (
                    "loss",
                    f"{run.loss[first]:.4g} at step {first} \u2192 {run.loss[last]:.4g} at step {last} ({tensorboard})",
                )
            )
        else:
            rows.append(("loss", f"none found in {tensorboard}"))
    return rows


def _measured(run: RunData, key: str) -> bool:
    if key in {m.name for m in METRICS.per_layer}:
        return len(run.taps) == 2
    return any(key.endswith("_" + tap) for tap in run.taps)


def _span(values) -> str:
    values = sorted(set(values))
    if not values:
        return "n/a"
    return str(values[0]) if len(values) == 1 else f"{values[0]} \u2026 {values[-1]}"


# -- the page -----------------------------------------------------------------------------------------------------


def data_json(run: RunData) -> str:
    """The plotted values, NaN as null: what the tooltips show, and what a reader can copy out of the page."""

    def cells(array):
        return [[None if not math.isfinite(v) else v for v in row] for row in array.tolist()]

    values = {key: cells(v) for key, v in run.values.items() if _measured(run, key)}
    if len(run.taps) == 2:
        for metric in METRICS.per_tap:
            values[f"{metric.name}_diff"] = cells(run.values[f"{metric.name}_post"] - run.values[f"{metric.name}_pre"])
    data = {
        "steps": run.steps,
        "layers": run.layers,
        "values": values,
        "loss": {str(s): v for s, v in sorted(run.loss.items())},
    }
    # "</" would end the script element early
    return json.dumps(data, allow_nan=False).replace("</", "<\\/")


def render(run: RunData, choice: Choice, source: str, tensorboard: str | None = None, title: str = "") -> str:
    heading = title or "NerVE report"
    fact_rows = "\n".join(
        f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in facts(run, source, tensorboard)
    )
    loss = loss_curve(run)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(heading)}</title>",
        f"<style>{CSS}</style></head><body>",
        # the hatch behind heatmap cells that have no value
        '<svg width="0" height="0" style="position:absolute"><defs><pattern id="nerve-gap" width="6" height="6" '
        'patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="6" height="6" fill="#eeeeee"/>'
        '<line x1="0" y1="0" x2="0" y2="6" stroke="#b0b0b0" stroke-width="2"/></pattern></defs></svg>',
        f"<header><h1>{escape(heading)}</h1>",
        '<div class="top">',
        f'<table class="facts">{fact_rows}</table>',
        f'<div class="loss">{loss}</div>' if loss else "",
        "</div></header>",
        '<section id="heatmaps"><h2>Layer \u00d7 step</h2>',
        '<p class="note">Rows are layers (first on top), columns the logged steps. Pre and post of a metric share '
        f"one colour scale; post {MINUS} pre is centred on 0 (red: post higher, blue: post lower). "
        '<span class="gap"></span> hatched: no value (a failed layer). Hover a cell for its value.</p>',
        '<div class="grid3">',
        *heatmaps(run),
        "</div></section>",
        '<section id="curves"><h2>Chosen layers over steps</h2>',
        legend(run, choice),
        '<div class="grid2">',
        *curves(run, choice),
        "</div></section>",
        '<section id="spectra"><h2>Eigen-spectra</h2>',
        '<p class="note">Eigenvalues of the covariance against their rank, log-log (up to 64 log-spaced ranks '
        f"per spectrum; zero eigenvalues, at the {EIG_FLOOR:g} floor, are left out).</p>",
        legend(run, choice),
        '<div class="grid3">',
        *spectra(run, choice),
        "</div></section>",
        f'<script type="application/json" id="nerve-data">{data_json(run)}</script>',
        f'<div id="tip"></div><script>{SCRIPT}</script>',
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


CSS = """
body { font-family: "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; color: #222; margin: 20px 28px;
       max-width: 1360px; background: #fff; }
h1 { font-size: 22px; margin: 0 0 10px; }
h2 { font-size: 17px; margin: 26px 0 6px; border-bottom: 1px solid #ccc; padding-bottom: 3px; }
.top { display: flex; gap: 24px; align-items: flex-start; }
table.facts { border-collapse: collapse; font-size: 13px; max-width: 640px; }
table.facts th { text-align: left; font-weight: 600; padding: 2px 14px 2px 0; vertical-align: top;
                 white-space: nowrap; color: #444; }
table.facts td { padding: 2px 0; overflow-wrap: anywhere; }
.note { font-size: 13px; color: #444; margin: 4px 0 8px; }
.gap { display: inline-block; width: 14px; height: 10px; border: 1px solid #999;
       background: repeating-linear-gradient(45deg, #eee 0 2px, #b0b0b0 2px 4px); }
.grid3 { display: grid; grid-template-columns: repeat(3, 430px); gap: 10px 20px; }
.grid2 { display: grid; grid-template-columns: repeat(2, 660px); gap: 10px 20px; }
.legend { font-size: 13px; margin: 4px 0 8px; }
.legend .item { margin-right: 16px; white-space: nowrap; }
.legend svg { vertical-align: middle; margin-right: 4px; }
svg.figure { font-family: inherit; background: #fff; }
svg .fig-title { font-size: 13px; font-weight: 600; }
svg .tick { font-size: 10px; fill: #333; }
svg .label { font-size: 11px; fill: #333; }
svg .grid { stroke: #e3e3e3; }
svg.heatmap image.cells { image-rendering: pixelated; }
#tip { position: fixed; display: none; pointer-events: none; background: rgba(30, 30, 30, 0.9); color: #fff;
       font-size: 12px; padding: 3px 6px; border-radius: 3px; }
"""

SCRIPT = """
(function () {
  const data = JSON.parse(document.getElementById("nerve-data").textContent);
  const tip = document.getElementById("tip");
  let ready = 0;
  for (const svg of document.querySelectorAll("svg.heatmap")) {
    const [px, py, pw, ph] = svg.dataset.plot.split(" ").map(Number);
    const [rows, cols] = svg.dataset.shape.split(" ").map(Number);
    const values = data.values[svg.dataset.key];
    if (values) ready += 1;
    svg.addEventListener("mousemove", (e) => {
      const box = svg.getBoundingClientRect();
      const x = (e.clientX - box.left) * svg.viewBox.baseVal.width / box.width - px;
      const y = (e.clientY - box.top) * svg.viewBox.baseVal.height / box.height - py;
      if (!values || x < 0 || y < 0 || x >= pw || y >= ph) { tip.style.display = "none"; return; }
      const i = Math.floor(y / ph * rows), j = Math.floor(x / pw * cols);
      const v = values[i][j];
      tip.textContent = `layer ${data.layers[i]}, step ${data.steps[j]}: `
        + (v === null ? "no value" : v.toPrecision(5));
      tip.style.left = (e.clientX + 12) + "px";
      tip.style.top = (e.clientY + 12) + "px";
      tip.style.display = "block";
    });
    svg.addEventListener("mouseleave", () => { tip.style.display = "none"; });
  }
  document.body.dataset.ready = String(ready);  // how many maps found their values (read by the tests)
})();
"""
