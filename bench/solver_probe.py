"""Where NerVE's eigen-solves and Grams should run, measured on one GPU machine.

python bench/solver_probe.py            # GPU eigvalsh (cuSOLVER vs MAGMA), side-stream contention
python bench/solver_probe.py --gram     # Gram accumulation (CovarianceStats.update) vs a plain bf16 matmul
python bench/solver_probe.py --host     # host (CPU, MKL) float64 eigvalsh vs thread count
"""

import threading
import time

import torch


def timed(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return sorted(out)[len(out) // 2]


def spd(n, dtype):
    x = torch.randn(2 * n, n, device="cuda", dtype=torch.float32)
    return ((x.T @ x) / (2 * n)).to(dtype)


def main():
    import sys

    if "--gram" in sys.argv:
        return gram()
    if "--host" in sys.argv:
        return host()
    print(torch.__version__, torch.cuda.get_device_name())
    for lib in ("cusolver", "magma"):
        torch.backends.cuda.preferred_linalg_library(lib)
        for n in (768, 2048, 4096, 8192):
            for dtype in (torch.float64, torch.float32):
                a = spd(n, dtype)
                t = timed(lambda: torch.linalg.eigvalsh(a), reps=3 if n < 8192 else 1)
                print(f"eigvalsh {lib:8s} n={n:5d} {str(dtype):14s} {t * 1e3:9.1f} ms", flush=True)
    torch.backends.cuda.preferred_linalg_library("cusolver")
    # batched small
    a = torch.stack([spd(768, torch.float64) for _ in range(12)])
    print(f"batched 12x768 fp64 {timed(lambda: torch.linalg.eigvalsh(a)) * 1e3:.1f} ms")

    # contention: training-like bf16 matmuls on the main stream, eigvalsh(8192 fp64) on a side stream thread
    w = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(16384, 8192, device="cuda", dtype=torch.bfloat16)

    def train_step():
        y = x
        for _ in range(6):
            y = y @ w
        return y

    base = timed(train_step, reps=20)
    cov = spd(8192, torch.float64)
    stream = torch.cuda.Stream()
    done = threading.Event()

    def worker():
        with torch.cuda.stream(stream):
            for _ in range(4):
                torch.linalg.eigvalsh(cov)
            stream.synchronize()
        done.set()

    th = threading.Thread(target=worker)
    th.start()
    steps = []
    while not done.is_set():
        t = time.perf_counter()
        train_step()
        torch.cuda.synchronize()
        steps.append(time.perf_counter() - t)
    th.join()
    print(
        f"contention: train step alone {base * 1e3:.1f} ms; with side-stream eigvalsh(8192 fp64) x4: "
        f"median {sorted(steps)[len(steps) // 2] * 1e3:.1f} ms over {len(steps)} steps, sum {sum(steps):.2f}s"
    )


def gram():
    import sys

    sys.path.insert(0, ".")
    from nerve_plugin.stats import CovarianceStats

    for d, n in ((2048, 16384), (8192, 16384), (14336, 16384)):
        x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
        s = CovarianceStats(d, "cuda")
        t_upd = timed(lambda: s.update(x), reps=5)
        t_mm = timed(lambda: torch.mm(x.T, x, out_dtype=torch.float32), reps=5)
        t_mm2 = timed(lambda: x.T @ x, reps=5)
        flops = 2 * n * d * d
        print(
            f"gram D={d} N={n}: update {t_upd * 1e3:.2f} ms ({flops / t_upd / 1e12:.0f} TF/s), mm fp32-out "
            f"{t_mm * 1e3:.2f} ms ({flops / t_mm / 1e12:.0f}), mm bf16 {t_mm2 * 1e3:.2f} ms "
            f"-> ratio {t_upd / t_mm2:.2f}"
        )


def host():
    for n in (2048, 4096, 8192):
        x = torch.randn(2 * n, n, dtype=torch.float64)
        a = (x.T @ x) / (2 * n)
        for threads in (4, 8, 14):
            torch.set_num_threads(threads)
            start = time.perf_counter()
            torch.linalg.eigvalsh(a)
            print(f"host eigvalsh n={n} float64 threads={threads}: {time.perf_counter() - start:.2f} s", flush=True)


if __name__ == "__main__":
    main()
