"""Reproduce the NerVE paper's experiments with train_configs/: run every arm, keep a small summary, judge the claims.

    python tools/reproduce.py activation optimizer            # every arm to its file's schedule, seeds 0 and 1 (GPU)
    python tools/reproduce.py all                             # the eight experiments
    python tools/reproduce.py activation --steps 200 --tokens 8x128   # a shortened schedule (what a CPU can do)
    python tools/reproduce.py --render                        # the tables again, from train_configs/results/
    python tools/reproduce.py --render --readme               # ... written into train_configs/README.md
    python tools/reproduce.py optimizer -- --muon.ns_dtype float32    # after --: to every torchtitan run

A selector is an experiment (a folder of train_configs/), ``experiment/arm`` or ``all``. Each arm runs once per
seed (``--seeds``, default 0,1: torchtitan's ``debug.seed``, which seeds the init and the corpus order) through
tools/smoke_train_configs.py's launcher (``torchrun --standalone -m torchtitan.train``, command-line overrides
only, CPU mode and float32 on a machine without a GPU). Without ``--steps`` a run is the file's own schedule
(2000 steps of 8 x 512 tokens, NerVE every 100 steps); ``--steps N`` (NerVE at step 1 and N) with ``--tokens
BATCHxSEQ_LEN`` is a shortened one, which a machine without a GPU requires (the full schedule is days there).

Of each run, the NerVE metrics of its last logging step (every layer) and its final loss are kept in
``<results-dir>/<full|shortened>/<experiment>.json`` (a few kB; nothing else of the run is needed to re-render),
the runs themselves under ``<dump-root>/<timestamp>/``. The tables (markdown, on stdout) say per experiment:
the schedule, the final losses, each claim of the paper that train_configs/README.md or issue 15 states for it
with the measured numbers per layer (mean +- half the range over seeds) and its verdict by RULE below, and
every arm's per-layer metrics. Experiments for which no claim is stated get the numbers only. The claims are
written out in CLAIMS; they are not tuned to the outcome, and neither are the configs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smoke_train_configs as smoke  # noqa: E402  (the launcher, config lookup and CPU overrides)

REPO_ROOT = smoke.REPO_ROOT
CONFIG_ROOT = smoke.CONFIG_ROOT
RESULTS_DIR = CONFIG_ROOT / "results"
README = CONFIG_ROOT / "README.md"
README_BEGIN, README_END = "<!-- reproduce:begin -->", "<!-- reproduce:end -->"
SCHEDULES = ("full", "shortened")
DEFAULT_SEEDS = (0, 1)

# A record's metrics as a summary keeps them (per layer), and how the tables name and print them.
KEYS = {  # key: (record path, label, decimals)
    "se_pre": (("pre", "spectral_entropy"), "SE pre", 3),
    "se_post": (("post", "spectral_entropy"), "SE post", 3),
    "pr_pre": (("pre", "participation_ratio"), "PR pre", 1),
    "pr_post": (("post", "participation_ratio"), "PR post", 1),
    "eee_pre": (("pre", "eee"), "EEE pre", 4),  # near 1 in concentrated spectra: 3 decimals hide differences
    "eee_post": (("post", "eee"), "EEE post", 4),
    "js": (("js",), "JS", 4),
}
DERIVED = {"dse": ("SE post - pre", 3)}  # computed from a layer's numbers, not stored

RULE = (
    "A claim holds in a layer when its inequality holds in every seed (two arms are compared seed by seed: "
    "the same seed is the same init draw and corpus order). It is **reproduced** when it holds in at least 3/4 of "
    'the layers it is about (rounded up: 6 of 8, 3 of 4), otherwise **not reproduced**. "Early layers" are '
    "the first half of the blocks. Numbers: the last logging step's, mean +- half the range over seeds."
)


@dataclass(frozen=True)
class Quantity:
    arm: str
    key: str  # a KEYS or DERIVED key

    def label(self) -> str:
        # KEYS rows are (path, label, decimals), DERIVED rows (label, decimals): the label is second from last.
        return f"{self.arm} {(KEYS.get(self.key) or DERIVED[self.key])[-2]}"

    def decimals(self) -> int:
        return (KEYS.get(self.key) or DERIVED[self.key])[-1]


@dataclass(frozen=True)
class Claim:
    id: str
    statement: str  # what the paper says, as train_configs/README.md or issue 15 states it
    source: str
    lhs: Quantity
    rhs: Quantity | float  # the claim: lhs > rhs
    layers: str = "all"  # or "early": the first half of the blocks

    def tested(self) -> str:
        rhs = self.rhs.label() if isinstance(self.rhs, Quantity) else f"{self.rhs:g}"
        return f"{self.lhs.label()} > {rhs}" + (" (early layers)" if self.layers == "early" else "")

    def arms(self) -> list[str]:
        return [q.arm for q in (self.lhs, self.rhs) if isinstance(q, Quantity)]


def _reinjection(arm: str, prefix: str, what: str) -> list[Claim]:
    """Issue 15 (a), in one arm: the nonlinearity re-injects variance into the directions the pre-activation left
    nearly empty, so the post-activation spectrum is flatter than the pre-activation's."""
    source = "issue 15 (a), paper Sec. 3.1"
    return [
        Claim(
            f"{prefix}SE",
            f"variance reinjection ({what}): post-activation spectral entropy above pre",
            source,
            Quantity(arm, "se_post"),
            Quantity(arm, "se_pre"),
        ),
        Claim(
            f"{prefix}EEE",
            f"variance reinjection ({what}): post-activation EEE below pre",
            source,
            Quantity(arm, "eee_pre"),
            Quantity(arm, "eee_post"),
        ),
        Claim(
            f"{prefix}PR",
            f"variance reinjection ({what}): post-activation participation ratio above pre",
            source,
            Quantity(arm, "pr_post"),
            Quantity(arm, "pr_pre"),
        ),
    ]


