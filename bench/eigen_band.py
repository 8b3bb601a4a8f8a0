"""Speed and accuracy of the dense -> band reduction (nerve_plugin.eigen.band.reduce_to_band) on the GPU.

    python bench/eigen_band.py [--sizes 24x3072,32x8192,1x14336,1x28672] [--bandwidth 32]
                               [--panel persistent|triton|torch] [--tiling 64x1] [--graph] [--check-n 3072]
    python bench/eigen_band.py --compare [--methods triton,torch,persistent] [--graph] [--sizes ...]

For every B x n: the median of 3 timed runs after a warm-up, the achieved TFLOP/s counting the 2 n^3 flops per
matrix the algorithm performs (full-matrix trailing updates), the 4/3 n^3 floor of a reduction at 67 TFLOP/s,
the panel QRs alone (the same sequence of panel launches without the trailing updates, whose cost does not depend
on the data), and the peak workspace beyond the input (a silent copy of the m x m trailing matrix would show up
as about B n^2 8 bytes). --graph also times a CUDA-graph replay (launch overhead removed). Then the band of one
n x n covariance of n / 2 rows (rank-deficient) plus three outliers at 1e6 x its mean eigenvalue is checked
against torch.linalg.eigvalsh of the matrix.

--tiling is the panel kernel's: ROWSxCHUNKS (rows per chunk, chunks per program) for "triton", ROWSxWARPS (rows
per program, warps) for "persistent"; default: picked from the shape and the GPU.

--compare times the panel methods side by side for each size (whole stage, panels alone, and with --graph the
graph replay of the stage), and checks that the persistent band's eigenvalues equal the triton band's within
10 eps ||A|| (torch.linalg.eigvalsh of the dense bands for n <= 4096, else the solver's own stages 2 and 3 on
both bands; ||A|| = the largest |eigenvalue|), and that no persistent launch stalled. The methods take turns
on one workspace.

Without a GPU it runs on CPU for smoke tests (e.g. --sizes 2x40; the Triton panels through TRITON_INTERPRET=1).
A benchmark, not a test.
"""

import argparse
import os
import statistics
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # chosen when the kernel is defined: before the import

from nerve_plugin.eigen import band as band_module  # noqa: E402
from nerve_plugin.eigen.band import householder_panel, panel_starts, reduce_to_band  # noqa: E402

EPS = torch.finfo(torch.float64).eps


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run, prepare, device: torch.device, reps: int = 3) -> float:
    """Median wall time of run() over reps, after one warm-up; prepare() (untimed) resets the input first."""
    prepare()
    run()
    times = []
    for _ in range(reps):
        prepare()
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def panels_only(work: torch.Tensor, bandwidth: int, panel: str, tiling) -> None:
    """The panel launches of reduce_to_band without the trailing updates (the persistent panels get their
    barrier counters from one zeroed buffer, as reduce_to_band gives them)."""
    n = work.shape[-1]
    starts = panel_starts(n, bandwidth)
    sync = None
    if panel == "persistent":
        sync = torch.zeros(1 + len(starts), work.shape[0], dtype=torch.int32, device=work.device)
    for i, k in enumerate(starts):
        householder_panel(
            work[:, k + bandwidth :, k : k + bandwidth], method=panel, tiling=tiling,
            counters=None if sync is None else sync[1 + i], flags=None if sync is None else sync[0],
        )  # fmt: skip


def graph_seconds(work, source, bandwidth, panel, tiling, device, reps: int = 3) -> float:
    graph = torch.cuda.CUDAGraph()
    work.copy_(source)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # compile and warm the allocator outside the capture
        reduce_to_band(work, bandwidth, panel=panel, panel_tiling=tiling)
    torch.cuda.current_stream(device).wait_stream(side)
    work.copy_(source)
    with torch.cuda.graph(graph):
        reduce_to_band(work, bandwidth, panel=panel, panel_tiling=tiling)
    return median_seconds(graph.replay, lambda: work.copy_(source), device, reps)


