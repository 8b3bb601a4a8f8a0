"""Dense -> band reduction (nerve_plugin.eigen.band): the result is a band of the requested width, orthogonally
similar to the input (same eigenvalues to eps * ||A|| * n, same Frobenius norm), on both panel paths: the Triton
kernel (under TRITON_INTERPRET=1 on CPU, so small n) and torch.geqrf."""

import pytest
import torch

from nerve_plugin.eigen.band import reduce_to_band

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


@pytest.mark.parametrize("panel", ["triton", "torch"])
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
