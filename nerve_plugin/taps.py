"""FFN taps: forward hooks that stream each block's pre- and post-activation into covariance statistics.

A ``TapSpec`` says where the blocks are and, inside a block, which module's input or output is the FFN's
pre-activation (the nonlinearity's input) and post-activation (W_down's input). It works on any ``nn.Module``;
built-in specs cover torchtitan 0.2.2's dense FFNs. Wrappers that torchtitan and PyTorch put around blocks
(activation checkpointing, torch.compile, FSDP) are looked through when resolving module paths.

Hooks exist only between ``attach()`` and ``remove()``, and they only do work while armed (a logging step).

Why the hooks look the way they do (torch.compile with fullgraph=True, as torchtitan compiles each block):
- Every hook is one of two module-level functions, and a tapped module carries its slot as a tensor
  attribute. Per-layer closures or integer attributes would be guarded by dynamo and recompile the shared
  block graph once per layer, until the recompile limit (pytorch#170110).
- The hook calls the opaque custom op ``nerve::capture``, so the graph holds one call and our Python runs at
  run time, not at trace time (capture-to-dict hooks cannot be traced under fullgraph, pytorch#173452). The
  op declares that it mutates the slot, which keeps the compiler from dropping it as dead code.
- Whether anything is armed is a module-level bool that dynamo guards on: steps that do not log run a graph
  without any capture (nothing to pay), logging steps a second graph. Both are shared by all blocks, so the
  taps add exactly one graph to a model, whatever its depth; which layers and step are captured is decided
  inside the op at run time.
- Activation checkpointing re-runs forwards inside the backward pass: the op skips calls made there.
Hooks must be attached before the blocks are compiled: hooks added afterwards are ignored (pytorch#117758).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

import torch
import torch.distributed as dist
import torch.distributed.tensor
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from .stats import CovarianceStats

TAPS = ("pre", "post")

# Attributes under which PyTorch wrappers keep the wrapped module: checkpoint_wrapper, torch.compile.
_WRAPPER_ATTRS = frozenset({"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"})
_SLOT_ATTR = {"input": "_nerve_input_slot", "output": "_nerve_output_slot"}


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

    def point(self, tap: str) -> TapPoint:
        return self.pre if tap == "pre" else self.post


# torchtitan 0.2.2 dense SwiGLU FFN: w2(silu(w1(x)) * w3(x)). Pre is the gate's pre-activation w1(x); post is
# w2's input. MoE blocks of llama4/qwen3 have no feed_forward and are skipped.
_TORCHTITAN_DENSE = TapSpec(
    blocks="layers",
    pre=TapPoint("feed_forward.w1", "output"),
    post=TapPoint("feed_forward.w2", "input"),
)
# nerve_llama (nerve_plugin.torchtitan.variants) keeps these module names for gated and non-gated FFNs alike.
BUILTIN_SPECS: dict[str, TapSpec] = {name: _TORCHTITAN_DENSE for name in ("llama3", "llama4", "qwen3", "nerve_llama")}


def tap_points(
    model: nn.Module, spec: TapSpec, layers: Iterable[int] | None = None, taps: Iterable[str] = TAPS
) -> dict[tuple[int, str], nn.Module]:
    """{(global layer, tap): module} for the blocks (of ``layers``, None: all) that have both taps."""
    wanted = None if layers is None else set(layers)
    taps = tuple(taps)
    points = {}
    for layer, block in find_blocks(model, spec):
        if wanted is not None and layer not in wanted:
            continue
        pre, post = find_module(block, spec.pre.module), find_module(block, spec.post.module)
        if pre is None or post is None:
            continue  # e.g. an MoE block in a model whose dense blocks carry the FFN
        for tap, module in (("pre", pre), ("post", post)):
            if tap in taps:
                points[(layer, tap)] = module
    return points


def canonical_name(name: str) -> str:
    """A module path with wrapper segments removed: 'layers.0._checkpoint_wrapped_module.x' -> 'layers.0.x'."""
    return ".".join(part for part in name.split(".") if part and part not in _WRAPPER_ATTRS)


def find_module(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at a dotted path, looking through wrappers; None if it does not exist."""
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


# -- the capture path shared by every tap ---------------------------------------------------------------------

_slot_ids = itertools.count()
_slots: dict[int, tuple["FFNTaps", int, str]] = {}
_armed: set["FFNTaps"] = set()
# bool(_armed), as a plain global: compiled graphs specialise on it (see _send).
_capturing = False


