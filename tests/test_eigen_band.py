"""Dense -> band reduction (nerve_plugin.eigen.band): the result is a band of the requested width, orthogonally
similar to the input (same eigenvalues to eps * ||A|| * n, same Frobenius norm), on every panel path: the two
Triton kernels (under TRITON_INTERPRET=1 on CPU, so small n; the persistent one then has one program per matrix)
and torch.geqrf."""

import inspect
import threading

import pytest
import torch
import triton

from nerve_plugin.eigen import band as band_module
from nerve_plugin.eigen.band import householder_panel, reduce_to_band

EPS = torch.finfo(torch.float64).eps


def random_symmetric(n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, n, dtype=torch.float64, generator=gen)
    return (x + x.T) / 2


def covariance(n: int, gen: torch.Generator, rows: int | None = None) -> torch.Tensor:
    """X^T X of fewer rows than columns: rank-deficient, with n - rows exact zero eigenvalues."""
    x = torch.randn(rows or max(1, n // 3), n, dtype=torch.float64, generator=gen)
    return x.T @ x


def with_outliers(n: int, gen: torch.Generator) -> torch.Tensor:
    """A covariance with a few directions 1e6 x the rest, like massive activations."""
    base = covariance(n, gen, rows=2 * n)
    q, _ = torch.linalg.qr(torch.randn(n, 3, dtype=torch.float64, generator=gen))
    scale = 1e6 * torch.linalg.eigvalsh(base).median()
    return base + scale * (q * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)) @ q.T


def batch_of(kinds: tuple[str, ...], n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    makers = {
        "random": lambda: random_symmetric(n, gen),
        "covariance": lambda: covariance(n, gen),
        "outliers": lambda: with_outliers(n, gen),
        "zero": lambda: torch.zeros(n, n, dtype=torch.float64),
        "diagonal": lambda: torch.diag(torch.randn(n, dtype=torch.float64, generator=gen)),
    }
    return torch.stack([makers[kind]() for kind in kinds])


def dense_from_band(band: torch.Tensor) -> torch.Tensor:
    batch, n, width = band.shape
    dense = torch.zeros(batch, n, n, dtype=band.dtype)
    for d in range(min(width, n)):
        idx = torch.arange(n - d)
        dense[:, idx + d, idx] = band[:, : n - d, d]
        dense[:, idx, idx + d] = band[:, : n - d, d]
    return dense


def check_similar_band(a: torch.Tensor, bandwidth: int, **options) -> torch.Tensor:
    """Reduce a copy of a (whose strict upper triangle is scrambled first: only the lower one may be read), check
    the band and the similarity, and return the band."""
    n = a.shape[-1]
    work = a.tril() + torch.triu(torch.randn_like(a), diagonal=1)
    band = reduce_to_band(work, bandwidth, **options)
    assert band.shape == (a.shape[0], n, bandwidth + 1) and band.dtype == torch.float64
    assert torch.isfinite(band).all()
    # storage: zero past the last row; the workspace's lower triangle is the band plus exact zeros
    for d in range(1, bandwidth + 1):
        assert (band[:, max(n - d, 0) :, d] == 0).all()
    assert (work.tril(-bandwidth - 1) == 0).all()
    for d in range(min(bandwidth, n - 1) + 1):
        assert torch.equal(band[:, : n - d, d], torch.diagonal(work, offset=-d, dim1=1, dim2=2))

    t = dense_from_band(band)
    norm2 = torch.linalg.matrix_norm(a, ord=2).clamp_min(torch.finfo(torch.float64).tiny)
    eig_error = (torch.linalg.eigvalsh(t) - torch.linalg.eigvalsh(a)).abs().amax(-1)
    assert (eig_error <= 2 * n * EPS * norm2).all(), (eig_error / (EPS * norm2)).tolist()
    fro_error = (torch.linalg.matrix_norm(t) - torch.linalg.matrix_norm(a)).abs()
    assert (fro_error <= 2 * n * EPS * norm2).all(), (fro_error / (EPS * norm2)).tolist()
    return band


MIXED = ("random", "covariance", "outliers")
SPECIAL = ("zero", "diagonal", "covariance")

# (n, bandwidth): n not a multiple of b, one panel (n = b + 2), last panels shorter than b, b = 2
TRITON_SHAPES = [(24, 4), (21, 2), (30, 8), (10, 8), (48, 8), (15, 3)]
PERSISTENT_SHAPES = [shape for shape in TRITON_SHAPES if shape != (48, 8)]  # the slowest under the interpreter
TORCH_SHAPES = TRITON_SHAPES + [(64, 4), (67, 8), (100, 32), (40, 3), (33, 32), (34, 32)]


@pytest.mark.parametrize("n,bandwidth", TRITON_SHAPES)
def test_triton_panels(n, bandwidth):
    check_similar_band(batch_of(MIXED, n, seed=n), bandwidth, panel="triton")


@pytest.mark.parametrize("n,bandwidth", TORCH_SHAPES)
@pytest.mark.parametrize("kinds", [MIXED, SPECIAL])
def test_torch_panels(n, bandwidth, kinds):
    check_similar_band(batch_of(kinds, n, seed=n + bandwidth), bandwidth, panel="torch")


def test_triton_special_matrices():
    """Zero panels (tau = 0 everywhere) give no NaN; an already diagonal matrix comes back unchanged."""
    a = batch_of(SPECIAL, 20, seed=1)
    band = check_similar_band(a, 4, panel="triton")
    assert (band[0] == 0).all()
    assert torch.equal(band[1, :, 0], torch.diagonal(a[1])) and (band[1, :, 1:] == 0).all()


def test_triton_reduction_across_programs():
    """Programs of two chunks of two rows: up to three programs per matrix, whose partial dot products are summed
    by all of them, and pivot rows owned by another program or by a program's second chunk."""
    check_similar_band(batch_of(MIXED, 20, seed=2), 8, panel="triton", panel_tiling=(2, 2))


def test_triton_matches_torch_panels():
    """Both panel paths use LAPACK's reflector conventions, so on a well-separated random matrix they produce
    the same band up to rounding."""
    a = batch_of(("random", "random", "outliers"), 20, seed=3)
    triton_band = reduce_to_band(a.clone(), 4, panel="triton")
    torch_band = reduce_to_band(a.clone(), 4, panel="torch")
    scale = torch.linalg.matrix_norm(a, ord=2)[:, None, None]
    assert ((triton_band - torch_band).abs() <= 1e-9 * scale).all()


@pytest.mark.parametrize("n,bandwidth", PERSISTENT_SHAPES)
def test_persistent_panels(n, bandwidth):
    """One launch per panel: the same band as torch.geqrf's panels up to rounding, and no stall flagged."""
    a = batch_of(MIXED, n, seed=n)
    status = torch.zeros(a.shape[0], dtype=torch.int32)
    band = check_similar_band(a, bandwidth, panel="persistent", status=status)
    assert (status == 0).all()
    torch_band = reduce_to_band(a.clone(), bandwidth, panel="torch")
    scale = torch.linalg.matrix_norm(a, ord=2)[:, None, None]
    assert ((band - torch_band).abs() <= 1e-9 * scale).all()


def test_persistent_matches_triton_panels():
    """The same math as the per-column kernel: equal bands to rounding (bitwise under the interpreter, whose sums
    run in the same order), on special matrices too (a zero panel: tau = 0; an already diagonal matrix)."""
    a = batch_of(("random", "zero", "diagonal"), 14, seed=5)
    persistent = reduce_to_band(a.clone(), 4, panel="persistent")
    per_column = reduce_to_band(a.clone(), 4, panel="triton")
    scale = torch.linalg.matrix_norm(a, ord=2).clamp_min(1.0)[:, None, None]
    assert ((persistent - per_column).abs() <= 64 * EPS * scale).all()
    assert (persistent[1] == 0).all()
    assert torch.equal(persistent[2, :, 0], torch.diagonal(a[2])) and (persistent[2, :, 1:] == 0).all()


def test_persistent_barrier_state():
    """Each program counts itself in once per column (the counters end at reflectors x programs), and a matrix
    already flagged as stalled never waits: even on counters that can no longer reach their target."""
    a = batch_of(MIXED, 12, seed=6)
    panel = a[:, 4:, :4].clone()
    counters = torch.zeros(3, dtype=torch.int32)
    flags = torch.zeros(3, dtype=torch.int32)
    v, tau = householder_panel(panel, method="persistent", counters=counters, flags=flags)
    assert counters.tolist() == [4, 4, 4] and flags.tolist() == [0, 0, 0]
    reference = a[:, 4:, :4].clone()
    v_torch, tau_torch = householder_panel(reference, method="torch")
    assert torch.allclose(panel, reference, atol=1e-12) and torch.allclose(tau, tau_torch, atol=1e-12)
    assert torch.allclose(v, v_torch, atol=1e-12)

    stuck = torch.full((3,), -100, dtype=torch.int32)
    flagged = torch.ones(3, dtype=torch.int32)
    householder_panel(a[:, 4:, :4].clone(), method="persistent", counters=stuck, flags=flagged)
    assert flagged.tolist() == [1, 1, 1]


def _threaded_grid_executor(monkeypatch) -> None:
    """Make Triton's interpreter run every program of a launch at once, each in its own thread (with its own
    program id), as a GPU whose grid is resident would: the persistent kernel's barriers then end with several
    programs per matrix. Skips the test if the interpreter's internals are not the expected ones."""
    from triton.runtime import interpreter

    executor = getattr(interpreter, "GridExecutor", None)
    builder = getattr(interpreter, "InterpreterBuilder", None)
    needed = ("_init_args_hst", "_restore_args_dev")
    if (
        executor is None
        or builder is None
        or not all(hasattr(executor, name) for name in needed)
        or not all(hasattr(interpreter, name) for name in ("_patch_lang", "_implicit_cvt", "interpreter_builder"))
    ):
        pytest.skip("Triton's interpreter changed: no threaded grid")
    local = threading.local()
    per_thread = property(lambda self: getattr(local, "grid_idx", None), lambda self, v: setattr(local, "grid_idx", v))
    monkeypatch.setattr(builder, "grid_idx", per_thread, raising=False)

    def call(self, *args_dev, **kwargs):
        spec = inspect.getfullargspec(self.fn)
        kwargs = {k: v for k, v in kwargs.items() if k in spec.args or k in spec.kwonlyargs}
        args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
        scope = interpreter._patch_lang(self.fn)
        errors = []
        try:
            args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
            args = {k: v if k in self.constexprs else interpreter._implicit_cvt(v) for k, v in args.items()}
            grid = self.grid(args) if callable(self.grid) else self.grid
            grid = tuple(grid) + (1,) * (3 - len(grid))
            interpreter.interpreter_builder.set_grid_dim(*grid)

            def program(x, y, z):
                try:
                    interpreter.interpreter_builder.set_grid_idx(x, y, z)
                    self.fn(**args)
                except Exception as error:  # noqa: BLE001 - re-raised below, in the caller's thread
                    errors.append(error)

            threads = [
                threading.Thread(target=program, args=(x, y, z), daemon=True)
                for x in range(grid[0]) for y in range(grid[1]) for z in range(grid[2])
            ]  # fmt: skip
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)  # a barrier that never ends would otherwise hang the test session
                if thread.is_alive():
                    raise TimeoutError("a program of the threaded grid is still waiting after 120 s")
        finally:
            scope.restore()
        if errors:
            raise errors[0]
        self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)

    monkeypatch.setattr(executor, "__call__", call)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's threaded grid; the GPU test is below")
