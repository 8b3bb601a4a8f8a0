"""Cost of attached-but-disarmed taps on steps that do not log, isolated from run-to-run noise.

One process, one model, forward+backward steps alternating in blocks between "taps attached, disarmed" and
"no taps" (eager: attach/remove; compiled: two compiled copies with the same weights). Prints median step
times and their ratio. A benchmark, not a test.

    python bench/hook_overhead.py [--seq-len 2048] [--batch 16] [--blocks 20] [--block-steps 10]
"""

import argparse
import copy
import statistics

import torch

from nerve_plugin import BUILTIN_SPECS, FFNTaps


def build(args):
    from torchtitan.models.llama3 import Transformer, llama3_args

    model_args = copy.deepcopy(llama3_args["debugmodel"])
    model_args.max_seq_len = args.seq_len
    with torch.device("cuda"):
        model = Transformer(model_args)
    with torch.no_grad():
        model.init_weights()
    return model


def step_time(model, tokens) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(tokens).float().logsumexp(-1).mean()
    loss.backward()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def alternate(run_a, run_b, blocks: int, block_steps: int):
    a, b = [], []
    for i in range(blocks):
        first, second = (run_a, run_b) if i % 2 == 0 else (run_b, run_a)
        for run in (first, second):
            times = [run() for _ in range(block_steps)][2:]  # the first steps of a block warm caches
            (a if run is run_a else b).extend(times)
    return statistics.median(a), statistics.median(b)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--block-steps", type=int, default=10)
    args = parser.parse_args()
    tokens = torch.randint(0, 2048, (args.batch, args.seq_len), device="cuda")
    spec = BUILTIN_SPECS["llama3"]

    model = build(args)
    taps = FFNTaps(model, spec)

    def without():
        if taps.attached:
            taps.remove()
        return step_time(model, tokens)

    def with_taps():
        if not taps.attached:
            taps.attach()
        return step_time(model, tokens)

    for _ in range(5):
        step_time(model, tokens)
    off, on = alternate(without, with_taps, args.blocks, args.block_steps)
    print(f"eager    : no taps {off:7.3f} ms, taps disarmed {on:7.3f} ms, ratio {on / off:.4f}")

    from torchtitan.config.job_config import Compile
    from torchtitan.models.llama3.infra.parallelize import apply_compile

    plain, tapped = build(args), build(args)
    tapped.load_state_dict(plain.state_dict())
    FFNTaps(tapped, spec).attach()
    for m in (plain, tapped):
        apply_compile(m, Compile(enable=True))
        for _ in range(5):
            step_time(m, tokens)
    off, on = alternate(
        lambda: step_time(plain, tokens), lambda: step_time(tapped, tokens), args.blocks, args.block_steps
    )
    print(f"compiled : no taps {off:7.3f} ms, taps disarmed {on:7.3f} ms, ratio {on / off:.4f}")


if __name__ == "__main__":
    main()
