"""Run train_configs/ TOMLs through torchtitan's real Trainer for a few steps and check their NerVE output.

    python tools/smoke_train_configs.py                       # every train_configs/**/*.toml
    python tools/smoke_train_configs.py norm_free ffn_width/8x.toml --steps 10
    python tools/smoke_train_configs.py --steps 0             # each file as is (all its steps)
    python tools/smoke_train_configs.py optimizer -- --muon.ns_dtype float32   # after --: to torchtitan

Each config runs under ``torchrun --standalone -m torchtitan.train --job.config_file <file>`` with command-line
overrides only: ``--training.steps``, ``--metrics.log_freq 1``, ``--nerve.log_freq`` = steps (so NerVE logs at
step 1 and at the last step) and ``--job.dump_folder``. On a machine without a GPU it also adds what a CPU needs
(float32 compute: bf16 autocast is slow or refused on CPUs; a short sequence and a small batch); the model and
[variant] keys stay as in the file. A run passes when torchtitan exits with 0, every logged loss is finite, and
``<dump>/nerve/metrics.jsonl`` holds, at the last logging step, a record with finite pre and post metrics
(spectral entropy, participation ratio, EEE) and JS for every layer of the model (or of ``[nerve] layers``).

Prints one row per config (config, steps, seconds, final loss, layers logged) and exits with 1 if any failed.
Each run's folder (log in ``smoke.log``) is kept under ``<dump-root>/<timestamp>/<experiment>/<arm>``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_ROOT = REPO_ROOT / "train_configs"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP_LINE = re.compile(r"step:\s*(\d+)\s+loss:\s*(\S+)")
METRICS = ("spectral_entropy", "participation_ratio", "eee")
CPU_SEQ_LEN, CPU_BATCH = 128, 2


@dataclass
class Result:
    config: str
    steps: int
    seconds: float
    final_loss: float | None
    layers_logged: int
    layers_expected: int
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def find_configs(selectors: list[str]) -> list[Path]:
    """Every TOML under train_configs/, or those a selector names: a file, an experiment folder, or a glob
    relative to train_configs/ (``ffn_width/*x``; ``.toml`` is optional)."""
    every = sorted(CONFIG_ROOT.rglob("*.toml"))
    if not selectors:
        return every
    chosen: list[Path] = []
    for selector in selectors:
        path = Path(selector)
        if path.is_file():
            matches = [path.resolve()]
        elif (CONFIG_ROOT / selector).is_dir():
            matches = sorted((CONFIG_ROOT / selector).glob("*.toml"))
        else:
            pattern = selector if selector.endswith(".toml") else selector + ".toml"
            matches = sorted(CONFIG_ROOT.glob(pattern))
        if not matches:
            raise SystemExit(f"smoke_train_configs: no config matches {selector!r} under {CONFIG_ROOT}")
        chosen += [m for m in matches if m not in chosen]
    return chosen


def config_name(path: Path) -> str:
    try:
        return path.resolve().relative_to(CONFIG_ROOT).with_suffix("").as_posix()
    except ValueError:
        return path.stem


def expected_layers(config: dict) -> list[int]:
    """The blocks NerVE measures: [nerve] layers, or every block of the model's flavor."""
    layers = config.get("nerve", {}).get("layers") or []
    if layers:
        return sorted(layers)
    import nerve_plugin.torchtitan  # noqa: F401  (registers nerve's specs, nerve_llama included)
    from torchtitan.protocols.train_spec import get_train_spec

    model = config["model"]
    return list(range(get_train_spec(model["name"]).model_args[model["flavor"]].n_layers))


def last_logging_step(steps: int, log_freq: int) -> int:
    """NerVE logs at step 1 and every log_freq steps."""
    return max(1, steps // log_freq * log_freq)


def overrides(steps: int, gpu: bool, seq_len: int | None, batch: int | None) -> list[str]:
    args = ["--metrics.log_freq", "1"]
    if steps:
        args += ["--training.steps", str(steps), "--nerve.log_freq", str(steps)]
    if not gpu:
        args += ["--training.mixed_precision_param", "float32"]
        seq_len, batch = seq_len or CPU_SEQ_LEN, batch or CPU_BATCH
    if seq_len:
        args += ["--training.seq_len", str(seq_len)]
    if batch:
        args += ["--training.local_batch_size", str(batch)]
    return args


def check_metrics(jsonl: Path, step: int, layers: list[int]) -> tuple[int, str]:
    """(layers with finite metrics at ``step``, error or "")."""
    if not jsonl.exists():
        return 0, f"no {jsonl}"
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    at_step = {r["layer"]: r for r in records if r["step"] == step}
    good = []
    for layer in layers:
        record = at_step.get(layer)
        if record is None:
            continue
        values = [record[tap][m] for tap in ("pre", "post") for m in METRICS] + [record["js"]]
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            good.append(layer)
    missing = sorted(set(layers) - set(good))
    if missing:
        logged = sorted({r["step"] for r in records})
        return len(good), f"step {step}: no finite metrics for layers {missing} (steps logged: {logged})"
    return len(good), ""


def run_config(
    path: Path,
    run_dir: Path,
    steps: int,
    nproc: int,
    gpu: bool,
    seq_len: int | None,
    batch: int | None,
    timeout: float,
    extra: list[str],
) -> Result:
    config = tomllib.loads(path.read_text())
    name = config_name(path)
    total = steps or config.get("training", {}).get("steps", 10000)
    nerve_freq = steps or config.get("nerve", {}).get("log_freq", 100)
    layers = expected_layers(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "torchtitan.train", "--job.config_file", str(path.resolve()), "--job.dump_folder", str(run_dir),
        *overrides(steps, gpu, seq_len, batch), *extra,
    ]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    start = time.monotonic()
    # A session of its own, so that a timeout ends torchrun's workers with it.
    proc = subprocess.Popen(
        cmd, env=env, cwd=run_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        code = None
    seconds = time.monotonic() - start
    (run_dir / "smoke.log").write_text(log)
    losses = {int(m[1]): float(m[2]) for m in STEP_LINE.finditer(ANSI.sub("", log))}
    final = losses[max(losses)] if losses else None
    result = Result(name, total, seconds, final, 0, len(layers))
    if code is None:
        result.error = f"timed out after {timeout:.0f}s"
    elif code != 0:
        tail = "\n".join(log.splitlines()[-15:])
        result.error = f"torchtitan exited with {code}; the end of {run_dir / 'smoke.log'}:\n{tail}"
    elif sorted(losses) != list(range(1, total + 1)) or not all(math.isfinite(v) for v in losses.values()):
        result.error = f"expected a finite loss at steps 1..{total}, got {losses}"
    else:
        result.layers_logged, result.error = check_metrics(
            run_dir / "nerve" / "metrics.jsonl", last_logging_step(total, nerve_freq), layers
        )
    return result


def format_row(r: Result, width: int) -> str:
    loss = f"{r.final_loss:.4f}" if r.final_loss is not None else "-"
    status = "ok" if r.ok else "FAILED"
    return (
        f"{r.config:<{width}}  {r.steps:>5}  {r.seconds:>7.1f}  {loss:>10}  "
        f"{f'{r.layers_logged}/{r.layers_expected}':>6}  {status}"
    )


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our options, and what follows "--" (passed to every torchtitan run as is)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "configs", nargs="*", help="files, experiment folders or globs under train_configs/ (default: all)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=4,
        help="training steps per run (0: the file's own, with its [nerve] log_freq; default 4)",
    )
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (default 1)")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help=f"override training.seq_len (CPU default {CPU_SEQ_LEN}; GPU: the file's)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help=f"override training.local_batch_size (CPU default {CPU_BATCH}; GPU: the file's)",
    )
    parser.add_argument("--dump-root", default="./outputs/smoke", help="runs go to <dump-root>/<timestamp>/")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--cpu", action="store_true", help="use the CPU overrides even with a GPU")
    # Split at "--" ourselves: argparse's REMAINDER would also swallow our options after the config names.
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    if args.steps < 0:
        parser.error("--steps must be >= 0")
    return args, argv[cut + 1 :]


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else list(argv))
    configs = find_configs(args.configs)
    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    root = Path(args.dump_root).resolve() / time.strftime("%Y%m%d-%H%M%S")
    width = max(len("config"), *(len(config_name(c)) for c in configs))
    print(
        f"smoke_train_configs: {len(configs)} config(s) on {'GPU' if gpu else 'CPU'}, {args.nproc} "
        f"process(es) each; runs under {root}",
        flush=True,
    )
    print(f"{'config':<{width}}  {'steps':>5}  {'seconds':>7}  {'final loss':>10}  {'layers':>6}", flush=True)
    results = []
    for path in configs:
        run_dir = root / config_name(path)
        result = run_config(path, run_dir, args.steps, args.nproc, gpu, args.seq_len, args.batch, args.timeout, extra)
        results.append(result)
        print(format_row(result, width), flush=True)
        if not result.ok:
            print("    " + result.error.replace("\n", "\n    "), flush=True)
    failed = [r.config for r in results if not r.ok]
    print(f"{len(results) - len(failed)}/{len(results)} passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
