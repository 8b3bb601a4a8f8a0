"""NerVEAnalyzer: the FFN eigen-spectrum metrics of a trained model on a batch of token sequences.

    analyzer = NerVEAnalyzer(model)                  # finds the FFN layout (see architectures.py)
    results = analyzer.analyze(input_ids, attention_mask, batch_size=8)
    print_summary(results)

Per layer, the rows of every kept token (attention_mask != 0) are folded into float64 streaming covariance
statistics of the pre- and post-activation, one eigen-solve each gives SE / PR / EEE, and JS compares the two
normalised spectra. No activation is stored; a D x D statistic per tap and layer is. When those do not fit in
``max_stats_gib`` the layers are measured in several passes over the data.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
import time
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..monitor import tap_result
from ..records import FEW_TOKENS_RATIO
from ..solve import solve
from ..taps import feature_dim
from .architectures import ARCHITECTURES, Architecture, detect, register
from .capture import MaskedCapture, resolve_points
from .results import AnalysisResults, LayerResult

ForwardFn = Callable[[torch.Tensor, torch.Tensor], object]

logger = logging.getLogger(__name__)


class NerVEAnalyzer:
    """Offline NerVE for one model.

    Args:
        model: any ``nn.Module`` whose layout is registered (HuggingFace models: see ``ARCHITECTURES``).
        architecture: a registered layout's name; default: detected from ``model.config.model_type``, else
            from the module structure.
        layers: block indices to measure; default all.
        forward: ``forward(input_ids, attention_mask)`` running the model on one batch. Default: HuggingFace
            models run their base model (no LM head) with the mask; other modules get ``model(input_ids)``
            (the mask then only selects the measured tokens: pad on the right for causal models).
        accumulate_dtype: of the covariance statistics; float64 keeps the small eigenvalues.
        name: how the model is called in the results (default: its HF name or class).
    """

    def __init__(
        self,
        model: nn.Module,
        architecture: str | None = None,
        *,
        layers: Iterable[int] | None = None,
        forward: ForwardFn | None = None,
        accumulate_dtype: torch.dtype = torch.float64,
        name: str | None = None,
    ):
        self.model = model
        self.resolved = detect(model, architecture)
        self.architecture: Architecture = self.resolved.architecture
        self.points = resolve_points(model, self.resolved.spec, layers)
        self.layers: list[int] = sorted({layer for layer, _ in self.points})
        self.forward = forward or default_forward(model)
        self.accumulate_dtype = accumulate_dtype
        config_name = getattr(getattr(model, "config", None), "_name_or_path", None)
        self.name = name or config_name or type(model).__name__

    @staticmethod
    def register_architecture(
        name: str,
        *,
        block_path: str,
        up: str,
        down: str,
        gated: bool = False,
        gate: str | None = None,
        model_types: Sequence[str] = (),
        description: str = "",
        overwrite: bool = False,
    ) -> Architecture:
        """Teach the analyzer a layout. Paths are dotted module names: ``block_path`` from the model's root (or
        a suffix of it) to the container of the blocks; ``up``, ``down`` (and ``gate``) inside a block. Pre is
        the output of ``up`` (of ``gate`` when ``gated``), post the input of ``down``. ``model_types``: the
        HuggingFace ``config.model_type`` values that should pick this layout."""
        arch = Architecture(
            name, block_path, up, down, gated=gated, gate=gate, model_types=tuple(model_types), description=description
        )
        return register(arch, overwrite=overwrite)

    @staticmethod
    def supported_architectures() -> dict[str, Architecture]:
        return dict(ARCHITECTURES)

    @property
    def tap_modules(self) -> dict[tuple[int, str], nn.Module]:
        """{(layer, "pre"|"post"): the module hooked (pre: its output, post: its input)}."""
        return {key: module for key, (_, module) in self.points.items()}

    # -- analysis ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def analyze(
        self,
        input_ids,
        attention_mask=None,
        *,
        batch_size: int = 8,
        layers_per_pass: int | None = None,
        max_stats_gib: float = 8.0,
        progress: bool | Callable[[dict], None] = False,
    ) -> AnalysisResults:
        """SE / PR / EEE of pre and post and JS, per layer, over every token with ``attention_mask != 0``.

        ``input_ids``: [n_sequences, seq_len] (a tensor, or equal-length lists); ``attention_mask``: same shape,
        0 at padding. ``layers_per_pass``: layers measured per pass over the data (default: as many as fit in
        ``max_stats_gib`` of statistics). ``progress``: True prints to stderr; a callable gets a dict per batch.
        """
        ids, mask = _as_batch(input_ids, attention_mask)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        kept = int(mask.sum())
        if kept < 2:
            # a covariance of N rows divides by N - 1
            raise ValueError(f"analyze needs at least 2 tokens with attention_mask != 0, got {kept}: pass more text")
        passes = self._plan_passes(layers_per_pass, max_stats_gib)
        report = _printer() if progress is True else (progress or None)
        device = _model_device(self.model)
        batches = range(0, ids.shape[0], batch_size)
        was_training = self.model.training
        self.model.eval()
        layer_results: dict[int, LayerResult] = {}
        try:
            for pass_index, pass_layers in enumerate(passes):
                keys = [key for key in self.points if key[0] in pass_layers]
                with MaskedCapture(self.points, self.resolved.spec, keys, self.accumulate_dtype) as capture:
                    for batch_index, start in enumerate(batches):
                        batch_ids = ids[start : start + batch_size].to(device)
                        batch_mask = mask[start : start + batch_size].to(device)
                        capture.keep = batch_mask.bool()
                        self.forward(batch_ids, batch_mask)
                        if report:
                            report(
                                {
                                    "pass": pass_index + 1,
                                    "passes": len(passes),
                                    "batch": batch_index + 1,
                                    "batches": len(batches),
                                    "tokens": int(batch_mask.sum()),
                                }
                            )
                layer_results.update(self._solve(capture, pass_layers))
                del capture
        finally:
            self.model.train(was_training)
        tokens = layer_results[self.layers[0]].pre.tokens
        few = sorted({t.dim for r in layer_results.values() for t in (r.pre, r.post) if t.few_tokens})
        if few:
            logger.warning(
                f"nerve-analyze: {tokens} tokens per layer, fewer than FFN width / {FEW_TOKENS_RATIO} (width "
                f"{', '.join(map(str, few))}): SE, PR and EEE describe the token sample more than the layers (the "
                f'results say "few_tokens": true); pass more text (--max-tokens, more files)'
            )
        return AnalysisResults(
            self.architecture.name, self.name, tokens, [layer_results[layer] for layer in self.layers]
        )

    def _solve(self, capture: MaskedCapture, layers: list[int]) -> dict[int, LayerResult]:
        out = {}
        for layer in layers:
            taps = {}
            for tap in ("pre", "post"):
                stats = capture.stats.get((layer, tap))
                if stats is None:
                    raise RuntimeError(
                        f"layer {layer} {tap}: the hooked module {self.points[(layer, tap)][0]!r} "
                        "never ran; does the forward function run the model?"
                    )
                taps[tap] = tap_result(solve(stats.m2, stats.count))
            pre, post = taps["pre"], taps["post"]
            # The per-layer metrics (JS) default to those of pre and post.
            out[layer] = LayerResult(layer, pre, post, self.points[(layer, "pre")][0], self.points[(layer, "post")][0])
        return out

    def _plan_passes(self, layers_per_pass: int | None, max_stats_gib: float) -> list[list[int]]:
        if layers_per_pass is None:
            itemsize = torch.empty((), dtype=self.accumulate_dtype).element_size()
            per_layer = max(
                sum(
                    (feature_dim(module, "output" if tap == "pre" else "input") or 0) ** 2 * itemsize
                    for (layer, tap), (_, module) in self.points.items()
                    if layer == first
                )
                for first in self.layers
            )
            layers_per_pass = max(1, int(max_stats_gib * 2**30 // max(per_layer, 1)))
        if layers_per_pass < 1:
            raise ValueError(f"layers_per_pass must be >= 1, got {layers_per_pass}")
        return [self.layers[i : i + layers_per_pass] for i in range(0, len(self.layers), layers_per_pass)]


def default_forward(model: nn.Module) -> ForwardFn:
    # HuggingFace task models keep their transformer as base_model: running it skips the LM head's logits.
    body = getattr(model, "base_model", None)
    body = body if isinstance(body, nn.Module) else model
    try:
        params = inspect.signature(body.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "input_ids" in params and "attention_mask" in params:
        extra = {"use_cache": False} if "use_cache" in params else {}
        return lambda ids, mask: body(input_ids=ids, attention_mask=mask, **extra)
    return lambda ids, mask: body(ids)


def _as_batch(input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(
            f"input_ids must be integer token ids of shape [n_sequences, seq_len], got {tuple(ids.shape)} {ids.dtype}"
        )
    if attention_mask is None:
        return ids, torch.ones_like(ids)
    mask = torch.as_tensor(attention_mask)
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
    return ids, (mask != 0).to(torch.long)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _printer(min_interval_s: float = 1.0) -> Callable[[dict], None]:
    """Progress lines on stderr, at most one a second (and the last batch of each pass)."""
    state = {"last": 0.0, "start": time.perf_counter(), "tokens": 0}

    def report(p: dict) -> None:
        state["tokens"] += p["tokens"]
        now = time.perf_counter()
        if now - state["last"] < min_interval_s and p["batch"] != p["batches"]:
            return
        state["last"] = now
        rate = state["tokens"] / max(now - state["start"], 1e-9)
        width = len(str(p["batches"]))
        print(
            f"nerve-analyze: pass {p['pass']}/{p['passes']} batch {p['batch']:>{width}}/{p['batches']} "
            f"({math.floor(rate):,} tokens/s)",
            file=sys.stderr,
            flush=True,
        )

    return report
