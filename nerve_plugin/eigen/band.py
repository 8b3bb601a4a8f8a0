"""Stage 1 of the batched eigenvalue solver: dense symmetric -> symmetric band of width b, by orthogonal similarity.

Blocked Householder reduction (the scheme of LAPACK's sy2sb), batched over the matrices. For each panel of b
columns [k, k + b), with the rows below the band r0 = k + b .. n - 1 (m = n - r0 of them):

a. a Householder QR of the panel P = A[r0:, k:k+b] gives reflectors H = H_1 ... H_r = I - V T V^T and leaves
   R (upper triangular, inside the band) with exact zeros below it;
b. T (r x r, upper triangular) of the compact WY form comes from T^{-1} = diag(1 / tau) + strict_upper(V^T V);
c. the trailing matrix A22 = A[r0:, r0:] becomes H^T A22 H = A22 - V W^T - W V^T with X = A22 V T,
   M = T^T V^T X and W = X - M V / 2.

Step c holds nearly all the flops and runs as float64 batched matrix products on strided views of the input,
which cuBLAS reads in place (unit column stride, leading dimension n), so no m x m copy is ever made. Symmetry
halves the update: only the lower block columns of A22 (and its diagonal blocks whole) are kept current, and
A22 V T is assembled from them and their transposes (``_block_columns``): about (2/3 + 2/3) n^3 flops a matrix
instead of (2/3 + 4/3) n^3, the rank-2b updates of ``update_group`` panels applied together. Step a is O(n^2 b) but
sequential over columns; on the GPU it is a Triton kernel, because cuSOLVER's geqrf loops over the batch and a
column loop of small torch ops costs about ten launches per column. Two kernels do the same math:
- "triton" (``_householder_column_step``): one launch per column for the whole batch; the launch boundary is the
  synchronisation between the programs of a matrix (~30 us a column on an H200, launch and drain included);
- "persistent" (``_householder_panel_persistent``): one launch per panel; each program keeps its rows of the
  panel in registers for all b columns and the programs of a matrix meet at a barrier (release/acquire atomics
  on a counter, bounded polls) once per column. The waits need every program of the launch resident at once;
  ``_persistent_plan`` sizes the grid for that from the compiled kernel's registers, and falls back to "triton"
  for a panel too tall to fit.
On CPU the panel goes through torch.geqrf instead; the Triton kernels also run there under ``TRITON_INTERPRET=1``
(slowly: the tests only; "persistent" then uses one program per matrix, the interpreter running programs one
after another).

The CUDA path has no host synchronisation and no control flow on tensor values (the solver is captured in a CUDA
graph): every loop runs over panel and column indices, and zero reflectors (tau = 0, H_j = I: an exactly zero
column below the band, common in rank-deficient covariances) are handled with masks, not branches.

Every operation is float64, and each step is a backward-stable orthogonal transformation, so the band's
eigenvalues match the input's to a small multiple of eps * ||A||. One limit LAPACK avoids by rescaling: column
norms are formed from plain sums of squares, so entries must lie within about 1e+-150 (far outside the range of
covariances of activations).
"""

import contextlib
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .primitives import householder_scalars, wait_until

_PANEL_METHODS = ("persistent", "triton", "torch")
# The panel method on CUDA tensors when none is asked for.
_CUDA_DEFAULT_PANEL = "triton"


def panel_starts(n: int, bandwidth: int) -> range:
    """First columns k of the panels that reduce an n x n matrix to bandwidth b: those with at least two rows
    below the band (a single row needs no reflector)."""
    return range(0, max(n - bandwidth - 1, 0), bandwidth)


