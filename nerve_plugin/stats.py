"""Streaming covariance statistics: count, mean and centred second moment, mergeable without raw activations.

For a set of rows X the state is (n, mu, M2) with M2 = (X - mu)^T (X - mu), so Sigma = M2 / (n - 1). Two
states merge exactly by the parallel formula of Chan, Golub & LeVeque (1979):

    n  = n_a + n_b
    mu = mu_a + delta * n_b / n                      with delta = mu_b - mu_a
    M2 = M2_a + M2_b + delta delta^T * n_a * n_b / n

A micro-batch is folded in as a state of its own. Its rows are first shifted by the running mean (rounded to
the Gram's dtype; for bf16/fp16 Grams only features whose mean dominates, see ``_shift``), so that the Gram
product sees small, centred numbers: activations whose mean is much larger than their spread would otherwise
lose their covariance to cancellation in X^T X - n mu mu^T.

Across ranks, the states merge with the k-way form of the same formula: every rank adds its
M2_r + n_r (mu_r - mu)(mu_r - mu)^T for the global mean mu, and one sum-reduction of those terms is the result.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

_LOW_PRECISION = (torch.bfloat16, torch.float16)
GPU_GRAM_CHUNK_ROWS = 2048


def default_accumulate_dtype(device: torch.device) -> torch.dtype:
    # float64 where it is cheap (CPU); on GPUs float64 matrix work is 30-60x slower than float32, and a
    # float32 sum of a few centred micro-batch Grams per logging step stays within ~1e-7 relative.
    return torch.float64 if device.type == "cpu" else torch.float32


class CovarianceStats:
    """Running (count, mean, M2) of the rows of [..., dim] activations on one device.

    ``update`` takes bf16, fp16, fp32 or fp64 input. On CUDA, bf16/fp16 Grams run on tensor cores with fp32
    output; every other case computes the Gram in the accumulation dtype. Means are always float64.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu", accumulate_dtype: torch.dtype | None = None):
        self.dim = dim
        self.device = torch.device(device)
        self.accumulate_dtype = accumulate_dtype or default_accumulate_dtype(self.device)
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self.m2 = torch.zeros(dim, dim, dtype=self.accumulate_dtype, device=self.device)

    def reset(self) -> None:
        self.count = 0
        self.mean.zero_()
        self.m2.zero_()

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold the rows of ``x`` ([..., dim]) into the running statistics."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected activations with last dimension {self.dim}, got shape {tuple(x.shape)}")
        rows = x.detach().reshape(-1, self.dim)
        n_b = rows.shape[0]
        if n_b == 0:
            return
        gram_dtype = self._gram_dtype(rows)
        # Subtract in the wider of the two dtypes, then round only the centred values to the Gram dtype. The
        # shift is exactly the value subtracted, so it may be any rounding of the mean: the batch's own mean
        # offset is measured below and carried in float64.
        work_dtype = torch.promote_types(rows.dtype, gram_dtype)
        shift = self._shift(rows, gram_dtype).to(work_dtype)
        shifted = (rows.to(work_dtype) - shift).to(gram_dtype)
        offset = _column_sums(shifted) / n_b

        n_a = self.count
        n = n_a + n_b
        batch_mean = shift.to(torch.float64) + offset
        delta = batch_mean - self.mean
        # M2 += G - n_b offset offset^T (the batch's own M2), then the Chan term: the Gram accumulates straight
        # into M2 and both corrections are rank-one updates in place, so M2 is read and written once each.
        self._accumulate_gram(shifted)
        acc = self.accumulate_dtype
        self.m2.addr_(offset.to(acc), offset.to(acc), alpha=-n_b)
        if n_a:
            self.m2.addr_(delta.to(acc), delta.to(acc), alpha=n_a * n_b / n)
        self.mean.add_(delta * (n_b / n))
        self.count = n

    def merge_(self, other: "CovarianceStats") -> "CovarianceStats":
        """Fold another state of the same dimension into this one (Chan et al.)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        if other.count == 0:
            return self
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        other_mean = other.mean.to(self.device)
        delta = other_mean - self.mean
        self.m2.add_(other.m2.to(self.device, self.accumulate_dtype))
        self.m2.add_(torch.outer(delta, delta).mul_(n_a * n_b / n).to(self.accumulate_dtype))
        self.mean.add_(delta * (n_b / n))
        self.count = n
        return self

    def _shift(self, rows: torch.Tensor, gram_dtype: torch.dtype) -> torch.Tensor:
        """What to subtract from each feature before the Gram product.

        fp32/fp64 Grams: the (estimated) mean. Raw sums would lose the covariance to cancellation in
        X^T X - n mu mu^T as the mean grows; the shifted values cost one rounding of a small number.
        bf16/fp16 Grams: the mean only where it exceeds 8 standard deviations, else 0. A shifted bf16 value is
        exact only when x and the shift are within a factor of 2 (Sterbenz), which holds for nearly every row
        there; elsewhere the raw values are exact and cancellation costs at most ~65 eps of fp32 accumulation.
        """
        # Reductions with a wide accumulator, not a wide copy: a float64 copy of a [16k, 8k] micro-batch is 1 GiB.
        mean = self.mean if self.count else _column_sums(rows) / rows.shape[0]
        if gram_dtype not in _LOW_PRECISION:
            return mean
        if self.count:
            var = torch.diagonal(self.m2).to(torch.float64) / max(self.count - 1, 1)
        else:  # only decides which features to shift: E[x^2] - mean^2 is accurate enough for that
            var = (_column_sums(rows, square=True) / rows.shape[0] - mean.square()).clamp_min(0)
        return torch.where(mean.square() > 64 * var, mean, torch.zeros_like(mean))

    def covariance(self) -> torch.Tensor:
        """The unbiased covariance M2 / (n - 1), float64."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 rows, have {self.count}")
        return covariance_from_m2(self.m2, self.count)

    def _gram_dtype(self, rows: torch.Tensor) -> torch.dtype:
        if rows.is_cuda and rows.dtype in _LOW_PRECISION:
            return rows.dtype
        return self.accumulate_dtype

    def _accumulate_gram(self, shifted: torch.Tensor) -> None:
        """M2 += shifted^T shifted."""
        if not shifted.is_cuda:
            self.m2.addmm_(shifted.T.to(self.accumulate_dtype), shifted.to(self.accumulate_dtype))
            return
        # GPU matmul accumulators lose precision with the reduction length (measured on H100, bf16 in, fp32
        # out: 1.3e-6 relative at 1000 rows, 2e-5 at 8400), so long micro-batches go in row chunks, each added
        # to M2 by the matmul's own epilogue (beta = 1) rather than by a separate pass over D x D.
        for chunk in shifted.split(GPU_GRAM_CHUNK_ROWS):
            if chunk.dtype in _LOW_PRECISION:
                with _full_precision_reductions():
                    _addmm_fp32_out(self.m2, chunk)
            else:
                self.m2.addmm_(chunk.T.to(self.accumulate_dtype), chunk.to(self.accumulate_dtype))


