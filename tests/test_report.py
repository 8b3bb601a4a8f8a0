"""nerve-report on a JSONL of known synthetic values: the page must carry exactly those values (in its data, its
heatmap pixels and its facts), keep the last of a repeated record, show a failed layer as a gap, and render in
headless Chromium with every figure."""

import base64
import io
import json
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from nerve_plugin.report import ReportError, build_report, main

STEPS = [1, 5, 10, 15]
LAYERS = [0, 1, 2, 3]
DIM = {"pre": 48, "post": 32}
TOKENS = 256
METRICS = ("spectral_entropy", "participation_ratio", "eee")
FAILED = (10, 2)  # (step, layer) whose pre statistics held NaN: pre metrics and JS are missing
NAN_POST = (15, 3, "eee")  # a NaN written as a JSON NaN literal rather than null


def metric(name: str, tap: str, step: int, layer: int) -> float:
    """Distinct values per cell, so a misplaced cell shows."""
    base = {"spectral_entropy": 3.0, "participation_ratio": 20.0, "eee": 0.5}[name]
    scale = {"spectral_entropy": 0.1, "participation_ratio": 2.0, "eee": 0.05}[name]
    post = -0.4 * (1 + layer / 4) if tap == "post" else 0.0
    return base * (1 + post) + scale * (layer + step / 20) + (0.013 * layer * step if tap == "pre" else 0.0)


def js(step: int, layer: int) -> float:
    return 0.01 * (layer + 1) + 0.002 * step


def spectrum(step: int, layer: int, tap: str) -> dict:
    d = DIM[tap]
    ranks = sorted({int(round(r)) for r in np.geomspace(1, d, num=16)})
    alpha = 0.5 + 0.2 * layer + (0.3 if tap == "post" else 0.0) + step / 100
    return {"rank": ranks, "eigenvalue": [float(r**-alpha) for r in ranks]}


def expected(key: str, step: int, layer: int) -> float:
    if key == "js":
        return math.nan if (step, layer) == FAILED else js(step, layer)
    name, tap = key.rsplit("_", 1)
    if tap == "diff":
        return expected(f"{name}_post", step, layer) - expected(f"{name}_pre", step, layer)
    if tap == "pre" and (step, layer) == FAILED or (step, layer, name) == NAN_POST and tap == "post":
        return math.nan
    return metric(name, tap, step, layer)


def record(step: int, layer: int) -> dict:
    out = {"step": step, "layer": layer, "fallback": False}  # a field the report does not know
    for tap in ("pre", "post"):
        out[tap] = {
            "tokens": TOKENS,
            "dim": DIM[tap],
            "spectrum": spectrum(step, layer, tap),
            **{m: metric(m, tap, step, layer) for m in METRICS},
        }
    out["js"] = js(step, layer)
    if (step, layer) == FAILED:
        out["pre"].update({m: None for m in METRICS}, status="nonfinite", spectrum={"rank": [], "eigenvalue": []})
        out["js"] = None
    if (step, layer) == NAN_POST[:2]:
        out["post"][NAN_POST[2]] = math.nan
    return out


def write_run(folder) -> str:
    path = folder / "nerve" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    lines = []
    for step in STEPS:
        for layer in LAYERS:
            if (step, layer) == (5, 1):  # logged before a crash, logged again after the resume: keep the last
                stale = record(step, layer)
                stale["pre"]["spectral_entropy"] = stale["post"]["spectral_entropy"] = stale["js"] = 99.0
                lines.append(json.dumps(stale))
            lines.append(json.dumps(record(step, layer)))  # allow_nan: NAN_POST's NaN literal
    lines.append('{"step": 20, "layer": 0, "pre": {"tok')  # the line a crash cut short
    path.write_text("\n".join(lines) + "\n")

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder / "tb" / "20260101-0000"))
    for step in range(1, 16):
        writer.add_scalar("loss_metrics/global_avg_loss", loss(step), step)
    writer.close()
    return str(path)