def reduce_to_band(
    a: Tensor,
    bandwidth: int = 32,
    *,
    panel: str | None = None,
    panel_tiling: tuple[int, int] | None = None,
    status: Tensor | None = None,
    update_group: int = 4,
    update_block: int | None = None,
) -> Tensor:
    """Lower band storage (B, n, bandwidth + 1) of a matrix orthogonally similar to each symmetric a[i].

    a: (B, n, n) float64, contiguous, symmetric; only its lower triangle is read. It is the workspace and is
    overwritten (the caller passes a fresh copy): afterwards its lower triangle holds the band and zeros below it,
    its strict upper triangle is garbage.
    Returns ``band`` with ``band[i, c, d] = T[i, c + d, c]`` for the band matrix T (zero where c + d >= n).
    panel: "persistent" (one launch per panel), "triton" (one launch per column; the default on CUDA) or "torch"
    (torch.geqrf; the default on CPU) for the panel QRs; the Triton ones on a CPU tensor need TRITON_INTERPRET=1
    set before this module is imported.
    panel_tiling: for "triton", (rows per chunk, chunks per program); for "persistent", (rows per program,
    warps per program); None picks them from the shape and the device (tests pass small values to exercise the
    reduction across programs).
    status: optional (B,) int32 tensor on a's device; the "persistent" panels OR 1 into the entry of every
    matrix whose programs stalled at a barrier (that matrix's band is then unusable; the caller falls back).
    The other methods cannot stall and leave it as it is.
    update_group: panels whose two-sided updates are applied to the trailing matrix together (1: after every
    panel). The trailing matrix is the one large operand, so applying ``g`` panels' updates in one product of
    inner dimension 2 g b reads and writes it once per g panels instead of once per panel; in between, each
    panel's columns and its product with the trailing matrix are corrected by the pending updates (products with
    the thin V and W only).
    update_block: the block columns of the symmetric trailing matrix (``_block_columns``): only the lower ones
    are updated and read. None: 512 columns below n = 8192, 1024 from there (fewer, larger products); n or more:
    the whole square, both triangles.
    """
    if a.dim() != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"expected a batch of square matrices (B, n, n), got shape {tuple(a.shape)}")
    if a.dtype != torch.float64:
        raise ValueError(f"expected float64, got {a.dtype}")
    if not a.is_contiguous():
        raise ValueError("a must be contiguous: it is the workspace, updated in place through strided views")
    if bandwidth < 1:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    if update_group < 1:
        raise ValueError(f"update_group must be >= 1, got {update_group}")
    if update_block is not None and update_block < 1:
        raise ValueError(f"update_block must be >= 1, got {update_block}")
    method = panel or (_CUDA_DEFAULT_PANEL if a.is_cuda else "torch")
    if method not in _PANEL_METHODS:
        raise ValueError(f"panel must be one of {_PANEL_METHODS}, got {panel!r}")
    batch, n = a.shape[0], a.shape[-1]
    if status is not None and (status.shape != (batch,) or status.dtype != torch.int32 or status.device != a.device):
        raise ValueError(f"status must be a ({batch},) int32 tensor on {a.device}")
    starts = panel_starts(n, bandwidth)
    # Triton launches on the current CUDA device, which need not be a's.
    device_guard = torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext()
    with device_guard:
        sync = None
        if method == "persistent" and len(starts):
            # Row 0: the stall flags; row 1 + i: the barrier counters of panel i. One memset for the whole stage.
            sync = torch.zeros(1 + len(starts), batch, dtype=torch.int32, device=a.device)
        block = update_block or _default_update_block(n, a.device)
        _mirror_diagonal_blocks_(a, block)
        pending = _PendingUpdates(a, update_group, bandwidth)
        waiting = 0
        for i, k in enumerate(starts):
            r0 = k + bandwidth
            pending.make_current(a[:, k:, k:r0], k)
            v, tau = householder_panel(
                a[:, r0:, k:r0], method=method, tiling=panel_tiling,
                counters=None if sync is None else sync[1 + i], flags=None if sync is None else sync[0],
            )  # fmt: skip
            pending.add(v, _two_sided_factor(a, v, tau, pending, r0, block), r0)
            waiting += 1
            if waiting == update_group or i == len(starts) - 1:
                pending.apply(a, r0, block)
                waiting = 0
        if status is not None and sync is not None:
            status.bitwise_or_(sync[0])
        return _lower_band(a, bandwidth)


