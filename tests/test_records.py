"""The record schema (nerve_plugin.records): JSON round trips, keyword-only results, and a metric added through the
registry alone reaching every reader and writer: the JSONL, TensorBoard, nerve-report's data and the analyzer's
table and heatmap."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from helpers import read_jsonl
from nerve_plugin import NerveLoop
from nerve_plugin.analyze import ARCHITECTURES, NerVEAnalyzer
from nerve_plugin.analyze.heatmap import build_grid, layer_panel
from nerve_plugin.records import METRICS, LayerRecord, Metric, TapResult
from nerve_plugin.report.data import load_run
from nerve_plugin.report.page import choose, data_json, render
from nerve_plugin.writers import custom_scalars_layout
from reference import eigenvalues, covariance
from toy_model import ToyModel


def test_records_round_trip_through_json():
    eigs = np.array([3.0, 1.0, 0.5, 1e-12])
    ok = TapResult.measured(tokens=9, eigenvalues=eigs)
    failed = TapResult.measured(tokens=9, eigenvalues=None, dim=4, status="non-finite statistics")
    for record in (
        LayerRecord(3, 1, pre=ok, post=ok).measure_pair(),
        LayerRecord(3, 2, pre=ok, post=failed).measure_pair(),
        LayerRecord(5, 0, post=ok),
        LayerRecord(7, 4, js=0.25),
    ):
        line = json.loads(json.dumps(record.to_json(), allow_nan=False))
        back = LayerRecord.from_json(line)
        assert back.to_json() == line
        assert (back.step, back.layer) == (record.step, record.layer)
    failed_back = LayerRecord.from_json(LayerRecord(3, 2, pre=ok, post=failed).measure_pair().to_json())
    assert math.isnan(failed_back.js) and math.isnan(failed_back.post.eee)  # null -> NaN, as computed
    assert failed_back.post.status == "non-finite statistics"
    assert LayerRecord.from_json({"step": 5, "layer": 0}).js is None  # not measured


def test_tap_results_are_built_by_keyword_and_names_are_checked():
    with pytest.raises(TypeError):
        TapResult(9, 1.0, 2.0, 0.5, np.ones(3))  # the positional form this schema replaced
    with pytest.raises(TypeError, match="unexpected keyword argument 'entropy'"):
        TapResult(tokens=9, eigenvalues=np.ones(3), entropy=1.0)
    result = TapResult(tokens=9, eigenvalues=np.ones(3), spectral_entropy=1.0, participation_ratio=3.0, eee=0.0)
    assert (result.spectral_entropy, result.dim, result.few_tokens) == (1.0, 3, False)
    assert math.isnan(TapResult(tokens=9, eigenvalues=np.ones(3)).eee)  # not computed
    with pytest.raises(AttributeError):
        result.js  # a per-layer metric is not a tap's
    for taken in ("tokens", "to_json", "spectral_entropy"):
        with pytest.raises(ValueError, match="is taken"):
            METRICS.register(Metric(taken, "T", "T", ".1f", True, lambda e: 0.0))
    with pytest.raises(ValueError, match="is taken"):
        METRICS.register(Metric("pre", "T", "T", ".1f", False, lambda a, b: 0.0))


# -- a fifth and a sixth metric, registered here and nowhere else --------------------------------------------

STABLE_RANK = Metric(
    "stable_rank", "Stable rank", "SR", ".2f", per_tap=True, of=lambda eigs: float(eigs.sum() / eigs[0])
)
PR_RATIO = Metric(
    "pr_ratio",
    "PR ratio",
    "PRR",
    ".3f",
    per_tap=False,
    of=lambda pre, post: float((post.sum() ** 2 / (post**2).sum()) / (pre.sum() ** 2 / (pre**2).sum())),
)


def ref_stable_rank(rows):
    eigs = eigenvalues(covariance(rows))
    return eigs.sum() / eigs[0]


class Embedded(nn.Module):
    """Token ids in, a ToyModel stack: a model the analyzer can run."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 8)
        self.stack = ToyModel(8, 12, 3)

    def forward(self, ids):
        return self.stack(self.embed(ids))


@pytest.fixture
def extra_metrics():
    saved = dict(ARCHITECTURES)
    with METRICS.added(STABLE_RANK), METRICS.added(PR_RATIO):
        yield
    ARCHITECTURES.clear()
    ARCHITECTURES.update(saved)
    assert METRICS.get("stable_rank") is None  # gone again for the other tests