CLAIMS: dict[str, list[Claim]] = {
    "baseline": _reinjection("gpt2", "a-", "GPT-2 with GELU"),
    "activation": _reinjection("gelu", "a-gelu-", "GELU") + _reinjection("relu", "a-relu-", "ReLU"),
    "optimizer": [
        Claim(
            "b-SE",
            "Muon's pre-activation spectra are flatter than AdamW's (higher spectral entropy)",
            "issue 15 (b)",
            Quantity("muon", "se_pre"),
            Quantity("adamw", "se_pre"),
        ),
        Claim(
            "b-JS",
            "AdamW's pre -> post Jensen-Shannon divergence is larger than Muon's",
            "issue 15 (b)",
            Quantity("adamw", "js"),
            Quantity("muon", "js"),
        ),
    ],
    "norm_free": [
        Claim(
            "c-inertia",
            "norm-free GELU shows spectral inertia: little reinjection in early layers (its SE "
            "post - pre below norm-free ReLU's)",
            "issue 15 (c), paper Sec. 3.2",
            Quantity("relu", "dse"),
            Quantity("gelu", "dse"),
            "early",
        ),
        Claim(
            "c-EEE",
            "norm-free GELU's EEE stays near 1 in early layers (post-activation EEE above norm-free ReLU's)",
            "issue 15 (c), paper Sec. 3.2",
            Quantity("gelu", "eee_post"),
            Quantity("relu", "eee_post"),
            "early",
        ),
        Claim(
            "c-relu",
            "norm-free ReLU compensates: it reinjects in early layers (SE post - pre > 0)",
            "issue 15 (c), paper Sec. 3.2",
            Quantity("relu", "dse"),
            0.0,
            "early",
        ),
    ],
}


class ReproduceError(ValueError):
    pass


# -- runs -> summaries ------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> dict[tuple[int, int], dict]:
    """{(step, layer): record} of a NerVE metrics.jsonl; the last record of a (step, layer) wins (a resumed run
    logs it again), lines that are not a record (a crash mid-write) are skipped."""
    records = {}
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line)
            key = (record["step"], record["layer"])
        except (ValueError, KeyError, TypeError):
            continue
        if all(isinstance(k, int) and not isinstance(k, bool) for k in key):
            records[key] = record
    return records


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(f"{value:.7g}")  # the tables print 4 digits at most: 7 keep the summaries small and exact enough


