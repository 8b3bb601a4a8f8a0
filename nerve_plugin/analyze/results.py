"""What an analysis returns: per-layer SE / PR / EEE of pre and post, and JS, printable and JSON-ready."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar

from ..records import METRICS, TapResult, MetricValues, layer_metrics
from ..writers import format_layer_table


@dataclass(init=False)
class LayerResult(MetricValues):
    """One layer's taps and its per-layer metrics (``result.js``: JS(p_pre || p_post), None when the two
    spectra differ in length); ``values`` defaults to the metrics of ``pre`` and ``post``."""

    _per_tap: ClassVar[bool] = False
    _missing: ClassVar[None] = None

    layer: int
    pre: TapResult
    post: TapResult
    pre_module: str
    post_module: str
    values: dict[str, float | None]

    def __init__(
        self,
        layer: int,
        pre: TapResult,
        post: TapResult,
        pre_module: str = "",
        post_module: str = "",
        *,
        values: dict[str, float | None] | None = None,
        **metrics: float | None,
    ):
        self.layer, self.pre, self.post, self.pre_module, self.post_module = layer, pre, post, pre_module, post_module
        self._take_metrics(layer_metrics(pre, post) if values is None and not metrics else values, metrics)

    def to_dict(self, spectrum_points: int = 64) -> dict:
        out = {
            "layer": self.layer,
            "pre": self.pre.to_json(spectrum_points),
            "post": self.post.to_json(spectrum_points),
        }
        out.update({m.name: getattr(self, m.name) for m in METRICS.per_layer})
        out["pre"]["module"], out["post"]["module"] = self.pre_module, self.post_module
        return out


@dataclass
class AnalysisResults:
    """``results.layers[i].pre.spectral_entropy``, ``results.metric("eee", "post")``, ``print(results)``,
    ``json.dump(results.to_dict(), f)``."""

    architecture: str
    model: str
    tokens: int  # tokens measured per layer (padding excluded)
    layers: list[LayerResult] = field(default_factory=list)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> LayerResult:
        for result in self.layers:
            if result.layer == layer:
                return result
        raise KeyError(f"layer {layer} was not analysed (layers: {[r.layer for r in self.layers]})")

    def metric(self, name: str, tap: str | None = None) -> list[float | None]:
        """One value per layer: ``metric("js")`` or ``metric("eee", "pre")``."""
        metric = METRICS.get(name)
        if metric is not None and not metric.per_tap:
            return [getattr(r, name) for r in self.layers]
        if metric is None or tap not in ("pre", "post"):
            layer_names = ", ".join(repr(m.name) for m in METRICS.per_layer)
            raise ValueError(
                f"metric({name!r}, {tap!r}): expected {layer_names}, or one of "
                f"{tuple(m.name for m in METRICS.per_tap)} with tap 'pre' or 'post'"
            )
        return [getattr(getattr(r, tap), name) for r in self.layers]

    def to_dict(self, spectrum_points: int = 64) -> dict:
        """JSON-ready; each tap keeps its eigenvalues at up to ``spectrum_points`` log-spaced ranks."""
        return {
            "model": self.model,
            "architecture": self.architecture,
            "tokens": self.tokens,
            "layers": [r.to_dict(spectrum_points) for r in self.layers],
        }

    def to_json(self, path=None, spectrum_points: int = 64) -> str:
        text = json.dumps(self.to_dict(spectrum_points), indent=2)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    def summary(self) -> str:
        return format_summary(self)

    def __str__(self) -> str:
        return format_summary(self)


def format_summary(results: AnalysisResults) -> str:
    dims = sorted({r.pre.dim for r in results.layers})
    title = (
        f"NerVE: {results.model} ({results.architecture} layout), {results.tokens} tokens, "
        f"FFN width {', '.join(map(str, dims))} (pre -> post)"
    )
    return "\n".join([title, *format_layer_table([r.to_dict(spectrum_points=0) for r in results.layers])])


def print_summary(results: AnalysisResults) -> None:
    print(format_summary(results))
