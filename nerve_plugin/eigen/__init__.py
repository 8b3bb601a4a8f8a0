"""Batched float64 eigenvalues of symmetric matrices on the GPU, near the hardware's limit.

A logging step holds many covariances of one size (two taps x every layer). cuSOLVER's one-stage reduction
(torch.linalg.eigvalsh) is bound by memory traffic and kernel launches and solves them one after another; this
package reduces them all at once, in three stages, every one batched over the matrices:

1. ``band.reduce_to_band``: dense -> band of width ``b`` by blocked Householder reflections; the trailing
   updates are float64 matrix products (tensor cores on Hopper), bound by the trailing matrix's memory traffic
   (README, Performance).
2. ``chase.band_to_tridiagonal``: band -> tridiagonal by bulge chasing, a Triton kernel in which each program
   chases one sweep of one matrix, following the previous sweep in a pipeline.
3. ``tridiagonal.tridiagonal_eigvalsh``: every eigenvalue of the tridiagonal matrices by Sturm-count
   bisection, a Triton kernel, one lane per eigenvalue.

Every stage is an orthogonal similarity or a backward-stable bisection in float64, so the eigenvalues carry
LAPACK's error bound (a small multiple of eps * ||A||). The Triton kernels also run on CPU tensors under
``TRITON_INTERPRET=1`` (the tests do that at small n); torch.linalg.eigvalsh stays the reference and the
fallback.

Storage conventions shared by the stages (all float64, batch first):
- dense: (B, n, n), symmetric; only the lower triangle is trusted.
- lower band of width b: (B, n, b + 1) with ``band[i, c, d] = A[i, c + d, c]`` (zero where c + d >= n).
- tridiagonal: ``d`` (B, n) diagonal, ``e`` (B, n - 1) sub-diagonal.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch

logger = logging.getLogger(__name__)

EPS = torch.finfo(torch.float64).eps
DEFAULT_BANDWIDTH = 32
# float64 bytes of matrices reduced at once (a chunk's workspace, kept by its CUDA graph between logging steps).
DEFAULT_WORKSPACE_BYTES = 4 << 30
# Large matrices that do not fit in that workspace are instead reduced eagerly, in one-off chunks of at most this
# many bytes and half the device memory free at the time, freed after the solve. Measured on an H200: 32 matrices
# of n = 8192 take 1.47 s eagerly in one chunk, 1.75 s as four captured chunks of 8 (each of a chunk's ~n
# sequential panel steps costs about the same for 8 matrices as for 32); below n = 8192, and for few matrices,
# eager launches cost more than the GPU work they start (1 x 14336: 1.43 s eager, 0.46 s captured).
DEFAULT_EAGER_WORKSPACE_BYTES = 24 << 30
EAGER_MIN_DIM = 8192
# ... and only chunks of this many matrices or more (8 x 8192: 0.70 s eager, 0.44 s captured).
EAGER_MIN_BATCH = 16
EAGER_FREE_FRACTION = 0.5


def smallest_batched_dim(bandwidth: int = DEFAULT_BANDWIDTH) -> int:
    """Below this size a matrix is already (nearly) a band: torch.linalg.eigvalsh solves it."""
    return 2 * bandwidth + 2


def eigvalsh_pipeline(matrices: torch.Tensor, bandwidth: int = DEFAULT_BANDWIDTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending eigenvalues (B, n) of the symmetric float64 ``matrices`` (B, n, n), overwritten as workspace,
    and a (B,) int32 status (non-zero: that matrix's result is unusable). No host synchronisation: the whole
    pipeline can be captured in a CUDA graph."""
    from .band import reduce_to_band
    from .chase import band_to_tridiagonal
    from .tridiagonal import tridiagonal_eigvalsh

    status = torch.zeros(matrices.shape[0], dtype=torch.int32, device=matrices.device)
    band = reduce_to_band(matrices, bandwidth, status=status)
    diagonal, off_diagonal, chase_status = band_to_tridiagonal(band)
    return tridiagonal_eigvalsh(diagonal, off_diagonal), status | chase_status


