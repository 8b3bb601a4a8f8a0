"""Probe of the bulge-chasing kernel (stage 2) on a GPU: time per (B, n, b, warps), P=1 vs pipelined bitwise,
eigenvalues against torch.linalg.eigvalsh, and Triton's launch overhead."""

import time
import torch
import triton
import triton.language as tl
from nerve_plugin.eigen.chase import band_to_tridiagonal


def rand_band(B, n, b, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    band = torch.randn(B, n, b + 1, dtype=torch.float64, generator=g).to(device)
    idx = torch.arange(n, device=device)[:, None] + torch.arange(b + 1, device=device)[None, :]
    return band * (idx < n)


def dense(band):
    B, n, w = band.shape
    a = torch.zeros(B, n, n, dtype=band.dtype, device=band.device)
    for d in range(w):
        a.diagonal(-d, 1, 2).copy_(band[:, : n - d, d])
        if d:
            a.diagonal(d, 1, 2).copy_(band[:, : n - d, d])
    return a


def timed(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


@triton.jit
def _noop(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1)


def main():
    dev = torch.device("cuda")
    # correctness: pipelined equals one program per matrix, bitwise, and eigenvalues
    for b in (16, 32):
        band = rand_band(2, 1000, b, dev)
        d1, e1, s1 = band_to_tridiagonal(band.clone())
        d2, e2, s2 = band_to_tridiagonal(band)
        T = torch.diag_embed(d2) + torch.diag_embed(e2, -1) + torch.diag_embed(e2, 1)
        err = (torch.linalg.eigvalsh(T) - torch.linalg.eigvalsh(dense(band))).abs().max().item()
        print(
            f"b={b}: two runs bitwise equal: {torch.equal(d1, d2) and torch.equal(e1, e2)}, "
            f"status {s1.tolist()} {s2.tolist()}, eig err {err:.2e}"
        )
    for B, n in ((24, 3072), (32, 8192), (1, 14336), (1, 28672)):
        for b in (16, 32):
            for warps in (1, 2):
                band = rand_band(B, n, b, dev)
                ms = timed(lambda: band_to_tridiagonal(band, num_warps=warps), reps=2) * 1e3
                status = band_to_tridiagonal(band, num_warps=warps)[2]
                assert not status.any(), "stalled"
                steps = B * n * n / (2 * b)
                print(f"B={B} n={n} b={b} warps={warps}: {ms:.1f} ms ({ms * 1e3 / steps * 1e3:.2f} ns per step-matrix)")


if __name__ == "__main__":
    main()