def covariance_from_m2(m2: torch.Tensor, count: int) -> torch.Tensor:
    """The unbiased covariance M2 / (n - 1) in float64, symmetrised (M2 is summed in ways that are not
    bitwise symmetric)."""
    m2 = m2.to(torch.float64)
    return 0.5 * (m2 + m2.T) / (count - 1)


def _column_sums(x: torch.Tensor, square: bool = False) -> torch.Tensor:
    """Float64 column sums (of squares) of [n, d] rows, in row chunks: a reduction asked for in float64 casts
    its whole input first, which for a [16k, 8k] bf16 micro-batch is a 1 GiB temporary."""
    total = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
    # GPUs: fp32 within a 2048-row chunk (half the traffic of fp64; relative error ~1e-7, below the fp32 M2's
    # own), fp64 across chunks. CPUs: fp64 throughout, where the accumulation is fp64 too.
    within = torch.float32 if x.is_cuda and x.dtype != torch.float64 else torch.float64
    for chunk in x.split(GPU_GRAM_CHUNK_ROWS if x.is_cuda else max(1, x.shape[0])):
        chunk = chunk.to(within)
        total += (chunk.square() if square else chunk).sum(dim=0)
    return total


_ADDMM_OUT_DTYPE: bool | None = None  # whether this build has addmm(..., out_dtype=) for CUDA