def measure(
    source: torch.Tensor, work: torch.Tensor, bandwidth: int, panel: str, tiling, graph: bool, device: torch.device
) -> dict:
    """Stage and panel times (s), peak workspace (GiB), graph replay time (s, or the capture error) and the
    matrices flagged as stalled, of one panel method on ``source``."""
    reset = lambda: work.copy_(source)  # noqa: E731
    full = lambda: reduce_to_band(work, bandwidth, panel=panel, panel_tiling=tiling)  # noqa: E731
    result = {"stage": median_seconds(full, reset, device), "workspace": float("nan"), "graph": None}
    if device.type == "cuda":
        reset()
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        full()
        synchronize(device)
        result["workspace"] = (torch.cuda.max_memory_allocated(device) - before) / 2**30
    result["panels"] = median_seconds(lambda: panels_only(work, bandwidth, panel, tiling), reset, device)
    if graph and device.type == "cuda" and panel == "torch":
        result["graph"] = "n/a"  # not attempted: geqrf (cuSOLVER / MAGMA) may synchronise, breaking the capture
    elif graph and device.type == "cuda":
        try:
            result["graph"] = graph_seconds(work, source, bandwidth, panel, tiling, device)
        except RuntimeError as error:  # report, do not hide the other numbers
            result["graph"] = f"capture failed: {error}"
    status = torch.zeros(source.shape[0], dtype=torch.int32, device=device)
    reset()
    result["band"] = reduce_to_band(work, bandwidth, panel=panel, panel_tiling=tiling, status=status)
    result["stalled"] = int((status != 0).sum())
    return result


