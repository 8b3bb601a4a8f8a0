"""Stage 3 of nerve_plugin.eigen: every eigenvalue of a batch of real symmetric tridiagonal matrices, in float64,
by Sturm-count bisection in one Triton kernel.

Why bisection: it needs no eigenvectors, each eigenvalue is found on its own (one lane per eigenvalue, so a batch
of n x n matrices gives B * n parallel lanes), and a Sturm count is backward stable, so every eigenvalue is accurate
to a few eps * ||T||, as with LAPACK's dstebz.

The count. ``count(x)``, the number of eigenvalues below ``x``, is the number of negative pivots of the LDL^T
factorisation of ``T - x I``: ``q_0 = d_0 - x``, ``q_k = (d_k - x) - e_{k-1}^2 / q_{k-1}``. Pivots smaller than
``pivmin`` (the safe minimum times max(1, max e^2), as in dstebz) are replaced by ``-pivmin``, so every e^2 / q stays
finite. Each step is a composition of correctly rounded monotone operations, so the computed count is monotone in
``x`` (Kahan's argument); that is what makes the intervals below trustworthy, and every decision that shrinks an
interval rests on such a count and on nothing else.

The kernel. Grid (B, ceil(n / BLOCK)); program (b, p) finds eigenvalues p * BLOCK ... p * BLOCK + BLOCK - 1 of
matrix b, one lane each, each lane j holding an interval [lo, hi) with count(lo) <= j < count(hi). Each iteration
every lane picks one probe point, all the probes are counted in one pass over the matrix (the loop over k: a few
float64 operations and one reciprocal per step, which is the whole cost), and then every lane learns from every
probe of its program, not only from its own: a probe with count c raises lo of the lanes j >= c and lowers hi of
the lanes j < c. Lanes whose intervals coincide (a cluster, or the start, where all share the Gershgorin interval)
hold consecutive indices, so they split it into equal parts among themselves: g lanes cut it g + 1 ways,
log2(g + 1) bits per iteration instead of one.

Newton. The same pass also yields S(x) = d/dx log|det(T - xI)| = sum_i 1 / (x - lambda_i) (the derivative of the
pivots is a second recurrence), and once a lane's interval holds a single eigenvalue it probes at the Newton point
x - 1 / S instead of splitting: quadratic convergence instead of one bit per iteration, about 15 iterations per
program instead of about 50 on random and covariance-like spectra. (A few lanes in a cluster that extends into
other programs, which split it only slowly, use x - m / S, m the eigenvalues in the interval, which heads for the
cluster.) The Newton point is only a guess of where to probe: it is used only strictly inside the interval and
while its steps at least halve, otherwise the lane splits as above. Newton converges from one side, leaving the
far end of the interval where it was; so once its step is down to the tolerance, or it overshoots past the far end
(the eigenvalue is then just inside that end), the lane probes a little beyond the estimate into the interval,
doubling the distance while that fails, which closes the interval from both sides. After NEWTON_ITERS iterations
every lane only splits, so MAX_ITERS always suffices.

Tolerance: a lane is done when hi - lo <= max(eps * tnorm, 2 eps max(|lo|, |hi|), pivmin), tnorm = max(|lower|,
|upper|) of the Gershgorin interval (dstebz's defaults); the answer is the interval's midpoint. A program stops when
all its lanes are done or after MAX_ITERS iterations: no unbounded loop.

Everything around the kernel is batched torch without host synchronisation or data-dependent Python control flow,
so the whole call can be captured in a CUDA graph: Gershgorin bounds, a power-of-two scaling of every matrix to
norm in [1/2, 1) (exact; it keeps e^2 and pivmin far from under- and overflow), and a final sort (programs do not
see each other's probes, so neighbouring eigenvalues of two programs could come out a tolerance out of order).

On CPU tensors the kernel runs under Triton's interpreter: TRITON_INTERPRET=1 must be set before this module is
imported (tests/conftest.py does that when there is no GPU).
"""

