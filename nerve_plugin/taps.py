"""FFN taps: forward hooks that stream each block's pre- and post-activation into covariance statistics.

A ``TapSpec`` says where the blocks are and, inside a block, which module's input or output is the FFN's
pre-activation (the nonlinearity's input) and post-activation (W_down's input). It works on any ``nn.Module``;
built-in specs cover torchtitan 0.2.2's dense FFNs. Wrappers that torchtitan and PyTorch put around blocks
(activation checkpointing, torch.compile, FSDP) are looked through when resolving module paths.

Hooks exist only between ``attach()`` and ``remove()``, and they only do work while armed (a logging step).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from .stats import CovarianceStats

TAPS = ("pre", "post")

# Attributes under which PyTorch wrappers keep the wrapped module: checkpoint_wrapper, torch.compile.
_WRAPPER_ATTRS = frozenset({"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"})


@dataclass(frozen=True)
class TapPoint:
    """A module inside a block (dotted path) and whether its input or its output is the tapped activation."""

    module: str
    capture: Literal["input", "output"]

    def __post_init__(self):
        if self.capture not in ("input", "output"):
            raise ValueError(f"TapPoint.capture must be 'input' or 'output', got {self.capture!r}")


@dataclass(frozen=True)
class TapSpec:
    """Where a model's blocks are (the container whose children are blocks) and where pre/post live in each."""

    blocks: str
    pre: TapPoint
    post: TapPoint


# torchtitan 0.2.2 dense SwiGLU FFN: w2(silu(w1(x)) * w3(x)). Pre is the gate's pre-activation w1(x); post is
# w2's input. MoE blocks of llama4/qwen3 have no feed_forward and are skipped.
_TORCHTITAN_DENSE = TapSpec(
    blocks="layers",
    pre=TapPoint("feed_forward.w1", "output"),
    post=TapPoint("feed_forward.w2", "input"),
)
BUILTIN_SPECS: dict[str, TapSpec] = {"llama3": _TORCHTITAN_DENSE, "llama4": _TORCHTITAN_DENSE, "qwen3": _TORCHTITAN_DENSE}


def canonical_name(name: str) -> str:
    """A module path with wrapper segments removed: 'layers.0._checkpoint_wrapped_module.x' -> 'layers.0.x'."""
    return ".".join(part for part in name.split(".") if part and part not in _WRAPPER_ATTRS)


