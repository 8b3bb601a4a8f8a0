"""[nerve] max_overhead: the cost model (nerve_plugin/budget.py) picks the exact layer count for given timings, and
NerveMonitor/NerveLoop runs on an injected clock measure those counts, rotating over every layer, with every
rank agreeing (two gloo processes).

The monitor's expensive part is faked by advancing the test's clock inside ``NerveMonitor._reduce_owned``: a
cost per measured layer and a fixed cost per logging step, whatever solver runs after it.
"""

import json
import logging
import os
import time
from datetime import timedelta

import pytest
import torch

from helpers import read_jsonl
from nerve_plugin import NerveLoop
from nerve_plugin.budget import OverheadBudget, StepTimes
from nerve_plugin.monitor import MonitorConfig, NerveMonitor, ParallelGroups
from toy_model import SPEC, ToyModel

DIM, HIDDEN, LAYERS = 4, 6, 5
STEP_S = 0.1  # a normal step on the test's clock


# -- the cost model ------------------------------------------------------------------------------------------


def test_picks_the_largest_count_within_the_budget_from_the_fitted_line():
    budget = OverheadBudget(0.05, log_freq=100)
    budget.observe(8, 0.80)
    budget.observe(2, 0.26)  # fixed 80 ms + 90 ms per layer
    assert budget.fit() == pytest.approx((0.08, 0.09))
    # allowance 0.05 x 100 x 0.1 s = 0.5 s: 4 layers cost 0.44 s, 5 would cost 0.53 s
    choice = budget.choose(total=8, step_s=0.1)
    assert (choice.layers, choice.total) == (4, 8)
    assert choice.overhead_s == pytest.approx(0.44) and choice.amortized == pytest.approx(0.044)
    assert not choice.over_budget
    assert budget.choose(total=8, step_s=0.1, cap=3).layers == 3  # max_layers_per_step only lowers it
    assert budget.choose(total=8, step_s=0.2).layers == 8  # twice the step time: everything fits


def test_a_count_exactly_at_the_budget_is_taken():
    budget = OverheadBudget(0.05, log_freq=10)
    budget.observe(4, 0.1)  # 25 ms per layer; allowance 0.05 x 10 x 0.1 = 50 ms: 2 layers, exactly
    assert budget.choose(total=4, step_s=0.1).layers == 2


def test_at_least_one_layer_and_one_warning_naming_a_log_freq_that_fits(caplog):
    budget = OverheadBudget(0.05, log_freq=100)
    budget.observe(4, 4.0)  # 1 s per layer against an allowance of 0.5 s
    with caplog.at_level(logging.INFO, logger="nerve_plugin.budget"):
        assert budget.update(total=4, step_s=0.1) == 1
        budget.observe(1, 1.0)
        assert budget.update(total=4, step_s=0.1) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "nerve: max_overhead = 0.05 cannot be met at log_freq 100: one layer per logging step adds ~1000 ms to a "
        "100 ms step (10.0%); measuring 1 of 4 layers per logging step anyway. log_freq >= 200 would fit the budget"
    ]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == [
        "nerve: measuring 1 of 4 layers per logging step (logging step ~1000 ms over a 100 ms step, "
        "10.0% at log_freq 100; budget 5%)"
    ]  # once: the choice did not change


def test_the_warm_up_step_counts_only_until_a_later_one_exists(caplog):
    budget = OverheadBudget(0.05, log_freq=100)
    budget.observe(8, 80.0, warm_up=True)  # compilation and solver start-up: 10 s a layer
    with caplog.at_level(logging.INFO, logger="nerve_plugin.budget"):
        assert budget.update(total=8, step_s=0.1) == 1
    assert [r.levelname for r in caplog.records] == ["INFO"]  # no over-budget warning from the warm-up step
    budget.observe(8, 0.8)
    assert budget.fit() == pytest.approx((0.0, 0.1))  # the warm-up step is gone, not averaged in
    assert budget.choose(total=8, step_s=0.1).layers == 5


def test_no_budget_or_nothing_to_decide_from_leaves_every_layer():
    off = OverheadBudget(0.0, log_freq=100)
    off.observe(8, 100.0)
    assert not off.active and off.choose(total=8, step_s=0.1) is None
    every_step_logs = OverheadBudget(0.05, log_freq=1)
    every_step_logs.observe(8, 100.0)
    assert not every_step_logs.active and every_step_logs.choose(total=8, step_s=0.1) is None
    undecided = OverheadBudget(0.05, log_freq=100)
    assert undecided.choose(total=8, step_s=0.1) is None  # no logging step timed
    undecided.observe(8, 0.8)
    assert undecided.choose(total=8, step_s=None) is None  # no normal step timed


