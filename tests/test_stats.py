"""Streaming covariance statistics against the two-pass float64 covariance of all rows at once."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import free_port
from nerve_plugin import CovarianceStats, reduce_stats

TOLERANCE = 1e-6
# A float32 M2 carries the rounding of float32 sums of N products, ~sqrt(N) eps32 relative for random-order
# rounding: 1.9e-6 at the 1024 rows below. How close a BLAS gets depends on its summation order (an AVX-512 host
# gave 1.09e-6 where CI's stayed under 1e-6), so the float32 bound is that size, not a number tuned to one host.
FLOAT32_TOLERANCE = 2 * 1024**0.5 * torch.finfo(torch.float32).eps


def two_pass_covariance(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    centred = rows - rows.mean(axis=0)
    return centred.T @ centred / (rows.shape[0] - 1)


def relative_error(cov: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.linalg.norm(cov.numpy() - ref) / np.linalg.norm(ref))


def make_rows(seed: int, n: int, d: int, mean_over_spread: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5
    spread = torch.randn(n, d, generator=gen, dtype=torch.float64) @ mixing
    mean = torch.randn(d, generator=gen, dtype=torch.float64).sign() * mean_over_spread * spread.std()
    return spread + mean


def stream(rows: torch.Tensor, sizes: list[int], accumulate_dtype: torch.dtype) -> CovarianceStats:
    stats = CovarianceStats(rows.shape[-1], accumulate_dtype=accumulate_dtype)
    for chunk in rows.split(sizes):
        stats.update(chunk)
    return stats


UNEVEN = [1, 37, 200, 3, 0, 511, 2, 270]  # sums to 1024; includes a 1-row and an empty micro-batch


@pytest.mark.parametrize("accumulate_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("input_dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mean_over_spread", [0.0, 1.0, 1e3])
def test_streamed_covariance_equals_two_pass(input_dtype, accumulate_dtype, mean_over_spread):
    rows = make_rows(7, sum(UNEVEN), 48, mean_over_spread).to(input_dtype)
    # The reference sees exactly the values the stream sees (after rounding to the input dtype).
    ref = two_pass_covariance(rows.double().numpy())
    stats = stream(rows, UNEVEN, accumulate_dtype)
    assert stats.count == sum(UNEVEN)
    tolerance = TOLERANCE if accumulate_dtype == torch.float64 else FLOAT32_TOLERANCE
    assert relative_error(stats.covariance(), ref) < tolerance
    ref_mean = rows.double().numpy().mean(axis=0)
    spread = np.sqrt(np.diag(ref).max())
    np.testing.assert_allclose(stats.mean.numpy(), ref_mean, rtol=1e-12, atol=TOLERANCE * spread)


def test_large_mean_in_float32_needs_the_shift():
    # The same data folded as raw sums (X^T X - n mu mu^T in float32) loses the covariance entirely, which
    # is what the shifted update protects against. This keeps the data set of the test above honest.
    rows = make_rows(7, 1024, 48, 1e3).float()
    ref = two_pass_covariance(rows.double().numpy())
    raw = rows.T @ rows - rows.shape[0] * torch.outer(rows.mean(0), rows.mean(0))
    assert relative_error(raw.double() / (rows.shape[0] - 1), ref) > 1e-2
    assert relative_error(stream(rows, UNEVEN, torch.float32).covariance(), ref) < TOLERANCE


def test_merge_of_two_streams_equals_one_stream():
    rows = make_rows(3, 900, 32, 50.0)
    # Different halves get very different means: the Chan cross term is what joins them.
    rows[:400] += 20.0
    a = stream(rows[:400], [100, 300], torch.float64)
    b = stream(rows[400:], [250, 250], torch.float64)
    empty = CovarianceStats(32)
    a.merge_(empty).merge_(b)
    assert a.count == 900
    assert relative_error(a.covariance(), two_pass_covariance(rows.numpy())) < 1e-12


def test_update_accepts_leading_dimensions_and_checks_width():
    rows = make_rows(5, 4 * 16, 8, 1.0)
    stats = CovarianceStats(8)
    stats.update(rows.view(4, 16, 8))
    assert relative_error(stats.covariance(), two_pass_covariance(rows.numpy())) < 1e-12
    with pytest.raises(ValueError, match="last dimension 8"):
        stats.update(torch.zeros(3, 9))
    with pytest.raises(ValueError, match="at least 2 rows"):
        CovarianceStats(8).covariance()


# -- two ranks over gloo ------------------------------------------------------------------------------------

RANK_ROWS = {0: (0, 700, [300, 400]), 1: (700, 1000, [1, 99, 0, 200])}  # uneven token counts per rank
DIMS = (16, 40)


def _all_rows(d: int) -> torch.Tensor:
    rows = make_rows(d, 1000, d, 1e3)
    rows[700:] -= 3.0 * rows[:700].std()  # the ranks' means differ
    return rows


def _gloo_worker(rank: int, port: int, accumulate_dtype: torch.dtype) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        start, stop, sizes = RANK_ROWS[rank]
        references = [two_pass_covariance(_all_rows(d).numpy()) for d in DIMS]
        references.append(two_pass_covariance(make_rows(11, 50, 8, 2.0).numpy()))
        counts = [1000, 1000, 50]

        def check(merged, indices):
            for i in indices:
                assert merged[i].count == counts[i], (rank, i)
                err = relative_error(merged[i].covariance(), references[i])
                assert err < TOLERANCE, (rank, i, err)

        def local_states():
            states = [stream(_all_rows(d)[start:stop], sizes, accumulate_dtype) for d in DIMS]
            # A state that only rank 1 has rows for: rank 0 takes part with an empty one.
            only_one = CovarianceStats(8, accumulate_dtype=accumulate_dtype)
            if rank == 1:
                only_one.update(make_rows(11, 50, 8, 2.0))
            return states + [only_one]

        merged = local_states()
        assert reduce_stats(merged) == [0, 1, 2]
        check(merged, range(3))
        # Owners: each merge lands on one rank only (the eigen-solves are then spread over ranks).
        owners = [1, 0, 1]
        merged = local_states()
        mine = reduce_stats(merged, owners=owners)
        assert mine == [i for i, owner in enumerate(owners) if owner == rank]
        check(merged, mine)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("accumulate_dtype", [torch.float64, torch.float32])
def test_two_rank_gloo_merge_equals_one_process(accumulate_dtype):
    mp.spawn(_gloo_worker, args=(free_port(), accumulate_dtype), nprocs=2, join=True)


def test_shift_rule():
    # Features 0-3 have a mean 50x their spread, 4-7 a mean of half of it.
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(500, 8, generator=gen, dtype=torch.float64)
    rows[:, :4] += 50.0
    rows[:, 4:] += 0.5
    stats = CovarianceStats(8)
    # fp32/fp64 Grams: always the mean (batch mean first, running mean after).
    assert torch.equal(stats._shift(rows, torch.float64), rows.mean(0))
    # bf16 Grams: only where the mean dominates, so that values near zero stay exact in the Gram.
    first = stats._shift(rows, torch.bfloat16)
    assert torch.equal(first[:4], rows[:, :4].mean(0)) and torch.all(first[4:] == 0)
    stats.update(rows)
    assert torch.equal(stats._shift(rows, torch.float32), stats.mean)
    later = stats._shift(rows, torch.bfloat16)
    assert torch.equal(later[:4], stats.mean[:4]) and torch.all(later[4:] == 0)
