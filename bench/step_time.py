"""Step time with NerVE off and on (non-logging and logging steps), eager and compiled, in one process.

    torchrun --standalone --nproc_per_node=1 bench/step_time.py [--steps 40] [--log-freq 10] [-- torchtitan args]

Builds torchtitan's real Trainer on the packaged debug config (stdlib corpus, nerve's vocabulary) for NerVE
off and on, eager and compiled, alternating off/on runs so drift hits both alike, and times every train_step
between device synchronisations. Prints per-run medians, ratios to NerVE off of the same mode, and the spread
of the off runs as the noise floor. A benchmark, not a test.
"""

import argparse
import statistics
import sys
import tempfile
import time

import torch


def time_steps(extra_args: list[str], steps: int, dump: str) -> list[float]:
    from torchtitan.config import ConfigManager
    from torchtitan.train import Trainer

    from nerve_plugin.torchtitan.demo import packaged_config

    config = ConfigManager().parse_args(
        ["--job.config_file", str(packaged_config()), "--job.dump_folder", dump, "--training.steps", str(steps),
         "--metrics.log_freq", str(10**9), *extra_args]
    )  # fmt: skip
    trainer = Trainer(config)
    batches = trainer.batch_generator(trainer.dataloader)
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    try:
        for step in range(1, steps + 1):
            trainer.step = step
            trainer.gc_handler.run(step)
            synchronize()
            start = time.perf_counter()
            trainer.train_step(batches)
            synchronize()
            times.append(time.perf_counter() - start)
    finally:
        trainer.close()
    torch._dynamo.reset()
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-freq", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the statistics")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant, alternating off and on")
    parser.add_argument("torchtitan_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    extra = [a for a in args.torchtitan_args if a != "--"]
    logging_steps = {s for s in range(1, args.steps + 1) if s == 1 or s % args.log_freq == 0}

    # {(mode, nerve): [(non-logging median, logging median) per repetition]}
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for mode in ("eager", "compiled"):
        for _ in range(args.repeats):
            for nerve in ("off", "on"):
                flags = ["--nerve.enable" if nerve == "on" else "--nerve.no-enable"]
                flags += ["--nerve.log_freq", str(args.log_freq)]
                flags += ["--compile.enable"] if mode == "compiled" else []
                with tempfile.TemporaryDirectory() as dump:
                    times = time_steps(flags + extra, args.steps, dump)
                measured = {s: t for s, t in enumerate(times, 1) if s > args.warmup}
                results.setdefault((mode, nerve), []).append((
                    statistics.median(t for s, t in measured.items() if s not in logging_steps),
                    statistics.median(t for s, t in measured.items() if s in logging_steps),
                ))  # fmt: skip

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\nstep time, {device}, debugmodel, {args.steps} steps x {args.repeats} runs per variant, "
          f"NerVE log_freq {args.log_freq}; medians per run, ratios to the mean of the NerVE-off runs")  # fmt: skip
    print(f"{'mode':<9} {'NerVE':<6} {'non-logging (ms)':>24} {'logging (ms)':>22} {'ratio non-log':>14} {'ratio log':>10}")
    for mode in ("eager", "compiled"):
        base = statistics.mean(normal for normal, _ in results[(mode, "off")])
        for nerve in ("off", "on"):
            runs = results[(mode, nerve)]
            normal = statistics.mean(n for n, _ in runs)
            logging = statistics.mean(lg for _, lg in runs)
            print(f"{mode:<9} {nerve:<6} {' '.join(f'{n * 1e3:7.2f}' for n, _ in runs):>24} "
                  f"{' '.join(f'{lg * 1e3:7.1f}' for _, lg in runs):>22} {normal / base:14.3f} {logging / base:10.2f}")
        off_runs = [n for n, _ in results[(mode, "off")]]
        print(f"{mode:<9} noise: NerVE-off runs spread {100 * (max(off_runs) - min(off_runs)) / base:.1f}% of their mean")
        on_normal = statistics.mean(n for n, _ in results[(mode, "on")])
        on_logging = statistics.mean(lg for _, lg in results[(mode, "on")])
        amortized = ((args.log_freq - 1) * on_normal + on_logging) / (args.log_freq * base) - 1
        print(f"{mode:<9} amortized NerVE overhead at log_freq {args.log_freq}: {100 * amortized:.2f}%")


if __name__ == "__main__":
    sys.exit(main())
