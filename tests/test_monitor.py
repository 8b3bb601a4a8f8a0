"""NerveMonitor's step lifecycle: overlapped solves, layer rotation, hooks only where needed, faults, memory.

References are independent: activations captured by the test's own hooks, float64 numpy covariance and
eigenvalues, the metric formulas written out in tests/reference.py.
"""

import json
import logging
import math
import time

import numpy as np
import pytest
import torch

from helpers import read_jsonl
import nerve_plugin.solve as solve_module
from nerve_plugin.monitor import MonitorConfig, NerveMonitor
from nerve_plugin.writers import JsonlWriter
from reference import covariance, eigenvalues, metrics
from toy_model import SPEC, ToyModel

DIM, HIDDEN, LAYERS = 8, 12, 5


class Toy(ToyModel):
    def __init__(self):
        super().__init__(DIM, HIDDEN, LAYERS)


def batches(step):
    g = torch.Generator().manual_seed(step)
    return [torch.randn(3, 7, DIM, generator=g, dtype=torch.float64) for _ in range(2)]


def reference(model, step):
    """{(layer, tap): (tokens, eigenvalues desc)} from the test's own hooks and numpy float64."""
    seen = {}
    handles = []
    for i, block in enumerate(model.layers):
        handles.append(block.w1.register_forward_hook(lambda m, a, o, i=i: seen.setdefault((i, "pre"), []).append(o)))
        handles.append(
            block.w2.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault((i, "post"), []).append(a[0]))
        )
    with torch.no_grad():
        for x in batches(step):
            model(x)
    for h in handles:
        h.remove()
    out = {}
    for key, chunks in seen.items():
        x = torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks]).numpy().astype(np.float64)
        if not np.isfinite(x).all():
            continue
        out[key] = (x.shape[0], eigenvalues(covariance(x)))
    return out


def train(model, monitor, steps, flush_at=()):
    got = {}
    for step in range(1, steps + 1):
        monitor.begin_step(step)
        for x in batches(step):
            model(x)
        records = monitor.end_step(step) or []
        if step in flush_at:
            records += monitor.flush()
        for r in records:
            got[(r.step, r.layer)] = (step, r)
    for r in monitor.close():
        got[(r.step, r.layer)] = ("close", r)
    return got


def assert_matches(record, ref, rel=1e-10):
    for tap in ("pre", "post"):
        result = getattr(record, tap)
        tokens, eigs = ref[(record.layer, tap)]
        assert result.tokens == tokens and result.status == "ok"
        np.testing.assert_allclose(result.eigenvalues, eigs, rtol=rel, atol=1e-12)
        want = metrics(eigs)
        assert result.spectral_entropy == pytest.approx(want["spectral_entropy"], rel=rel)
        assert result.participation_ratio == pytest.approx(want["participation_ratio"], rel=rel)
        assert result.eee == pytest.approx(want["eee"], rel=rel, abs=1e-12)


@pytest.mark.parametrize("timing", ["overlap", "stream"])
def test_deferred_timings_return_each_step_at_the_next_logging_step_and_equal_sync(timing):
    model = Toy().double()
    # max_overhead = 0: every layer at every logging step, whatever this machine's step times
    sync = train(
        model, NerveMonitor(model, SPEC, MonitorConfig(log_freq=3, solve_timing="sync", max_overhead=0)).attach(), 7
    )
    overlap = train(
        model, NerveMonitor(model, SPEC, MonitorConfig(log_freq=3, solve_timing=timing, max_overhead=0)).attach(), 7
    )
    assert sorted(sync) == sorted(overlap) == [(s, layer) for s in (1, 3, 6) for layer in range(LAYERS)]
    for key, (returned_at, record) in overlap.items():
        # step 1 -> at step 3, step 3 -> at step 6, step 6 -> at close
        assert returned_at == {1: 3, 3: 6, 6: "close"}[key[0]]
        assert sync[key][0] == key[0]  # sync: at its own step
        np.testing.assert_array_equal(record.pre.eigenvalues, sync[key][1].pre.eigenvalues)
        assert record.js == sync[key][1].js
    for step in (1, 3, 6):
        ref = reference(model, step)
        for layer in range(LAYERS):
            assert_matches(overlap[(step, layer)][1], ref)


def test_flush_returns_pending_before_a_checkpoint():
    model = Toy().double()
    got = train(
        model, NerveMonitor(model, SPEC, MonitorConfig(log_freq=2, solve_timing="overlap")).attach(), 4, flush_at=(2,)
    )
    assert {key: at for key, (at, _) in got.items() if key[0] == 2} == {(2, layer): 2 for layer in range(LAYERS)}


