"""Time and check stage 3 of nerve_plugin.eigen (tridiagonal_eigvalsh, Sturm-count bisection with Newton probes) on
random tridiagonal matrices, one line per (B, n): milliseconds (median of --reps after a warm-up; also replayed
from a CUDA graph, which checks that the call captures), the kernel's iterations per program, and the error of
matrix 0 against torch.linalg.eigvalsh of the dense matrix in units of eps * max|eig| (up to --max-reference-n).

    python bench/eigen_tridiagonal.py                          # GPU: the sizes NerVE solves
    python bench/eigen_tridiagonal.py --block 32,64,128 --no-newton
    python bench/eigen_tridiagonal.py --sizes 2x64             # no GPU: Triton's interpreter, small sizes only
"""

import argparse
import os
import statistics
import time

import torch

DEFAULT_SIZES = "24x3072,32x8192,1x14336,1x28672"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated BxN (default %(default)s)")
    parser.add_argument("--block", default="64", help="comma-separated eigenvalues per program (default 64)")
    parser.add_argument("--no-newton", action="store_true", help="plain bisection, for comparison")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-reference-n", type=int, default=8192, help="skip the dense reference above this n")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.sizes.split(",")]
    args.block = [int(b) for b in args.block.split(",")]
    return args


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, reps):
    fn()  # warm-up (compilation on the first size)
    synchronize(device)
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel's module is imported
    from nerve_plugin.eigen.tridiagonal import EPS, _launch, _scaled_problem, tridiagonal_eigvalsh

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}")
    generator = torch.Generator(device=device).manual_seed(0)
    for batch, n in args.sizes:
        d = torch.randn(batch, n, dtype=torch.float64, device=device, generator=generator)
        e = torch.randn(batch, n - 1, dtype=torch.float64, device=device, generator=generator)
        if n <= args.max_reference_n:
            dense = torch.diag_embed(d[0]) + torch.diag_embed(e[0], -1) + torch.diag_embed(e[0], 1)
            reference = torch.linalg.eigvalsh(dense)
            del dense
        else:
            reference = None
        for block in args.block:
            newton = not args.no_newton

            def solve():
                return tridiagonal_eigvalsh(d, e, block=block, newton=newton)

            ms = median_ms(solve, device, args.reps)
            eigenvalues = solve()
            graph_text = ""
            if device.type == "cuda":
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    captured = solve()
                graph_ms = median_ms(graph.replay, device, args.reps)
                same = torch.equal(captured, eigenvalues)
                graph_text = f"  graph {graph_ms:8.2f} ms{'' if same else ' (DIFFERS from eager!)'}"
                del graph, captured
            _, iterations = _launch(*_scaled_problem(d, e)[:3], n, block=block, newton=newton)
            iterations = iterations.double()
            if reference is None:
                error_text = "no reference"
            else:
                error = (eigenvalues[0] - reference).abs().max() / (EPS * reference.abs().max())
                error_text = f"error {error.item():6.2f} eps*max|eig|"
            print(
                f"B={batch:3d} n={n:6d} block={block:3d} {'newton' if newton else 'bisect'}: {ms:9.2f} ms"
                f"{graph_text}  iterations mean {iterations.mean().item():5.1f} max {iterations.max().item():3.0f}"
                f"  {error_text}",
                flush=True,
            )


if __name__ == "__main__":
    main()
