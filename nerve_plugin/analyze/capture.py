"""Forward hooks that fold the kept tokens' pre- and post-activations into streaming covariance statistics.

The training taps (``nerve_plugin.taps.FFNTaps``) count every row of a forward; offline analysis must leave
out padding, so each forward here carries a token mask. Nothing is compiled or distributed offline, so these
are plain hooks; module resolution and statistics are the core's (``tap_points``, ``CovarianceStats``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..stats import CovarianceStats
from ..taps import TAPS, TapSpec, tap_points


def resolve_points(model: nn.Module, spec: TapSpec, layers=None) -> dict[tuple[int, str], tuple[str, nn.Module]]:
    """{(layer, "pre"|"post"): (module path, module)} for every block that has both taps."""
    wanted = None if layers is None else set(layers)
    points = {
        key: (f"{spec.blocks}.{key[0]}.{spec.point(key[1]).module}", module)
        for key, module in tap_points(model, spec, layers).items()
    }
    if wanted is not None and wanted - {layer for layer, _ in points}:
        missing = sorted(wanted - {layer for layer, _ in points})
        raise ValueError(
            f"layers {missing} are not FFN blocks of this model (it has {sorted({layer for layer, _ in points})})"
        )
    if not points:
        raise ValueError(
            f"no FFN found: no block under {spec.blocks!r} has both {spec.pre.module!r} and {spec.post.module!r}"
        )
    return points


class MaskedCapture:
    """Hooks on the (layer, tap) points of ``keys``; while attached, every forward folds the rows selected by
    ``self.keep`` ([batch, seq] bool, or None for all rows) into one ``CovarianceStats`` per point."""

    def __init__(
        self,
        points: dict[tuple[int, str], tuple[str, nn.Module]],
        spec: TapSpec,
        keys,
        accumulate_dtype: torch.dtype = torch.float64,
    ):
        self.points = points
        self.spec = spec
        self.keys = list(keys)
        self.accumulate_dtype = accumulate_dtype
        self.keep: torch.Tensor | None = None
        self.stats: dict[tuple[int, str], CovarianceStats] = {}
        self._handles = []

    def __enter__(self) -> "MaskedCapture":
        for key in self.keys:
            _, module = self.points[key]
            if self.spec.point(key[1]).capture == "output":
                hook = module.register_forward_hook(lambda m, args, out, key=key: self._fold(key, out))
            else:
                hook = module.register_forward_pre_hook(lambda m, args, key=key: self._fold(key, args[0]))
            self._handles.append(hook)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _fold(self, key: tuple[int, str], activation: torch.Tensor) -> None:
        with torch.no_grad():
            rows = select_rows(activation.detach(), self.keep)
            stats = self.stats.get(key)
            if stats is None:
                stats = self.stats[key] = CovarianceStats(rows.shape[-1], rows.device, self.accumulate_dtype)
            stats.update(rows)


def select_rows(activation: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The [n, dim] rows of ``activation`` ([..., dim]) whose tokens ``keep`` marks."""
    dim = activation.shape[-1]
    if keep is None:
        return activation.reshape(-1, dim)
    if activation.shape[:-1] == keep.shape:
        return activation[keep.to(activation.device)]
    if activation.numel() // dim == keep.numel():  # a model that flattens batch and sequence
        return activation.reshape(-1, dim)[keep.reshape(-1).to(activation.device)]
    raise ValueError(
        f"cannot apply the token mask of shape {tuple(keep.shape)} to an FFN activation of shape "
        f"{tuple(activation.shape)}: the model does not keep one row per input token"
    )


__all__ = ["MaskedCapture", "TAPS", "resolve_points", "select_rows"]
