"""Step time and memory with NerVE off and on: non-logging steps, logging steps, the steps after them, and the
amortized overhead, eager and compiled, in one process.

    torchrun --standalone --nproc_per_node=N bench/step_time.py [--model debug|1b] [--steps 120]
        [--log-freq 50] [--variants off,sync,overlap] [--modes eager,compiled] [-- torchtitan args]

Builds torchtitan's real Trainer on the packaged debug config (stdlib corpus, nerve's vocabulary), optionally
with the benchmark's "1B" flavor (bench/tt_flavors.py: dim 2048, FFN 8192, 16 layers, seq 2048, bf16), and
times every train_step between device synchronisations. A variant is NerVE off or a set of [nerve] flags
(VARIANTS below). Per variant it prints: the median non-logging step, the median logging step, the median step
while overlapped solves are pending, the overhead of whole logging windows against NerVE off (the amortized
cost at this log_freq, measured) and extrapolated to log_freq 100, and peak GPU memory. Also the spread of
repeated off runs as the noise floor. A benchmark, not a test.
"""

import argparse
import statistics
import sys
import tempfile
import time

import torch

VARIANTS = {
    "off": ["--nerve.no-enable"],
    "sync": ["--nerve.enable", "--nerve.solve_timing", "sync"],
    "overlap": ["--nerve.enable", "--nerve.solve_timing", "overlap"],
    "overlap_cap2": ["--nerve.enable", "--nerve.solve_timing", "overlap", "--nerve.max_layers_per_step", "2"],
    "spread": ["--nerve.enable", "--nerve.solve_timing", "sync", "--nerve.solve_placement", "spread"],
    "spread_overlap": ["--nerve.enable", "--nerve.solve_timing", "overlap", "--nerve.solve_placement", "spread"],
    "spread_overlap_cap2": [
        "--nerve.enable",
        "--nerve.solve_timing",
        "overlap",
        "--nerve.solve_placement",
        "spread",
        "--nerve.max_layers_per_step",
        "2",
    ],
    "overlap_cap1": ["--nerve.enable", "--nerve.solve_timing", "overlap", "--nerve.max_layers_per_step", "1"],
}
MODELS = {
    "debug": [],
    "1b": ["--experimental.custom_import", "bench.tt_flavors", "--model.flavor", "1B", "--training.seq_len", "2048",
           "--training.local_batch_size", "4", "--activation_checkpoint.mode", "none", "--optimizer.lr", "3e-4"],
}  # fmt: skip


NERVE_HOST_TIME = [0.0]  # seconds spent inside NerVE's per-step calls (begin_step, pause, end_step)


def instrument_nerve() -> None:
    """Time NerVE's own entry points on the host: on steps that do not log this is all NerVE does."""
    from nerve_plugin.monitor import NerveMonitor

    for name in ("begin_step", "pause", "end_step"):
        original = getattr(NerveMonitor, name)

        def timed(self, *args, _original=original, **kwargs):
            start = time.perf_counter()
            try:
                return _original(self, *args, **kwargs)
            finally:
                NERVE_HOST_TIME[0] += time.perf_counter() - start

        setattr(NerveMonitor, name, timed)


def run(extra_args: list[str], steps: int, dump: str) -> tuple[list[float], int]:
    from torchtitan.config import ConfigManager
    from torchtitan.train import Trainer

    from nerve_plugin.torchtitan.demo import packaged_config

    config = ConfigManager().parse_args(
        ["--job.config_file", str(packaged_config()), "--job.dump_folder", dump, "--training.steps", str(steps),
         "--metrics.log_freq", str(10**9), *extra_args]
    )  # fmt: skip
    cuda = torch.cuda.is_available()
    baseline = 0
    if cuda:
        # Earlier runs of this process may still hold memory (their Trainer, nerve's session): measure the
        # peak of this run above what was allocated before it.
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated()
    trainer = Trainer(config)
    batches = trainer.batch_generator(trainer.dataloader)
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, host = [], []
    try:
        for step in range(1, steps + 1):
            trainer.step = step
            trainer.gc_handler.run(step)
            synchronize()
            NERVE_HOST_TIME[0] = 0.0
            start = time.perf_counter()
            trainer.train_step(batches)
            synchronize()
            times.append(time.perf_counter() - start)
            host.append(NERVE_HOST_TIME[0])
    finally:
        trainer.close()
    peak = torch.cuda.max_memory_allocated() - baseline if cuda else 0
    torch._dynamo.reset()
    RUN_HOST_TIMES.append(host)
    return times, peak


