"""Stage 3 of nerve_plugin.eigen: tridiagonal_eigvalsh (Sturm-count bisection with Newton probes, a Triton kernel).

Every case is checked against float64 torch.linalg.eigvalsh of the dense matrix, within c * eps * max|eig| *
sqrt(n): the reference itself is only that accurate (a few eps * ||T|| growing with n; the kernel is within about
one eps * ||T||, which the closed-form case and the extended-precision Sturm counts below check more sharply).
Without a GPU the kernel runs under Triton's interpreter (tests/conftest.py), which is slow, so sizes stay small.
"""

import math

import numpy as np
import pytest
import torch

from nerve_plugin.eigen.tridiagonal import MAX_ITERS_NEWTON, _launch, _scaled_problem, tridiagonal_eigvalsh

EPS = torch.finfo(torch.float64).eps
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# the interpreter evaluates the kernel with numpy, which warns where the GPU silently produces inf or NaN in the
# Newton estimate (at an exact eigenvalue, for instance); those estimates are discarded by design
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]


def dense(d, e):
    return torch.diag_embed(d) + torch.diag_embed(e, -1) + torch.diag_embed(e, 1)


def assert_matches_reference(eigenvalues, d, e, c=4.0):
    reference = torch.linalg.eigvalsh(dense(d, e))
    scale = reference.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    error = ((eigenvalues - reference).abs() / scale).amax().item() / EPS
    assert eigenvalues.shape == d.shape and eigenvalues.dtype == torch.float64
    assert torch.isfinite(eigenvalues).all()
    assert (eigenvalues[:, 1:] >= eigenvalues[:, :-1]).all(), "not ascending"
    assert error <= c * math.sqrt(d.shape[1]), f"error {error:.1f} eps * max|eig|"


def random_tridiagonal(batch, n, seed):
    generator = torch.Generator().manual_seed(seed)
    d = torch.randn(batch, n, generator=generator, dtype=torch.float64)
    e = torch.randn(batch, n - 1, generator=generator, dtype=torch.float64)
    return d.to(DEVICE), e.to(DEVICE)


def wilkinson(m):
    """W_m^+: d = |k - (m - 1) / 2|, e = 1; its large eigenvalues come in pairs equal to many digits."""
    d = torch.tensor([abs(k - (m - 1) / 2) for k in range(m)], dtype=torch.float64)
    return d, torch.ones(m - 1, dtype=torch.float64)


def sturm_count_extended(d, e, x):
    """Eigenvalues below each x, by the LDL^T recurrence in numpy's extended precision (80-bit on x86)."""
    d = d.astype(np.longdouble)
    e2 = e.astype(np.longdouble) ** 2
    x = x.astype(np.longdouble)
    pivot = d[0] - x
    count = (pivot < 0).astype(np.int64)
    tiny = np.finfo(np.longdouble).tiny
    with np.errstate(all="ignore"):
        for k in range(1, len(d)):
            pivot = np.where(pivot == 0, -tiny, pivot)
            pivot = (d[k] - x) - e2[k - 1] / pivot
            count += pivot < 0
    return count


@pytest.fixture(scope="module")
def random_64():
    d, e = random_tridiagonal(2, 64, seed=0)
    return d, e, tridiagonal_eigvalsh(d, e)  # the default block: one program per matrix


def test_random_matches_reference(random_64):
    d, e, eigenvalues = random_64
    assert_matches_reference(eigenvalues, d, e)


def test_random_certified_by_extended_precision_counts(random_64):
    """Independent of any dense solver: eigenvalue j lies within 2 eps * ||T|| of the returned value, by counts in
    extended precision, i.e. count(value - delta) <= j < count(value + delta)."""
    d, e, eigenvalues = random_64
    index = np.arange(d.shape[1])
    for row in range(d.shape[0]):
        dn, en, values = d[row].cpu().numpy(), e[row].cpu().numpy(), eigenvalues[row].cpu().numpy()
        norm = np.abs(torch.linalg.eigvalsh(dense(d[row], e[row])).cpu().numpy()).max()
        delta = 2 * EPS * norm
        assert (sturm_count_extended(dn, en, values - delta) <= index).all()
        assert (sturm_count_extended(dn, en, values + delta) > index).all()


@pytest.mark.parametrize("n, newton", [(40, True), (24, False)])
def test_second_difference_closed_form(n, newton):
    """d = 2, e = -1: eigenvalues 2 - 2 cos(k pi / (n + 1)), known exactly; Newton-assisted and plain bisection."""
    d = torch.full((1, n), 2.0, dtype=torch.float64, device=DEVICE)
    e = torch.full((1, n - 1), -1.0, dtype=torch.float64, device=DEVICE)
    k = torch.arange(1, n + 1, dtype=torch.float64, device=DEVICE)
    exact = 2 - 2 * torch.cos(k * math.pi / (n + 1))
    error = (tridiagonal_eigvalsh(d, e, newton=newton)[0] - exact).abs().max().item()
    assert error <= 4 * EPS * 4, f"error {error / EPS:.2f} eps"


@pytest.mark.parametrize("n", [1, 2])
def test_tiny_sizes(n):
    d, e = random_tridiagonal(3, n, seed=n)
    d[1] = 5.0  # n = 2: a double eigenvalue when e = 0
    e[1] = 0.0
    eigenvalues = tridiagonal_eigvalsh(d, e, block=16)
    assert_matches_reference(eigenvalues, d, e, c=2.0)
    if n == 1:
        assert ((eigenvalues - d).abs() <= 2 * EPS * d.abs()).all()


