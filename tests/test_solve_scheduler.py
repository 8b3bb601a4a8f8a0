"""solve.SolveScheduler: when a logging step's states are solved, one interface for "sync", "overlap" and
"stream" (on CPU statistics "stream" solves at submit and keeps the results until due, as on a GPU)."""

import numpy as np
import pytest
import torch

from nerve_plugin.solve import SolveScheduler


def states(seed: int, dim: int = 6, count: int = 40):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(count, dim, dtype=torch.float64, generator=gen)
    x = x - x.mean(0)
    return [((0, "pre"), count, x.T @ x), ((0, "post"), 1, torch.zeros(dim, dim, dtype=torch.float64))]


def reference(seed: int) -> np.ndarray:
    (_, count, m2), _ = states(seed)
    return np.sort(np.linalg.eigvalsh((m2 / (count - 1)).numpy()))[::-1].clip(1e-12)


@pytest.mark.parametrize("timing", ["sync", "overlap", "stream"])
def test_due_gives_each_step_once_in_order_with_exact_spectra(timing):
    scheduler = SolveScheduler(timing, threads=1)
    try:
        scheduler.submit(2, states(2))
        scheduler.submit(4, states(4))
        # sync results are due at once; overlapped ones only at a later step (here: those before step 4)
        first = scheduler.due(before=4)
        assert [step for step, _ in first] == ([2, 4] if timing == "sync" else [2])
        rest = scheduler.due(before=None)
        assert [step for step, _ in first + rest] == [2, 4]
        assert not scheduler.pending and scheduler.due(before=None) == []
        for step, results in first + rest:
            np.testing.assert_allclose(results[(0, "pre")].eigenvalues, reference(step), rtol=1e-12, atol=1e-15)
            assert results[(0, "pre")].status == "ok"
            assert results[(0, "post")].eigenvalues is None
            assert results[(0, "post")].status.startswith("too few tokens: 1")
    finally:
        scheduler.close()


@pytest.mark.parametrize("timing", ["overlap", "stream"])
def test_ready_waits_a_bounded_time_and_keeps_the_steps_pending(timing):
    scheduler = SolveScheduler(timing, threads=1)
    try:
        scheduler.submit(3, states(3))
        ((step, results),) = scheduler.ready(wait_s=60)
        assert step == 3 and set(results) == {(0, "pre"), (0, "post")}
        assert scheduler.pending and [s for s, _ in scheduler.due(before=None)] == [3]
    finally:
        scheduler.close()


def test_an_unknown_timing_names_the_choices():
    with pytest.raises(ValueError, match="sync.*overlap.*stream"):
        SolveScheduler("later")