@pytest.mark.parametrize("cap", [2, 3])
def test_rotation_measures_windows_of_layers_by_step(cap):
    model = Toy().double()
    config = MonitorConfig(log_freq=1, max_layers_per_step=cap)
    monitor = NerveMonitor(model, SPEC, config).attach()
    windows = math.ceil(LAYERS / cap)
    got = train(model, monitor, 2 * windows)
    seen_layers = set()
    for step in range(1, 2 * windows + 1):
        layers = sorted(layer for (s, layer) in got if s == step)
        index = 0 if step == 1 else step
        # windows of `cap` layers, one after the other, wrapping round the end: a function of the step
        assert layers == sorted((index * cap + i) % LAYERS for i in range(cap))
        assert layers == monitor.selected_layers(step)
        seen_layers.update(layers)
        ref = reference(model, step)
        for layer in layers:
            assert_matches(got[(step, layer)][1], ref)
    assert seen_layers == set(range(LAYERS))


def test_eager_hooks_exist_only_during_logging_steps():
    model = Toy().double()
    monitor = NerveMonitor(model, SPEC, MonitorConfig(log_freq=2)).attach()
    w1 = model.layers[0].w1
    assert len(w1._forward_hooks) == 1  # attached up front, so that a compile would see them
    monitor.begin_step(1)
    assert len(w1._forward_hooks) == 1
    model(batches(1)[0])
    monitor.end_step(1)
    assert len(w1._forward_hooks) == 0 and len(model.layers[0].w2._forward_pre_hooks) == 0
    monitor.begin_step(2)
    assert len(w1._forward_hooks) == 1
    model(batches(2)[0])
    assert len(monitor.end_step(2)) == LAYERS
    monitor.begin_step(3)
    assert len(w1._forward_hooks) == 0
    monitor.close()


def test_compiled_blocks_keep_their_hooks():
    model = Toy().double()
    monitor = NerveMonitor(model, SPEC, MonitorConfig(log_freq=2)).attach()
    model.layers[0] = torch.compile(model.layers[0])  # lazily: nothing is traced until it runs
    monitor.begin_step(3)
    monitor.end_step(3)
    assert len(model.layers[1].w1._forward_hooks) == 1
    monitor.close()
    assert len(model.layers[1].w1._forward_hooks) == 0


def test_non_finite_layer_is_reported_and_the_others_are_exact(caplog):
    model = Toy().double()
    with torch.no_grad():
        model.layers[2].w1.weight[0, 0] = math.inf
    monitor = NerveMonitor(model, SPEC, MonitorConfig(log_freq=1)).attach()
    with caplog.at_level(logging.WARNING):
        got = train(model, monitor, 1)
    bad = got[(1, 2)][1]
    assert bad.pre.status == "non-finite statistics" and math.isnan(bad.pre.spectral_entropy)
    assert math.isnan(bad.js)
    assert any("layer 2 pre" in m and "non-finite" in m for m in caplog.messages)
    ref = reference(model, 1)
    for layer in (0, 1, 3, 4):
        assert_matches(got[(1, layer)][1], ref)
    line = json.loads(json.dumps(bad.to_json(), allow_nan=False))
    assert line["pre"]["spectral_entropy"] is None and line["pre"]["status"] == "non-finite statistics"


def test_a_failing_solver_falls_back_and_says_so(monkeypatch):
    model = Toy().double()
    real = solve_module.compute_sorted_eigs
    calls = []

    def flaky(cov):
        calls.append(cov.shape[0])
        if cov.shape[0] == HIDDEN and len(calls) == 1:
            raise torch.linalg.LinAlgError("failed to converge")
        return real(cov)

    monkeypatch.setattr(solve_module, "compute_sorted_eigs", flaky)
    got = train(model, NerveMonitor(model, SPEC, MonitorConfig(log_freq=1, layers=[0])).attach(), 1)
    record = got[(1, 0)][1]
    statuses = {record.pre.status, record.post.status}
    assert any(s.startswith("fallback: svd") and "failed to converge" in s for s in statuses)
    ref = reference(model, 1)
    for tap in ("pre", "post"):
        np.testing.assert_allclose(getattr(record, tap).eigenvalues, ref[(0, tap)][1], rtol=1e-9, atol=1e-12)


