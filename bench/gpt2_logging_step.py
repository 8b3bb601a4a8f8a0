"""A NerVE logging step against a normal step: GPT-2 124M, 16 x 512 tokens, bf16 autocast, fused AdamW, one GPU.

    python bench/gpt2_logging_step.py [--original PATH]   # PATH holds the original NerVE's `nerve` package

Arms, in one process on the same model and tokens: NerVE off; nerve's NerveLoop (solve_timing = "sync") with the batched
eigen-solver (nerve_plugin.eigen) and with torch.linalg.eigvalsh; the original NerVE FFNEigenMetricsCallback
(unmodified, full batch: do_sampling=False) driven through its own Trainer-callback methods. Each arm starts from
the same initial weights, so its step-1 metrics can be compared. Prints medians and ratios to the normal step.
"""

from __future__ import annotations

import argparse
import copy
import glob
import os
import re
import sys
import tempfile
import time
from types import SimpleNamespace

import torch


def build(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config()).cuda()
    return model


def make_step(model, batch):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def run_nerve(initial, batch, solver, logging_steps=5, normal_steps=10):
    from nerve_plugin.loop import NerveLoop

    model = copy.deepcopy(initial)
    step = make_step(model, batch)
    loop = NerveLoop(model, blocks="transformer.h", up="mlp.c_fc", down="mlp.c_proj", log_freq=1, eigensolver=solver)
    torch.manual_seed(123)  # the same dropout masks at step 1 in every arm
    logging, own, first = [], [], None
    for s in range(1, logging_steps + 1):

        def one():
            loop.begin_step(s)
            step()
            return loop.end_step(s)

        seconds, records = timed(one)
        if s == 1:
            first = records
        logging.append(seconds)
        own.append(loop.monitor.last_duration_s)
    loop.monitor.config.log_freq = 10**9  # the same loop, now with no logging step
    normal = [timed(lambda: (loop.begin_step(s), step(), loop.end_step(s)))[0] for s in range(2, 2 + normal_steps)]
    loop.close()
    return logging, median(normal), first, median(own[1:])


def stream_timed(fn):
    """Wall time of ``fn`` up to the end of its work on the training stream only: a side stream's work (the
    "stream" solves) is not waited for, as training itself would not wait for it."""
    stream = torch.cuda.current_stream()
    stream.synchronize()
    start = time.perf_counter()
    out = fn()
    stream.synchronize()
    return time.perf_counter() - start, out


def run_window(initial, batch, timing, off, log_freq=10, windows=4):
    """Whole logging intervals: every step of ``windows`` intervals of ``log_freq`` steps after a warm-up
    interval, each step timed on the training stream. Returns (median logging step, median extra time of an
    interval over log_freq steps of NerVE off, in seconds, steps that ended with a side-stream solve in flight)."""
    from nerve_plugin.loop import NerveLoop

    model = copy.deepcopy(initial)
    step = make_step(model, batch)
    loop = NerveLoop(
        model,
        blocks="transformer.h",
        up="mlp.c_fc",
        down="mlp.c_proj",
        log_freq=log_freq,
        solve_timing=timing,
        max_overhead=0,
    )
    times, step1 = {}, None
    in_flight = 0
    torch.manual_seed(123)  # the same dropout masks at step 1 in every arm
    for s in range(1, log_freq * (windows + 1) + log_freq):
        times[s], (_, _, records) = stream_timed(lambda: (loop.begin_step(s), step(), loop.end_step(s)))
        step1 = step1 or [r for r in records or [] if r.step == 1]
        in_flight += int(loop.monitor._solves.in_flight())
    loop.close()
    logging = [times[s] for s in range(2 * log_freq, log_freq * (windows + 1) + 1, log_freq)]
    extra = [
        sum(times[t] for t in range(s, s + log_freq)) - log_freq * off
        for s in range(2 * log_freq, log_freq * (windows + 1) + 1, log_freq)
    ]
    return median(logging), median(extra), in_flight, step1


