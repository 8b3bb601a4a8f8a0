"""Stage 2: symmetric band -> tridiagonal by bulge chasing, many matrices and many sweeps at once.

Sweep ``s`` zeroes column ``s`` below its sub-diagonal with one Householder reflector of length ``b`` acting
on rows ``[s+1, s+1+b)``. Applying it from both sides fills the block below the band (the bulge); the first
column of the bulge is zeroed by the next reflector, ``b`` rows further down, and so on to the end of the
matrix: about ``(n - s) / b`` steps, each a few ``b x b`` tile products. The rest of each bulge is left in
place: it lies in the columns the next sweeps zero, so every sweep starts from a matrix whose column ``s`` has
exactly ``b`` entries below the diagonal (Bischof, Lang & Sun's successive band reduction, one band at a time).

One step is a short chain of dependent reductions on one tile: far too little work for a GPU. What makes it
fast is that sweep ``s + 1`` may run its step ``k`` as soon as sweep ``s`` has finished step ``k + 1`` (the
tiles they touch are disjoint from then on), so a matrix of ``n / b`` steps per sweep keeps up to ~``n / 2b``
sweeps in flight, and all matrices of the batch run side by side. Each program chases one sweep of one
matrix, waiting on the previous sweep's progress counter (acquire/release atomics; tiles are read and written
through L2 only, so no stale L1 line is seen).

Waiting on other programs is safe only if those are running or done. Programs take their (sweep, matrix) from a
ticket counter when they start, sweep-major, so every program waits only on a ticket handed out before its own,
to a program that is already running: progress never depends on how many programs the GPU holds at once or in
which order it starts them (the decoupled look-back of GPU prefix scans rests on the same argument). Every wait
is still bounded: after ``primitives.SPIN_LIMIT`` polls a program flags its matrix, whose result the caller then
discards.
Triton's interpreter (the CPU tests) runs the programs one after another in ticket order, so it runs this very
code and never waits.

Working storage: per matrix ``(n + pad, 2b)`` float64 with ``work[c, d] = A[c + d, c]`` - the lower band and
the ``b`` diagonals below it where bulges live - zero-padded past ``n`` so tiles need no masks (padding rows
stay zero: every reflector is zero there).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .primitives import householder_scalars, wait_until


@triton.jit
def _reflector(x, first):
    """LAPACK larfg on a register vector: (v, tau, beta) with (I - tau v v^T) x = beta e_1 and v[0] = 1."""
    alpha = tl.sum(tl.where(first, x, 0.0), axis=0)
    rest = tl.where(first, 0.0, x)
    beta, tau, scale = householder_scalars(alpha, tl.sum(rest * rest, axis=0))
    return tl.where(first, 1.0, rest / scale), tau, beta


# Sizes are not specialisation keys: the residency probe below compiles with other values than the real launch,
# and must get the same kernel (Triton specialises integers equal to 1 or divisible by 16).
@triton.jit(do_not_specialize=["n", "batch", "matrix_stride"])
def _chase_kernel(
    work_ptr,
    progress_ptr,
    status_ptr,
    ticket_ptr,
    n,
    batch,
    matrix_stride,
    BW: tl.constexpr,
):
    W: tl.constexpr = 2 * BW
    ticket = tl.atomic_add(ticket_ptr, 1)
    sweep = ticket // batch
    matrix = ticket % batch
    work = work_ptr + matrix.to(tl.int64) * matrix_stride
    progress = progress_ptr + matrix.to(tl.int64) * n
    status = status_ptr + matrix

    index = tl.arange(0, BW)
    rows = index[:, None]
    cols = index[None, :]
    first = index == 0
    lower = rows >= cols
    # Tile offsets relative to the tile's first row/column r (the diagonal block's lower triangle, mirrored,
    # and the block below it), in elements of ``work``.
    diagonal_offsets = tl.where(lower, cols * W + (rows - cols), rows * W + (cols - rows))
    below_offsets = cols * W + (BW + rows - cols)

    if sweep < n - 2:
        steps = tl.cdiv(n - 1 - sweep, BW)
        steps_before = tl.cdiv(n - sweep, BW)  # the previous sweep's step count
        if sweep > 0:
            wait_until(progress + sweep - 1, status, tl.minimum(2, steps_before))
        # Column ``sweep`` below the diagonal: b entries, zeroed but for the sub-diagonal.
        column = work + sweep * W + 1
        x = tl.load(column + index, cache_modifier=".cg")
        v, tau, beta = _reflector(x, first)
        tl.store(column + index, tl.where(first, beta, 0.0), cache_modifier=".cg")
        r = sweep + 1
        for step in range(0, steps):
            if (sweep > 0) & (step > 0):
                wait_until(progress + sweep - 1, status, tl.minimum(step + 2, steps_before))
            tile = work + r * W
            # Both sides on the diagonal block: D <- H D H = D - v u^T - u v^T.
            d = tl.load(tile + diagonal_offsets, cache_modifier=".cg")
            w = tau * tl.sum(d * v[None, :], axis=1)
            u = w - (0.5 * tau * tl.sum(v * w, axis=0)) * v
            d = d - v[:, None] * u[None, :] - u[:, None] * v[None, :]
            tl.store(tile + diagonal_offsets, d, mask=lower, cache_modifier=".cg")
            # From the right on the block below (it fills: the bulge), then zero the bulge's first column
            # from the left; the rest of the bulge belongs to the next sweeps' columns.
            e = tl.load(tile + below_offsets, cache_modifier=".cg")
            e = e - tau * tl.sum(e * v[None, :], axis=1)[:, None] * v[None, :]
            x = tl.sum(tl.where(cols == 0, e, 0.0), axis=1)
            v, tau, beta = _reflector(x, first)
            e = e - tau * v[:, None] * tl.sum(e * v[:, None], axis=0)[None, :]
            e = tl.where(cols == 0, tl.where(rows == 0, beta, 0.0), e)
            tl.store(tile + below_offsets, e, cache_modifier=".cg")
            tl.atomic_xchg(progress + sweep, step + 1, sem="release")
            r += BW


def _band_work(band: torch.Tensor, bandwidth: int) -> torch.Tensor:
    """(B, n + pad, 2b) working storage holding ``band`` (B, n, b + 1), zero elsewhere."""
    batch, n, _ = band.shape
    work = torch.zeros(batch, n + 3 * bandwidth + 1, 2 * bandwidth, dtype=torch.float64, device=band.device)
    work[:, :n, : bandwidth + 1] = band
    return work


def band_to_tridiagonal(band: torch.Tensor, num_warps: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Diagonal (B, n), sub-diagonal (B, n - 1) of a tridiagonal matrix orthogonally similar to each lower band
    (B, n, b + 1) (``band[i, c, d] = A[i, c + d, c]``), and a (B,) int32 status: non-zero where a matrix's
    programs stalled (its result is then unusable; the caller falls back). On a CPU tensor it needs
    TRITON_INTERPRET=1 set before this module is imported.
    """
    if band.dtype != torch.float64 or band.dim() != 3:
        raise ValueError(
            f"band_to_tridiagonal expects a (B, n, b + 1) float64 band, got {band.dtype} {tuple(band.shape)}"
        )
    batch, n, width = band.shape
    bandwidth = width - 1
    if bandwidth < 1 or bandwidth & (bandwidth - 1):
        raise ValueError(f"band_to_tridiagonal needs a power-of-two bandwidth, got {bandwidth}")
    status = torch.zeros(batch, dtype=torch.int32, device=band.device)
    if n < 3 or bandwidth == 1:
        d = band[:, :, 0].clone()
        e = band[:, : n - 1, 1].clone() if bandwidth >= 1 else band.new_zeros(batch, max(n - 1, 0))
        return d, e, status
    work = _band_work(band, bandwidth)
    progress = torch.zeros(batch, n, dtype=torch.int32, device=band.device)
    tickets = torch.zeros(1, dtype=torch.int32, device=band.device)
    device_guard = torch.cuda.device(band.device) if band.is_cuda else contextlib.nullcontext()
    with device_guard:
        _chase_kernel[(batch * (n - 2),)](
            work, progress, status, tickets, n, batch, work.stride(0), BW=bandwidth, num_warps=num_warps
        )
    d = work[:, :n, 0].clone()
    e = work[:, : n - 1, 1].clone()
    return d, e, status