def _default_update_block(n: int, device: torch.device) -> int:
    if device.type != "cuda":
        return max(8, n // 4)  # the tests' small matrices still cross several blocks
    return 512 if n < 8192 else 1024


def householder_panel(
    panel: Tensor,
    *,
    method: str = "triton",
    tiling: tuple[int, int] | None = None,
    counters: Tensor | None = None,
    flags: Tensor | None = None,
):
    """Householder QR of a batch of panels (B, m, w), in place: R in the upper triangle, exact zeros below it.

    Returns (v, tau): v (B, m, r) unit lower trapezoidal (possibly a strided view) and tau (B, r) with
    H_1 ... H_r = Q, H_j = I - tau_j v_j v_j^T (LAPACK's conventions: tau in [1, 2], or 0 for H_j = I). A column
    of v whose tau is 0 is all zeros (not e_j), so the compact WY identity needs no division by tau there.
    counters, flags ("persistent" only): (B,) int32 tensors, the counters zero (used once: one per panel), the
    flags set to 1 where a matrix's programs stalled; None allocates them (the flags are then not seen).
    Exposed so the benchmark can time the panels alone.
    """
    if method == "torch":
        return _householder_panel_torch(panel)
    if method == "triton":
        return _householder_panel_triton(panel, tiling)
    if method == "persistent":
        return _householder_panel_persistent(panel, tiling, counters, flags)
    raise ValueError(f"method must be one of {_PANEL_METHODS}, got {method!r}")


# -- the panel QR --------------------------------------------------------------------------------------------------


def _householder_panel_torch(panel: Tensor):
    m = panel.shape[1]
    qr, tau = torch.geqrf(panel)
    reflectors = tau.shape[-1]  # min(m, w); when m <= w the last one has nothing below its pivot: tau = 0
    panel.copy_(qr.triu())
    unit = torch.eye(m, reflectors, dtype=panel.dtype, device=panel.device)
    v = (qr[:, :, :reflectors].tril(-1) + unit) * (tau != 0).unsqueeze(1)
    return v, tau


def _householder_panel_triton(panel: Tensor, tiling: tuple[int, int] | None):
    batch, m, width = panel.shape
    reflectors = min(width, m - 1)  # a pivot on the last row has nothing below it to annihilate
    block_cols = triton.next_power_of_2(width)
    block_rows, chunks = tiling or _default_tiling(batch, m, block_cols, panel.device)
    if block_rows < 1 or block_rows & (block_rows - 1) or chunks < 1:
        raise ValueError(f"tiling needs a power-of-two row count and at least one chunk, got {tiling}")
    num_blocks = triton.cdiv(m, block_rows * chunks)
    # V^T, so that column j of V is one contiguous row the kernel writes in one coalesced store; the products in
    # the trailing update read the transposed view in place.
    vt = panel.new_empty(batch, reflectors, m)
    tau = panel.new_empty(batch, reflectors)
    # Ping-pong buffers (launch j reads slot j % 2, writes the other): per-program partial dot products of the
    # next pivot column with every column, and the next pivot row as it stands before its reflector.
    dots = panel.new_empty(2, batch, num_blocks, block_cols)
    pivot_rows = panel.new_empty(2, batch, block_cols)
    launch = _householder_column_step[(batch, num_blocks)]
    for j in range(-1, reflectors):  # j = -1 only prepares column 0
        launch(
            panel, panel.stride(0), panel.stride(1), panel.stride(2),
            vt, vt.stride(0), vt.stride(1),
            tau, tau.stride(0),
            dots, pivot_rows,
            batch, m, width, num_blocks, chunks, j,
            APPLY=j >= 0, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
            BLOCK_REDUCE=max(1, 2048 // block_cols),
            num_warps=4, enable_fp_fusion=True,  # FMAs: as accurate, and not left to Triton's changing default
        )  # fmt: skip
    return vt.mT, tau


def _default_tiling(batch: int, m: int, block_cols: int, device: torch.device) -> tuple[int, int]:
    # About 2048 float64 per program held in registers (16 per thread with 4 warps).
    block_rows = max(16, min(256, 2048 // block_cols))
    if device.type != "cuda":
        # The interpreter runs programs one after another in Python: one program per matrix is fastest.
        block_rows = min(256, triton.next_power_of_2(m))
        return block_rows, triton.cdiv(m, block_rows)
    # At least ~4 programs per SM (two waves at the ~195 registers a thread of the b = 32 kernel takes), more
    # chunks per program beyond that: every program re-reads all partial dot products of its matrix, traffic that
    # grows with the square of the programs per matrix, hence also at most 256 programs per matrix.
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    blocks = triton.cdiv(m, block_rows)
    return block_rows, max(1, (batch * blocks) // (4 * sms), triton.cdiv(blocks, 256))


# Per-panel sizes and strides are runtime values, not specialisation keys: two compiled variants per bandwidth.
@triton.jit(
    do_not_specialize=["stride_vb", "stride_vr", "stride_tb", "num_rows", "num_blocks", "chunks_per_program", "j"]
)
def _householder_column_step(
    panel_ptr, stride_pb, stride_pr, stride_pc,
    vt_ptr, stride_vb, stride_vr,
    tau_ptr, stride_tb,
    dots_ptr, pivot_ptr,
    batch, num_rows, num_cols, num_blocks, chunks_per_program, j,
    APPLY: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_REDUCE: tl.constexpr,
):  # fmt: skip
    """One column of the panel QR for the whole batch: grid (B, num_blocks), each program owns
    chunks_per_program consecutive chunks of BLOCK_ROWS rows of one panel, all columns of a chunk in registers.

    (i) APPLY: finish reflector j from the previous launch's results. Every program sums the partial dot
        products s_k = sum over rows > j of P[row, j] P[row, k] in the same order (identical results everywhere,
        deterministic, no atomics) and reads the pivot row P[j, :] from a buffer (its owner overwrites it in the
        panel during this launch). Then alpha = P[j, j], beta = -sign(alpha) sqrt(alpha^2 + s_j),
        tau = (beta - alpha) / beta, v = P[j+1:, j] / (alpha - beta) with v[j] = 1, and
        w_k = v^T P[:, k] = P[j, k] + s_k / (alpha - beta): no second pass over the rows. Each program updates
        P[:, k] -= tau v w_k on its rows for k > j, sets column j to (beta, 0, ...) and writes v to V^T.
        s_j = 0 gives tau = 0 and v = 0 (H_j = I) without dividing by zero.
    (ii) For column j + 1 (as just updated): write this program's partial dot products with every column over its
        rows below the pivot j + 1 (so the norm needs no cancelling subtraction) and, from the program owning
        row j + 1, that row. Only columns >= j are loaded or stored: the ones left of j are final.
    """
    batch_index = tl.program_id(0).to(tl.int64)
    program = tl.program_id(1)
    cols = tl.arange(0, BLOCK_COLS)
    live_cols = (cols < num_cols) & (cols >= j)
    panel_base = panel_ptr + batch_index * stride_pb
    next_col = j + 1
    write_slot = next_col % 2

    tau = 0.0
    coef = tl.zeros([BLOCK_COLS], dtype=tl.float64)
    if APPLY:
        read_slot = j % 2
        dots_base = dots_ptr + (read_slot * batch + batch_index) * num_blocks * BLOCK_COLS
        dots_sum = tl.zeros([BLOCK_COLS], dtype=tl.float64)
        for start in range(0, num_blocks, BLOCK_REDUCE):
            blocks = start + tl.arange(0, BLOCK_REDUCE)
            partial_dots = tl.load(
                dots_base + blocks[:, None] * BLOCK_COLS + cols[None, :],
                mask=(blocks[:, None] < num_blocks) & live_cols[None, :],
                other=0.0,
            )
            dots_sum += tl.sum(partial_dots, axis=0)
        pivot_base = pivot_ptr + (read_slot * batch + batch_index) * BLOCK_COLS
        pivot_row = tl.load(pivot_base + cols, mask=live_cols, other=0.0)
        alpha = tl.load(pivot_base + j)
        below_norm2 = tl.sum(tl.where(cols == j, dots_sum, 0.0), axis=0)
        diag_value, tau, denom = householder_scalars(alpha, below_norm2)
        w = pivot_row + dots_sum / denom
        coef = tl.where(cols > j, tau * w, 0.0)
        if program == 0:
            tl.store(tau_ptr + batch_index * stride_tb + j, tau)

    next_partial = tl.zeros([BLOCK_COLS], dtype=tl.float64)
    for chunk in range(chunks_per_program):
        chunk_start = (program * chunks_per_program + chunk) * BLOCK_ROWS
        rows = chunk_start + tl.arange(0, BLOCK_ROWS)
        live_rows = rows < num_rows
        ptrs = panel_base + rows[:, None].to(tl.int64) * stride_pr + cols[None, :] * stride_pc
        live = live_rows[:, None] & live_cols[None, :]
        block = tl.load(ptrs, mask=live, other=0.0)
        if APPLY:
            col_j = tl.sum(tl.where(cols[None, :] == j, block, 0.0), axis=1)
            v = tl.where(rows > j, col_j / denom, tl.where(rows == j, 1.0, 0.0))
            v = tl.where(tau != 0.0, v, 0.0)
            block -= v[:, None] * coef[None, :]
            new_col_j = tl.where(rows == j, diag_value, tl.where(rows > j, 0.0, col_j))
            block = tl.where(cols[None, :] == j, new_col_j[:, None], block)
            tl.store(ptrs, block, mask=live)
            tl.store(vt_ptr + batch_index * stride_vb + j * stride_vr + rows, v, mask=live_rows)
        col_next = tl.sum(tl.where(cols[None, :] == next_col, block, 0.0), axis=1)
        col_next = tl.where(rows > next_col, col_next, 0.0)
        next_partial += tl.sum(block * col_next[:, None], axis=0)
        if (next_col >= chunk_start) & (next_col < chunk_start + BLOCK_ROWS):
            pivot_values = tl.sum(tl.where(rows[:, None] == next_col, block, 0.0), axis=0)
            tl.store(pivot_ptr + (write_slot * batch + batch_index) * BLOCK_COLS + cols, pivot_values)
    dots_out = dots_ptr + ((write_slot * batch + batch_index) * num_blocks + program) * BLOCK_COLS
    tl.store(dots_out + cols, next_partial)


# -- the persistent panel QR: one launch per panel ---------------------------------------------------------------
#
# Program p of matrix i holds rows [p R, (p + 1) R) of the panel (R = BLOCK_ROWS) and all its BLOCK_COLS columns
# in registers from the start of the panel to its end, and runs the column loop of ``_householder_column_step``
# on them; the launch boundary between two columns becomes a barrier of the matrix's P programs.
#
# RESIDENCY ASSUMPTION: a barrier only ends if every program of the matrix runs, so all programs of a launch must
# be resident on the GPU at once. ``_persistent_plan`` makes B_launch * P <= (SMs) x (programs one SM holds, from
# the compiled kernel's registers, shared memory and warps), launching the batch in chunks of matrices if needed.
# That assumes the whole GPU is ours while the launch runs: the grid's programs are not held back by work that
# never finishes (another kernel of this process or another spinning on its own barriers, as an MPS client
# limited to part of the SMs or a green context would be), and multi_processor_count is the SMs we may use.
# Other kernels that finish delay the waits, they do not deadlock them. If the assumption fails anyway, every
# wait gives up after primitives.SPIN_LIMIT polls and flags its matrix (the result is then garbage; the caller falls
# back), and the later waits of a flagged matrix return at once.

# Tilings the automatic plan tries, in order of preference, as (doubles per thread of the register slab, warps):
# BLOCK_ROWS x BLOCK_COLS = doubles x 32 x warps. Compiled for sm_90 (Triton 3.9, b = 32) the kernel takes about
# 210 registers a thread at 32 doubles and 254 at 64 (no spills): either way 2 programs of 4 warps per SM, so the
# 64-double slab holds twice the rows per SM and is chosen whenever the smaller one needs more launches.
_SLAB_TILINGS = ((32, 4), (64, 4), (32, 8), (64, 8))
# At most this many rows of the slab per thread (the per-row vectors are replicated over the lanes that share a
# row: small bandwidths would otherwise get thousands of rows a program).
_SLAB_ROWS_PER_THREAD = 8


def _persistent_block_reduce(block_cols: int, num_warps: int) -> int:
    # Partial dot products summed per step of the reduction: about 8 float64 per thread of transient registers.
    return max(1, 8 * 32 * num_warps // block_cols)


def _householder_panel_persistent(panel: Tensor, tiling, counters: Tensor | None, flags: Tensor | None):
    batch, m, width = panel.shape
    reflectors = min(width, m - 1)
    block_cols = triton.next_power_of_2(width)
    # Triton types an integer argument of 2^31 or more as int64: a different kernel, probed as such.
    wide = panel.stride(0) >= 2**31
    plan = _persistent_plan(batch, m, block_cols, panel.device, tiling, wide)
    if plan is None:  # one matrix's panel needs more programs than the GPU holds at once
        return _householder_panel_triton(panel, None)
    block_rows, num_warps, programs, per_launch = plan
    if counters is None:
        counters = torch.zeros(batch, dtype=torch.int32, device=panel.device)
    if flags is None:
        flags = torch.zeros(batch, dtype=torch.int32, device=panel.device)
    # V^T, as in "triton": rows of V written in coalesced stores, read transposed in place by the update.
    vt = panel.new_empty(batch, reflectors, m)
    tau = panel.new_empty(batch, reflectors)
    # Ping-pong slots (column j uses slot j % 2): per-program partial dot products, and the pivot row.
    dots = panel.new_empty(batch, 2, programs, block_cols)
    pivot_rows = panel.new_empty(batch, 2, block_cols)
    for lo in range(0, batch, per_launch):  # each launch's grid is resident at once (see _persistent_plan)
        _launch_persistent(
            (min(per_launch, batch - lo), programs), panel, vt, tau, dots, pivot_rows, counters, flags, lo,
            programs, block_rows, num_warps,
        )  # fmt: skip
    return vt.mT, tau


def _launch_persistent(grid, panel, vt, tau, dots, pivot_rows, counters, flags, matrix_offset, programs,
                       block_rows, num_warps, batch_stride=None):  # fmt: skip
    """The one launch site of the persistent kernel, shared by the residency probe: same constexprs, same
    compiled kernel. Returns the compiled kernel."""
    _, m, width = panel.shape
    block_cols = triton.next_power_of_2(width)
    return _householder_panel_persistent_kernel[grid](
        panel, panel.stride(0) if batch_stride is None else batch_stride, panel.stride(1), panel.stride(2),
        vt, vt.stride(0), vt.stride(1),
        tau, tau.stride(0),
        dots, pivot_rows, counters, flags,
        matrix_offset, m, width, vt.shape[1], programs,
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
        BLOCK_REDUCE=_persistent_block_reduce(block_cols, num_warps),
        num_warps=num_warps,
        num_stages=1,  # no software pipelining: it would stage the shared buffers' loads through cp.async
        enable_fp_fusion=True,
    )  # fmt: skip


def _persistent_plan(batch: int, m: int, block_cols: int, device: torch.device, tiling, wide: bool = False):
    """(rows per program, warps, programs per matrix, matrices per launch) for panels (batch, m, <= block_cols),
    or None if one matrix does not fit on the GPU at once. Decided from shapes and the device only (no data), so
    the same panels always get the same launches, as a CUDA graph needs."""
    if tiling is not None:
        rows, warps = tiling
        if rows < 1 or rows & (rows - 1) or warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"persistent tiling needs a power-of-two row count and 1-16 warps, got {tiling}")
    if device.type != "cuda":
        # Triton's interpreter runs the programs one after another: a barrier between two programs of a matrix
        # would never end, so one program per matrix, whose barriers its own arrival satisfies.
        rows, warps = tiling or (triton.next_power_of_2(m), 4)
        if rows < m:
            raise ValueError(f"on CPU the persistent panel has one program per matrix: {rows} rows < m = {m}")
        return rows, warps, 1, batch
    if tiling is not None:
        candidates = [tuple(tiling)]
    else:
        group = min(8, block_cols)  # the kernel's column group: 8 rows of lanes per 4 column lanes (see there)
        row_lanes = 32 // max(1, group // 2)
        candidates = [
            (max(1, min(doubles * 32 * warps // block_cols, _SLAB_ROWS_PER_THREAD * row_lanes * warps)), warps)
            for doubles, warps in _SLAB_TILINGS
        ]
    best = None
    for rows, warps in dict.fromkeys(candidates):
        programs = triton.cdiv(m, rows)
        resident, spills = _resident_persistent_programs(device, rows, block_cols, warps, wide)
        per_launch = min(batch, resident // programs)
        if per_launch < 1:
            continue
        waves = triton.cdiv(batch, per_launch)
        key = (waves, spills > 0)
        if best is None or key < best[0]:
            best = (key, rows, warps, programs, triton.cdiv(batch, waves))  # balanced launches
        if key == (1, False):
            break
    return None if best is None else best[1:]


@functools.lru_cache(maxsize=None)
def _resident_persistent_programs(
    device: torch.device, block_rows: int, block_cols: int, num_warps: int, wide: bool = False
) -> tuple[int, int]:
    """Programs of the persistent kernel (this tiling) that ``device`` holds at once, from the compiled kernel's
    registers and shared memory, and the kernel's register spills. Compiles it on first use, by a launch on a
    2-row dummy panel: every size and stride argument is do_not_specialize (and the pointers that can be views do
    not specialise on alignment), so the probe gets the kernel the real launches get (Triton specialises integers
    equal to 1 or divisible by 16, and pointers on 16-byte alignment); ``wide``: the batch stride is 2^31 or more,
    an int64 argument (the probe's single matrix never multiplies it)."""
    properties = torch.cuda.get_device_properties(device)
    registers, shared, spills = 255, 0, 0  # the worst case, if the compiled kernel does not say
    try:
        with torch.cuda.device(device):
            compiled = _probe_persistent(device, block_rows, block_cols, num_warps, wide)
        registers = int(getattr(compiled, "n_regs", 0) or 0) or registers
        spills = int(getattr(compiled, "n_spills", 0) or 0)
        metadata = getattr(compiled, "metadata", None)
        shared = int(getattr(metadata, "shared", 0) or 0)
    except Exception:  # the counts are an optimisation; the worst case is safe
        pass
    warp_registers = -(-registers * 32 // 256) * 256  # allocated per warp in units of 256
    by_registers = getattr(properties, "regs_per_multiprocessor", 65536) // (warp_registers * num_warps)
    by_warps = (properties.max_threads_per_multi_processor // 32) // num_warps
    # 1 KiB of shared memory per block is reserved by the driver (Ampere and later)
    by_shared = properties.shared_memory_per_multiprocessor // (shared + 1024)
    per_sm = max(0, min(by_registers, by_warps, by_shared, 32))  # at most 32 blocks per SM
    return properties.multi_processor_count * per_sm, spills


def _probe_persistent(device: torch.device, block_rows: int, block_cols: int, num_warps: int, wide: bool):
    """Launch the persistent kernel on a dummy panel of 2 rows, one program (its barriers need no one else)."""
    probe = torch.zeros(1, 2, block_cols, dtype=torch.float64, device=device)
    sync = torch.zeros(2, 1, dtype=torch.int32, device=device)
    return _launch_persistent(
        (1, 1), probe, probe.new_zeros(1, 1, 2), probe.new_zeros(1, 1), probe.new_zeros(1, 2, 1, block_cols),
        probe.new_zeros(1, 2, block_cols), sync[0], sync[1], 0, 1, block_rows, num_warps,
        batch_stride=2**31 if wide else None,
    )  # fmt: skip


@triton.jit
def _arrive_and_wait(counter_ptr, flag_ptr, need):
    """Barrier of the programs of one matrix: count this program in, wait for ``need`` arrivals (bounded)."""
    # Every thread's stores (the partial dot products, the pivot row) come before the release below.
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release")
    wait_until(counter_ptr, flag_ptr, need)
    tl.debug_barrier()  # no thread reads the shared buffers before the wait is over


@triton.jit
def _row_vector(x):
    """(rows,) -> (1, rows, 1), undoing sum over axis 0 then axis 1 of a slab (so no layout conversion)."""
    return tl.expand_dims(tl.expand_dims(x, 1), 0)


# Sizes and strides are runtime values, not specialisation keys, and the pointers that may be views of the
# workspace (or rows of a shared buffer) do not specialise on alignment: see _resident_persistent_programs.
@triton.jit(
    do_not_specialize=[
        "stride_pb", "stride_pr", "stride_vb", "stride_vr", "stride_tb",
        "matrix_offset", "num_rows", "num_cols", "reflectors", "num_programs",
    ],
    do_not_specialize_on_alignment=["panel_ptr", "counter_ptr", "flag_ptr"],
)  # fmt: skip
def _householder_panel_persistent_kernel(
    panel_ptr, stride_pb, stride_pr, stride_pc,
    vt_ptr, stride_vb, stride_vr,
    tau_ptr, stride_tb,
    dots_ptr, pivot_ptr, counter_ptr, flag_ptr,
    matrix_offset, num_rows, num_cols, reflectors, num_programs,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_REDUCE: tl.constexpr,
):  # fmt: skip
    """The whole panel QR of matrix matrix_offset + program_id(0) by num_programs programs (program_id(1)), each
    holding BLOCK_ROWS rows of the panel in registers. For each column j, the math of _householder_column_step:
    (ii) each program writes its partial dot products s_k = sum over its rows > j of P[row, j] P[row, k] to slot
    j % 2, and the owner of row j writes that row; barrier; (i) every program sums all partials in the same order
    (identical results everywhere, no atomics on data), forms alpha, beta, tau and w_k = P[j, k] + s_k /
    (alpha - beta), and applies the reflector to its slab; program 0 writes tau, each program its rows of v.
    Slot j % 2 is next written at column j + 2, after barrier j + 1, by which time every program has read it.
    The slab is stored back once, at the end.

    The slab is a (GROUPS, BLOCK_ROWS, GROUP) tensor, column c = GROUPS-index * GROUP + GROUP-index, GROUP = 8
    contiguous columns: Triton then spreads the rows over 8 lanes and 4 x 2 columns over the other 4, so a thread
    holds a few rows of every group (per-row vectors cost a few registers, not 16 as with a plain (rows, 32)
    tile, whose layout puts 16 lanes on the columns), and both reductions (over columns for the pivot column,
    over rows for the dot products) are short: in-thread adds, then 2 or 3 shuffle steps.
    """
    GROUP: tl.constexpr = 8 if BLOCK_COLS > 8 else BLOCK_COLS
    GROUPS: tl.constexpr = BLOCK_COLS // GROUP
    matrix = matrix_offset + tl.program_id(0)
    matrix64 = matrix.to(tl.int64)
    program = tl.program_id(1)
    cols2 = tl.arange(0, GROUPS)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # (GROUPS, GROUP) column index
    cols3 = cols2[:, None, :]
    row_start = program * BLOCK_ROWS
    rows = row_start + tl.arange(0, BLOCK_ROWS)
    rows3 = rows[None, :, None]
    live_rows = rows < num_rows
    slab_base = panel_ptr + matrix64 * stride_pb + row_start.to(tl.int64) * stride_pr
    local3 = tl.arange(0, BLOCK_ROWS)[None, :, None]
    block = tl.load(
        slab_base + local3 * stride_pr + cols3 * stride_pc,
        mask=(rows3 < num_rows) & (cols3 < num_cols),
        other=0.0,
    )
    vt_base = vt_ptr + matrix64 * stride_vb
    dots_base = dots_ptr + matrix64 * (2 * num_programs * BLOCK_COLS)
    pivot_base = pivot_ptr + matrix64 * (2 * BLOCK_COLS)
    counter = counter_ptr + matrix
    flag = flag_ptr + matrix

    for j in range(0, reflectors):
        slot = j % 2
        # (ii) this program's share of column j's dot products, and the pivot row from its owner
        col_j = tl.sum(tl.sum(tl.where(cols3 == j, block, 0.0), axis=0), axis=1)
        below = tl.where(rows > j, col_j, 0.0)
        partial = tl.sum(block * _row_vector(below), axis=1)
        slot_dots = dots_base + slot * num_programs * BLOCK_COLS
        tl.store(slot_dots + program * BLOCK_COLS + cols2, partial, cache_modifier=".cg")
        slot_pivot = pivot_base + slot * BLOCK_COLS
        if (j >= row_start) & (j < row_start + BLOCK_ROWS):
            pivot_values = tl.sum(tl.where(rows3 == j, block, 0.0), axis=1)
            tl.store(slot_pivot + cols2, pivot_values, cache_modifier=".cg")
        _arrive_and_wait(counter, flag, (j + 1) * num_programs)

        # (i) reflector j, from every program's partials (read through L2: other SMs wrote them)
        dots_sum = tl.zeros([GROUPS, GROUP], dtype=tl.float64)
        for start in range(0, num_programs, BLOCK_REDUCE):
            others = (start + tl.arange(0, BLOCK_REDUCE))[None, :, None]
            partial_dots = tl.load(
                slot_dots + others * BLOCK_COLS + cols3,
                mask=(others < num_programs) & (cols3 < BLOCK_COLS),
                other=0.0,
                cache_modifier=".cg",
            )
            dots_sum += tl.sum(partial_dots, axis=1)
        pivot_row = tl.load(slot_pivot + cols2, cache_modifier=".cg")
        alpha = tl.sum(tl.sum(tl.where(cols2 == j, pivot_row, 0.0), axis=1), axis=0)
        below_norm2 = tl.sum(tl.sum(tl.where(cols2 == j, dots_sum, 0.0), axis=1), axis=0)
        diag_value, tau, denom = householder_scalars(alpha, below_norm2)
        w = pivot_row + dots_sum / denom
        coef = tl.where(cols2 > j, tau * w, 0.0)
        if program == 0:
            tl.store(tau_ptr + matrix64 * stride_tb + j, tau)
        v = tl.where(rows > j, col_j / denom, tl.where(rows == j, 1.0, 0.0))
        v = tl.where(tau != 0.0, v, 0.0)
        block -= _row_vector(v) * coef[:, None, :]
        new_col_j = tl.where(rows == j, diag_value, tl.where(rows > j, 0.0, col_j))
        block = tl.where(cols3 == j, _row_vector(new_col_j), block)
        tl.store(vt_base + j * stride_vr + rows, v, mask=live_rows)
    tl.store(
        slab_base + local3 * stride_pr + cols3 * stride_pc,
        block,
        mask=(rows3 < num_rows) & (cols3 < num_cols),
    )


# -- the trailing update and the storage helpers --------------------------------------------------------------


class _PendingUpdates:
    """The (V, W) of panels whose update A <- A - V W^T - W V^T has not reached the trailing matrix yet.

    Kept in two preallocated buffers over the matrix's absolute rows, L = [V_1 W_1 V_2 W_2 ...] and
    R = [W_1 V_1 W_2 V_2 ...] (zero above each panel's own first row), so that every use is one product of
    L with R on views, with no concatenation: V W^T + W V^T = L R^T, and the correction of a product with the
    stale trailing matrix, V (W^T Y) + W (V^T Y) = L (R^T Y)."""

    def __init__(self, like: Tensor, group: int, bandwidth: int):
        batch, n, _ = like.shape
        self.left = like.new_zeros(batch, n, 2 * group * bandwidth)
        self.right = like.new_zeros(batch, n, 2 * group * bandwidth)
        self.columns = 0  # live columns of both buffers: 2 x the pending panels' reflectors
        self.first_row = 0

    def live(self, row: int) -> tuple[Tensor, Tensor]:
        """L and R over the rows from ``row`` on, their live columns."""
        return self.left[:, row:, : self.columns], self.right[:, row:, : self.columns]

    def make_current(self, columns: Tensor, row: int) -> None:
        """Apply the pending updates to ``columns`` = A[:, row:, row:row + b] (the next panel and its diagonal
        block), in place."""
        if self.columns:
            left, right = self.live(row)
            columns.baddbmm_(left, right[:, : columns.shape[-1]].mT, alpha=-1.0)

    def corrected_product(self, x: Tensor, vt: Tensor, row: int) -> Tensor:
        """x = A_stale[row:, row:] @ vt, corrected to the current trailing matrix's product."""
        if self.columns:
            left, right = self.live(row)
            x.baddbmm_(left, torch.bmm(right.mT, vt), alpha=-1.0)
        return x

    def add(self, v: Tensor, w: Tensor, row: int) -> None:
        if not self.columns:
            self.first_row = row
        r = v.shape[-1]
        c = self.columns
        # Rows between the group's first row and this panel's are zero in V and W: clear what an earlier group
        # left there.
        if row > self.first_row:
            self.left[:, self.first_row : row, c : c + 2 * r].zero_()
            self.right[:, self.first_row : row, c : c + 2 * r].zero_()
        self.left[:, row:, c : c + r].copy_(v)
        self.left[:, row:, c + r : c + 2 * r].copy_(w)
        self.right[:, row:, c : c + r].copy_(w)
        self.right[:, row:, c + r : c + 2 * r].copy_(v)
        self.columns = c + 2 * r

    def apply(self, a: Tensor, row: int, block: int) -> None:
        """A[row:, row:] -= L R^T for every pending panel, as products of inner dimension 2 x their reflectors,
        on the lower block columns only (see ``_block_columns``), then forget them."""
        left, right = self.live(row)
        for c0, c1 in _block_columns(a.shape[-1], row, block):
            a[:, c0:, c0:c1].baddbmm_(left[:, c0 - row :], right[:, c0 - row : c1 - row].mT, alpha=-1.0)
        self.columns = 0


def _block_columns(n: int, row: int, block: int) -> list[tuple[int, int]]:
    """The block columns [c0, c1) of the trailing matrix A[row:, row:] on the absolute grid of ``block`` columns.

    Symmetry halves the trailing matrix's work: only each block column from its diagonal block down is updated
    (the diagonal blocks whole, both triangles), and products with the symmetric matrix are assembled from those
    blocks and their transposes. The grid is absolute (multiples of ``block``) so that a later, smaller trailing
    matrix's diagonal blocks lie inside earlier ones, whose both triangles the updates kept current."""
    if block >= n:
        return [(row, n)]
    return [(max(start, row), min(start + block, n)) for start in range((row // block) * block, n, block)]


def _symmetric_product(a: Tensor, row: int, vt: Tensor, block: int) -> Tensor:
    """A[row:, row:] @ vt for the symmetric trailing matrix, reading only its lower block columns (and whole
    diagonal blocks) in place: strided views with unit column stride, which cuBLAS reads without copies."""
    columns = _block_columns(a.shape[-1], row, block)
    if len(columns) == 1:
        return torch.bmm(a[:, row:, row:], vt)
    x = torch.zeros_like(vt)
    for c0, c1 in columns:
        i0, i1 = c0 - row, c1 - row
        x[:, i0:].baddbmm_(a[:, c0:, c0:c1], vt[:, i0:i1])  # the block column, from its diagonal block down
        if c1 < a.shape[-1]:
            x[:, i0:i1].baddbmm_(a[:, c1:, c0:c1].mT, vt[:, i1:])  # its transpose: the row of blocks right of it
    return x


def _two_sided_factor(a: Tensor, v: Tensor, tau: Tensor, pending: _PendingUpdates, row: int, block: int) -> Tensor:
    """W of the two-sided update H^T A22 H = A22 - V W^T - W V^T for H = I - V T V^T, where A22 = a[:, row:, row:]
    is the trailing matrix with ``pending`` applied (``a`` itself may still lack them)."""
    reflectors = tau.shape[-1]
    # A zero reflector has v = 0 (see householder_panel), so any nonzero diagonal entry keeps the identity exact.
    inverse_tau = torch.where(tau == 0, 1.0, tau).reciprocal()
    t_inverse = torch.triu(torch.bmm(v.mT, v), diagonal=1) + torch.diag_embed(inverse_tau)
    eye = torch.eye(reflectors, dtype=v.dtype, device=v.device).expand_as(t_inverse)
    t = torch.linalg.solve_triangular(t_inverse, eye, upper=True)
    vt = torch.bmm(v, t)
    # The m x m operand is read in place: the stage's one pass over it per panel.
    x = pending.corrected_product(_symmetric_product(a, row, vt, block), vt, row)
    m = torch.bmm(vt.mT, x)  # T^T V^T A22 V T, symmetric
    return torch.baddbmm(x, v, m, alpha=-0.5)


def _mirror_diagonal_blocks_(a: Tensor, block: int) -> None:
    """Make each diagonal block of the grid ``block`` exactly symmetric from its lower triangle, in place."""
    n = a.shape[-1]
    for start in range(0, n, block):
        end = min(start + block, n)
        diagonal_block = a[:, start:end, start:end]
        diagonal_block.copy_(diagonal_block.tril() + diagonal_block.tril(-1).mT)


def _lower_band(a: Tensor, bandwidth: int) -> Tensor:
    batch, n, _ = a.shape
    band = a.new_zeros(batch, n, bandwidth + 1)
    for d in range(min(bandwidth, n - 1) + 1):
        band[:, : n - d, d] = torch.diagonal(a, offset=-d, dim1=1, dim2=2)
    return band
