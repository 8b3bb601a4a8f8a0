"""NerVE metric math against closed forms and an independent float64 numpy implementation (tests/reference.py)."""

import math

import numpy as np
import pytest
import torch

from nerve_plugin import (
    compute_covariance,
    compute_eee,
    compute_js,
    compute_participation_ratio,
    compute_sorted_eigs,
    compute_spectral_entropy,
    normalize_eigs,
    spectrum_metrics,
)
from reference import js as np_js
from reference import of_rows


# -- closed forms -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 7, 64])
def test_isotropic_spectrum(d):
    eigs = compute_sorted_eigs(torch.eye(d, dtype=torch.float64) * 3.5)
    p = normalize_eigs(eigs)
    assert compute_spectral_entropy(p) == pytest.approx(math.log(d), abs=1e-12)
    assert compute_participation_ratio(eigs) == pytest.approx(d, rel=1e-12)
    assert compute_eee(p) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("d", [8, 256])
def test_rank_one_spectrum(d):
    v = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    eigs = compute_sorted_eigs(torch.outer(v, v))
    p = normalize_eigs(eigs)
    assert compute_participation_ratio(eigs) == pytest.approx(1.0, abs=1e-9)
    assert compute_spectral_entropy(p) == pytest.approx(0.0, abs=1e-9)
    # All variance in the first direction: the cumulative spectrum is 1 everywhere, EEE = (D - 1) / D.
    assert compute_eee(p) == pytest.approx((d - 1) / d, abs=1e-9)


def test_eigenvalues_sorted_descending_and_clamped():
    cov = torch.diag(torch.tensor([0.0, 5.0, -1e-9, 2.0], dtype=torch.float64))
    eigs = compute_sorted_eigs(cov)
    assert eigs.dtype == torch.float64
    assert eigs.tolist() == [5.0, 2.0, 1e-12, 1e-12]
    assert float(normalize_eigs(eigs).sum()) == pytest.approx(1.0, abs=1e-15)


def test_eigensolve_is_float64_even_for_float32_input():
    # A spectrum spanning 10 decades: float32 eigvalsh cannot resolve the small end.
    lam = torch.logspace(0, -10, 32, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    cov = q @ torch.diag(lam) @ q.T
    eigs = compute_sorted_eigs(cov)
    assert torch.allclose(eigs[:20], lam[:20], rtol=1e-6, atol=0)


def test_js_of_equal_spectra_is_zero_and_js_is_bounded_by_ln2():
    p = normalize_eigs(torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64))
    assert compute_js(p, p) == pytest.approx(0.0, abs=1e-15)
    # Disjoint supports reach the bound; the clamped floor keeps them a hair below it.
    a = normalize_eigs(torch.tensor([1.0, 1e-12, 1e-12, 1e-12], dtype=torch.float64))
    b = normalize_eigs(torch.tensor([1e-12, 1e-12, 1e-12, 1.0], dtype=torch.float64))
    assert compute_js(a, b) == pytest.approx(math.log(2), rel=1e-9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        x = normalize_eigs(torch.rand(16, generator=gen, dtype=torch.float64) ** 8)
        y = normalize_eigs(torch.rand(16, generator=gen, dtype=torch.float64) ** 8)
        assert 0.0 <= compute_js(x, y) <= math.log(2)
        assert compute_js(x, y) == pytest.approx(compute_js(y, x), abs=1e-15)


def test_js_rejects_spectra_of_different_length():
    with pytest.raises(ValueError, match="equal shape"):
        compute_js(torch.ones(3) / 3, torch.ones(4) / 4)


# -- random spectra against the numpy reference -------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_random_activations_match_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(40, 400)), int(rng.integers(2, 48))
    # Anisotropic data with a nonzero mean, so every metric is away from its bounds.
    x = rng.standard_normal((n, d)) @ np.diag(rng.exponential(size=d) ** 2) @ rng.standard_normal((d, d))
    x += rng.standard_normal(d) * 5
    ref = of_rows(x)  # the independent float64 numpy reference

    cov = compute_covariance(torch.from_numpy(x))
    np.testing.assert_allclose(cov.numpy(), ref["cov"], rtol=1e-10, atol=1e-10 * np.abs(ref["cov"]).max())
    m = spectrum_metrics(cov)
    np.testing.assert_allclose(m.eigenvalues.numpy(), ref["eigenvalues"], rtol=1e-8, atol=1e-9 * ref["eigenvalues"][0])
    assert m.spectral_entropy == pytest.approx(ref["spectral_entropy"], rel=1e-9)
    assert m.participation_ratio == pytest.approx(ref["participation_ratio"], rel=1e-9)
    assert m.eee == pytest.approx(ref["eee"], rel=1e-9, abs=1e-12)
    assert 0 <= m.spectral_entropy <= math.log(d) + 1e-12
    assert 1 - 1e-12 <= m.participation_ratio <= d + 1e-9


@pytest.mark.parametrize("seed", range(4))
def test_random_js_matches_numpy_reference(seed):
    rng = np.random.default_rng(100 + seed)
    d = int(rng.integers(2, 64))
    p, q = rng.exponential(size=d) ** 3, rng.exponential(size=d) ** 3
    p, q = p / p.sum(), q / q.sum()
    assert compute_js(torch.from_numpy(p), torch.from_numpy(q)) == pytest.approx(np_js(p, q), rel=1e-10, abs=1e-14)


def test_covariance_input_validation():
    with pytest.raises(ValueError, match="2-D"):
        compute_covariance(torch.zeros(3))
    with pytest.raises(ValueError, match="at least 2 rows"):
        compute_covariance(torch.zeros(1, 4))


def test_eee_takes_raw_eigenvalues_as_the_original_readme_calls_it():
    # compute_eee(eigenvalues) in the original README: raw eigenvalues used to give 1.0 (the cumulative sum of
    # unnormalised values is far above the diagonal) for every spectrum
    flat = torch.full((64,), 3.5, dtype=torch.float64)
    assert compute_eee(flat) == pytest.approx(0.0, abs=1e-15)
    eigs = torch.logspace(2, -3, 50, dtype=torch.float64) * 1e4
    assert compute_eee(eigs) == pytest.approx(compute_eee(normalize_eigs(eigs)), rel=1e-14)
    assert 0.0 < compute_eee(eigs) < 1.0