def loss(step: int) -> float:
    return 8.0 - 0.3 * step + 0.01 * step * step


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    write_run(folder)
    path = build_report(str(folder), str(folder / "report.html"))  # the dump folder: finds nerve/ and tb/
    return folder, open(path, encoding="utf-8").read()


def page_data(html: str) -> dict:
    blob = re.search(r'<script type="application/json" id="nerve-data">(.*?)</script>', html, re.S)[1]
    return json.loads(blob)


HEATMAPS = [f"{m}_{t}" for m in METRICS for t in ("pre", "post", "diff")] + ["js"]


def test_embedded_values_are_the_input_and_the_repeat_keeps_the_last(report):
    _, html = report
    data = page_data(html)
    assert data["steps"] == STEPS and data["layers"] == LAYERS
    assert sorted(data["values"]) == sorted(HEATMAPS)
    for key in HEATMAPS:
        for i, layer in enumerate(LAYERS):
            for j, step in enumerate(STEPS):
                want = expected(key, step, layer)
                got = data["values"][key][i][j]
                assert (got is None) if math.isnan(want) else got == want, (key, step, layer, got, want)
    assert 99.0 not in (v for row in data["values"]["js"] for v in row)
    # TensorBoard keeps float32
    assert data["loss"] == {str(s): float(np.float32(loss(s))) for s in range(1, 16)}


def test_heatmap_cells_have_the_colour_of_their_value_and_gaps_are_transparent(report):
    _, html = report
    anchors = {
        "viridis": [
            "#440154",
            "#482878",
            "#3e4989",
            "#31688e",
            "#26828e",
            "#1f9e89",
            "#35b779",
            "#6ece58",
            "#b5de2b",
            "#fde725",
        ],
        "diverging": [
            "#2166ac",
            "#4393c3",
            "#92c5de",
            "#d1e5f0",
            "#f7f7f7",
            "#fddbc7",
            "#f4a582",
            "#d6604d",
            "#b2182b",
        ],
    }
    figures = re.findall(
        r'<svg class="figure heatmap"[^>]*data-key="([^"]+)"[^>]*data-plot="([^"]+)"[^>]*>.*?'
        r'href="data:image/png;base64,([^"]+)"',
        html,
        re.S,
    )
    assert sorted(k for k, _, _ in figures) == sorted(HEATMAPS)
    for key, plot, png in figures:
        _, _, width, height = map(int, plot.split())
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(png))).convert("RGBA"))
        assert image.shape[:2] == (height, width)
        cells = np.array([[expected(key, s, layer) for s in STEPS] for layer in LAYERS])
        if key.endswith("_diff"):
            bound = np.nanmax(np.abs(cells))
            lo, hi, colours = -bound, bound, anchors["diverging"]
        else:  # pre and post of a metric share one scale
            name = key.rsplit("_", 1)[0]
            both = (
                cells
                if key == "js"
                else np.array(
                    [[[expected(f"{name}_{t}", s, layer) for s in STEPS] for layer in LAYERS] for t in ("pre", "post")]
                )
            )
            lo, hi, colours = np.nanmin(both), np.nanmax(both), anchors["viridis"]
        for i in range(len(LAYERS)):
            for j in range(len(STEPS)):
                pixel = image[int((i + 0.5) * height / len(LAYERS)), int((j + 0.5) * width / len(STEPS))]
                if math.isnan(cells[i, j]):
                    assert pixel[3] == 0, (key, i, j)  # the hatch behind shows through
                    continue
                t = (cells[i, j] - lo) / (hi - lo) * (len(colours) - 1)
                k = min(int(t), len(colours) - 2)
                a, b = (np.array([int(c[n : n + 2], 16) for n in (1, 3, 5)]) for c in colours[k : k + 2])
                want = a + (b - a) * (t - k)
                assert pixel[3] == 255 and np.abs(pixel[:3] - want).max() <= 1, (key, i, j, pixel, want)