def test_one_slow_logging_step_does_not_move_the_fit():
    budget = OverheadBudget(0.05, log_freq=100)
    for overhead in (0.30, 0.30, 3.0, 0.30):  # a checkpoint or a page-cache miss in one of them
        budget.observe(3, overhead)
    assert budget.fit() == pytest.approx((0.0, 0.1))


def test_the_first_logging_step_at_a_new_count_counts_until_a_second_one():
    budget = OverheadBudget(0.05, log_freq=100)
    budget.observe(4, 0.4)
    budget.observe(2, 1.2)  # a new batch shape for the solver: compiled, captured
    assert budget.fit() == (pytest.approx(0.8), 0.0)  # taken at its word for now: a cost that does not grow
    budget.observe(2, 0.2)
    assert budget.fit() == pytest.approx((0.0, 0.1))


def test_step_times_median():
    times = StepTimes(window=3)
    assert times.median() is None
    for seconds in (0.1, 5.0, 0.12, 0.11):  # the window keeps the last three
        times.add(seconds)
    assert times.median() == pytest.approx(0.12)


# -- NerveMonitor / NerveLoop on an injected clock -----------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Toy(ToyModel):
    def __init__(self):
        super().__init__(DIM, HIDDEN, LAYERS)


REDUCE_OWNED = NerveMonitor._reduce_owned


def fake_cost(monkeypatch, clock, per_layer_s: float, fixed_s: float = 0.0):
    """Every logging step costs fixed_s + per_layer_s per measured layer on ``clock``."""

    def expensive(self):
        owned = REDUCE_OWNED(self)
        clock.advance(fixed_s + per_layer_s * len({key[0] for key, _, _ in owned}))
        return owned

    monkeypatch.setattr(NerveMonitor, "_reduce_owned", expensive)


def batch(step: int, rank: int = 0) -> torch.Tensor:
    return torch.randn(2, 8, DIM, generator=torch.Generator().manual_seed(100 * step + rank), dtype=torch.float64)


def run(monitor, clock, steps: int, rank: int = 0) -> dict[int, list[int]]:
    """{logging step: layers it measured}, from what the monitor armed and what its records hold."""
    model = monitor.parts[0]
    measured = {}
    for step in range(1, steps + 1):
        monitor.begin_step(step)
        if monitor.armed_step == step:
            measured[step] = monitor.selected_layers(step)
        model(batch(step, rank))
        clock.advance(STEP_S)
        records = monitor.end_step(step)
        if records:
            assert [r.layer for r in records] == measured[step]
    monitor.close()
    return measured


def monitor_for(clock, **options) -> NerveMonitor:
    model = Toy().double()
    return NerveMonitor(model, SPEC, MonitorConfig(**{"log_freq": 10, **options}), clock=clock).attach()


ALL = list(range(LAYERS))


@pytest.mark.parametrize(
    "fixed_s, windows, infos",
    [
        # step 1: warm-up, and no step timed before it; step 10: every layer again, now timed against steps 2-9.
        # 20 ms a layer, allowance 0.05 x 10 x 0.1 s = 50 ms: 2 layers, windows wrapping round the 5
        (0.0, [ALL, ALL, [0, 1], [2, 3], [0, 4], [1, 2]], ["~40 ms over a 100 ms step, 4.0%"]),
        # +20 ms fixed: step 10 costs 120 ms (24 ms a layer while it is all taken as per-layer: 2 layers); step 20's
        # 60 ms for 2 layers gives the line, 20 ms + 20 ms a layer: 1 layer (40 ms), from where step 20 ended
        (
            0.02,
            [ALL, ALL, [0, 1], [2], [3], [4]],
            ["~48 ms over a 100 ms step, 4.8%", "~40 ms over a 100 ms step, 4.0%"],
        ),
    ],
)
def test_an_expensive_logging_step_measures_a_rotating_subset(monkeypatch, caplog, fixed_s, windows, infos):
    clock = Clock()
    fake_cost(monkeypatch, clock, per_layer_s=0.02, fixed_s=fixed_s)
    with caplog.at_level(logging.INFO, logger="nerve_plugin.budget"):
        measured = run(monitor_for(clock), clock, 50)
    assert measured == dict(zip([1, 10, 20, 30, 40, 50], windows))
    # one line per change of the choice, and no warning
    assert [r.getMessage() for r in caplog.records] == [
        f"nerve: measuring {len(windows[2 + i])} of 5 layers per logging step (logging step {info} at log_freq 10; "
        "budget 5%)"
        for i, info in enumerate(infos)
    ]