def test_buffer_bytes_counts_the_rotation_window():
    model = Toy()
    full = NerveMonitor(model, SPEC, MonitorConfig()).buffer_bytes("cpu")
    capped = NerveMonitor(model, SPEC, MonitorConfig(max_layers_per_step=2)).buffer_bytes("cpu")
    per_layer = (HIDDEN**2 + HIDDEN**2) * 8  # float64 on the CPU, pre and post both HIDDEN wide
    working = 2 * HIDDEN**2 * 8
    assert full == LAYERS * per_layer + working
    assert capped == 2 * per_layer + working
    gpu = NerveMonitor(model, SPEC, MonitorConfig(eigensolver="eigvalsh")).buffer_bytes("cuda")
    assert gpu == LAYERS * per_layer // 2 + working
    # the batched solver adds its float64 copies of every covariance solved at once (one chunk: all of them)
    batched = NerveMonitor(model, SPEC, MonitorConfig()).buffer_bytes("cuda")
    assert batched == gpu + 2 * LAYERS * HIDDEN**2 * 8
    capped = NerveMonitor(model, SPEC, MonitorConfig(max_layers_per_step=2)).buffer_bytes("cuda")
    assert capped == 2 * per_layer // 2 + working + 2 * 2 * HIDDEN**2 * 8


def test_jsonl_truncate_from_drops_stale_steps(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [json.dumps({"step": s, "layer": 0}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 5, "lay')  # the last line cut by a crash
    JsonlWriter(str(path)).truncate_from(3)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]


def test_due_solves_still_queued_are_taken_over_by_the_caller(monkeypatch):
    import threading

    gate, entered = threading.Event(), threading.Event()
    real = solve_module.solve

    def slow_in_thread(m2, count):
        if threading.current_thread().name == "nerve-solver":
            entered.set()
            gate.wait(timeout=30)  # the background thread is stuck in its first solve
        return real(m2, count)

    monkeypatch.setattr(solve_module, "solve", slow_in_thread)
    g = torch.Generator().manual_seed(3)
    states = []
    for i in range(3):
        x = torch.randn(50, 6, generator=g, dtype=torch.float64)
        m2 = (x - x.mean(0)).T @ (x - x.mean(0))
        states.append(((i, "pre"), 50, m2))
    expected = {key: real(m2.clone(), count) for key, count, m2 in states}
    solver = solve_module.BackgroundSolver()
    job = solver.submit(solve_module.Job(7, list(states)))
    assert entered.wait(timeout=30)
    threading.Timer(0.5, gate.set).start()
    results = job.finish(None)
    solver.close()
    assert job.taken_by_caller == 2
    assert sorted(results) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(results[key].eigenvalues, expected[key].eigenvalues)


def test_tensorboard_resume_marker_hides_stale_points(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from nerve_plugin.writers import TensorBoardWriter

    def writer():
        return TensorBoardWriter.__new__(TensorBoardWriter)  # the purge marker needs no layout

    first = SummaryWriter(str(tmp_path))
    for step in range(1, 6):  # an attempt that dies after step 5, its last checkpoint at step 2
        first.add_scalar("loss", float(step), step)
    first.close()
    again = SummaryWriter(str(tmp_path))  # the restart, same run directory
    w = writer()
    w.writer = again
    w.truncate_from(3)
    for step in range(3, 5):
        again.add_scalar("loss", 10.0 + step, step)
    again.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]


# -- the background solver never leaves the training thread waiting without a bound -----------------------------


def _one_state_job(step=1):
    from nerve_plugin.solve import Job

    x = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
    m2 = (x - x.mean(0)).T @ (x - x.mean(0))
    return Job(step, [((0, "pre"), 40, m2)]), m2


def test_a_solver_thread_that_hangs_is_not_waited_for_forever(monkeypatch):
    import threading

    import nerve_plugin.solve as solve_module

    release = threading.Event()
    real_solve = solve_module.solve

    def hanging_solve(m2, count):
        if threading.current_thread().name == "nerve-solver":
            release.wait(30)  # a stuck solve; released at the end so the thread exits
        return real_solve(m2, count)

    monkeypatch.setattr(solve_module, "solve", hanging_solve)
    solver = solve_module.BackgroundSolver()
    job, _ = _one_state_job()
    solver.submit(job)
    while job._in_flight is None:  # the thread has taken the state
        threading.Event().wait(0.01)
    start = time.monotonic()
    results = job.finish(None, timeout_s=2.0)
    assert time.monotonic() - start < 10
    assert results[(0, "pre")].status.startswith("failed: the solver thread did not answer")
    release.set()
    solver.close()


def test_a_solver_thread_that_dies_mid_solve_is_taken_over(monkeypatch):
    import threading

    import nerve_plugin.solve as solve_module

    real_solve = solve_module.solve

    def dying_solve(m2, count):
        if threading.current_thread().name == "nerve-solver":
            raise SystemExit  # not an Exception: ends the thread, as a fatal error would
        return real_solve(m2, count)

    monkeypatch.setattr(solve_module, "solve", dying_solve)
    solver = solve_module.BackgroundSolver(threads=1099511627776)  # an impossible thread count must not kill it
    job, m2 = _one_state_job(2)
    solver.submit(job)
    results = job.finish(None, timeout_s=30.0)
    reference = real_solve(m2, 40)
    assert results[(0, "pre")].status == "ok"
    np.testing.assert_allclose(results[(0, "pre")].eigenvalues, reference.eigenvalues, rtol=1e-12)
    assert job.taken_by_caller == 1


def test_the_memory_hint_names_a_layer_count_that_fits():
    # the float64 working copies do not shrink with the layer count: the old hint (budget / per-layer share of
    # the whole need) named one layer too many
    monitor = NerveMonitor(Toy(), SPEC, MonitorConfig())
    per_layer = monitor.buffer_bytes("cpu", layers_at_once=2) - monitor.buffer_bytes("cpu", layers_at_once=1)
    working = monitor.buffer_bytes("cpu", layers_at_once=1) - per_layer
    assert working > 0
    for budget_layers in (1, 2, 3):
        budget = working + budget_layers * per_layer + per_layer / 2
        fits = monitor.layers_that_fit(budget, "cpu")
        assert fits == budget_layers
        assert (
            monitor.buffer_bytes("cpu", layers_at_once=fits)
            <= budget
            < monitor.buffer_bytes("cpu", layers_at_once=fits + 1)
        )
    assert monitor.layers_that_fit(working / 2, "cpu") == 0


def _record(step, layer=0):
    from nerve_plugin.monitor import LayerRecord

    return LayerRecord(step=step, layer=layer, js=0.5)


def test_a_partial_last_line_never_swallows_the_next_record(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"step": 1, "layer": 0}) + "\n" + '{"step": 2, "lay')  # a crash mid-write
    JsonlWriter(str(path)).write(3, [_record(3)])
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 3]  # every line parses; the cut one is gone