def _addmm_fp32_out(m2: torch.Tensor, chunk: torch.Tensor) -> None:
    """m2 (fp32) += chunk^T chunk for a bf16/fp16 chunk, on tensor cores with fp32 output."""
    global _ADDMM_OUT_DTYPE
    if m2.dtype == torch.float32 and _ADDMM_OUT_DTYPE is not False:
        try:
            torch.addmm(m2, chunk.T, chunk, out_dtype=torch.float32, out=m2)
            _ADDMM_OUT_DTYPE = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _ADDMM_OUT_DTYPE = False
    m2.add_(torch.mm(chunk.T, chunk, out_dtype=torch.float32).to(m2.dtype))


@contextlib.contextmanager
def _full_precision_reductions():
    """cuBLAS may reduce split-K partial sums of bf16/fp16 matmuls in bf16/fp16 (PyTorch allows it by default),
    which costs the fp32-output Gram ~1e-4 relative. Forbid it for our matmul only; training's are untouched."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction = saved


@torch.no_grad()
def reduce_stats(
    stats: list[CovarianceStats], group: dist.ProcessGroup | None = None, owners: list[int] | None = None
) -> list[int]:
    """Merge the ranks' statistics. Returns the indices of ``stats`` that now hold the merged result here.

    ``owners[i]`` is the rank (within ``group``) that receives the merge of ``stats[i]``; with ``owners=None``
    every rank receives every merge. States this rank does not own are left unspecified: reset them before
    reuse. Every rank of the group must pass states of the same dimensions in the same order (a state with no
    rows is fine), and the same owners.

    Collectives: one all-gather of counts and means, then one sum of the Chan-corrected second moments per
    distinct owner (one all-reduce without owners), in float64 so the merge adds no rounding of its own.
    """
    if not stats:
        return []
    if group is None and not dist.is_initialized():
        return list(range(len(stats)))
    world, me = dist.get_world_size(group), dist.get_rank(group)
    if owners is not None and len(owners) != len(stats):
        raise ValueError(f"owners has {len(owners)} entries for {len(stats)} states")
    if world == 1:
        return list(range(len(stats)))
    device = stats[0].device
    local = torch.cat(
        [torch.cat([torch.tensor([float(s.count)], dtype=torch.float64, device=device), s.mean]) for s in stats]
    )
    gathered = torch.empty(world * local.numel(), dtype=torch.float64, device=device)
    dist.all_gather_into_tensor(gathered, local, group=group)
    per_state = gathered.view(world, local.numel()).split([1 + s.dim for s in stats], dim=1)
    totals = [int(c) for c in torch.stack([block[:, 0].sum() for block in per_state]).tolist()]

    means, corrected = [], []
    for s, block, total in zip(stats, per_state, totals):
        counts, rank_means = block[:, 0], block[:, 1:]
        mean = (counts[:, None] * rank_means).sum(dim=0) / max(total, 1)
        delta = s.mean - mean
        corrected.append((s.m2.to(torch.float64) + torch.outer(delta, delta) * s.count).flatten())
        means.append(mean)

    if owners is None:
        buckets = {None: list(range(len(stats)))}
    else:
        buckets = {}
        for i, owner in enumerate(owners):
            buckets.setdefault(owner, []).append(i)
    mine = []
    for owner in sorted(buckets, key=lambda o: -1 if o is None else o):
        indices = buckets[owner]
        flat = torch.cat([corrected[i] for i in indices])
        if owner is None:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        else:
            dst = owner if group is None else dist.get_global_rank(group, owner)
            dist.reduce(flat, dst=dst, op=dist.ReduceOp.SUM, group=group)
            if owner != me:
                continue
        for i, m2 in zip(indices, flat.split([stats[i].dim ** 2 for i in indices])):
            stats[i].count = totals[i]
            stats[i].mean.copy_(means[i])
            stats[i].m2.copy_(m2.view(stats[i].dim, stats[i].dim))
            mine.append(i)
    return sorted(mine)