def test_over_budget_measures_one_layer_at_a_time_and_warns_once(monkeypatch, caplog):
    clock = Clock()
    fake_cost(monkeypatch, clock, per_layer_s=0.2)  # 4x the allowance for a single layer
    with caplog.at_level(logging.INFO, logger="nerve_plugin.budget"):
        measured = run(monitor_for(clock), clock, 70)
    assert [len(measured[s]) for s in sorted(measured)] == [5, 5, 1, 1, 1, 1, 1, 1]
    assert sorted(layer for s in sorted(measured)[2:7] for layer in measured[s]) == ALL
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "log_freq >= 40 would fit the budget" in warnings[0]


def test_a_resumed_run_shrinks_for_one_logging_step_after_its_warm_up_at_most(monkeypatch, caplog):
    clock = Clock()
    fake_cost(monkeypatch, clock, per_layer_s=0.02)
    monitor = monitor_for(clock)
    real_end_step = monitor.end_step

    def end_step(step):  # the process's first logging step compiles the capture graph, starts the solver...
        if step == 10:
            clock.advance(1.0)
        return real_end_step(step)

    monitor.end_step = end_step
    with caplog.at_level(logging.INFO, logger="nerve_plugin.budget"):
        measured = {}
        for step in range(5, 51):  # resumed after step 4: steps 5-9 give the normal step before step 10
            monitor.begin_step(step)
            if monitor.armed_step == step:
                measured[step] = len(monitor.selected_layers(step))
            monitor.parts[0](batch(step))
            clock.advance(STEP_S)
            monitor.end_step(step)
        monitor.close()
    # step 10 (1.1 s for 5 layers, warm) chooses 1 for step 20; step 20's 20 ms replace it: 2 layers from step 30
    assert measured == {10: 5, 20: 1, 30: 2, 40: 2, 50: 2}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no verdict from the warm-up step


def test_max_layers_per_step_caps_and_the_budget_lowers(monkeypatch):
    clock = Clock()
    fake_cost(monkeypatch, clock, per_layer_s=0.001)  # everything fits: the cap decides
    assert [len(v) for v in run(monitor_for(clock, max_layers_per_step=3), clock, 40).values()] == [3, 3, 3, 3, 3]
    clock = Clock()
    fake_cost(monkeypatch, clock, per_layer_s=0.02)  # the budget allows 2
    measured = run(monitor_for(clock, max_layers_per_step=3), clock, 40)
    assert [len(v) for v in measured.values()] == [3, 3, 2, 2, 2]
    # the 2-layer windows start where step 10's 3-layer window ended
    assert [measured[s] for s in (1, 10, 20, 30, 40)] == [[0, 1, 2], [0, 3, 4], [1, 2], [3, 4], [0, 1]]


@pytest.mark.parametrize("options", [dict(max_overhead=0), dict(log_freq=1)])
def test_no_budget_measures_every_layer_at_every_logging_step(monkeypatch, caplog, options):
    clock = Clock()
    fake_cost(monkeypatch, clock, per_layer_s=1.0)
    with caplog.at_level(logging.INFO, logger="nerve_plugin"):
        measured = run(monitor_for(clock, **options), clock, 30)
    assert all(layers == ALL for layers in measured.values()) and len(measured) >= 4
    messages = [r.getMessage() for r in caplog.records]
    if options.get("log_freq") == 1:  # not silently: once, why the budget cannot act
        assert messages == [
            "nerve: max_overhead = 0.05 needs steps that do not log to time, and log_freq = 1 has "
            "none: every logging step measures 5 of 5 layers"
        ]
    else:
        assert messages == []


def test_nerve_loop_writes_the_records_of_the_measured_layers_unchanged(monkeypatch, tmp_path):
    def train(max_overhead, jsonl):
        clock = Clock()
        fake_cost(monkeypatch, clock, per_layer_s=0.02)
        model = Toy().double()
        nerve = NerveLoop(
            model,
            blocks="layers",
            up="w1",
            down="w2",
            log_freq=10,
            jsonl=str(jsonl),
            clock=clock,
            max_overhead=max_overhead,
        )
        for step in range(1, 41):
            nerve.begin_step(step)
            model(batch(step))
            clock.advance(STEP_S)
            nerve.end_step(step)
        nerve.close()
        return read_jsonl(jsonl)

    budgeted = train(0.05, tmp_path / "budget.jsonl")
    full = {(r["step"], r["layer"]): r for r in train(0, tmp_path / "full.jsonl")}
    assert [(r["step"], r["layer"]) for r in budgeted] == [(1, layer) for layer in ALL] + [
        (10, layer) for layer in ALL
    ] + [
        (20, 0),
        (20, 1),
        (30, 2),
        (30, 3),
        (40, 0),
        (40, 4),
    ]
    assert all(r == full[(r["step"], r["layer"])] for r in budgeted)  # the same records, just fewer