def test_a_fresh_run_keeps_an_earlier_attempts_records_aside(tmp_path):
    path = tmp_path / "m.jsonl"
    stale = json.dumps({"step": 1, "layer": 0, "js": 0.1}) + "\n" + json.dumps({"step": 5, "layer": 0}) + "\n"
    path.write_text(stale)
    writer = JsonlWriter(str(path))
    aside = writer.start_fresh()
    writer.write(1, [_record(1)])
    assert open(aside).read() == stale
    assert read_jsonl(path) == [{"step": 1, "layer": 0, "js": 0.5}]
    assert JsonlWriter(str(tmp_path / "none.jsonl")).start_fresh() is None


def _one_logging_step(model, monitor, tokens):
    """Step 1 (a logging step) of forwards holding ``tokens`` tokens in all, then close: the records."""
    monitor.begin_step(1)
    with torch.no_grad():
        model(torch.randn(1, tokens, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(tokens)))
    records = (monitor.end_step(1) or []) + monitor.close()
    return {r.layer: r for r in records}


@pytest.mark.parametrize("solve", ["sync", "overlap"])
def test_a_layer_of_fewer_than_two_tokens_gets_a_status_not_numbers(solve):
    model = Toy().double()
    got = _one_logging_step(model, NerveMonitor(model, SPEC, MonitorConfig(log_freq=1, solve_timing=solve)).attach(), 1)
    assert sorted(got) == list(range(LAYERS))  # every layer has its record, none is dropped silently
    for record in got.values():
        for tap in ("pre", "post"):
            line = json.loads(json.dumps(record.to_json(), allow_nan=False))[tap]
            assert line["status"] == "too few tokens: 1 (a covariance needs at least 2)"
            assert line["tokens"] == 1 and line["dim"] == HIDDEN
            assert line["spectral_entropy"] is line["participation_ratio"] is line["eee"] is None


def test_few_tokens_for_the_width_are_flagged_in_every_record_and_warned_once(caplog):
    # 2 tokens for D = 12: fewer than D / 4. Then 42 tokens (3 x 7 x 2, `batches`): not few.
    model = Toy().double()
    monitor = NerveMonitor(model, SPEC, MonitorConfig(log_freq=1, max_overhead=0)).attach()
    with caplog.at_level(logging.WARNING):
        few = _one_logging_step(model, monitor, 2)
        few_again = _one_logging_step(model, monitor, 2)
    for records in (few, few_again):
        for record in records.values():
            line = record.to_json()
            assert line["pre"]["few_tokens"] is line["post"]["few_tokens"] is True
            assert line["pre"]["tokens"] == 2 and line["pre"]["spectral_entropy"] is not None  # numbers, flagged
    warnings = [m for m in caplog.messages if "fewer tokens than D / 4" in m]
    assert len(warnings) == 1 and "layer 0 pre: 2 tokens for D = 12" in warnings[0]
    assert "tokens_per_rank" in warnings[0]
    enough = train(model, NerveMonitor(model, SPEC, MonitorConfig(log_freq=1)).attach(), 1)
    assert all(r.to_json()["pre"]["few_tokens"] is False for _, r in enough.values())
