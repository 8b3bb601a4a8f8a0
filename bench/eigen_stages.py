"""Where the batched eigen-solver's time goes: each stage captured in its own CUDA graph and timed alone.

    python bench/eigen_stages.py [--sizes 24x3072,32x8192] [--bandwidths 32] [--groups 4] [--panels triton]

For every B x n and every (bandwidth, update group, panel method): the graph replay time of the dense -> band
stage, the bulge chasing and the bisection, their sum, and the whole pipeline captured as one graph (as the
solver runs it), next to the compute floor (4/3 n^3 flops per matrix at 67 TFLOP/s). Matrices: random
symmetric (the cost does not depend on the data). A benchmark, not a test; needs a GPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from nerve_plugin.eigen.band import reduce_to_band
from nerve_plugin.eigen.chase import band_to_tridiagonal
from nerve_plugin.eigen.tridiagonal import tridiagonal_eigvalsh

FLOPS = 67e12


def graph_seconds(fn, reset, reps=3):
    """Median replay time of fn captured as a CUDA graph; reset() (untimed) refills its input first."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        reset()
        fn()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    reset()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(reps + 1):
        reset()
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times = sorted(times[1:])
    return times[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="24x3072,32x8192")
    parser.add_argument("--bandwidths", default="32")
    parser.add_argument("--groups", default="4")
    parser.add_argument("--panels", default="triton")
    parser.add_argument("--blocks", default="0", help="comma-separated update_block values (0: the default)")
    parser.add_argument("--eager", action="store_true", help="also time the whole pipeline eagerly (no graph)")
    parser.add_argument("--whole-only", action="store_true", help="only the whole pipeline (large sizes)")
    parser.add_argument("--chase-warps", default="1", help="comma-separated num_warps of the chase kernel")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| B x n | b | group | panel | band | chase | bisection | sum | one graph | floor | x floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        batch, n = (int(v) for v in size.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        source = torch.randn(batch, n, n, dtype=torch.float64, device="cuda", generator=g)
        source = source + source.mT
        work = torch.empty_like(source)
        floor = batch * 4 / 3 * n**3 / FLOPS
        configs = [
            (b, group, panel, block)
            for b in (int(v) for v in args.bandwidths.split(","))
            for group in (int(v) for v in args.groups.split(","))
            for panel in args.panels.split(",")
            for block in (int(v) or None for v in args.blocks.split(","))
        ]
        for b, group, panel, block in configs:

            def reset():
                return work.copy_(source)

            held = {}
            options = dict(panel=panel, update_group=group, update_block=block)

            def whole():
                band_ = reduce_to_band(work, b, **options)
                dd, ee, _ = band_to_tridiagonal(band_)
                tridiagonal_eigvalsh(dd, ee)

            t_whole = graph_seconds(whole, reset)
            eager = ""
            if args.eager:
                times = []
                for _ in range(3):
                    reset()
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    whole()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                eager = f" (eager {sorted(times)[1] * 1e3:.1f} ms)"
            if args.whole_only:
                print(
                    f"| {batch} x {n} | {b} | {group} | {panel} | block {block} | | | | {t_whole * 1e3:.1f} ms"
                    f"{eager} | {floor * 1e3:.1f} ms | {t_whole / floor:.1f} |",
                    flush=True,
                )
                continue

            def band_stage():
                held["band"] = reduce_to_band(work, b, **options)

            t_band = graph_seconds(band_stage, reset)
            band = held["band"].clone()

            chase_times = []
            for warps in (int(v) for v in args.chase_warps.split(",")):

                def chase_stage():
                    held["tri"] = band_to_tridiagonal(band, num_warps=warps)

                chase_times.append(f"{graph_seconds(chase_stage, lambda: None) * 1e3:.1f}")
            t_chase = float(chase_times[0]) / 1e3
            d, e, _ = (x.clone() for x in held["tri"])
            t_bisect = graph_seconds(lambda: tridiagonal_eigvalsh(d, e), lambda: None)
            total = t_band + t_chase + t_bisect
            print(
                f"| {batch} x {n} | {b} | {group} | {panel} block {block} | {t_band * 1e3:.1f} ms | "
                f"{'/'.join(chase_times)} ms | "
                f"{t_bisect * 1e3:.1f} ms | {total * 1e3:.1f} ms | {t_whole * 1e3:.1f} ms{eager} | "
                f"{floor * 1e3:.1f} ms | {t_whole / floor:.1f} |",
                flush=True,
            )
        source = work = None  # freed before the next size (a del would leave the closures above unbound names)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