def summarise_run(jsonl: Path) -> dict:
    """The last logging step of a run's JSONL: {"step", "tokens", "dim", "layers": [{"layer", <KEYS>...}]}."""
    records = read_jsonl(jsonl)
    if not records:
        raise ReproduceError(f"{jsonl}: no NerVE records")
    step = max(s for s, _ in records)
    layers = []
    for (s, layer), record in sorted(records.items()):
        if s != step:
            continue
        row = {"layer": layer}
        for key, (path, _, _) in KEYS.items():
            value = record
            for part in path:
                value = value.get(part) if isinstance(value, dict) else None
            row[key] = _number(value)
        layers.append(row)
    first = records[(step, layers[0]["layer"])].get("pre") or {}
    return {"step": step, "tokens": first.get("tokens"), "dim": first.get("dim"), "layers": layers}


# -- claims -----------------------------------------------------------------------------------------------------


def layer_value(row: dict | None, key: str) -> float | None:
    if row is None:
        return None
    if key == "dse":
        pre, post = row.get("se_pre"), row.get("se_post")
        return None if pre is None or post is None else post - pre
    return row.get(key)


def runs_by_arm(summary: dict) -> dict[str, dict[int, dict[int, dict]]]:
    """{arm: {seed: {layer: row}}}."""
    out: dict[str, dict[int, dict[int, dict]]] = {}
    for run in summary["runs"]:
        out.setdefault(run["arm"], {})[run["seed"]] = {row["layer"]: row for row in run["layers"]}
    return out