def test_persistent_across_programs_threaded(monkeypatch):
    """Several programs per matrix on CPU: 4-row programs (pivot rows owned by programs other than the first,
    partial dot products from up to five programs) and the batch in launches of two matrices, every program of a
    launch running at once in its own thread of the interpreter."""
    _threaded_grid_executor(monkeypatch)
    monkeypatch.setattr(band_module, "_persistent_plan", lambda batch, m, *_: (4, 4, triton.cdiv(m, 4), 2))
    a = batch_of(("random", "zero", "outliers"), 20, seed=8)
    status = torch.zeros(3, dtype=torch.int32)
    band = check_similar_band(a, 8, panel="persistent", status=status)
    torch_band = reduce_to_band(a.clone(), 8, panel="torch")
    scale = torch.linalg.matrix_norm(a, ord=2).clamp_min(1.0)[:, None, None]
    assert ((band - torch_band).abs() <= 1e-9 * scale).all() and (status == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="several programs per matrix need a GPU")
def test_persistent_across_programs_gpu(monkeypatch):
    """On the GPU: 4-row programs (pivot rows owned by programs other than the first), and a batch launched in
    chunks of two matrices (as when the GPU cannot hold every program at once)."""
    a = batch_of(MIXED + MIXED, 40, seed=7).cuda()
    status = torch.zeros(a.shape[0], dtype=torch.int32, device="cuda")
    per_column = reduce_to_band(a.clone(), 8, panel="triton")
    persistent = reduce_to_band(a.clone(), 8, panel="persistent", panel_tiling=(4, 4), status=status)
    scale = torch.linalg.matrix_norm(a, ord=2)[:, None, None]
    assert ((persistent - per_column).abs() <= 64 * EPS * scale).all() and (status == 0).all()
    monkeypatch.setattr(band_module, "_resident_persistent_programs", lambda device, rows, *_: (2 * 40 // rows, 0))
    chunked = reduce_to_band(a.clone(), 8, panel="persistent", panel_tiling=(4, 4), status=status)
    assert ((chunked - per_column).abs() <= 64 * EPS * scale).all() and (status == 0).all()


@pytest.mark.parametrize("panel", ["triton", "persistent", "torch"])
@pytest.mark.parametrize("n,bandwidth", [(1, 4), (5, 4), (6, 8), (9, 8)])
def test_no_panels(n, bandwidth, panel):
    """n <= b + 1: the matrix already is a band; it is returned as is."""
    a = batch_of(("random", "covariance", "diagonal"), n, seed=4)
    band = check_similar_band(a, bandwidth, panel=panel)
    assert torch.equal(dense_from_band(band), a)


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        reduce_to_band(torch.zeros(2, 4, 4, dtype=torch.float32))
    with pytest.raises(ValueError):
        reduce_to_band(torch.zeros(2, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError):
        reduce_to_band(torch.zeros(2, 4, 4, dtype=torch.float64).mT)
    with pytest.raises(ValueError):
        reduce_to_band(torch.zeros(2, 4, 4, dtype=torch.float64), panel="magma")
    with pytest.raises(ValueError):
        reduce_to_band(torch.zeros(2, 4, 4, dtype=torch.float64), status=torch.zeros(3, dtype=torch.int32))
    if not torch.cuda.is_available():  # the interpreter runs one program per matrix: no tiling of fewer rows
        with pytest.raises(ValueError):
            reduce_to_band(torch.zeros(2, 12, 12, dtype=torch.float64), 2, panel="persistent", panel_tiling=(4, 4))