def test_batch_mixing_structures():
    """One batch (one n, odd and not a multiple of the block) of very different matrices: random, diagonal,
    constant (one n-fold eigenvalue), Wilkinson W21+ (close pairs), a graded matrix whose eigenvalues span 1e6
    down to ~1e-12, and two W21+ copies glued by 1e-10 halves (clusters of near-degenerate eigenvalues)."""
    n = 21
    d, e = random_tridiagonal(6, n, seed=3)
    generator = torch.Generator().manual_seed(4)
    d[1] = torch.randn(n, generator=generator, dtype=torch.float64).to(DEVICE) * 10  # diagonal
    e[1] = 0.0
    d[2] = -3.0  # constant
    e[2] = 0.0
    d[3], e[3] = (t.to(DEVICE) for t in wilkinson(n))
    d[4] = 1e6 * torch.logspace(0, -18, n, dtype=torch.float64, device=DEVICE)  # graded
    e[4] = 0.1 * (d[4, :-1] * d[4, 1:]).sqrt()
    half_d, half_e = wilkinson(11)
    d[5] = torch.cat([half_d[:10], half_d]).to(DEVICE)
    e[5] = torch.cat([half_e[:9], torch.tensor([1e-10], dtype=torch.float64), half_e]).to(DEVICE)
    eigenvalues = tridiagonal_eigvalsh(d, e, block=32)
    assert_matches_reference(eigenvalues, d, e)
    # the diagonal and the constant matrix: every eigenvalue to within half the tolerance (eps * ||T||)
    assert ((eigenvalues[1] - torch.sort(d[1]).values).abs() <= EPS * d[1].abs().max()).all()
    assert ((eigenvalues[2] + 3.0).abs() <= EPS * 3.0).all()


def test_glued_wilkinson_clusters():
    """Two W21+ glued by 1e-10: twenty pairs of eigenvalues within ~1e-10 of each other."""
    w_d, w_e = wilkinson(21)
    d = torch.cat([w_d, w_d])[None].to(DEVICE)
    e = torch.cat([w_e, torch.tensor([1e-10], dtype=torch.float64), w_e])[None].to(DEVICE)
    assert_matches_reference(tridiagonal_eigvalsh(d, e), d, e)


def test_huge_dynamic_range_has_no_nan():
    n = 32
    d = (1e6 * torch.logspace(0, -18, n, dtype=torch.float64)).to(DEVICE)
    e = 0.5 * (d[:-1] * d[1:]).sqrt()
    eigenvalues = tridiagonal_eigvalsh(d[None], e[None], block=16)
    assert_matches_reference(eigenvalues, d[None], e[None])
    assert eigenvalues.abs().min() < 1e-6 * eigenvalues.abs().max()  # the small ones are there, not flushed


def test_power_of_two_scaling_is_exact():
    """Eigenvalues of 2^k T are exactly 2^k times those of T; at 2^-600 the unscaled e^2 would underflow and at
    2^600 overflow, so this also checks that the kernel works on the rescaled matrix."""
    d, e = random_tridiagonal(1, 12, seed=5)
    base = tridiagonal_eigvalsh(d, e, block=16)
    for power in (-600, 600):
        factor = 2.0**power
        assert torch.equal(tridiagonal_eigvalsh(d * factor, e * factor, block=16), base * factor)


def test_zero_matrix():
    d = torch.zeros(2, 5, dtype=torch.float64, device=DEVICE)
    eigenvalues = tridiagonal_eigvalsh(d, torch.zeros(2, 4, dtype=torch.float64, device=DEVICE), block=16)
    assert (eigenvalues.abs() <= 1e-300).all()


def test_several_programs_per_matrix_and_newton_pays():
    """n = 37 with blocks of 16: three programs per matrix, the last one mostly padding. Newton probes keep the
    iteration count far below plain bisection's ~50, and far below the cap."""
    d, e = random_tridiagonal(1, 37, seed=6)
    diag, offdiag_sq, bounds, scale = _scaled_problem(d, e)
    scaled, iterations = _launch(diag, offdiag_sq, bounds, 37, block=16)  # what tridiagonal_eigvalsh runs
    assert_matches_reference(torch.sort(scaled / scale[:, None]).values, d, e)
    assert iterations.shape == (1, 3)
    assert iterations.max().item() <= 24 < MAX_ITERS_NEWTON, iterations.tolist()


@pytest.mark.skipif(DEVICE == "cuda", reason="the compiled kernel always shares probes one at a time")
def test_probe_sharing_paths_agree():
    """The compiled kernel takes the other lanes' probes one at a time, the interpreted one a chunk at a time
    (cheaper there); both must give bitwise the same intervals."""
    d, e = random_tridiagonal(1, 13, seed=7)
    problem = _scaled_problem(d, e)[:3]
    one_at_a_time = _launch(*problem, 13, block=8, share_chunk=1)
    chunked = _launch(*problem, 13, block=8, share_chunk=4)
    assert torch.equal(one_at_a_time[0], chunked[0]) and torch.equal(one_at_a_time[1], chunked[1])


def test_rejects_bad_input():
    d = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="expected d"):
        tridiagonal_eigvalsh(d, torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="float64"):
        tridiagonal_eigvalsh(d.float(), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="power of two"):
        tridiagonal_eigvalsh(d, torch.zeros(2, 3, dtype=torch.float64), block=48)
    assert tridiagonal_eigvalsh(d[:0], torch.zeros(0, 3, dtype=torch.float64)).shape == (0, 4)