def _balanced(count: int, most: int) -> int:
    """Chunk size for ``count`` items, at most ``most`` a chunk, with as few and as equal chunks as possible."""
    chunks = math.ceil(count / max(1, most))
    return math.ceil(count / chunks)


def _free_bytes(device: torch.device) -> int | None:
    """Device memory free now: the driver's free memory plus what torch's allocator holds unused."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph | None
    inputs: torch.Tensor  # (B, n, n) float64, filled before each replay
    eigenvalues: torch.Tensor
    status: torch.Tensor


def _to_host(*tensors: torch.Tensor) -> tuple:
    """Host copies of ``tensors`` started on the current stream (pinned: the copies do not block the host), and
    an event that fires once they are done (None on CPU, where they are done at once)."""
    if tensors[0].device.type != "cuda":
        return (*tensors, None)
    copies = []
    for tensor in tensors:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        copies.append(host)
    event = torch.cuda.Event()
    event.record()
    return (*copies, event)


@dataclass
class PendingEigenvalues:
    """A launched batched solve: ``done()`` asks without waiting, ``result()`` waits for it and solves with
    torch.linalg.eigvalsh the matrices that failed the invariant checks."""

    matrices: list[torch.Tensor]
    scales: list[float]
    values: torch.Tensor  # (len, n) float64 on the host once ``event`` fired
    good: torch.Tensor  # (len,) bool: passed the checks
    finite: torch.Tensor  # (len,) bool: the matrix held no NaN or Inf
    event: torch.cuda.Event | None
    _result: tuple | None = None

    def done(self) -> bool:
        return self._result is not None or self.event is None or self.event.query()

    def result(self) -> tuple[torch.Tensor, set[int], set[int]]:
        """(descending eigenvalues (len, n) on the host, indices eigvalsh solved, indices of non-finite
        matrices, whose rows are NaN); computed once."""
        if self._result is None:
            self._result = self._finish()
        return self._result

    def _finish(self) -> tuple[torch.Tensor, set[int], set[int]]:
        from ..spectrum import EIG_FLOOR

        if self.event is not None:
            self.event.synchronize()
        nonfinite = set((~self.finite).nonzero().flatten().tolist())
        self.values[sorted(nonfinite)] = float("nan")
        fell_back: set[int] = set()
        for i in (~self.good & self.finite).nonzero().flatten().tolist():
            fell_back.add(i)
            dim = int(self.matrices[i].shape[-1])
            logger.warning(f"nerve: batched eigen-solve of a {dim} x {dim} matrix failed its checks; using eigvalsh")
            m = self.matrices[i].to(torch.float64)
            exact = torch.linalg.eigvalsh(0.5 * (m + m.mT) * self.scales[i]).flip(-1)
            self.values[i] = exact.cpu().clamp_min_(EIG_FLOOR)
        self.matrices = []  # the caller's statistics are no longer needed
        return self.values, fell_back, nonfinite


class BatchedEigensolver:
    """Eigenvalues of many same-size symmetric matrices at once, on the matrices' GPU.

    The pipeline launches ~n small kernels per chunk (one per column of the dense-to-band panels), so each
    chunk shape is captured once in a CUDA graph and replayed at later logging steps: replaying costs the GPU
    work alone. A captured graph keeps its chunk's float64 workspace (at most ``workspace_bytes``) between
    logging steps; ``release()`` frees it. Many large matrices (``plan``) go instead in larger one-off eager
    chunks (at most ``eager_workspace_bytes``), where the GPU work outweighs the launches. Results are checked
    against two invariants every exact solve keeps
    (the trace and the Frobenius norm); a matrix that fails them, or whose kernels stalled, is solved again by
    torch.linalg.eigvalsh.
    """

    def __init__(
        self,
        bandwidth: int = DEFAULT_BANDWIDTH,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
        graphs: bool = True,
        device_types: tuple[str, ...] = ("cuda",),
        eager_workspace_bytes: int = DEFAULT_EAGER_WORKSPACE_BYTES,
        eager_min_dim: int = EAGER_MIN_DIM,
    ):
        self.bandwidth = bandwidth
        self.eager_workspace_bytes = eager_workspace_bytes
        self.eager_min_dim = eager_min_dim
        # Where it is the faster exact solver. The CPU (LAPACK's eigvalsh wins there) only runs it in tests,
        # through Triton's interpreter.
        self.device_types = device_types
        self.workspace_bytes = workspace_bytes
        self.graphs = graphs
        self._captured: dict[tuple, _Captured] = {}

    def release(self) -> None:
        self._captured.clear()

    def accepts(self, matrix: torch.Tensor) -> bool:
        return matrix.device.type in self.device_types and int(matrix.shape[-1]) >= smallest_batched_dim(self.bandwidth)

    def chunk_size(self, count: int, dim: int) -> int:
        """Matrices reduced at once in the held (captured) workspace: the least the solver needs. Larger eager
        chunks (``plan``) only use memory the eager workspace bound leaves."""
        return _balanced(count, max(1, self.workspace_bytes // (dim * dim * 8)))

    def plan(self, count: int, dim: int, free_bytes: int | None = None) -> tuple[int, bool]:
        """(matrices reduced at once, whether as a captured graph kept between logging steps) for ``count``
        matrices of ``dim``, the chunks balanced. As many as the held workspace takes, captured; when that
        needs several chunks of large matrices, fewer, larger eager chunks within the eager workspace and
        (``free_bytes``: the device memory free now) half the free memory."""
        matrix_bytes = dim * dim * 8
        held = max(1, self.workspace_bytes // matrix_bytes)
        if count > held and dim >= self.eager_min_dim:
            # The input copies plus the pending-update buffers and products: ~10% more at these sizes.
            budget = self.eager_workspace_bytes
            if free_bytes is not None:
                budget = min(budget, int(free_bytes * EAGER_FREE_FRACTION))
            eager = budget * 10 // (matrix_bytes * 11)
            if eager > held and min(count, eager) >= EAGER_MIN_BATCH:
                return _balanced(count, eager), False
        return _balanced(count, held), self.graphs

    def eigvalsh(
        self, matrices: Sequence[torch.Tensor], scales: Sequence[float] | None = None
    ) -> tuple[torch.Tensor, set[int]]:
        """Descending float64 eigenvalues (len, n), on the host, of ``scale * (M + M^T) / 2`` for each n x n
        ``M`` (any float dtype, one CUDA device), clamped at ``EIG_FLOOR`` as the metrics expect, and the
        indices of the matrices that torch.linalg.eigvalsh solved instead. A matrix holding NaN or Inf gives a
        row of NaN (``launch(...).result()`` says which)."""
        values, fell_back, _ = self.launch(matrices, scales).result()
        return values, fell_back

    def launch(self, matrices: Sequence[torch.Tensor], scales: Sequence[float] | None = None) -> PendingEigenvalues:
        """Start the solve of ``eigvalsh`` on the current CUDA stream and return at once: nothing here waits for
        the GPU, so a side stream can run it while training goes on. The caller keeps ``matrices`` unchanged
        until the result is taken (their memory must not be reused before: ``Tensor.record_stream``)."""
        from ..spectrum import EIG_FLOOR

        count = len(matrices)
        dim = int(matrices[0].shape[-1])
        device = matrices[0].device
        scales = list(scales) if scales is not None else [1.0] * count
        out = torch.empty(count, dim, dtype=torch.float64, device=device)
        good = torch.empty(count, dtype=torch.bool, device=device)
        finite = torch.empty(count, dtype=torch.bool, device=device)
        chunk, kept = self.plan(count, dim, _free_bytes(device))
        for lo in range(0, count, chunk):
            hi = min(count, lo + chunk)
            captured = self._get(chunk, dim, device) if kept else None
            if captured is not None:
                inputs = captured.inputs
            else:  # a one-off workspace, returned to the allocator after this chunk
                inputs = torch.empty(hi - lo, dim, dim, dtype=torch.float64, device=device)
            for i in range(lo, hi):
                # M + M^T summed in float64 (M2 is summed in ways that are not bitwise symmetric); the factor
                # scale / 2 is applied to the eigenvalues instead (one rounding each, not a pass over n^2).
                m = matrices[i].to(torch.float64)
                torch.add(m, m.mT, out=inputs[i - lo])
            if hi - lo < inputs.shape[0]:
                inputs[hi - lo :].zero_()
            # The invariants of the inputs, before the pipeline overwrites them (a fused reduction: no n x n
            # temporary). A NaN or Inf anywhere makes the Frobenius norm non-finite: such a matrix is solved as
            # a zero matrix (no kernel sees a NaN) and reported, without a host synchronisation to find it.
            trace = inputs[: hi - lo].diagonal(dim1=1, dim2=2).sum(-1)
            scale = torch.linalg.vector_norm(inputs[: hi - lo], dim=(1, 2))
            finite[lo:hi] = torch.isfinite(scale)
            inputs[: hi - lo].masked_fill_(~finite[lo:hi, None, None], 0.0)
            if captured is not None and captured.graph is not None:
                captured.graph.replay()
                eigenvalues, status = captured.eigenvalues, captured.status
            else:
                eigenvalues, status = eigvalsh_pipeline(inputs, self.bandwidth)
            eigenvalues, status = eigenvalues[: hi - lo], status[: hi - lo]
            # Backward-stable stages move each eigenvalue by a small multiple of eps ||A||; the floor lets a zero
            # matrix's eigenvalues be tiny but not exact zeros.
            tolerance = 64 * dim * EPS * scale + dim * 1e-300
            good[lo:hi] = (
                (status == 0)
                & torch.isfinite(eigenvalues).all(-1)
                & ((eigenvalues.sum(-1) - trace).abs() <= tolerance)
                & ((eigenvalues.square().sum(-1).sqrt() - scale).abs() <= tolerance)
            )
            factors = torch.tensor([0.5 * v for v in scales[lo:hi]], dtype=torch.float64).to(device, non_blocking=True)
            out[lo:hi] = eigenvalues.flip(-1) * factors[:, None]
        out.clamp_min_(EIG_FLOOR)
        return PendingEigenvalues(list(matrices), scales, *_to_host(out, good, finite))

    def _get(self, batch: int, dim: int, device: torch.device) -> _Captured:
        """The kept workspace (and, on CUDA with graphs on, the captured pipeline) for chunks of this shape."""
        key = (batch, dim, device)
        if key in self._captured:
            return self._captured[key]
        inputs = torch.zeros(batch, dim, dim, dtype=torch.float64, device=device)
        graph = None
        eigenvalues = status = None
        if self.graphs and device.type == "cuda":
            # One eager run compiles the kernels (and must not be captured), then the capture.
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                inputs.copy_(torch.eye(dim, dtype=torch.float64, device=device).expand(batch, dim, dim))
                eigvalsh_pipeline(inputs, self.bandwidth)
            torch.cuda.current_stream(device).wait_stream(side)
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    eigenvalues, status = eigvalsh_pipeline(inputs, self.bandwidth)
            except Exception as error:  # capture is an optimisation: run eagerly without it
                logger.warning(f"nerve: CUDA graph capture of the eigen-solver failed ({error}); running eagerly")
                graph = None
        captured = _Captured(graph, inputs, eigenvalues, status)
        self._captured[key] = captured
        return captured
