"""The batched eigen-solver (nerve_plugin.eigen): the bulge-chasing stage, its pipelining rule, and the whole
pipeline against float64 LAPACK, including the metrics, on CPU through Triton's interpreter."""

import math

import numpy as np
import pytest
import torch

from nerve_plugin.eigen import BatchedEigensolver
from nerve_plugin.eigen.chase import _band_work, band_to_tridiagonal
from nerve_plugin.solve import solve, solve_many
from nerve_plugin.spectrum import EIG_FLOOR, compute_js, normalize_eigs, spectrum_metrics_from_eigs

EPS = torch.finfo(torch.float64).eps


def random_band(batch, n, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    band = torch.randn(batch, n, b + 1, dtype=torch.float64, generator=g)
    valid = (torch.arange(n)[:, None] + torch.arange(b + 1)[None, :]) < n
    return band * valid


def dense_from_band(band):
    batch, n, width = band.shape
    a = torch.zeros(batch, n, n, dtype=torch.float64)
    for d in range(width):
        a.diagonal(-d, 1, 2).copy_(band[:, : n - d, d])
        if d:
            a.diagonal(d, 1, 2).copy_(band[:, : n - d, d])
    return a


def tridiagonal(d, e):
    return torch.diag_embed(d) + torch.diag_embed(e, -1) + torch.diag_embed(e, 1)


@pytest.mark.parametrize("n,b", [(3, 2), (9, 8), (21, 4), (26, 8)])
def test_chase_keeps_the_spectrum(n, b):
    band = random_band(2, n, b, seed=n)
    d, e, status = band_to_tridiagonal(band)
    assert status.tolist() == [0, 0]
    got = torch.linalg.eigvalsh(tridiagonal(d, e))
    want = torch.linalg.eigvalsh(dense_from_band(band))
    scale = want.abs().max(-1).values[:, None]
    assert ((got - want).abs() / scale).max() < 50 * n * EPS


def test_chase_of_a_diagonal_and_a_zero_band():
    band = torch.zeros(2, 12, 5, dtype=torch.float64)
    band[0, :, 0] = torch.arange(12.0)
    d, e, status = band_to_tridiagonal(band)
    assert torch.equal(d[0], torch.arange(12.0, dtype=torch.float64)) and not e.any() and not d[1].any()
    assert status.tolist() == [0, 0]


# -- the pipelining rule ------------------------------------------------------------------------------------
# The kernel lets sweep s + 1 run its step k once sweep s has finished step k + 2 - 1. A model of the kernel's
# arithmetic on the same storage runs every step the rule allows at once (all read, then all write), which is
# the most concurrency any number of programs can reach; it must give bitwise what one sweep after another
# gives, and a rule one step looser must not.


def _reflector(x):
    alpha, rest = x[0].item(), x.clone()
    rest[0] = 0.0
    xnorm2 = float((rest * rest).sum())
    if xnorm2 == 0.0:
        v = torch.zeros_like(x)
        v[0] = 1.0
        return v, 0.0, alpha
    norm = math.sqrt(alpha * alpha + xnorm2)
    beta = -norm if alpha >= 0 else norm
    v = rest / (alpha - beta)
    v[0] = 1.0
    return v, (beta - alpha) / beta, beta


def _model_step(work, n, b, sweep, step, carried):
    """Reads from ``work`` (flat), returns (writes, carried reflector) of one step of the kernel."""
    width = 2 * b
    a = torch.arange(b)[:, None]
    j = torch.arange(b)[None, :]
    diagonal = torch.where(a >= j, j * width + (a - j), a * width + (j - a))
    below = j * width + (b + a - j)
    writes = []
    if step == 0:
        column = sweep * width + 1 + torch.arange(b)
        v, tau, beta = _reflector(work[column])
        new = torch.zeros(b, dtype=torch.float64)
        new[0] = beta
        writes.append((column, new))
    else:
        v, tau = carried
    r = sweep + 1 + step * b
    d = work[r * width + diagonal]
    w = tau * (d @ v)
    u = w - 0.5 * tau * (v @ w) * v
    d = d - v[:, None] * u[None, :] - u[:, None] * v[None, :]
    lower = (a >= j).expand(b, b)
    writes.append(((r * width + diagonal)[lower], d[lower]))
    e = work[r * width + below]
    e = e - tau * (e @ v)[:, None] * v[None, :]
    v2, tau2, beta2 = _reflector(e[:, 0].clone())
    e = e - tau2 * v2[:, None] * (v2 @ e)[None, :]
    e[:, 0] = 0.0
    e[0, 0] = beta2
    writes.append(((r * width + below).flatten(), e.flatten()))
    return writes, (v2, tau2)


def _modelled_chase(band, lag, concurrent):
    n, b = band.shape[1], band.shape[2] - 1
    work = _band_work(band, b)[0].flatten().clone()
    sweeps = n - 2
    steps = [math.ceil((n - 1 - s) / b) for s in range(sweeps)]
    progress, carried = [0] * sweeps, [None] * sweeps
    if not concurrent:
        for s in range(sweeps):
            for k in range(steps[s]):
                writes, carried[s] = _model_step(work, n, b, s, k, carried[s])
                for index, values in writes:
                    work[index] = values
        return work
    while any(progress[s] < steps[s] for s in range(sweeps)):
        running = [
            s
            for s in range(sweeps)
            if progress[s] < steps[s] and (s == 0 or progress[s - 1] >= min(progress[s] + lag, steps[s - 1]))
        ]
        snapshot = work.clone()
        results = [(s, _model_step(snapshot, n, b, s, progress[s], carried[s])) for s in running]
        for s, (writes, reflector) in results:
            for index, values in writes:
                work[index] = values
            carried[s] = reflector
            progress[s] += 1
    return work


@pytest.mark.parametrize("n,b", [(23, 4), (30, 2)])
def test_pipelining_rule_is_race_free_and_tight(n, b):
    band = random_band(1, n, b, seed=3)
    sequential = _modelled_chase(band, lag=2, concurrent=False)
    assert torch.equal(_modelled_chase(band, lag=2, concurrent=True), sequential)
    assert not torch.equal(_modelled_chase(band, lag=1, concurrent=True), sequential)
    # and the model is the kernel's arithmetic: same tridiagonal as the Triton kernel, to rounding
    d, e, _ = band_to_tridiagonal(band)
    width = 2 * b
    assert torch.allclose(sequential[: n * width : width], d[0], atol=1e-12)
    assert torch.allclose(sequential[1 : (n - 1) * width : width], e[0], atol=1e-12)


# -- the whole pipeline ---------------------------------------------------------------------------------------


def covariance_cases(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    k = torch.arange(1, n + 1, dtype=torch.float64)
    power = 1.0 / k
    outliers = power.clone()
    outliers[:3] = 1e6 * power.median()  # massive activations
    clustered = 1.0 + 1e-10 * (k % 3)
    cases = [(q * lam) @ q.T for lam in (power, outliers, clustered)]
    x = torch.randn(n // 3, n, dtype=torch.float64, generator=g)  # N < D: rank-deficient
    x = x - x.mean(0)
    cases.append(x.T @ x / (x.shape[0] - 1))
    cases.append(torch.zeros(n, n, dtype=torch.float64))
    return cases


def test_pipeline_matches_lapack_and_the_metrics():
    n = 44
    cases = covariance_cases(n)
    solver = BatchedEigensolver(bandwidth=8, graphs=False, device_types=("cpu",))
    got, fell_back = solver.eigvalsh(cases)
    assert fell_back == set()
    for a, eigs in zip(cases, got):
        want = torch.linalg.eigvalsh(a).flip(-1).clamp_min(EIG_FLOOR)
        assert (eigs - want).abs().max() <= 100 * n * EPS * want.abs().max()
        if a.any():
            mine, ref = spectrum_metrics_from_eigs(eigs), spectrum_metrics_from_eigs(want)
            for field in ("spectral_entropy", "participation_ratio", "eee"):
                x, y = getattr(mine, field), getattr(ref, field)
                assert abs(x - y) <= 1e-9 * abs(y) + 1e-15, field
    js = compute_js(normalize_eigs(got[0]), normalize_eigs(got[1]))
    js_ref = compute_js(
        normalize_eigs(torch.linalg.eigvalsh(cases[0]).flip(-1).clamp_min(EIG_FLOOR)),
        normalize_eigs(torch.linalg.eigvalsh(cases[1]).flip(-1).clamp_min(EIG_FLOOR)),
    )
    assert abs(js - js_ref) <= 1e-9 * js_ref


@pytest.mark.slow  # three pipeline runs under Triton's interpreter (~7 s)
def test_chunks_and_the_invariant_checks_fall_back():
    n = 20
    cases = covariance_cases(n, seed=1)[:3]
    # workspace for two matrices: chunks of 2 and 1 (padded with a zero matrix)
    solver = BatchedEigensolver(bandwidth=4, graphs=False, device_types=("cpu",), workspace_bytes=2 * n * n * 8)
    assert solver.chunk_size(3, n) == 2
    got, fell_back = solver.eigvalsh(cases, scales=[2.0, 1.0, 0.5])
    assert fell_back == set()
    for a, s, eigs in zip(cases, (2.0, 1.0, 0.5), got):
        want = torch.linalg.eigvalsh(a * s).flip(-1).clamp_min(EIG_FLOOR)
        assert (eigs - want).abs().max() <= 100 * n * EPS * want.abs().max()

    import nerve_plugin.eigen as eigen

    original = eigen.eigvalsh_pipeline

    def off_by_a_little(matrices, bandwidth):
        eigenvalues, status = original(matrices, bandwidth)
        return eigenvalues * 1.001, status

    try:
        eigen.eigvalsh_pipeline = off_by_a_little
        got, fell_back = BatchedEigensolver(bandwidth=4, graphs=False, device_types=("cpu",)).eigvalsh(cases)
    finally:
        eigen.eigvalsh_pipeline = original
    assert fell_back == {0, 1, 2}  # a 0.1% error breaks the trace check: eigvalsh answered
    for a, eigs in zip(cases, got):
        want = torch.linalg.eigvalsh(a).flip(-1).clamp_min(EIG_FLOOR)
        assert (eigs - want).abs().max() <= 100 * n * EPS * want.max()


def test_solve_many_routes_and_reports():
    n = 20
    good = covariance_cases(n, seed=2)[0] * 9.0  # M2 of 10 tokens
    bad = good.clone()
    bad[0, 0] = float("nan")
    small = torch.eye(5, dtype=torch.float64)
    states = [((0, "pre"), 10, good), ((0, "post"), 10, bad), ((1, "pre"), 10, small)]
    solver = BatchedEigensolver(bandwidth=4, graphs=False, device_types=("cpu",))
    results = solve_many(states, solver)
    assert results[(0, "post")].status == "non-finite statistics" and results[(0, "post")].eigenvalues is None
    reference = solve(good, 10)
    assert results[(0, "pre")].status == "ok"
    np.testing.assert_allclose(results[(0, "pre")].eigenvalues, reference.eigenvalues, rtol=1e-10, atol=1e-12)
    assert results[(1, "pre")].eigenvalues.tolist() == [1.0 / 9] * 5  # too small to batch: eigvalsh


def test_plan_takes_larger_eager_chunks_only_where_they_pay():
    """Beyond the held (captured) workspace, large matrices go in fewer, larger one-off chunks within the eager
    bound and half the free memory; small matrices and small eager chunks stay captured."""
    n = 64
    matrix = n * n * 8
    solver = BatchedEigensolver(workspace_bytes=4 * matrix, eager_workspace_bytes=40 * matrix, eager_min_dim=64)
    assert solver.plan(4, n) == (4, True)  # fits the held workspace
    assert solver.plan(32, n) == (32, False)  # 32 * 1.1 matrices fit the eager bound: one chunk
    assert solver.plan(48, n) == (24, False)  # two balanced chunks
    assert solver.plan(32, n, free_bytes=40 * matrix) == (16, False)  # half the free memory: 18 fit
    assert solver.plan(32, n, free_bytes=20 * matrix) == (4, True)  # 9 fit: below 16 a chunk, captured chunks
    assert solver.plan(32, n - 1) == (4, True)  # below eager_min_dim
    assert solver.chunk_size(32, n) == 4  # what buffer_bytes counts: the held chunk
    small = BatchedEigensolver(workspace_bytes=4 * matrix, eager_workspace_bytes=4 * matrix, eager_min_dim=64)
    assert small.plan(32, n) == (4, True)  # the eager bound holds no more than the held workspace


def test_a_non_finite_matrix_is_reported_without_touching_the_others():
    """A launched solve finds NaN/Inf on the device (no host synchronisation), solves that matrix as zeros and
    reports it; the batch's other matrices get the same eigenvalues as without it."""
    n = 20
    cases = covariance_cases(n, seed=3)[:2]
    bad = cases[0].clone()
    bad[3, 5] = float("inf")
    solver = BatchedEigensolver(bandwidth=4, graphs=False, device_types=("cpu",))
    alone, _ = solver.eigvalsh(cases)
    pending = solver.launch([cases[0], bad, cases[1]])
    assert pending.done()  # CPU: nothing in flight
    values, fell_back, nonfinite = pending.result()
    assert nonfinite == {1} and fell_back == set() and torch.isnan(values[1]).all()
    assert torch.equal(values[0], alone[0]) and torch.equal(values[2], alone[1])
    assert pending.result() is pending.result()  # taken once, then kept
