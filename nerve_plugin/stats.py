"""Streaming covariance statistics: count, mean and centred second moment, mergeable without raw activations.

For a set of rows X the state is (n, mu, M2) with M2 = (X - mu)^T (X - mu), so Sigma = M2 / (n - 1). Two
states merge exactly by the parallel formula of Chan, Golub & LeVeque (1979):

    n  = n_a + n_b
    mu = mu_a + delta * n_b / n                      with delta = mu_b - mu_a
    M2 = M2_a + M2_b + delta delta^T * n_a * n_b / n

A micro-batch is folded in as a state of its own. Its rows are first shifted by the running mean (rounded to
the Gram's dtype), so that the Gram product sees small, centred numbers: activations whose mean is much larger
than their spread would otherwise lose their covariance to cancellation in X^T X - n mu mu^T.

Across ranks, the states merge with the k-way form of the same formula: every rank adds its
M2_r + n_r (mu_r - mu)(mu_r - mu)^T for the global mean mu, and one sum-reduction of those terms is the result.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_LOW_PRECISION = (torch.bfloat16, torch.float16)


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
        shift_source = self.mean if self.count else rows.to(torch.float64).mean(dim=0)
        # The shift is exactly the value subtracted, so it may be any rounding of the mean: the batch's own
        # mean offset is measured below and carried in float64.
        # Subtract in the wider of the two dtypes, then round only the small centred values to the Gram dtype.
        work_dtype = torch.promote_types(rows.dtype, gram_dtype)
        shift = shift_source.to(work_dtype)
        shifted = (rows.to(work_dtype) - shift).to(gram_dtype)
        offset = shifted.sum(dim=0, dtype=torch.float64) / n_b
        gram = self._gram(shifted)

        n_a = self.count
        n = n_a + n_b
        batch_mean = shift.to(torch.float64) + offset
        delta = batch_mean - self.mean
        # M2_b = G - n_b offset offset^T, then the Chan term; both are rank-one updates.
        self.m2.add_(gram.to(self.accumulate_dtype))
        self.m2.add_(torch.outer(offset, offset).mul_(-n_b).to(self.accumulate_dtype))
        if n_a:
            self.m2.add_(torch.outer(delta, delta).mul_(n_a * n_b / n).to(self.accumulate_dtype))
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

    def covariance(self) -> torch.Tensor:
        """The unbiased covariance M2 / (n - 1), float64."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 rows, have {self.count}")
        m2 = self.m2.to(torch.float64)
        return 0.5 * (m2 + m2.T) / (self.count - 1)

    def _gram_dtype(self, rows: torch.Tensor) -> torch.dtype:
        if rows.is_cuda and rows.dtype in _LOW_PRECISION:
            return rows.dtype
        return self.accumulate_dtype

    @staticmethod
    def _gram(shifted: torch.Tensor) -> torch.Tensor:
        if shifted.dtype in _LOW_PRECISION:
            return torch.mm(shifted.T, shifted, out_dtype=torch.float32)
        return shifted.T @ shifted


@torch.no_grad()
def all_reduce_stats(stats: list[CovarianceStats], group: dist.ProcessGroup | None = None) -> None:
    """Merge every rank's statistics in place, so each rank ends with the statistics of all ranks' rows.

    Every rank must pass states of the same dimensions in the same order (a state with no rows is fine).
    Two collectives, whatever the number of states: an all-gather of counts and means, then one sum of the
    Chan-corrected second moments, in float64 so the merge adds no rounding beyond the local sums.
    """
    if not stats or dist.get_world_size(group) == 1:
        return
    device = stats[0].device
    local = torch.cat(
        [torch.cat([torch.tensor([float(s.count)], dtype=torch.float64, device=device), s.mean]) for s in stats]
    )
    world = dist.get_world_size(group)
    gathered = torch.empty(world * local.numel(), dtype=torch.float64, device=device)
    dist.all_gather_into_tensor(gathered, local, group=group)
    gathered = gathered.view(world, local.numel())

    per_state = gathered.split([1 + s.dim for s in stats], dim=1)
    totals = [int(c) for c in torch.stack([block[:, 0].sum() for block in per_state]).tolist()]
    corrected, means = [], []
    for s, block, total in zip(stats, per_state, totals):
        counts, rank_means = block[:, 0], block[:, 1:]
        mean = (counts[:, None] * rank_means).sum(dim=0) / max(total, 1)
        delta = s.mean - mean
        corrected.append((s.m2.to(torch.float64) + torch.outer(delta, delta) * s.count).flatten())
        means.append(mean)

    flat = torch.cat(corrected)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    for s, total, mean, m2 in zip(stats, totals, means, flat.split([s.dim * s.dim for s in stats])):
        s.count = total
        s.mean.copy_(mean)
        s.m2.copy_(m2.view(s.dim, s.dim))