def test_header_states_the_run_facts(report):
    _, html = report
    facts = dict(re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", html))
    assert facts["logged steps"] == "4: 1 \u2026 15, every 5"
    assert facts["layers"] == "4: 0, 1, 2, 3"
    assert (facts["dim pre"], facts["dim post"]) == ("48", "32")
    assert facts["tokens pre (per step)"] == facts["tokens post (per step)"] == str(TOKENS)
    assert (
        facts["records"]
        == "16 (1 repeated (step, layer) records replaced by the later one); 1 unreadable lines skipped"
    )
    assert "spectral entropy pre: 1" in facts["missing values"] and "eee post: 1" in facts["missing values"]
    assert "js: 1" in facts["missing values"] and "status nonfinite: 1" in facts["missing values"]
    assert facts["loss"].startswith(f"{np.float32(loss(1)):.4g} at step 1 \u2192 {np.float32(loss(15)):.4g} at step 15")


def svg_titles(html: str) -> list[str]:
    return re.findall(r'<svg class="figure[^"]*"[^>]*>\s*<title>([^<]*)</title>', html)


def test_default_choice_of_layers_and_steps(report):
    _, html = report
    titles = svg_titles(html)
    assert [t for t in titles if t.startswith("Eigen-spectrum")] == [f"Eigen-spectrum at step {s}" for s in (1, 10, 15)]
    # every layer of a 4-layer run, pre dashed and post solid, in every curve
    for layer in LAYERS:
        assert f"<title>layer {layer}, pre</title>" in html and f"<title>layer {layer}, post</title>" in html


def test_spectra_draw_every_point_in_descending_order(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    write_run(folder)
    html = open(build_report(str(folder), str(tmp_path / "r.html"), layers=[1, 3], steps=[5])).read()
    figure = re.search(r'<svg class="figure lineplot"[^>]*data-key="spectrum-5".*?</svg>', html, re.S)[0]
    paths = re.findall(r'<path d="([^"]+)"[^>]*><title>(layer \d, \w+)</title>', figure)
    assert [label for _, label in paths] == ["layer 1, pre", "layer 1, post", "layer 3, pre", "layer 3, post"]
    for d, label in paths:
        layer, tap = int(label[6]), label.split(", ")[1]
        points = [tuple(map(float, p.split(","))) for p in re.findall(r"[ML]([-\d.]+,[-\d.]+)", d)]
        ranks = spectrum(5, layer, tap)["rank"]
        assert len(points) == len(ranks)
        xs, ys = np.array(points).T
        # x is log(rank), y is log(eigenvalue) (screen y grows downward): both linear in log(rank) here
        assert np.all(np.diff(xs) > 0) and np.all(np.diff(ys) > 0)
        slope = np.polyfit(np.log(ranks), ys, 1)[0] / np.polyfit(np.log(ranks), xs, 1)[0]
        alpha = 0.5 + 0.2 * layer + (0.3 if tap == "post" else 0.0) + 5 / 100
        assert slope / alpha == pytest.approx(slope_unit(figure), rel=2e-3)


def slope_unit(figure: str) -> float:
    """Pixels of y per pixel of x for one decade each, from the axes' own decade ticks."""
    xt = [float(x) for x in re.findall(r'<line class="grid" x1="([-\d.]+)" y1="\d+" x2="[-\d.]+" y2="\d+', figure)]
    yt = [float(y) for y in re.findall(r'<line class="grid" x1="\d+" y1="([-\d.]+)" x2="\d+"', figure)]
    return (yt[0] - yt[1]) / (xt[1] - xt[0])


def test_bad_choices_name_what_is_allowed(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    jsonl = write_run(folder)
    with pytest.raises(ReportError, match=r"--layers 7: not in the run; expected values from 0, 1, 2, 3"):
        build_report(jsonl, str(tmp_path / "r.html"), layers=[0, 7])
    assert main([jsonl, "--steps", "2", "-o", str(tmp_path / "r.html")]) == 2
    assert "--steps 2: not in the run; expected values from 1, 5, 10, 15" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.slow  # a browser start (~5 s)
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium (.ci/run does)")
def test_renders_in_headless_chromium_with_every_figure(report, tmp_path):
    folder, html = report
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = (folder / "report.html").as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=60).stdout
    # the script ran and parsed the page's data
    assert re.search(r'<body[^>]*data-ready="\d+"', dom), dom[:500]
    ready = int(re.search(r'data-ready="(\d+)"', dom)[1])
    assert ready == len(HEATMAPS)  # the tooltip script found every heatmap and its values
    titles = svg_titles(dom)
    want = [
        f"{n}, {t}"
        for n in ("Spectral entropy (SE)", "Participation ratio (PR)", "Eigenvalue early enrichment (EEE)")
        for t in ("pre", "post", "post \u2212 pre")
    ]
    want += ["JS divergence (pre \u2016 post)", "Training loss (TensorBoard loss_metrics/global_avg_loss)"]
    want += [
        f"{n} over steps"
        for n in (
            "Spectral entropy (SE)",
            "Participation ratio (PR)",
            "Eigenvalue early enrichment (EEE)",
            "JS divergence (JS)",
        )
    ]
    want += [f"Eigen-spectrum at step {s}" for s in (1, 10, 15)]
    assert sorted(titles) == sorted(want)

    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1400,3000", "--hide-scrollbars", url],
        capture_output=True,
        timeout=60,
        check=True,
    )
    image = np.asarray(Image.open(shot).convert("RGB")).astype(np.int64)
    assert image.shape == (3000, 1400, 3)
    assert image.std() > 20  # not a blank page
    # the heatmap cells were drawn: the top of the colour scale (each map's maximum) is on screen
    assert (np.abs(image - np.array([0xFD, 0xE7, 0x25])).max(axis=2) <= 2).sum() >= 50
    if os.environ.get("NERVE_REPORT_SCREENSHOT"):  # to look at it
        shutil.copy(shot, os.environ["NERVE_REPORT_SCREENSHOT"])


def test_invalid_utf8_and_deeply_nested_lines_are_skipped_and_counted(tmp_path):
    from nerve_plugin.report.data import read_records

    path = tmp_path / "metrics.jsonl"
    good = json.dumps({"step": 1, "layer": 0, "pre": {"spectral_entropy": 1.0}})
    with open(path, "wb") as f:
        f.write(good.encode() + b"\n")
        f.write(b'{"step": 2, "layer": 0, "x": "\xff\xfe"}\n')  # not UTF-8
        f.write(("[" * 100000 + "]" * 100000).encode() + b"\n")  # RecursionError in json
        f.write(json.dumps({"step": 3, "layer": 0}).encode() + b"\n")
    records, duplicates, unreadable = read_records(str(path))
    assert sorted(records) == [(1, 0), (3, 0)] and duplicates == 0 and unreadable == 2


def test_an_output_that_cannot_be_written_is_one_line_naming_it(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    jsonl = write_run(folder)
    (tmp_path / "a_file").write_text("")
    under_a_file = tmp_path / "a_file" / "sub" / "report.html"
    assert main([jsonl, "-o", str(under_a_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"nerve-report: cannot write the report to {under_a_file}: Not a directory ({tmp_path / 'a_file' / 'sub'})"
    )
    assert main([jsonl, "-o", str(folder)]) == 2  # a folder where the file should be
    err = capsys.readouterr().err.strip()
    assert (
        err == f"nerve-report: -o {folder} is a folder: expected the HTML file to write, e.g. {folder / 'report.html'}"
    )
    assert "Traceback" not in err