import contextlib
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

EPS = torch.finfo(torch.float64).eps  # 2^-52, LAPACK's dlamch('P')
SAFE_MIN = torch.finfo(torch.float64).tiny  # dlamch('S')
NEWTON_ITERS = 40  # iterations that may probe at Newton points; after that only splits, each halving at least
MAX_ITERS_NEWTON = NEWTON_ITERS + 56  # 53 halvings take any interval in the Gershgorin one to the tolerance
MAX_ITERS_BISECTION = 64
_EPS = tl.constexpr(EPS)  # the kernel's copy


@triton.jit
def _sturm_bisection_kernel(
    diag_ptr,  # (B, n + 1) scaled diagonal, zero-padded at the end (the loop prefetches one step ahead)
    offdiag_sq_ptr,  # (B, n + 1): 0, e_0^2, ..., e_{n-2}^2, 0 (scaled)
    bounds_ptr,  # (B, 4): Gershgorin lower, upper, pivmin, absolute tolerance (scaled)
    out_ptr,  # (B, n): midpoints of the final intervals (scaled)
    probe_ptr,  # (B, num_blocks, BLOCK) float64 scratch: each iteration's probe points, shared within a program
    probe_count_ptr,  # (B, num_blocks, BLOCK) int32 scratch: their counts
    iterations_ptr,  # (B, num_blocks) int32: iterations each program ran (for benchmarks)
    n,
    num_blocks,
    BLOCK: tl.constexpr,
    SHARE_CHUNK: tl.constexpr,
    NEWTON: tl.constexpr,
    NEWTON_ITERS: tl.constexpr,
    MAX_ITERS: tl.constexpr,
):
    matrix = tl.program_id(0)
    block = tl.program_id(1)
    first = block * BLOCK
    last = tl.minimum(first + BLOCK, n)  # one past this program's last eigenvalue index
    lane = tl.arange(0, BLOCK)
    index = first + lane
    valid = index < n
    row_diag = diag_ptr + matrix * (n + 1)
    row_offdiag_sq = offdiag_sq_ptr + matrix * (n + 1)
    lower = tl.load(bounds_ptr + matrix * 4)
    upper = tl.load(bounds_ptr + matrix * 4 + 1)
    pivmin = tl.load(bounds_ptr + matrix * 4 + 2)
    minus_pivmin = -pivmin
    abs_tol = tl.maximum(tl.load(bounds_ptr + matrix * 4 + 3), pivmin)
    scratch = (matrix * num_blocks + block) * BLOCK

    zero = tl.zeros([BLOCK], tl.float64)
    lo = zero + lower
    hi = tl.where(valid, zero + upper, zero + lower)  # padding lanes start (and stay) done
    count_lo = tl.zeros([BLOCK], tl.int32)
    count_hi = tl.zeros([BLOCK], tl.int32) + n
    # Newton state: the estimate from this lane's last probe, its step from that probe, and the probe. lo as
    # estimate and a huge step mean "none": such an estimate is never strictly inside nor at the tolerance.
    newton_point = lo
    newton_step = zero + 1.0e300
    last_probe = lo
    last_newton_step = zero + 1.0e300  # step of the previous Newton probe; huge if that probe was not one
    push = zero + 1.0  # the closing probe's distance in units of 0.4 * tolerance; doubles while it fails

    tol = tl.maximum(abs_tol, 2.0 * _EPS * tl.maximum(tl.abs(lo), tl.abs(hi)))
    active = (hi - lo) > tol
    busy = tl.max(active.to(tl.int32), axis=0)
    iteration = 0
    while (busy > 0) & (iteration < MAX_ITERS):
        width = hi - lo
        # lanes sharing an interval hold consecutive indices [count_lo, count_hi) (counts are monotone), so a
        # lane's rank among the group members in this program places the group's probes evenly
        group_start = tl.maximum(count_lo, first)
        group_size = tl.minimum(count_hi, last) - group_start
        rank = index - group_start
        probe = lo + (rank + 1).to(tl.float64) / (group_size + 1).to(tl.float64) * width
        if NEWTON:
            multiplicity = count_hi - count_lo  # eigenvalues in [lo, hi)
            # Newton for an isolated eigenvalue, and for a group of few lanes in a cluster that extends into other
            # programs (those k-section slowly), where the estimate x - m / S heads for the cluster's centre
            eligible = (multiplicity == 1) | ((group_size <= 4) & (multiplicity > group_size))
            eligible = eligible & (width > 4.0 * tol) & (iteration < NEWTON_ITERS)
            step_size = tl.abs(newton_step)
            inside = (newton_point > lo) & (newton_point < hi)
            use_newton = eligible & inside & (step_size >= 4.0 * tol) & (step_size <= 0.5 * last_newton_step)
            # Newton converges from one side, so the far end of the interval stays put. When its step is down
            # to the tolerance, or it overshot past the far end (the eigenvalue is then just inside that end),
            # probe a little beyond the estimate, into the interval: the interval closes from both sides.
            # The distance doubles while that fails (the estimate is only accurate to a few tolerances).
            overshoot = ((last_probe == lo) & (newton_point >= hi)) | ((last_probe == hi) & (newton_point <= lo))
            miss = tl.where(newton_point <= lo, lo - newton_point, newton_point - hi)
            settled = eligible & ((step_size < 4.0 * tol) | (overshoot & (miss < width)))
            centre = tl.minimum(tl.maximum(newton_point, lo), hi)
            direction = tl.where(inside, tl.where(newton_step > 0.0, 1.0, -1.0), tl.where(centre == lo, 1.0, -1.0))
            distance = tl.maximum(tl.where(inside, 0.0, miss), 0.4 * tol * push)
            closing = centre + direction * distance
            closing = tl.where((closing > lo) & (closing < hi), closing, lo + 0.5 * width)
            probe = tl.where(use_newton, newton_point, tl.where(settled, closing, probe))
            push = tl.where(settled, push * 2.0, 1.0)
            last_newton_step = tl.where(use_newton, step_size, 1.0e300)
        probe = tl.where(active, probe, lo)

        # the pass: counts at every probe (and, for Newton, d/dx log|det(T - probe)| = sum_k q_k' / q_k)
        pivot = zero + 1.0  # q_{-1}; multiplied by e2[0] = 0, so any nonzero value
        count = tl.zeros([BLOCK], tl.int32)
        if NEWTON:
            slope = zero  # q_k'
            log_det_slope = zero
        d_k = tl.load(row_diag)
        e2_k = tl.load(row_offdiag_sq)
        next_diag = row_diag + 1
        next_offdiag_sq = row_offdiag_sq + 1
        for _ in range(n):
            # prefetched so that the loads' latency is off the chain of dependent arithmetic
            d_next = tl.load(next_diag)
            e2_next = tl.load(next_offdiag_sq)
            next_diag += 1
            next_offdiag_sq += 1
            if NEWTON:
                inv = 1.0 / pivot  # one reciprocal serves the pivot and its derivative
                log_det_slope += slope * inv
                ratio = e2_k * inv
                pivot = (d_k - probe) - ratio
                slope = ratio * inv * slope - 1.0
            else:
                pivot = (d_k - probe) - e2_k / pivot
            pivot = tl.where(tl.abs(pivot) < pivmin, minus_pivmin, pivot)
            # (no overflow check: the interpreter would run one per step, and a count cannot overflow)
            count = tl.add(count, (pivot < 0.0).to(tl.int32), sanitize_overflow=False)
            d_k = d_next
            e2_k = e2_next
        if NEWTON:
            log_det_slope += slope / pivot

        # every lane learns from every probe of this program
        tl.store(probe_ptr + scratch + lane, probe)
        tl.store(probe_count_ptr + scratch + lane, count)
        tl.debug_barrier()
        if SHARE_CHUNK == 1:
            # compiled: probe by probe, so that nothing wider than a lane lives in registers (a [BLOCK, chunk]
            # tensor costs the compiler dozens of registers per thread and with them occupancy)
            for other_lane in range(BLOCK):
                other = tl.load(probe_ptr + scratch + other_lane)
                other_count = tl.load(probe_count_ptr + scratch + other_lane)
                raises_lo = (other_count <= index) & (other > lo)  # other <= eigenvalue `index`
                lowers_hi = (other_count > index) & (other < hi)
                lo = tl.where(raises_lo, other, lo)
                count_lo = tl.where(raises_lo, other_count, count_lo)
                hi = tl.where(lowers_hi, other, hi)
                count_hi = tl.where(lowers_hi, other_count, count_hi)
        else:
            # interpreted: the same, a chunk of probes at a time (the interpreter's cost is per operation)
            for start in tl.static_range(0, BLOCK, SHARE_CHUNK):
                chunk = start + tl.arange(0, SHARE_CHUNK)
                other = tl.load(probe_ptr + scratch + chunk)[None, :]
                other_count = tl.load(probe_count_ptr + scratch + chunk)[None, :]
                at_or_below = other_count <= index[:, None]
                lo = tl.maximum(lo, tl.max(tl.where(at_or_below, other, -1.0e300), axis=1))
                count_lo = tl.maximum(count_lo, tl.max(tl.where(at_or_below, other_count, -1), axis=1))
                hi = tl.minimum(hi, tl.min(tl.where(at_or_below, 1.0e300, other), axis=1))
                count_hi = tl.minimum(count_hi, tl.min(tl.where(at_or_below, n + 1, other_count), axis=1))
        tl.debug_barrier()  # nobody overwrites the probes before everyone has read them
        if NEWTON:
            # with the new multiplicity; an exact hit (NaN: a zero pivot) estimates the probe itself
            estimate = probe - (count_hi - count_lo).to(tl.float64) / log_det_slope
            newton_point = tl.where(estimate == estimate, estimate, probe)
            newton_step = newton_point - probe
            last_probe = probe

        iteration += 1
        tol = tl.maximum(abs_tol, 2.0 * _EPS * tl.maximum(tl.abs(lo), tl.abs(hi)))
        active = (hi - lo) > tol
        busy = tl.max(active.to(tl.int32), axis=0)

    tl.store(out_ptr + matrix * n + index, lo + 0.5 * (hi - lo), mask=valid)
    tl.store(iterations_ptr + matrix * num_blocks + block, iteration)


