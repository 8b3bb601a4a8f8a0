"""Run torchtitan's real Trainer under torchrun from tests (CPU or GPU).

    cfg = merge(base_config(tmp_path), {"parallelism": {"tensor_parallel_degree": 2}})
    proc = run_torchtitan(tmp_path, cfg, nproc=2)      # raises TorchtitanRunError on failure
    steps = parse_steps(proc.stdout)                   # {rank: {step: {"loss", "grad_norm"}}}
    exact = read_metrics(cfg)                          # {rank: [{"step", "loss", ...}, ...]}

The base config uses the test-only spec in tests/tt_synthetic.py (CPU mode + synthetic
data), so it needs no tokenizer, dataset or network.
"""

import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = REPO_ROOT / "tests"


class TorchtitanRunError(RuntimeError):
    pass


def base_config(tmp_path) -> dict:
    """A tiny llama3 debugmodel job: a few steps on synthetic data, no checkpoints."""
    return {
        "job": {"dump_folder": str(Path(tmp_path) / "outputs"), "description": "nerve test"},
        "experimental": {"custom_import": "tt_synthetic"},
        "model": {"name": "nerve_test_llama3", "flavor": "debugmodel"},
        "training": {
            "local_batch_size": 2,
            "seq_len": 64,
            "steps": 3,
            "max_norm": 1.0,
            "dataset": "synthetic",  # ignored by the synthetic dataloader
            # fp32 compute: bf16 matmuls are slow on most CPUs and blur comparisons
            "mixed_precision_param": "float32",
        },
        "optimizer": {"name": "AdamW", "lr": 8e-4},
        "lr_scheduler": {"warmup_steps": 2},
        "parallelism": {"data_parallel_shard_degree": -1},
        "activation_checkpoint": {"mode": "none"},
        "checkpoint": {"enable": False},
        "metrics": {"log_freq": 1, "enable_tensorboard": False, "disable_color_printing": True},
        "debug": {"seed": 0},
    }


def merge(config: dict, overrides: dict) -> dict:
    """A deep copy of `config` with the nested dict `overrides` merged in."""
    out = copy.deepcopy(config)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML: {v!r}")


def to_toml(config: dict) -> str:
    """TOML for a dict of scalars, lists and (nested) dicts of them."""
    lines, tables = [], []

    def emit(d, prefix):
        body = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
        if prefix and (body or not any(isinstance(v, dict) for v in d.values())):
            lines.append(f"\n[{prefix}]")
        lines.extend(body)
        for k, v in d.items():
            if isinstance(v, dict):
                tables.append((v, f"{prefix}.{k}" if prefix else k))

    emit(config, "")
    while tables:
        emit(*tables.pop(0))
    return "\n".join(lines).lstrip("\n") + "\n"


def run_torchtitan(
    tmp_path,
    config: dict,
    nproc: int = 2,
    extra_args=(),
    timeout: float = 300,
    env: dict | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Write `config` to <tmp_path>/job.toml and run `torchrun -m torchtitan.train` on it.

    nproc processes on one host (torchrun --standalone picks a free port); extra_args are
    appended to torchtitan's command line (e.g. "--training.steps", "5"); env entries
    override the environment. Returns the CompletedProcess with stdout+stderr in .stdout,
    each line prefixed by torchrun with "[rank<N>]:". With check=True a non-zero exit or
    a timeout raises TorchtitanRunError with the log's tail.
    """
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    config_file = tmp_path / "job.toml"
    config_file.write_text(to_toml(config))
    return run_torchtitan_args(
        tmp_path, ["--job.config_file", str(config_file), *extra_args], nproc, timeout, env, check
    )


def run_torchtitan_args(
    tmp_path, args, nproc: int = 2, timeout: float = 300, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """``torchrun -m torchtitan.train *args`` in <tmp_path>, as run_torchtitan describes; the route of torchtitan
    versions without TOML (0.3.0: ``--module M --config F --section.key value``)."""
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "--role",
        "rank",
        "--tee",
        "3",
        "--log-dir",
        str(tmp_path / "torchrun_logs"),
        "-m",
        "torchtitan.train",
        *map(str, args),
    ]
    pythonpath = [str(REPO_ROOT), str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in pythonpath if p),
        "OMP_NUM_THREADS": "1",  # ranks share the host's cores
        "PYTHONUNBUFFERED": "1",
        # torchtitan warns unless PP's loss-holding rank is listed here
        "LOG_RANK": ",".join(map(str, range(nproc))),
        **(env or {}),
    }
    # a session of its own, so a timeout can end the workers with the launcher
    p = subprocess.Popen(
        cmd,
        env=full_env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        if check:
            raise TorchtitanRunError(f"timed out after {timeout}s: {' '.join(cmd)}\n{_tail(out)}")
    proc = subprocess.CompletedProcess(cmd, p.returncode, out, None)
    if check and proc.returncode != 0:
        raise TorchtitanRunError(f"torchtitan exited with {proc.returncode}: {' '.join(cmd)}\n{_tail(out)}")
    return proc


FATAL_MARKERS = ("Fatal Python error", "terminate called", "Traceback (most recent call last)")


def _tail(text: str, n: int = 80, context: int = 120) -> str:
    """The last n lines, preceded by the first crash report (a fatal error's thread dump, a traceback) when it
    lies further back: with several ranks the launcher's own traceback would otherwise push it out of view."""
    lines = (text or "").splitlines()
    first = next((i for i, line in enumerate(lines) if any(m in line for m in FATAL_MARKERS)), None)
    if first is None or first >= len(lines) - n:
        return "\n".join(lines[-n:])
    crash = lines[first : min(first + context, len(lines) - n)]
    return "\n".join(["[the first crash report]", *crash, "[...]", *lines[-n:]])


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STEP = re.compile(r"^\[\w*?(\d+)\]:.*?step:\s*(\d+)\s+loss:\s*(\S+)\s+grad_norm:\s*(\S+)")


def parse_steps(log: str) -> dict[int, dict[int, dict[str, float]]]:
    """{rank: {step: {"loss": .., "grad_norm": ..}}} from torchtitan's metric log lines.

    Under PP only the last stage's ranks log a real loss; the others log -1.
    """
    out: dict[int, dict[int, dict[str, float]]] = {}
    for line in _ANSI.sub("", log).splitlines():
        m = _STEP.match(line)
        if m:
            rank, step = int(m[1]), int(m[2])
            out.setdefault(rank, {})[step] = {"loss": float(m[3]), "grad_norm": float(m[4])}
    return out


def read_metrics(config: dict | Path) -> dict[int, list[dict]]:
    """Exact per-step metrics written by the test harnesses (tt_synthetic, tt030): {rank: [{"step", "loss",
    "max_loss", "grad_norm"}, ...]}, read from the job's dump folder (a config dict's job.dump_folder, or the
    folder itself; appended to by every run that uses it: give each run its own folder)."""
    folder = Path(config["job"]["dump_folder"]) if isinstance(config, dict) else Path(config)
    out = {}
    for f in sorted(folder.glob("metrics_rank*.jsonl")):
        rank = int(f.stem.removeprefix("metrics_rank"))
        out[rank] = [json.loads(line) for line in f.read_text().splitlines() if line]
    return out