def profile_nerve(initial, batch, rows=25):
    """One warm logging step of NerveLoop (batched solver) with the training step's GPU work finished before
    end_step, so end_step's time is NerVE's alone; then torch.profiler over that end_step."""
    from torch.profiler import ProfilerActivity, profile

    from nerve_plugin.loop import NerveLoop

    model = copy.deepcopy(initial)
    step = make_step(model, batch)
    loop = NerveLoop(model, blocks="transformer.h", up="mlp.c_fc", down="mlp.c_proj", log_freq=1)
    own = []
    for s in range(1, 5):
        loop.begin_step(s)
        step()
        seconds, _ = timed(lambda: loop.end_step(s))
        own.append(seconds)
    print(
        f"end_step after the step's GPU work (NerVE's merge + solves + records): "
        f"{', '.join(f'{t * 1e3:.0f}' for t in own)} ms"
    )
    loop.begin_step(5)
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        loop.end_step(5)
        torch.cuda.synchronize()
    loop.close()
    for key in ("cuda_time_total", "cpu_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def run_original(initial, batch, path, logging_steps=2, normal_steps=10):
    sys.path.insert(0, path)
    from nerve.callback import FFNEigenMetricsCallback  # the original, unmodified

    model = copy.deepcopy(initial)
    step = make_step(model, batch)
    out = tempfile.mkdtemp()
    callback = FFNEigenMetricsCallback(log_steps=1, num_layers=12, output_dir=out, do_sampling=False)
    state, control = SimpleNamespace(global_step=0), SimpleNamespace()
    callback.on_train_begin(None, state, control, model=model)
    torch.manual_seed(123)

    def one_step(s):
        state.global_step = s
        callback.on_step_begin(None, state, control)
        step()
        callback.on_step_end(None, state, control)

    logging = [timed(lambda: one_step(s))[0] for s in range(1, logging_steps + 1)]
    callback.log_steps = 10**9
    normal = [timed(lambda: one_step(s))[0] for s in range(logging_steps + 1, logging_steps + 1 + normal_steps)]
    metrics = {}
    for name in glob.glob(os.path.join(out, "layer_*_eigen.txt")):
        layer = int(re.search(r"layer_(\d+)_", name).group(1))
        with open(name) as f:
            line = f.readline()
        metrics[layer] = {k: float(v) for k, v in re.findall(r"(\w+)=([-\d.eE+]+)", line)}
    return logging, median(normal), metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", default=None, help="folder holding the original NerVE package `nerve`")
    parser.add_argument("--tokens", default="16x512")
    parser.add_argument("--profile", action="store_true", help="also profile one logging step of the batched arm")
    parser.add_argument("--window-freq", type=int, default=10, help="log_freq of the whole-interval arms")
    args = parser.parse_args()
    batch_size, seq = (int(v) for v in args.tokens.split("x"))
    torch.backends.cuda.matmul.allow_tf32 = True
    initial = build()
    batch = torch.randint(
        0,
        initial.config.vocab_size,
        (batch_size, seq),
        device="cuda",
        generator=torch.Generator(device="cuda").manual_seed(1),
    )

    model = copy.deepcopy(initial)
    step = make_step(model, batch)
    for _ in range(5):
        step()
    off = median([timed(step)[0] for _ in range(20)])
    del model, step
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; GPT-2 124M, {batch_size} x {seq} tokens")
    print("| arm | normal step | logging step (first) | logging step (median of the rest) | in normal steps |")
    print("|---|---|---|---|---|")
    print(f"| NerVE off | {off * 1e3:.1f} ms | - | - | - |")
    results = {}
    for solver in ("batched", "eigvalsh"):
        logging, normal, first, own = run_nerve(initial, batch, solver)
        rest = median(logging[1:])
        results[solver] = first
        print(
            f"| nerve NerveLoop sync, {solver} (end_step: merge + solves {own * 1e3:.0f} ms) | {normal * 1e3:.1f} ms | "
            f"{logging[0] * 1e3:.0f} ms | {rest * 1e3:.1f} ms | {rest / off:.2f} |"
        )
    print()
    print(f"Whole logging intervals (log_freq = {args.window_freq}), every step timed on the training stream:")
    print("| solve_timing | logging step | in normal steps | interval's extra time | amortized at log_freq 100 |")
    print("|---|---|---|---|---|")
    step1 = {}
    for timing in ("sync", "stream"):
        logging, extra, in_flight, step1[timing] = run_window(initial, batch, timing, off, log_freq=args.window_freq)
        print(
            f"| {timing} | {logging * 1e3:.1f} ms | {logging / off:.2f} | {extra * 1e3:.1f} ms "
            f"({extra / off:.2f} steps; {in_flight} steps ended with a solve in flight) | "
            f"{100 * extra / (100 * off):.2f}% |"
        )
    same = len(step1["sync"]) == len(step1["stream"]) == 12 and all(
        a.layer == b.layer
        and a.js == b.js
        and all((getattr(a, tap).eigenvalues == getattr(b, tap).eigenvalues).all() for tap in ("pre", "post"))
        for a, b in zip(step1["sync"], step1["stream"])
    )
    verdict = "bitwise equal" if same else "DIFFERENT"
    print(f"step 1, stream vs sync records: {verdict} over {len(step1['sync'])} layers")
    print()
    if args.original:
        logging, normal, metrics = run_original(initial, batch, args.original)
        rest = median(logging[1:]) if len(logging) > 1 else logging[0]
        print(
            f"| original NerVE callback, do_sampling=False | {normal * 1e3:.1f} ms | {logging[0] * 1e3:.0f} ms | "
            f"{rest * 1e3:.1f} ms | {rest / off:.2f} |"
        )
        ours = {r.layer: r for r in results["batched"]}
        results["original"] = metrics
        worst = max(abs(ours[layer].pre.spectral_entropy - m["SE_pre"]) for layer, m in metrics.items())
        print(
            f"step 1, layer 0: original SE pre {metrics[0]['SE_pre']:.3f} post {metrics[0]['SE_post']:.3f} "
            f"PR pre {metrics[0]['PR_pre']:.2f}; nerve batched SE pre {ours[0].pre.spectral_entropy:.3f} "
            f"post {ours[0].post.spectral_entropy:.3f} PR pre {ours[0].pre.participation_ratio:.2f}; "
            f"max |SE pre difference| over layers {worst:.4f} (the original prints 3 decimals)"
        )
    if args.profile:
        profile_nerve(initial, batch)
    a, b = results["batched"], results["eigvalsh"]
    worst = 0.0
    for ra, rb in zip(a, b):
        for tap in ("pre", "post"):
            for metric in ("spectral_entropy", "participation_ratio", "eee"):
                x, y = getattr(getattr(ra, tap), metric), getattr(getattr(rb, tap), metric)
                worst = max(worst, abs(x - y) / max(abs(y), 1e-300))
        worst = max(worst, abs(ra.js - rb.js) / max(abs(rb.js), 1e-300))
    print(f"step 1, batched vs eigvalsh: largest relative metric difference {worst:.2e} over {len(a)} layers")


if __name__ == "__main__":
    main()