def test_a_registered_metric_reaches_jsonl_tensorboard_report_and_analyzer(tmp_path, extra_metrics):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Training: NerveLoop on a toy model, rows captured by hooks of the test's own for the reference.
    model = ToyModel(8, 12, 3)
    seen = {}
    for i, block in enumerate(model.layers):
        block.w1.register_forward_hook(lambda m, a, o, i=i: seen.setdefault((i, "pre"), []).append(o.detach()))
    jsonl, tb = tmp_path / "nerve.jsonl", tmp_path / "tb"
    nerve = NerveLoop(
        model, blocks="layers", up="w1", down="w2", log_freq=2, jsonl=str(jsonl), tensorboard=str(tb), max_overhead=0
    )
    for step in (1, 2):
        seen.clear()
        nerve.begin_step(step)
        model(torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(step)))
        nerve.end_step(step)
    nerve.close()

    # JSONL: the per-tap metric in each tap, the per-layer one beside js; the value is the reference's.
    records = read_jsonl(jsonl)
    assert [(r["step"], r["layer"]) for r in records] == [(s, layer) for s in (1, 2) for layer in range(3)]
    for r in records[3:]:  # step 2: the rows seen last
        rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen[(r["layer"], "pre")]]).double().numpy()
        assert r["pre"]["stable_rank"] == pytest.approx(ref_stable_rank(rows), rel=1e-9)
        assert r["pr_ratio"] == pytest.approx(
            r["post"]["participation_ratio"] / r["pre"]["participation_ratio"], rel=1e-9
        )
    # TensorBoard: scalars under the metric's name, a chart per tap in the layout.
    events = EventAccumulator(str(next(tb.glob("**/*.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"nerve/stable_rank_pre/layer_000", "nerve/stable_rank_post/layer_002", "nerve/pr_ratio/layer_001"} <= tags
    assert events.Scalars("nerve/stable_rank_pre/layer_001")[-1].value == pytest.approx(
        records[4]["pre"]["stable_rank"]
    )
    charts = custom_scalars_layout()["NerVE"]
    assert charts["Stable rank (pre)"] == ["Multiline", [r"nerve/stable_rank_pre/layer_.*"]]
    assert charts["PR ratio (pre vs post)"] == ["Multiline", [r"nerve/pr_ratio/layer_.*"]]

    # nerve-report: its data, the embedded values and the figures' titles.
    run = load_run(str(jsonl))
    assert run.values["stable_rank_pre"][1, 1] == pytest.approx(records[4]["pre"]["stable_rank"])
    assert run.values["pr_ratio"][2, 0] == pytest.approx(records[2]["pr_ratio"])
    embedded = json.loads(data_json(run))["values"]
    assert {"stable_rank_pre", "stable_rank_post", "stable_rank_diff", "pr_ratio"} <= set(embedded)
    page = render(run, choose(run, None, None), str(jsonl))
    for title in (
        "Stable rank (SR), pre",
        "Stable rank (SR), post \u2212 pre",
        "PR ratio (pre \u2016 post)",
        "Stable rank (SR) over steps",
        "PR ratio (PRR) over steps",
    ):
        assert title in page, title

    # The analyzer: its results, its printed table and its heatmap grid.
    NerVEAnalyzer.register_architecture("embedded_toy", block_path="stack.layers", up="w1", down="w2")
    text_model = Embedded()
    captured = {}
    text_model.stack.layers[0].w1.register_forward_hook(lambda m, a, o: captured.setdefault("rows", o.detach()))
    results = NerVEAnalyzer(text_model).analyze(
        torch.randint(0, 40, (3, 10), generator=torch.Generator().manual_seed(0))
    )
    rows = captured["rows"].reshape(-1, 12).double().numpy()
    assert results.metric("stable_rank", "pre")[0] == pytest.approx(ref_stable_rank(rows), rel=1e-9)
    assert results.metric("pr_ratio") == [r.pr_ratio for r in results.layers] and results.layers[0].pr_ratio > 0
    table = results.summary().splitlines()
    assert "stable rank" in table[1] and table[1].rstrip().endswith("JS      PRR")
    assert f"{results.layers[0].pre.stable_rank:.2f} -> {results.layers[0].post.stable_rank:.2f}" in table[3]
    assert results.to_dict()["layers"][0]["pr_ratio"] == results.layers[0].pr_ratio
    grid = build_grid(results)
    assert grid.values["pre"].shape == (3, 4) and grid.values[layer_panel()].shape == (3, 2)
    assert layer_panel() == "JS / PRR"