def tridiagonal_eigvalsh(
    d: torch.Tensor, e: torch.Tensor, *, block: int = 64, num_warps: int | None = None, newton: bool = True
) -> torch.Tensor:
    """All eigenvalues, ascending, of the symmetric tridiagonal matrices with diagonals ``d`` (B, n) and
    sub-diagonals ``e`` (B, n - 1), float64, as a (B, n) float64 tensor on their device.

    ``block``: eigenvalues per program (a power of two; one lane each). ``num_warps`` defaults to one lane per
    thread. ``newton=False`` probes only at interval midpoints and group splits (plain bisection, ~3x the
    iterations); the answer is equally accurate either way.
    """
    if d.dim() != 2 or e.dim() != 2 or e.shape != (d.shape[0], max(d.shape[1] - 1, 0)):
        raise ValueError(f"expected d (B, n) and e (B, n - 1), got {tuple(d.shape)} and {tuple(e.shape)}")
    if d.dtype != torch.float64 or e.dtype != torch.float64 or d.device != e.device:
        raise ValueError(
            f"expected float64 tensors on one device, got {d.dtype} on {d.device}, {e.dtype} on {e.device}"
        )
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    if not d.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing "
            "nerve_plugin.eigen.tridiagonal"
        )
    batch, n = d.shape
    if batch == 0 or n == 0:
        return d.clone()
    diag, offdiag_sq, bounds, scale = _scaled_problem(d, e)
    eigenvalues, _ = _launch(diag, offdiag_sq, bounds, n, block=block, num_warps=num_warps, newton=newton)
    return torch.sort(eigenvalues / scale[:, None], dim=1).values