# -- every rank agrees --------------------------------------------------------------------------------------


def _agreeing_rank(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        clock = Clock()
        real = NerveMonitor._reduce_owned
        per_layer_s = (0.01, 0.02)[rank]  # alone, rank 0 would choose 2 layers and rank 1 one

        def expensive(self):
            owned = real(self)
            clock.advance(per_layer_s * len(self._selected))
            return owned

        NerveMonitor._reduce_owned = expensive
        model = Toy().double()
        monitor = NerveMonitor(
            model, SPEC, MonitorConfig(log_freq=5), ParallelGroups(token_group=dist.group.WORLD), clock=clock
        ).attach()
        measured, recorded = {}, {}
        for step in range(1, 36):
            monitor.begin_step(step)
            if monitor.armed_step == step:
                measured[step] = monitor.selected_layers(step)
            model(batch(step, rank))
            clock.advance(STEP_S)
            for r in monitor.end_step(step) or []:
                recorded.setdefault(step, []).append(r.layer)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"measured": measured, "recorded": recorded}, f)
        # Both ranks past their last collective before either tears gloo down: a rank that closes its
        # connections while the other still uses them aborts the other ("terminate called ..."), about one run
        # in eight here.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_chooses_from_the_slowest_ranks_timings(tmp_path):
    import torch.multiprocessing as mp

    context = mp.start_processes(
        _agreeing_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the ranks did not finish: a collective that not every rank issued?")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["measured"] == ranks[1]["measured"]
    # rank 1's 20 ms a layer decide (allowance 0.05 x 5 x 0.1 s = 25 ms: 1 layer), for both ranks
    sizes = {int(s): len(v) for s, v in ranks[0]["measured"].items()}
    assert sizes == {1: 5, 5: 5, 10: 1, 15: 1, 20: 1, 25: 1, 30: 1, 35: 1}
    assert ranks[0]["recorded"] == ranks[0]["measured"] and ranks[1]["recorded"] == {}  # rank 0 reports
    assert {v[0] for s, v in ranks[0]["measured"].items() if int(s) >= 10} == set(ALL)


def test_stream_solves_count_the_steps_they_slow_down(monkeypatch):
    """With solve_timing = "stream" a logging step's solves run beside the next steps and slow them: the budget
    charges that tail to the logging step (observed at the next logging step), and those steps are not normal
    steps. Own cost 10 ms a layer plus 5 ms a layer on each of the two steps after: 20 ms a layer, the first
    case of test_an_expensive_logging_step_measures_a_rotating_subset. Without the tail all 5 layers (50 ms)
    would fit the 50 ms allowance."""
    from nerve_plugin.solve import SolveScheduler

    clock = Clock()
    fake_cost(monkeypatch, clock, per_layer_s=0.01)
    ending = {"step": 0, "in_flight_until": 0}
    monkeypatch.setattr(SolveScheduler, "in_flight", lambda self: ending["step"] < ending["in_flight_until"])
    monitor = monitor_for(clock, solve_timing="stream")
    model = monitor.parts[0]
    measured, last_logged = {}, None
    for step in range(1, 51):
        monitor.begin_step(step)
        if monitor.armed_step == step:
            measured[step] = monitor.selected_layers(step)
        model(batch(step))
        clock.advance(STEP_S)
        if last_logged is not None and step - last_logged in (1, 2):
            clock.advance(0.005 * len(measured[last_logged]))  # the side stream's solves beside this step
        ending["step"] = step
        if step in measured:
            last_logged, ending["in_flight_until"] = step, step + 2
        monitor.end_step(step)
    monitor.close()
    assert measured == dict(zip([1, 10, 20, 30, 40, 50], [ALL, ALL, [0, 1], [2, 3], [0, 4], [1, 2]]))
    assert monitor._normal_steps.median() == pytest.approx(STEP_S)


def test_stream_tail_is_not_kept_without_a_budget(monkeypatch):
    """With max_overhead = 0 nothing takes the tail steps' times, so none are kept (no growth over a run)."""
    from nerve_plugin.solve import SolveScheduler

    clock = Clock()
    monkeypatch.setattr(SolveScheduler, "in_flight", lambda self: True)
    monitor = monitor_for(clock, solve_timing="stream", max_overhead=0)
    run(monitor, clock, 25)
    assert monitor._stream_tail == []
