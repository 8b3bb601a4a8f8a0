"""Muon for hidden matrices + AdamW for the rest, in one torch optimizer, exact and distributed under FSDP2.

    groups = split_params(model)                       # [{"params": matrices}, {"params": rest, "use_muon": False}]
    opt = Muon(groups, lr=3e-4, weight_decay=0.1, adamw={"betas": (0.9, 0.95)})

Framework-free: any ``nn.Module``, plain tensors or FSDP2 DTensors. One optimizer (one set of param groups), so
any LR scheduler drives both kinds of group; with ``adjust_lr_fn = "match_rms_adamw"`` one lr serves both.

**Exactness.** The result is bitwise that of ``torch.optim.Muon`` (for the Muon groups) and ``torch.optim.AdamW``
(for the others) fed the same full gradients. Everything before and after Newton-Schulz is elementwise (momentum
lerp, Nesterov lerp, the cast to bf16, decoupled weight decay, the update), so it runs on each rank's shard with
the same ops and dtypes; Newton-Schulz runs on the assembled full bf16 matrix with torch's op order. The AdamW
groups are stepped by a real ``torch.optim.AdamW`` that shares this optimizer's groups and state.

**Distribution.** FSDP2 shards every parameter on dim 0 over a data-parallel group (``torch.chunk`` rows: ranks
past the end hold none). Each matrix gets ONE owner rank. Per bucket of matrices and step, two collectives:

1. ``all_to_all_single``: every rank sends its bf16 rows of the momentum-updated matrices to their owners;
2. ``all_to_all_single``: each owner sends every rank its rows of the orthogonalised update.

Owners are balanced per bucket by Newton-Schulz cost (rows x cols x min(rows, cols)), heaviest first. While one
bucket is orthogonalised the next one's gather is already in flight (``async_op``). Under HSDP (placements
``(Replicate(), Shard(0))``) each replica group runs the same exchange inside its own shard group: the
orthogonalisation is repeated per replica, but no byte crosses the (usually slower) replicate dimension.
Replicated DTensors and plain tensors are orthogonalised locally, without any collective. Other layouts
(tensor-parallel shards, Shard on another dim, Partial) raise at construction.

**State.** Per parameter, like torch: ``momentum_buffer`` (a DTensor for a DTensor parameter) for Muon;
``step``, ``exp_avg``, ``exp_avg_sq`` for AdamW. So ``torch.distributed.checkpoint``'s
``get/set_optimizer_state_dict`` save, reshard and load it like any torch optimizer's.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.optim import Optimizer

# Wrappers (activation checkpointing, torch.compile, FSDP) add path components to parameter names: patterns
# match the model's own names.
from ..taps import canonical_name

# Keller Jordan's quintic Newton-Schulz coefficients, torch.optim.Muon's defaults.
NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7
ADJUST_LR_RULES = ("original", "match_rms_adamw")
# Modules whose 2-D weights are not hidden matrices: the output head, by the names LLM codebases give it.
OUTPUT_HEAD_NAMES = ("output", "lm_head")


# -- the math ----------------------------------------------------------------------------------------------------


def newton_schulz(matrix: Tensor, coefficients=NS_COEFFICIENTS, steps: int = NS_STEPS, eps: float = NS_EPS) -> Tensor:
    """Approximate orthogonalisation of a contiguous matrix (bf16 in torch.optim.Muon), in its dtype; the first
    normalisation works in place.

    Returns the result in the "wide" orientation: ``matrix`` itself is worked on as ``matrix.T`` when it has more
    rows than columns, and the returned tensor is then the transpose of the update (callers slice it
    accordingly). The op sequence and dtypes are torch.optim.Muon's, so the bits are too.
    """
    a, b, c = coefficients
    x = matrix.T if matrix.size(0) > matrix.size(1) else matrix
    # Frobenius norm >= spectral norm: after this the spectral norm is at most 1, where the iteration converges.
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b*G + c*G^2
        x = torch.addmm(x, poly, x, beta=a)  # a*X + (b*G + c*G^2) X
    return x


def adjusted_lr(lr: float, rule: str | None, shape) -> float:
    """The per-matrix learning rate: "original" (Keller Jordan) keeps the update's RMS independent of the aspect
    ratio; "match_rms_adamw" (Moonshot) matches AdamW's update RMS, so AdamW's lr and weight decay carry over.
    The same float expressions as torch.optim.Muon, so the same bits."""
    rows, cols = shape[:2]
    if rule is None or rule == "original":
        ratio = math.sqrt(max(1, rows / cols))
    elif rule == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, cols))
    else:
        raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_RULES}, got {rule!r}")
    return lr * ratio


# -- which parameters ----------------------------------------------------------------------------------------------


def hidden_matrix_names(model: nn.Module) -> set[str]:
    """The default Muon parameters: every 2-D parameter except embedding tables and the output head. Those map
    tokens to and from the hidden space, where orthogonalised updates do not fit (Muon's authors use AdamW)."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            continue
        if canonical_name(module_name).rsplit(".", 1)[-1] in OUTPUT_HEAD_NAMES:
            continue
        for param_name, param in module.named_parameters(prefix=module_name, recurse=False):
            if param.ndim == 2:
                names.add(canonical_name(param_name))
    return names


def split_params(model: nn.Module, patterns: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Two param groups for ``Muon``: the Muon matrices and the AdamW rest (trainable parameters only).

    ``patterns``: fnmatch patterns over parameter names (wrapper components removed); a matching parameter goes
    to Muon and must be 2-D. None or empty: ``hidden_matrix_names``. An empty group is left out.
    """
    patterns = list(patterns or [])
    default = None if patterns else hidden_matrix_names(model)
    muon, rest = [], []
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = canonical_name(raw_name)
        if default is not None:
            chosen = name in default
        else:
            chosen = any(fnmatch.fnmatchcase(name, p) for p in patterns)
            if chosen and param.ndim != 2:
                raise ValueError(
                    f"muon_params {patterns} match {name!r} of shape {tuple(param.shape)}: Muon needs 2-D matrices"
                )
        if chosen:
            row_layout(param, name)  # an unsupported layout fails here, with the parameter's name
        (muon if chosen else rest).append(param)
    groups = []
    if muon:
        groups.append({"params": muon, "use_muon": True})
    if rest:
        groups.append({"params": rest, "use_muon": False})
    return groups


# -- where the rows are ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowLayout:
    """How a matrix's rows are spread: ``starts[r]:starts[r+1]`` on rank ``r`` of ``group`` (None: one rank)."""

    group: Any
    world: int
    rank: int
    starts: tuple[int, ...]

    def rows(self, rank: int) -> int:
        return self.starts[rank + 1] - self.starts[rank]


def row_layout(param: Tensor, name: str = "parameter") -> RowLayout:
    rows = param.shape[0]
    if not isinstance(param, DTensor):
        return RowLayout(None, 1, 0, (0, rows))
    mesh, placements = param.device_mesh, param.placements
    # `type(...) is Shard`: _StridedShard (FSDP over TP) subclasses Shard but its rows are interleaved.
    sharded = [i for i, p in enumerate(placements) if type(p) is Shard and p.dim == 0]
    others = [p for i, p in enumerate(placements) if i not in sharded and not isinstance(p, Replicate)]
    if len(sharded) > 1 or others:
        raise ValueError(
            f"Muon: {name} is a DTensor with placements {tuple(placements)}; distributed Muon supports FSDP2/HSDP "
            "layouts only (Shard(0) over one mesh dimension, Replicate on the others). Tensor parallelism and "
            "other shardings are not supported: turn them off or optimise this parameter with AdamW."
        )
    if not sharded or mesh.size(sharded[0]) == 1:
        return RowLayout(None, 1, 0, (0, rows))
    dim = sharded[0]
    world, rank = mesh.size(dim), mesh.get_local_rank(dim)
    chunk = -(-rows // world)  # torch.chunk's rule, which FSDP2 follows
    starts = tuple(min(r * chunk, rows) for r in range(world + 1))
    local = param.to_local().shape[0]
    if local != starts[rank + 1] - starts[rank]:
        raise ValueError(f"Muon: {name} holds {local} rows on rank {rank}; expected torch.chunk's {starts}")
    return RowLayout(mesh.get_group(dim), world, rank, starts)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


# -- the exchange plan -----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Matrix:
    param: Tensor
    layout: RowLayout
    rows: int
    cols: int
    owner: int = 0

    @property
    def cost(self) -> int:  # Newton-Schulz flops, up to a constant
        return self.rows * self.cols * min(self.rows, self.cols)

    @property
    def transposed(self) -> bool:  # newton_schulz works on the transpose
        return self.rows > self.cols


@dataclass(eq=False)
class _Bucket:
    """Matrices sharing one process group, exchanged with one gather and one scatter all-to-all."""

    group: Any
    world: int
    rank: int
    matrices: list[_Matrix] = field(default_factory=list)

    def owned(self, rank: int) -> list[_Matrix]:
        return [m for m in self.matrices if m.owner == rank]

    def balance(self) -> None:
        load = [0] * self.world
        for m in sorted(self.matrices, key=lambda m: -m.cost):  # stable: ties keep parameter order
            m.owner = min(range(self.world), key=lambda r: load[r])
            load[m.owner] += m.cost

    # Split sizes, in elements, per peer rank. Gather: to each owner go this rank's rows of that owner's matrices;
    # from each rank come its rows of the matrices owned here. The scatter is the same exchange reversed.
    def gather_splits(self) -> tuple[list[int], list[int]]:
        send = [sum(m.layout.rows(self.rank) * m.cols for m in self.owned(dst)) for dst in range(self.world)]
        recv = [sum(m.layout.rows(src) * m.cols for m in self.owned(self.rank)) for src in range(self.world)]
        return send, recv

    def scatter_splits(self) -> tuple[list[int], list[int]]:
        recv, send = self.gather_splits()
        return send, recv


def _exchange(bucket: _Bucket, send: Tensor, send_splits: list[int], recv_splits: list[int]):
    """Start one all-to-all; returns (receive buffer, work or None)."""
    if bucket.group is None:
        return send, None
    recv = send.new_empty(sum(recv_splits))
    work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=bucket.group, async_op=True)
    return recv, work


# -- the optimizer ---------------------------------------------------------------------------------------------------


class Muon(Optimizer):
    """Muon (momentum, Newton-Schulz orthogonalisation, per-matrix lr) on groups with ``use_muon = True``
    (the default), ``torch.optim.AdamW`` on groups with ``use_muon = False``.

    Args:
        params: parameters or param groups. A group may set ``use_muon`` and any hyperparameter of its kind.
        lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn: Muon's, with
            torch.optim.Muon's meaning; ``adjust_lr_fn`` defaults to "match_rms_adamw" here (one lr for both).
        adamw: keyword arguments of ``torch.optim.AdamW`` for the AdamW groups; lr and weight_decay default to
            the ones above.
        bucket_mb: Newton-Schulz input per rank and bucket, in MiB (of bf16): a bucket holds at most
            ``bucket_mb`` x (shard group size) MiB of full matrices, and at least one. Each bucket costs two
            collectives per step. 0: one bucket per process group.
        ns_dtype: the dtype Newton-Schulz runs in (and the matrices travel in). bf16 is torch.optim.Muon's, and
            only with it are the results torch's bits; float32 is more accurate, and faster on CPUs without
            bf16 matrix units.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = NS_EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: str | None = "match_rms_adamw",
        *,
        adamw: dict[str, Any] | None = None,
        bucket_mb: float = 0,
        ns_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if not isinstance(lr, (int, float)) or lr < 0:
            raise ValueError(f"Muon: lr must be a float >= 0, got {lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon: momentum must be in [0, 1), got {momentum!r}")
        if weight_decay < 0:
            raise ValueError(f"Muon: weight_decay must be >= 0, got {weight_decay!r}")
        if not 1 <= ns_steps < 100:
            raise ValueError(f"Muon: ns_steps must be in [1, 99], got {ns_steps!r}")
        if len(ns_coefficients) != 3:
            raise ValueError(f"Muon: ns_coefficients must hold 3 values, got {ns_coefficients!r}")
        if not eps > 0:
            raise ValueError(f"Muon: eps must be > 0, got {eps!r}")
        if adjust_lr_fn is not None and adjust_lr_fn not in ADJUST_LR_RULES:
            raise ValueError(f"Muon: adjust_lr_fn must be one of {ADJUST_LR_RULES}, got {adjust_lr_fn!r}")
        if bucket_mb < 0:
            raise ValueError(f"Muon: bucket_mb must be >= 0, got {bucket_mb!r}")
        if ns_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"Muon: ns_dtype must be torch.bfloat16 or torch.float32, got {ns_dtype!r}")
        self.bucket_mb = bucket_mb
        self.ns_dtype = ns_dtype
        self._muon_defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": tuple(ns_coefficients),
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        # The AdamW groups are stepped by a real torch.optim.AdamW (fused/foreach/for-loop, amsgrad, ... exactly as
        # torch does them). It is built on a placeholder; at every step it is handed our AdamW groups and our
        # state dict, so the state stays keyed per parameter in this optimizer (what checkpointing needs).
        self._adamw = torch.optim.AdamW([torch.zeros(0)], **{"lr": lr, "weight_decay": weight_decay, **(adamw or {})})
        self._adamw_defaults = {k: v for k, v in self._adamw.defaults.items()}
        self._plans: dict[tuple, list[list[_Bucket]]] = {}
        self.last_collectives = 0  # all-to-alls issued by the last step (for tests and benchmarks)
        super().__init__(params, {"lr": lr})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        use_muon = param_group.setdefault("use_muon", True)
        for key, value in (self._muon_defaults if use_muon else self._adamw_defaults).items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)
        if use_muon:
            for p in self.param_groups[-1]["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        f"Muon: a use_muon group holds a parameter of shape {tuple(p.shape)}; "
                        "Muon needs 2-D matrices (put the rest in a group with use_muon=False)"
                    )
                if torch.is_complex(p):
                    raise ValueError("Muon: complex parameters are not supported")
                row_layout(p)  # unsupported layouts fail here, at construction

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon_step()
        adamw_groups = [g for g in self.param_groups if not g["use_muon"]]
        if adamw_groups:
            # load_state_dict replaces both the groups and the state: hand the current ones over every time.
            self._adamw.param_groups = adamw_groups
            self._adamw.state = self.state
            self._adamw.step()
        return loss

    def describe(self) -> str:
        """One line on the split and the exchange, for start-up logs (assumes every parameter gets a gradient)."""
        matrices = [p for g in self.param_groups if g["use_muon"] for p in g["params"]]
        others = [p for g in self.param_groups if not g["use_muon"] for p in g["params"]]
        plan = self._plan(matrices) if matrices else []
        exchanged = [b for buckets in plan for b in buckets if b.group is not None]
        ranks = max([b.world for b in exchanged], default=1)
        return (
            f"{len(matrices)} matrices ({sum(p.numel() for p in matrices):,} parameters) with Muon, "
            f"{len(others)} tensors ({sum(p.numel() for p in others):,} parameters) with AdamW; "
            f"{sum(len(b) for b in plan)} bucket(s), Newton-Schulz spread over {ranks} rank(s), "
            f"{2 * len(exchanged)} all-to-alls per step"
        )

    # -- Muon groups --------------------------------------------------------------------------------------------

    def _muon_step(self) -> None:
        matrices = [(p, g) for g in self.param_groups if g["use_muon"] for p in g["params"] if p.grad is not None]
        self.last_collectives = 0
        if not matrices:
            return
        group_of = {p: g for p, g in matrices}
        for buckets in self._plan([p for p, _ in matrices]):
            self._step_buckets(buckets, group_of)

    def _plan(self, params: list[Tensor]) -> list[list[_Bucket]]:
        """Buckets per process group, in parameter order (so every rank issues the same collectives in the same
        order). Cached per set of parameters with gradients: every rank must agree on that set, as FSDP2's
        gradients do."""
        key = tuple(id(p) for p in params)
        if key in self._plans:
            return self._plans[key]
        by_group: dict[int, list[_Matrix]] = {}
        for p in params:
            layout = row_layout(p)
            by_group.setdefault(id(layout.group), []).append(_Matrix(p, layout, p.shape[0], p.shape[1]))
        plan = []
        for matrices in by_group.values():
            layout = matrices[0].layout
            cap = self.bucket_mb * 2**20 / 2 * layout.world  # elements of full matrices per bucket
            buckets = [_Bucket(layout.group, layout.world, layout.rank)]
            size = 0
            for m in matrices:
                if self.bucket_mb and buckets[-1].matrices and size + m.rows * m.cols > cap:
                    buckets.append(_Bucket(layout.group, layout.world, layout.rank))
                    size = 0
                buckets[-1].matrices.append(m)
                size += m.rows * m.cols
            for bucket in buckets:
                bucket.balance()
            plan.append(buckets)
        self._plans = {key: plan}  # one entry: the set of parameters with gradients rarely changes
        return plan

    def _step_buckets(self, buckets: list[_Bucket], group_of: dict) -> None:
        # Pipeline: the gather of bucket i+1 is in flight while bucket i is orthogonalised; scatters are waited
        # for at the end.
        scatters = []
        pending = self._start_gather(buckets[0], group_of)
        for i, bucket in enumerate(buckets):
            received, work = pending
            if work is not None:
                work.wait()
            if i + 1 < len(buckets):
                pending = self._start_gather(buckets[i + 1], group_of)
            scatters.append(self._start_scatter(bucket, received, group_of))
        for bucket, (received, work) in zip(buckets, scatters):
            if work is not None:
                work.wait()
            self._apply(bucket, received, group_of)

    def _start_gather(self, bucket: _Bucket, group_of: dict):
        """Momentum on this rank's rows (elementwise: the same bits as on the full matrix), cast to the
        Newton-Schulz dtype into the send buffer in owner order, and the gather's all-to-all."""
        send_splits, recv_splits = bucket.gather_splits()
        first = _local(bucket.matrices[0].param)
        send = torch.empty(sum(send_splits), dtype=self.ns_dtype, device=first.device)
        offset = 0
        for dst in range(bucket.world):
            for m in bucket.owned(dst):
                update = self._momentum(m.param, group_of[m.param])
                n = update.numel()
                send[offset : offset + n].view(update.shape).copy_(update)  # the cast NS starts with
                offset += n
        if bucket.group is not None:
            self.last_collectives += 1
        return _exchange(bucket, send, send_splits, recv_splits)

    def _momentum(self, param: Tensor, group: dict) -> Tensor:
        grad = _local(param.grad)
        if grad.is_sparse:
            raise RuntimeError("Muon does not support sparse gradients")
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param.grad, memory_format=torch.preserve_format)
        buf = _local(state["momentum_buffer"])
        momentum = group["momentum"]
        buf.lerp_(grad, 1 - momentum)
        return grad.lerp(buf, momentum) if group["nesterov"] else buf

    def _start_scatter(self, bucket: _Bucket, received: Tensor, group_of: dict):
        """Assemble each owned matrix from the ranks' rows, orthogonalise it, and send every rank its rows."""
        send_splits, recv_splits = bucket.scatter_splits()
        owned = bucket.owned(bucket.rank)
        pieces: dict[_Matrix, list[Tensor]] = {m: [] for m in owned}
        offset = 0
        for src in range(bucket.world):
            for m in owned:
                n = m.layout.rows(src) * m.cols
                pieces[m].append(received[offset : offset + n])
                offset += n
        results = {}
        for m in owned:
            group = group_of[m.param]
            full = torch.cat(pieces[m]).view(m.rows, m.cols) if bucket.world > 1 else pieces[m][0].view(m.rows, m.cols)
            results[m] = newton_schulz(full, group["ns_coefficients"], group["ns_steps"], group["eps"])
        send = received.new_empty(sum(send_splits))
        offset = 0
        for dst in range(bucket.world):
            for m in owned:
                start, end = m.layout.starts[dst], m.layout.starts[dst + 1]
                n = (end - start) * m.cols
                x = results[m]
                # Transposed matrices travel transposed: the receiver's view then has the strides of
                # torch.optim.Muon's update (a transposed view), so the final add_ takes the same kernel path.
                rows = x[:, start:end] if m.transposed else x[start:end]
                send[offset : offset + n].view(rows.shape).copy_(rows)
                offset += n
        if bucket.group is not None:
            self.last_collectives += 1
        return _exchange(bucket, send, send_splits, recv_splits)

    def _apply(self, bucket: _Bucket, received: Tensor, group_of: dict) -> None:
        """Decoupled weight decay with the group's lr, then the update with the matrix's adjusted lr."""
        offset = 0
        for src in range(bucket.world):
            for m in bucket.owned(src):
                rows = m.layout.rows(bucket.rank)
                n = rows * m.cols
                piece = received[offset : offset + n]
                offset += n
                update = piece.view(m.cols, rows).T if m.transposed else piece.view(rows, m.cols)
                group = group_of[m.param]
                lr = group["lr"]
                if isinstance(lr, Tensor):
                    lr = lr.item()
                param = _local(m.param)
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], (m.rows, m.cols)))