def _scaled_problem(d: torch.Tensor, e: torch.Tensor):
    """The kernel's inputs: every matrix scaled by a power of two to norm in [1/2, 1) (exact, and e^2 and pivmin
    stay far from under- and overflow), padded e^2, and per matrix its widened Gershgorin interval, pivmin and
    absolute tolerance (as dstebz). Batched torch, no host synchronisation."""
    n = d.shape[1]
    abs_e = e.abs()
    radius = F.pad(abs_e, (1, 0)) + F.pad(abs_e, (0, 1))
    lower = (d - radius).amin(dim=1)
    upper = (d + radius).amax(dim=1)
    _, exponent = torch.frexp(torch.maximum(lower.abs(), upper.abs()))
    # a zero matrix has exponent 0 (scale 1); the clamp keeps 2^-exponent finite for subnormal norms
    scale = torch.ldexp(torch.ones_like(lower), -exponent.clamp(min=-1000))
    diag = F.pad(d * scale[:, None], (0, 1))
    scaled_e = e * scale[:, None]
    offdiag_sq = F.pad(scaled_e * scaled_e, (1, 1))
    pivmin = SAFE_MIN * offdiag_sq.amax(dim=1).clamp(min=1.0)
    lower = lower * scale
    upper = upper * scale
    # the widening keeps count(lower) = 0 and count(upper) = n despite the rounding in the counts
    slack = 2.1 * EPS * n * torch.maximum(lower.abs(), upper.abs()) + 4.2 * pivmin
    lower = lower - slack
    upper = upper + slack
    abs_tol = EPS * torch.maximum(lower.abs(), upper.abs())
    bounds = torch.stack([lower, upper, pivmin, abs_tol], dim=1)
    return diag.contiguous(), offdiag_sq.contiguous(), bounds.contiguous(), scale