def random_batch(batch: int, n: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(0)
    # only the lower triangle is read, so a plain random matrix stands for a symmetric one
    return torch.randn(batch, n, n, dtype=torch.float64, device=device, generator=gen)


def time_size(batch: int, n: int, args, device: torch.device) -> None:
    source = random_batch(batch, n, device)
    work = torch.empty_like(source)
    result = measure(source, work, args.bandwidth, args.panel, args.tiling, args.graph, device)
    seconds, panel_seconds = result["stage"], result["panels"]
    flops = 2 * n**3 * batch
    floor_ms = 4 / 3 * n**3 * batch / 67e12 * 1e3
    line = (
        f"B={batch:3d} n={n:6d} b={args.bandwidth}: {seconds * 1e3:10.2f} ms  {flops / seconds / 1e12:6.2f} TFLOP/s"
        f" (2n^3)  floor {floor_ms:8.2f} ms  panels {panel_seconds * 1e3:9.2f} ms"
        f" ({100 * panel_seconds / seconds:4.1f}%)  workspace {result['workspace']:.2f} GiB"
        f" (an m x m copy: {batch * n * n * 8 / 2**30:.2f} GiB)"
    )
    if isinstance(result["graph"], float):
        line += f"  graph {result['graph'] * 1e3:.2f} ms"
    elif result["graph"] is not None:
        line += f"  graph {result['graph']}"
    if result["stalled"]:
        line += f"  STALLED: {result['stalled']} matrices flagged"
    print(line, flush=True)


def band_eigenvalues(band: torch.Tensor) -> tuple[torch.Tensor, str]:
    n, bandwidth = band.shape[1], band.shape[2] - 1
    if n > 4096 and bandwidth & (bandwidth - 1) == 0:
        from nerve_plugin.eigen.chase import band_to_tridiagonal
        from nerve_plugin.eigen.tridiagonal import tridiagonal_eigvalsh

        diagonal, off_diagonal, _ = band_to_tridiagonal(band.clone())
        return tridiagonal_eigvalsh(diagonal, off_diagonal), "stages 2-3"
    return torch.linalg.eigvalsh(band_to_dense(band)), "eigvalsh"


def compare_size(batch: int, n: int, args, device: torch.device) -> None:
    source = random_batch(batch, n, device)
    work = torch.empty_like(source)
    results = {}
    for method in args.methods:
        tiling = args.tiling if method == args.panel else None  # a tiling is one kernel's
        results[method] = measure(source, work, args.bandwidth, method, tiling, args.graph, device)
    del work

    def column(key: str) -> str:
        cells = []
        for method, result in results.items():
            value = result[key]
            cells.append(f"{method} {value * 1e3:9.2f}" if isinstance(value, float) else f"{method} {value}")
        return "  ".join(cells)

    line = f"B={batch:3d} n={n:6d} b={args.bandwidth} ms:  stage [{column('stage')}]  panels [{column('panels')}]"
    if args.graph and device.type == "cuda":
        line += f"  graph [{column('graph')}]"
    if "persistent" in results and "triton" in results:
        persistent, triton_result = results["persistent"], results["triton"]
        eig_persistent, how = band_eigenvalues(persistent["band"])
        eig_triton, _ = band_eigenvalues(triton_result["band"])
        norm = eig_triton.abs().amax(-1).clamp_min(torch.finfo(torch.float64).tiny)
        error = float(((eig_persistent - eig_triton).abs().amax(-1) / (EPS * norm)).max())
        verdict = "ok" if error <= 10 and persistent["stalled"] == 0 else "FAIL"
        line += (
            f"  | persistent vs triton eigenvalues ({how}): max {error:.2f} eps ||A|| (<= 10: {verdict}),"
            f" stalled {persistent['stalled']}"
        )
    print(line, flush=True)


def band_to_dense(band: torch.Tensor) -> torch.Tensor:
    batch, n, width = band.shape
    dense = band.new_zeros(batch, n, n)
    for d in range(min(width, n)):
        idx = torch.arange(n - d, device=band.device)
        dense[:, idx + d, idx] = band[:, : n - d, d]
        dense[:, idx, idx + d] = band[:, : n - d, d]
    return dense


def check_accuracy(n: int, args, device: torch.device) -> None:
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(n // 2, n, dtype=torch.float64, device=device, generator=gen)
    a = x.T @ x
    q, _ = torch.linalg.qr(torch.randn(n, 3, dtype=torch.float64, device=device, generator=gen))
    a += 1e6 * a.diagonal().mean() * (q * torch.tensor([1.0, 2.0, 3.0], device=device)) @ q.T  # x mean eigenvalue
    band = reduce_to_band(a.clone()[None], args.bandwidth, panel=args.panel, panel_tiling=args.tiling)
    reference = torch.linalg.eigvalsh(a)
    error = (torch.linalg.eigvalsh(band_to_dense(band))[0] - reference).abs().max()
    norm = reference.abs().max()
    print(
        f"accuracy n={n}, covariance of {n // 2} rows + 3 outliers at 1e6 x mean: max |eig error| ="
        f" {float(error / (EPS * norm)):.1f} eps ||A||  (||A|| = {float(norm):.3e})"
    )


def parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(part) for part in item.lower().split("x")) for item in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("24x3072,32x8192,1x14336,1x28672"))
    parser.add_argument("--bandwidth", type=int, default=32)
    parser.add_argument(
        "--panel",
        choices=["persistent", "triton", "torch"],
        default=None,
        help="default: reduce_to_band's on the device",
    )
    parser.add_argument(
        "--tiling",
        type=lambda s: tuple(int(p) for p in s.split("x")),
        default=None,
        help="the panel kernel's tiling: ROWSxCHUNKS for triton, ROWSxWARPS for persistent"
        " (default: picked from the shape)",
    )
    parser.add_argument("--graph", action="store_true", help="also time a CUDA-graph replay")
    parser.add_argument("--check-n", type=int, default=None, help="accuracy check size (default 3072; CPU: first n)")
    parser.add_argument(
        "--compare", action="store_true", help="time the panel methods side by side and check persistent against triton"
    )
    parser.add_argument(
        "--methods",
        type=lambda s: s.split(","),
        default=["triton", "torch", "persistent"],
        help="the methods --compare times (comma-separated)",
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.panel = args.panel or (band_module._CUDA_DEFAULT_PANEL if device.type == "cuda" else "torch")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    if args.compare:
        print(
            f"{name}, torch {torch.__version__}, methods {','.join(args.methods)},"
            f" tiling {args.tiling or 'default'} (for {args.panel})"
        )
        for batch, n in args.sizes:
            compare_size(batch, n, args, device)
        return
    print(f"{name}, torch {torch.__version__}, panel {args.panel}, tiling {args.tiling or 'default'}")
    for batch, n in args.sizes:
        time_size(batch, n, args, device)
    check_n = args.check_n or (3072 if device.type == "cuda" else args.sizes[0][1])
    check_accuracy(check_n, args, device)


if __name__ == "__main__":
    main()
