"""nerve-demo: a short offline pre-training of torchtitan's tiny llama3 with NerVE on, then a summary.

Runs ``torchrun -m torchtitan.train`` on the packaged job (torchtitan 0.2.x: configs/debug_stdlib.toml; 0.3.x:
the same job as nerve's registry function ``nerve_debug_stdlib``): the Python standard
library's source as corpus, nerve's shipped vocabulary, one process per GPU, or one CPU process without a GPU.
Progress is shown as torchtitan logs it; the full log is kept in <dump folder>/demo.log. At the end it prints
where the TensorBoard run is and a per-layer table of the last logged NerVE metrics.

    nerve-demo [--steps N] [--nproc N] [--dump-folder DIR] [-- extra torchtitan arguments]

It lives outside nerve_plugin.torchtitan, whose import registers nerve with torchtitan (all of torchtitan, seconds):
``nerve-demo --help`` needs none of it, and the training runs in torchrun's processes anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

PROGRESS = re.compile(r"(step:\s*\d+\s+loss|nerve step|Training starts|Training completed)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RANK_PREFIX = re.compile(r"^\[(default)?\d*\]:|^\[rank\d+\]:\s?")
# A line that names what went wrong: an exception (the last line of a traceback) or a logged error.
CAUSE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b(:|$)| - ERROR - |^ERROR\b")
# torchrun's own summary names only the failed rank, never why.
NOT_A_CAUSE = ("ChildFailedError",)


def packaged_config() -> Path:
    # resources.files("nerve_plugin.torchtitan") would import that package, i.e. all of torchtitan
    return Path(str(resources.files("nerve_plugin") / "torchtitan" / "configs" / "debug_stdlib.toml"))


def torchtitan_version() -> str:
    """The installed torchtitan's version, without importing it (seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchtitan")
    except PackageNotFoundError:
        return "none"


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def default_nproc() -> int:
    import torch

    return max(1, torch.cuda.device_count()) if gpu_available() else 1


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="nerve-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's, 40)")
    parser.add_argument("--nproc", type=int, default=None, help="processes (default: one per GPU, else 1)")
    parser.add_argument("--dump-folder", default="./outputs/nerve_demo", help="where the run writes everything")
    parser.add_argument("--config", default=None, help="a torchtitan 0.2.x TOML to run instead of the packaged one")
    parser.add_argument("torchtitan_args", nargs=argparse.REMAINDER, help="after --: passed to torchtitan")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    nproc = args.nproc or default_nproc()
    dump = Path(args.dump_folder).resolve()
    dump.mkdir(parents=True, exist_ok=True)
    extra = [a for a in args.torchtitan_args if a != "--"]
    if args.steps is not None:
        extra = ["--training.steps", str(args.steps), *extra]
    if not gpu_available():
        # torchtitan autocasts to bf16 when it does not shard; most CPUs run bf16 matmuls several times slower.
        extra = ["--training.mixed_precision_param", "float32", *extra]
    if torchtitan_version().startswith("0.2."):
        job = ["--job.config_file", str(args.config or packaged_config()), "--job.dump_folder", str(dump)]
    elif args.config is not None:
        print(
            f"nerve-demo: --config takes a TOML, which torchtitan {torchtitan_version()} does not read", file=sys.stderr
        )
        return 2
    else:  # 0.3.0's config registry: the same job as configs/debug_stdlib.toml
        job = ["--module", "nerve_plugin.torchtitan.v0_3", "--config", "nerve_debug_stdlib", "--dump_folder", str(dump)]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "torchtitan.train", *job, *extra,
    ]  # fmt: skip
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    print(f"nerve-demo: {nproc} process(es); log: {dump / 'demo.log'}", flush=True)
    with open(dump / "demo.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            line = ANSI.sub("", line).rstrip()
            if PROGRESS.search(line):
                print("  " + line.split(" - ", 2)[-1], flush=True)
        code = proc.wait()
    if code != 0:
        print(failure_report((dump / "demo.log").read_text(errors="replace"), code, dump / "demo.log"), file=sys.stderr)
        return code
    print_summary(dump)
    return 0


def failure_report(log: str, code: int, path: Path, tail: int = 15) -> str:
    """What went wrong, for a failed run: the log's lines that name a cause (exceptions, logged errors), wherever
    they are (torchrun prints a rank's traceback first and its own summary, which never says why, last), then the
    log's last lines."""
    lines = [ANSI.sub("", line).rstrip() for line in log.splitlines()]
    causes = []
    for line in lines:
        text = RANK_PREFIX.sub("", line).strip()
        if CAUSE.search(text) and not any(s in text for s in NOT_A_CAUSE) and text not in causes:
            causes.append(text)
    out = [f"nerve-demo: torchtitan exited with {code}."]
    if causes:
        out += ["The lines of the log that say what went wrong:", *(f"  {c}" for c in causes[:10])]
    out += [f"The last {tail} lines of {path}:", *lines[-tail:]]
    return "\n".join(out)


def print_summary(dump: Path) -> None:
    runs = sorted((dump / "tb").glob("*"))
    if runs:
        print(f"\nTensorBoard run: {runs[-1]}\n  tensorboard --logdir {dump / 'tb'}")
    jsonl = dump / "nerve" / "metrics.jsonl"
    if not jsonl.exists():
        print("No NerVE metrics were written (is [nerve] enable = true?)")
        return
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line]
    last = max(r["step"] for r in records)
    print(f"NerVE metrics: {jsonl}\n")
    print(format_table([r for r in records if r["step"] == last], last))


def format_table(records: list[dict], step: int) -> str:
    from nerve_plugin.writers import format_layer_table

    return "\n".join([f"step {step} (pre -> post)", *format_layer_table(records)])


if __name__ == "__main__":
    sys.exit(main())