def _launch(diag, offdiag_sq, bounds, n, *, block=64, num_warps=None, newton=True, share_chunk=None):
    """Runs the kernel on prepared inputs; returns the scaled eigenvalues in index order (ascending within each
    program) and each program's iteration count (B, ceil(n / block)), the latter for benchmarks. ``share_chunk``:
    probes taken at once when lanes learn from each other (1 compiled, the whole block interpreted)."""
    batch = diag.shape[0]
    num_blocks = triton.cdiv(n, block)
    device = diag.device
    out = torch.empty(batch, n, dtype=torch.float64, device=device)
    probes = torch.empty(batch, num_blocks, block, dtype=torch.float64, device=device)
    probe_counts = torch.empty(batch, num_blocks, block, dtype=torch.int32, device=device)
    iterations = torch.empty(batch, num_blocks, dtype=torch.int32, device=device)
    if share_chunk is None:
        share_chunk = 1 if diag.is_cuda else min(block, 64)
    with torch.cuda.device(device) if diag.is_cuda else contextlib.nullcontext():
        _sturm_bisection_kernel[(batch, num_blocks)](
            diag,
            offdiag_sq,
            bounds,
            out,
            probes,
            probe_counts,
            iterations,
            n,
            num_blocks,
            BLOCK=block,
            SHARE_CHUNK=share_chunk,
            NEWTON=newton,
            NEWTON_ITERS=NEWTON_ITERS,
            MAX_ITERS=MAX_ITERS_NEWTON if newton else MAX_ITERS_BISECTION,
            num_warps=num_warps or max(1, block // 32),
        )
    return out, iterations