def find_module(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at a dotted path, looking through wrappers; None if it does not exist."""
    if canonical_name(path) == "":
        return root
    target = canonical_name(path)
    for name, module in root.named_modules():
        if canonical_name(name) == target:
            return module
    return None


def find_blocks(model: nn.Module, spec: TapSpec) -> list[tuple[int, nn.Module]]:
    """(layer index, block) pairs. Numeric child names are kept as indices, so that pipeline stages, which
    hold a subset of torchtitan's ``layers`` ModuleDict, report global layer indices."""
    container = find_module(model, spec.blocks)
    if container is None:
        raise ValueError(f"tap spec: no module at blocks path {spec.blocks!r} in {type(model).__name__}")
    children = list(container.named_children())
    while len(children) == 1 and children[0][0] in _WRAPPER_ATTRS:
        children = list(children[0][1].named_children())
    return [(int(name) if name.isdigit() else position, block) for position, (name, block) in enumerate(children)]


class FFNTaps:
    """Hooks on every selected block's pre and post tap, feeding one ``CovarianceStats`` per (layer, tap).

    Pre and post of a block are measured on the same tokens: when ``max_tokens_per_forward`` sub-samples a
    forward, both taps draw the same row indices, from a generator seeded by (seed, step, layer, forward
    ordinal). Forwards re-run by activation checkpointing during backward are not counted again.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: TapSpec,
        *,
        layers: Iterable[int] | None = None,
        max_tokens_per_forward: int | None = None,
        seed: int = 0,
        accumulate_dtype: torch.dtype | None = None,
    ):
        if max_tokens_per_forward is not None and max_tokens_per_forward < 2:
            raise ValueError(f"max_tokens_per_forward must be >= 2 or None, got {max_tokens_per_forward}")
        self.spec = spec
        self.max_tokens_per_forward = max_tokens_per_forward
        self.seed = seed
        self.accumulate_dtype = accumulate_dtype
        wanted = None if layers is None else set(layers)
        self._points: dict[tuple[int, str], nn.Module] = {}
        for layer, block in find_blocks(model, spec):
            if wanted is not None and layer not in wanted:
                continue
            pre, post = find_module(block, spec.pre.module), find_module(block, spec.post.module)
            if pre is None or post is None:
                continue  # e.g. an MoE block in a model whose dense blocks carry the FFN
            self._points[(layer, "pre")] = pre
            self._points[(layer, "post")] = post
        if not self._points:
            raise ValueError(
                f"tap spec found no FFN: no block under {spec.blocks!r} has both "
                f"{spec.pre.module!r} and {spec.post.module!r}"
            )
        self.layers: list[int] = sorted({layer for layer, _ in self._points})
        self.stats: dict[tuple[int, str], CovarianceStats] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._armed_step: int | None = None
        self._forward_ordinal: dict[tuple[int, str], int] = {}

    # -- lifecycle -------------------------------------------------------------------------------------------

    def attach(self) -> "FFNTaps":
        if self._handles:
            return self
        for (layer, tap), module in self._points.items():
            point = self.spec.pre if tap == "pre" else self.spec.post
            if point.capture == "output":
                hook = self._make_output_hook(layer, tap)
                self._handles.append(module.register_forward_hook(hook))
            else:
                hook = self._make_input_hook(layer, tap)
                self._handles.append(module.register_forward_pre_hook(hook))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def arm(self, step: int) -> None:
        """Start capturing for ``step``: statistics gathered from now on belong to it."""
        self._armed_step = step
        self._forward_ordinal.clear()

    def disarm(self) -> None:
        self._armed_step = None

    @contextlib.contextmanager
    def capturing(self, step: int) -> Iterator["FFNTaps"]:
        self.arm(step)
        try:
            yield self
        finally:
            self.disarm()

    def reset(self) -> None:
        for s in self.stats.values():
            s.reset()

    # -- capture ---------------------------------------------------------------------------------------------

    def _make_output_hook(self, layer: int, tap: str):
        def hook(module, args, output):
            self._capture(layer, tap, output)

        return hook

    def _make_input_hook(self, layer: int, tap: str):
        def hook(module, args):
            self._capture(layer, tap, args[0])

        return hook

    def _capture(self, layer: int, tap: str, activation: torch.Tensor) -> None:
        if self._armed_step is None:
            return
        # Activation checkpointing re-runs the forward inside the backward pass; those rows were counted
        # when the forward first ran.
        if torch._C._current_graph_task_id() != -1:
            return
        key = (layer, tap)
        ordinal = self._forward_ordinal.get(key, 0)
        self._forward_ordinal[key] = ordinal + 1
        # Our ops must be invisible to dispatch modes active in the forward: op-level selective activation
        # checkpointing counts and caches matmuls by order, and an extra Gram matmul would misalign its
        # recomputation.
        with _disable_current_modes():
            rows = activation.detach().reshape(-1, activation.shape[-1])
            if self.max_tokens_per_forward is not None and rows.shape[0] > self.max_tokens_per_forward:
                rows = rows.index_select(0, self._sample_rows(rows.shape[0], rows.device, layer, ordinal))
            stats = self.stats.get(key)
            if stats is None:
                stats = self.stats[key] = CovarianceStats(rows.shape[-1], rows.device, self.accumulate_dtype)
            stats.update(rows)

    def _sample_rows(self, n_rows: int, device: torch.device, layer: int, ordinal: int) -> torch.Tensor:
        # Pre and post of one forward derive the same seed, so they keep the same tokens.
        digest = hashlib.blake2b(f"{self.seed}/{self._armed_step}/{layer}/{ordinal}".encode(), digest_size=8)
        generator = torch.Generator(device=device).manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
        chosen = torch.randperm(n_rows, generator=generator, device=device)[: self.max_tokens_per_forward]
        return chosen.sort().values