@torch.library.custom_op("nerve::capture", mutates_args=("slot",))
def _capture_op(activation: torch.Tensor, slot: torch.Tensor) -> None:
    _deliver(activation, slot)


@_capture_op.register_fake
def _(activation, slot):
    return None


def _deliver(activation: torch.Tensor, slot: torch.Tensor) -> None:
    owner = _slots.get(int(slot))
    if owner is None:
        return
    taps, layer, tap = owner
    taps._capture(layer, tap, activation)


def _send(activation, slot: torch.Tensor) -> None:
    if isinstance(activation, torch.distributed.tensor.DTensor):
        activation = activation.to_local()
    # Under compile, dynamo guards on this global: the graph of steps that do not log holds no capture at
    # all, and logging steps run a second graph, shared by every block and compiled once.
    if not _capturing:
        return
    if torch.compiler.is_compiling():
        torch.ops.nerve.capture(activation, slot)
    else:
        _deliver(activation, slot)  # eager: skip the op's dispatch, same code


def _set_armed(taps: "FFNTaps", armed: bool) -> None:
    global _capturing
    (_armed.add if armed else _armed.discard)(taps)
    _capturing = bool(_armed)


def _output_hook(module, args, output):
    _send(output, module._nerve_output_slot)


def _input_hook(module, args):
    _send(args[0], module._nerve_input_slot)