RUN_HOST_TIMES: list[list[float]] = []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), default="debug")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--log-freq", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the statistics")
    parser.add_argument("--variants", default="off,sync,overlap")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the variants")
    parser.add_argument("torchtitan_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    extra = MODELS[args.model] + [a for a in args.torchtitan_args if a != "--"]
    variants = args.variants.split(",")
    f = args.log_freq
    logging_steps = {s for s in range(1, args.steps + 1) if s == 1 or s % f == 0}
    # whole windows [k f, (k+1) f) after warm-up: each holds one logging step and the steps its solves overlap
    first_window = max(f, ((args.warmup + f - 1) // f) * f)
    windows = [
        s for s in range(first_window, args.steps + 1) if s < first_window + f * ((args.steps + 1 - first_window) // f)
    ]

    instrument_nerve()
    results: dict[tuple[str, str], list[tuple[list[float], int]]] = {}
    host_us: dict[tuple[str, str], float] = {}
    for mode in args.modes.split(","):
        for _ in range(args.repeats):
            for variant in variants:
                flags = VARIANTS[variant] + ["--nerve.log_freq", str(f)]
                flags += ["--compile.enable"] if mode == "compiled" else []
                with tempfile.TemporaryDirectory() as dump:
                    results.setdefault((mode, variant), []).append(run(flags + extra, args.steps, dump))
                host = RUN_HOST_TIMES[-1]
                host_us[(mode, variant)] = 1e6 * statistics.median(
                    t for s, t in enumerate(host, 1) if s > args.warmup and s not in logging_steps
                )

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank:
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    print(
        f"\nstep time, {world} x {device}, model {args.model}, {args.steps} steps, NerVE log_freq {f}, "
        f"{args.repeats} run(s) per variant; ratios to NerVE off of the same mode; "
        f"windows = steps {windows[0]}-{windows[-1]}"
    )
    print(f"{'mode':<9} {'variant':<15} {'non-log ms':>10} {'log ms':>9} {'pending ms':>10} {'x non-log':>9} "
          f"{'log/normal':>10} {'window ovh':>10} {'@f=100':>8} {'peak GiB':>9} {'NerVE us/non-log':>16}")  # fmt: skip
    for mode in args.modes.split(","):
        off = results[(mode, "off")]
        base = statistics.mean(
            statistics.median(t for s, t in enumerate(times, 1) if s > args.warmup and s not in logging_steps)
            for times, _ in off
        )
        base_window = statistics.mean(sum(times[s - 1] for s in windows) for times, _ in off)
        for variant in variants:
            rows = results[(mode, variant)]
            normal, logging, pending, window = [], [], [], []
            for times, _ in rows:
                normal.append(
                    statistics.median(t for s, t in enumerate(times, 1) if s > args.warmup and s not in logging_steps)
                )
                logging.append(
                    statistics.median(t for s, t in enumerate(times, 1) if s > args.warmup and s in logging_steps)
                )
                # the steps right after a logging step, while an overlapped solve may be running
                after = [times[s] for s in logging_steps if args.warmup < s < args.steps and s + 1 <= args.steps]
                pending.append(statistics.median(after) if after else float("nan"))
                window.append(sum(times[s - 1] for s in windows))
            n, lg, pd, w = (statistics.mean(x) for x in (normal, logging, pending, window))
            extra_per_window = (w - base_window) / (len(windows) / f)
            at_100 = extra_per_window / (100 * base)
            peak = max(p for _, p in rows) / 2**30
            print(f"{mode:<9} {variant:<15} {n * 1e3:10.2f} {lg * 1e3:9.1f} {pd * 1e3:10.2f} {n / base:9.3f} "
                  f"{lg / base:10.2f} {100 * (w / base_window - 1):9.2f}% {100 * at_100:7.2f}% {peak:9.2f} "
                  f"{host_us[(mode, variant)]:8.1f} ({100 * host_us[(mode, variant)] * 1e-6 / base:.3f}%)")  # fmt: skip
        if len(off) > 1:
            runs = [
                statistics.median(t for s, t in enumerate(times, 1) if s > args.warmup and s not in logging_steps)
                for times, _ in off
            ]
            print(f"{mode:<9} noise: NerVE-off runs spread {100 * (max(runs) - min(runs)) / base:.1f}% of their mean")


if __name__ == "__main__":
    sys.exit(main())