def mean_spread(values: list[float]) -> tuple[float, float]:
    """The mean and half the range."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


@dataclass
class LayerVerdict:
    layer: int
    lhs: list[float | None]  # per seed, in `seeds` order
    rhs: list[float | None]
    holds: bool


@dataclass
class ClaimVerdict:
    claim: Claim
    seeds: list[int]
    layers: list[LayerVerdict]
    needed: int

    @property
    def held(self) -> int:
        return sum(v.holds for v in self.layers)

    @property
    def verdict(self) -> str:
        if not self.layers:
            return "not run"
        return "reproduced" if self.held >= self.needed else "not reproduced"


def evaluate(claim: Claim, arms: dict[str, dict[int, dict[int, dict]]]) -> ClaimVerdict:
    """The claim on the runs of its arms: per layer, lhs > rhs in every seed that all its arms ran (RULE)."""
    if any(arm not in arms for arm in claim.arms()):
        return ClaimVerdict(claim, [], [], 0)
    seeds = sorted(set.intersection(*(set(arms[a]) for a in claim.arms())))
    layers = sorted(set.intersection(*(set(arms[a][s]) for a in claim.arms() for s in seeds))) if seeds else []
    if claim.layers == "early":
        layers = layers[: max(1, len(layers) // 2)] if layers else []
    verdicts = []
    for layer in layers:
        lhs = [layer_value(arms[claim.lhs.arm][s].get(layer), claim.lhs.key) for s in seeds]
        if isinstance(claim.rhs, Quantity):
            rhs = [layer_value(arms[claim.rhs.arm][s].get(layer), claim.rhs.key) for s in seeds]
        else:
            rhs = [claim.rhs] * len(seeds)
        holds = all(a is not None and b is not None and a > b for a, b in zip(lhs, rhs))
        verdicts.append(LayerVerdict(layer, lhs, rhs, holds))
    return ClaimVerdict(claim, seeds, verdicts, math.ceil(0.75 * len(verdicts)))


# -- rendering --------------------------------------------------------------------------------------------------


def fmt(values: list[float | None], decimals: int) -> str:
    """mean +- half the range over seeds ("n/a" when a seed's value is missing)."""
    if not values or any(v is None for v in values):
        return "n/a"
    mean, spread = mean_spread(values)
    return f"{mean:.{decimals}f}" + (f" ± {spread:.{decimals}f}" if len(values) > 1 else "")


def describe_schedule(summary: dict) -> str:
    s = summary["schedule"]
    kind = "full schedule (the files' own)" if s["kind"] == "full" else "**shortened schedule, not the paper's**"
    return (
        f"{kind}: {s['steps']} steps x {s['local_batch_size']} x {s['seq_len']} tokens, seeds "
        f"{', '.join(map(str, summary['seeds']))}, on {s['device']}; {summary['date']}"
    )


def render_experiment(summary: dict) -> str:
    arms = runs_by_arm(summary)
    lines = [f"#### {summary['experiment']}: {describe_schedule(summary)}", ""]
    lines += [f"`{command}`" for command in summary["commands"]] + [""]
    first = summary["runs"][0] if summary["runs"] else {}
    if first:
        lines += [
            f"NerVE at step {first['step']} over {first['tokens']} tokens per logging step (FFN width {first['dim']})."
        ]
    losses = []
    for arm, seeds in arms.items():
        values = [run["final_loss"] for run in summary["runs"] if run["arm"] == arm]
        losses.append(f"{arm} {fmt(values if all(v is not None for v in values) else [None], 3)}")
    lines += [f"Final loss: {', '.join(losses)}.", ""]

    verdicts = [evaluate(c, arms) for c in CLAIMS.get(summary["experiment"], [])]
    if not verdicts:
        lines += [
            "No claim of the paper is stated for this experiment in train_configs/README.md or issue 15: "
            "the numbers only.",
            "",
        ]
    else:
        lines += [
            "| claim | the paper's statement | tested | layers where it holds | verdict |",
            "|---|---|---|---|---|",
        ]
        for v in verdicts:
            lines.append(
                f"| {v.claim.id} | {v.claim.statement} ({v.claim.source}) | {v.claim.tested()} | "
                f"{v.held}/{len(v.layers)} (needs {v.needed}) | {v.verdict} |"
            )
        lines += [
            "",
            "Per layer (lhs > rhs; ✓ where it holds in every seed):",
            "",
            "| layer | " + " | ".join(v.claim.id for v in verdicts) + " |",
            "|---" * (len(verdicts) + 1) + "|",
        ]
        all_layers = sorted({lv.layer for v in verdicts for lv in v.layers})
        for layer in all_layers:
            cells = []
            for v in verdicts:
                lv = next((x for x in v.layers if x.layer == layer), None)
                if lv is None:
                    cells.append("")
                    continue
                rhs = fmt(lv.rhs, v.claim.rhs.decimals()) if isinstance(v.claim.rhs, Quantity) else f"{v.claim.rhs:g}"
                cells.append(f"{fmt(lv.lhs, v.claim.lhs.decimals())} > {rhs} {'✓' if lv.holds else '✗'}")
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines.append("")

    lines += ["Every arm (pre -> post):", "", "| arm | layer | SE | PR | EEE | JS |", "|---|---|---|---|---|---|"]
    for arm, seeds in arms.items():
        layers = sorted(set.intersection(*(set(rows) for rows in seeds.values())))
        for layer in layers:

            def col(key):
                return fmt([layer_value(seeds[s].get(layer), key) for s in sorted(seeds)], KEYS[key][2])

            lines.append(
                f"| {arm} | {layer} | {col('se_pre')} -> {col('se_post')} | {col('pr_pre')} -> "
                f"{col('pr_post')} | {col('eee_pre')} -> {col('eee_post')} | {col('js')} |"
            )
    return "\n".join(lines) + "\n"


def render(summaries: list[dict]) -> str:
    return "\n".join([RULE, ""] + [render_experiment(s) for s in summaries])


def write_readme(text: str, readme: Path = README) -> None:
    """Replace what lies between README_BEGIN and README_END in the README."""
    content = readme.read_text()
    begin, end = content.find(README_BEGIN), content.find(README_END)
    if begin < 0 or end < begin:
        raise ReproduceError(f"{readme}: no {README_BEGIN} ... {README_END} section to write the tables into")
    readme.write_text(content[: begin + len(README_BEGIN)] + "\n" + text + content[end:])


# -- command line -----------------------------------------------------------------------------------------------


def experiments() -> list[str]:
    return sorted(p.name for p in CONFIG_ROOT.iterdir() if p.is_dir() and any(p.glob("*.toml")))


def select(selectors: list[str]) -> dict[str, list[Path]]:
    """{experiment: [arm configs]} for selectors "all", "<experiment>" or "<experiment>/<arm>"."""
    known = experiments()
    chosen: dict[str, list[Path]] = {}
    for selector in selectors:
        name, _, arm = selector.removesuffix(".toml").partition("/")
        names = known if name == "all" and not arm else [name]
        for experiment in names:
            if experiment not in known:
                raise ReproduceError(
                    f"experiment {selector!r} is not a folder of {CONFIG_ROOT}: expected one of "
                    f"{', '.join(known)}, 'all' or <experiment>/<arm>"
                )
            files = sorted((CONFIG_ROOT / experiment).glob(f"{arm or '*'}.toml"))
            if not files:
                arms = ", ".join(p.stem for p in sorted((CONFIG_ROOT / experiment).glob("*.toml")))
                raise ReproduceError(f"arm {selector!r}: {experiment} has the arms {arms}")
            chosen.setdefault(experiment, [])
            chosen[experiment] += [f for f in files if f not in chosen[experiment]]
    return chosen


def parse_tokens(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not m or int(m[1]) < 1 or int(m[2]) < 2:
        raise ReproduceError(
            f"--tokens {text!r}: expected BATCHxSEQ_LEN with BATCH >= 1 and SEQ_LEN >= 2, "
            "e.g. 8x128 (local batch size x sequence length)"
        )
    return int(m[1]), int(m[2])


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise ReproduceError(f"--seeds {text!r}: expected distinct integers separated by commas, e.g. 0,1")
    return seeds


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "selectors",
        nargs="*",
        help="experiments, <experiment>/<arm> or 'all' (with --render: which stored results; default all)",
    )
    parser.add_argument(
        "--seeds",
        default=",".join(map(str, DEFAULT_SEEDS)),
        help="debug.seed of each run of an arm, comma-separated (default 0,1)",
    )
    parser.add_argument(
        "--steps", type=int, default=0, help="a shortened schedule of this many steps (0: each file's own; needs a GPU)"
    )
    parser.add_argument(
        "--tokens",
        default=None,
        help="with --steps: BATCHxSEQ_LEN per step and process, e.g. "
        "8x128 (default on a CPU: 2x128; on a GPU: the file's)",
    )
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (default 1)")
    parser.add_argument("--cpu", action="store_true", help="the CPU overrides even with a GPU")
    parser.add_argument("--dump-root", default="./outputs/reproduce", help="runs go to <dump-root>/<timestamp>/")
    parser.add_argument(
        "--results-dir",
        default=str(RESULTS_DIR),
        help="summaries: <results-dir>/<full|shortened>/<experiment>.json (default train_configs/results)",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run (default 3600)")
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d"), help="the date the summaries record")
    parser.add_argument("--render", action="store_true", help="run nothing: render the stored summaries")
    parser.add_argument("--schedule", choices=SCHEDULES, default=None, help="with --render: only this schedule's")
    parser.add_argument(
        "--readme",
        action="store_true",
        help=f"also write the tables into {README} between {README_BEGIN} and {README_END}",
    )
    cut = argv.index("--") if "--" in argv else len(argv)  # after "--": torchtitan's
    args = parser.parse_args(argv[:cut])
    if args.steps < 0:
        raise ReproduceError(f"--steps {args.steps}: expected an integer >= 0 (0: each file's own schedule)")
    if args.nproc < 1:
        raise ReproduceError(f"--nproc {args.nproc}: expected an integer >= 1")
    if args.tokens is not None and not args.steps:
        raise ReproduceError("--tokens needs --steps: the full schedule keeps each file's batch and sequence length")
    args.seed_list = parse_seeds(args.seeds)
    args.batch_seq = parse_tokens(args.tokens) if args.tokens is not None else None
    if not args.render and not args.selectors:
        raise ReproduceError("name the experiments to run (or 'all'), or pass --render")
    return args, argv[cut + 1 :]


def load_summaries(results_dir: Path, selectors: list[str], schedule: str | None) -> list[dict]:
    names = sorted(select(selectors)) if selectors else None
    files = []
    for kind in [schedule] if schedule else SCHEDULES:
        folder = results_dir / kind
        files += [f for f in sorted(folder.glob("*.json")) if names is None or f.stem in names]
    if not files:
        raise ReproduceError(
            f"no stored results under {results_dir} for "
            f"{', '.join(names) if names else 'any experiment'}: run the experiments first"
        )
    return [json.loads(f.read_text()) for f in files]


def run_experiment(
    experiment: str, configs: list[Path], args, extra: list[str], gpu: bool, root: Path, command: str
) -> dict:
    steps = args.steps
    if steps:
        batch, seq_len = args.batch_seq or ((None, None) if gpu else (smoke.CPU_BATCH, smoke.CPU_SEQ_LEN))
    else:
        batch = seq_len = None
    runs = []
    for path in configs:
        config = smoke.tomllib.loads(path.read_text())
        for seed in args.seed_list:
            run_dir = root / experiment / path.stem / f"seed{seed}"
            result = smoke.run_config(
                path, run_dir, steps, args.nproc, gpu, seq_len, batch, args.timeout, ["--debug.seed", str(seed), *extra]
            )
            print(
                f"  {experiment}/{path.stem} seed {seed}: {result.seconds:.0f} s, final loss "
                f"{result.final_loss}, {'ok' if result.ok else 'FAILED'}",
                flush=True,
            )
            if not result.ok:
                raise ReproduceError(f"{experiment}/{path.stem} seed {seed} failed: {result.error}")
            run = summarise_run(run_dir / "nerve" / "metrics.jsonl")
            runs.append(
                {
                    "arm": path.stem,
                    "seed": seed,
                    "final_loss": result.final_loss,
                    "seconds": round(result.seconds, 1),
                    **run,
                }
            )
    training = config.get("training", {})
    schedule = {
        "kind": "shortened" if steps else "full",
        "steps": steps or training.get("steps"),
        "local_batch_size": batch or training.get("local_batch_size"),
        "seq_len": seq_len or training.get("seq_len"),
        "nproc": args.nproc,
        "device": device_name(gpu),
        "precision": "bfloat16 mixed" if gpu else "float32",
    }
    return {
        "experiment": experiment,
        "schedule": schedule,
        "seeds": args.seed_list,
        "date": args.date,
        "commands": [command],
        "runs": runs,
    }


def merge_summary(old: dict | None, new: dict) -> dict:
    """new, plus the runs of other arms or seeds that an earlier invocation stored for the same schedule (so
    that running one arm again does not drop the others); a different schedule replaces the file."""
    if not old or old.get("schedule") != new["schedule"]:
        return new
    ran = {(r["arm"], r["seed"]) for r in new["runs"]}
    runs = [r for r in old["runs"] if (r["arm"], r["seed"]) not in ran] + new["runs"]
    commands = [c for c in old.get("commands", []) if c not in new["commands"]] + new["commands"]
    seeds = sorted({r["seed"] for r in runs})
    return {**new, "seeds": seeds, "commands": commands, "runs": sorted(runs, key=lambda r: (r["arm"], r["seed"]))}


def device_name(gpu: bool) -> str:
    import os

    import torch

    if gpu:
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, extra = parse_args(argv)
        results_dir = Path(args.results_dir).resolve()
        if args.render:
            summaries = load_summaries(results_dir, args.selectors, args.schedule)
        else:
            chosen = select(args.selectors)
            import torch

            gpu = torch.cuda.is_available() and not args.cpu
            if not gpu and not args.steps:
                raise ReproduceError(
                    "the full schedule (2000 steps of 8 x 512 tokens per arm and seed) needs a GPU: "
                    "on this machine pass --steps N (and --tokens BATCHxSEQ_LEN) for a shortened one"
                )
            root = Path(args.dump_root).resolve() / time.strftime("%Y%m%d-%H%M%S")
            command = "python tools/reproduce.py " + " ".join(argv)
            print(
                f"reproduce: {sum(map(len, chosen.values()))} arm(s) x {len(args.seed_list)} seed(s) on "
                f"{'GPU' if gpu else 'CPU'}; runs under {root}",
                flush=True,
            )
            summaries = []
            for experiment, configs in chosen.items():
                summary = run_experiment(experiment, configs, args, extra, gpu, root, command)
                out = results_dir / summary["schedule"]["kind"] / f"{experiment}.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                summary = merge_summary(json.loads(out.read_text()) if out.exists() else None, summary)
                out.write_text(json.dumps(summary, indent=1) + "\n")
                print(f"  wrote {out}", flush=True)
                summaries.append(summary)
        text = render(summaries)
        print(text)
        if args.readme:
            write_readme(text)
    except ReproduceError as e:
        print(f"reproduce: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