class FFNTaps:
    """Hooks on every selected block's pre and post tap, feeding one ``CovarianceStats`` per (layer, tap).

    Pre and post of a block are measured on the same tokens: when ``max_tokens_per_forward`` sub-samples a
    forward, both taps draw the same row indices, from a generator seeded by (seed, step, layer, forward
    ordinal). Forwards re-run by activation checkpointing during backward are not counted again.

    ``feature_group``: tensor parallelism. The tapped activations are equal column shards of the FFN hidden
    dimension over this group (the same tokens on every rank); the kept rows are all-gathered so that every
    rank accumulates the full D x D statistics, cross-shard blocks included.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: TapSpec,
        *,
        taps: Iterable[str] = TAPS,
        layers: Iterable[int] | None = None,
        max_tokens_per_forward: int | None = None,
        seed: int = 0,
        accumulate_dtype: torch.dtype | None = None,
        feature_group: dist.ProcessGroup | None = None,
    ):
        if max_tokens_per_forward is not None and max_tokens_per_forward < 2:
            raise ValueError(f"max_tokens_per_forward must be >= 2 or None, got {max_tokens_per_forward}")
        self.spec = spec
        self.max_tokens_per_forward = max_tokens_per_forward
        self.seed = seed
        self.accumulate_dtype = accumulate_dtype
        self.feature_group = feature_group
        taps = tuple(taps)
        if not taps or any(t not in TAPS for t in taps):
            raise ValueError(f"taps must be a non-empty subset of {TAPS}, got {taps}")
        self._points = tap_points(model, spec, layers, taps)
        if not self._points and layers is None:
            raise ValueError(
                f"tap spec found no FFN: no block under {spec.blocks!r} has both "
                f"{spec.pre.module!r} and {spec.post.module!r}"
            )
        self.layers: list[int] = sorted({layer for layer, _ in self._points})
        self.stats: dict[tuple[int, str], CovarianceStats] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._slot_ids: list[int] = []
        self._armed_step: int | None = None
        self._active_layers: frozenset[int] | None = None
        self._forward_ordinal: dict[tuple[int, str], int] = {}

    # -- lifecycle -------------------------------------------------------------------------------------------

    def attach(self) -> "FFNTaps":
        if self._handles:
            return self
        for (layer, tap), module in self._points.items():
            capture = self.spec.point(tap).capture
            attr = _SLOT_ATTR[capture]
            if getattr(module, attr, None) is not None:
                raise RuntimeError(f"layer {layer} {tap}: module is already tapped (remove the other taps first)")
            slot = next(_slot_ids)
            _slots[slot] = (self, layer, tap)
            self._slot_ids.append(slot)
            setattr(module, attr, torch.tensor(slot))
            if capture == "output":
                self._handles.append(module.register_forward_hook(_output_hook))
            else:
                self._handles.append(module.register_forward_pre_hook(_input_hook))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for (layer, tap), module in self._points.items():
            capture = self.spec.point(tap).capture
            if hasattr(module, _SLOT_ATTR[capture]):
                delattr(module, _SLOT_ATTR[capture])
        self.disarm()
        for slot in self._slot_ids:
            _slots.pop(slot, None)
        self._handles.clear()
        self._slot_ids.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def arm(self, step: int, layers: Iterable[int] | None = None) -> None:
        """Start capturing for ``step``: statistics gathered from now on belong to it. ``layers``: capture only
        these (None: all of this instance's)."""
        self._armed_step = step
        self._active_layers = None if layers is None else frozenset(layers)
        self._forward_ordinal.clear()
        _set_armed(self, True)

    def disarm(self) -> None:
        self._armed_step = None
        _set_armed(self, False)

    @property
    def armed_step(self) -> int | None:
        return self._armed_step

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

    def release(self) -> None:
        """Drop the statistics: a logging step's D x D buffers live only until its merge."""
        self.stats = {}

    def dims(self) -> dict[tuple[int, str], int]:
        """The (global) feature dimension of each tap, from its module's weight: the size of its D x D buffers."""
        out = {}
        for (layer, tap), module in self._points.items():
            capture = self.spec.point(tap).capture
            dim = feature_dim(module, capture)
            if dim is not None:
                out[(layer, tap)] = dim
        return out

    # -- capture ---------------------------------------------------------------------------------------------

    def _capture(self, layer: int, tap: str, activation: torch.Tensor) -> None:
        if self._armed_step is None:
            return
        # Activation checkpointing re-runs the forward inside the backward pass; those rows were counted
        # when the forward first ran.
        if torch._C._current_graph_task_id() != -1:
            return
        if self._active_layers is not None and layer not in self._active_layers:
            return
        key = (layer, tap)
        ordinal = self._forward_ordinal.get(key, 0)
        self._forward_ordinal[key] = ordinal + 1
        # Our ops must be invisible to dispatch modes active in the forward: op-level selective activation
        # checkpointing counts and caches matmuls by order, and an extra Gram matmul would misalign its
        # recomputation.
        with _disable_current_modes(), torch.no_grad():
            rows = activation.detach().reshape(-1, activation.shape[-1])
            if self.max_tokens_per_forward is not None and rows.shape[0] > self.max_tokens_per_forward:
                rows = rows.index_select(0, self._sample_rows(rows.shape[0], rows.device, layer, ordinal))
            if self.feature_group is not None:
                rows = _gather_columns(rows, self.feature_group)
            stats = self.stats.get(key)
            if stats is None:
                stats = self.stats[key] = CovarianceStats(rows.shape[-1], rows.device, self.accumulate_dtype)
            stats.update(rows)

    def _sample_rows(self, n_rows: int, device: torch.device, layer: int, ordinal: int) -> torch.Tensor:
        # Pre and post of one forward derive the same seed, so they keep the same tokens; so do the ranks of
        # a tensor-parallel group, which see the same tokens.
        digest = hashlib.blake2b(f"{self.seed}/{self._armed_step}/{layer}/{ordinal}".encode(), digest_size=8)
        generator = torch.Generator(device=device).manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
        chosen = torch.randperm(n_rows, generator=generator, device=device)[: self.max_tokens_per_forward]
        return chosen.sort().values


def feature_dim(module: nn.Module, capture: str) -> int | None:
    """The width of a module's output ("output") or input ("input") activation, from its weight; None if it
    cannot be told. nn.Linear keeps its logical sizes under TP (DTensor weights) and FSDP."""
    name = "out_features" if capture == "output" else "in_features"
    if isinstance(getattr(module, name, None), int):
        return getattr(module, name)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    out_dim, in_dim = weight.shape
    if type(module).__name__ == "Conv1D":  # HuggingFace's GPT-2 Conv1D keeps its weight as [in, out]
        out_dim, in_dim = in_dim, out_dim
    return int(out_dim if capture == "output" else in_dim)


def _gather_columns(rows: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[n, d/W] column shards of W ranks -> the full [n, d] rows, in rank order."""
    world = dist.get_world_size(group)
    rows = rows.contiguous()
    gathered = torch.empty(world * rows.numel(), dtype=rows.dtype, device=rows.device)
    dist.all_gather_into_tensor(gathered, rows.flatten(), group=group)
    n, d_local = rows.shape
    return gathered.view(world, n, d_local).permute(1, 0, 2).reshape(n, world * d_local)
