"""The batched eigen-solver (nerve_plugin.eigen) against torch.linalg.eigvalsh on one GPU: precision and speed.

    python bench/eigensolver.py                  # both tables
    python bench/eigensolver.py --precision      # metric errors on the test spectra only
    python bench/eigensolver.py --speed 24x3072,32x8192,1x14336,1x28672

Precision: matrices Q diag(lambda) Q^T with known spectra (power law with massive-activation outliers up to 1e6 x
the median, rank-deficient covariances of N < n rows, near-degenerate clusters); SE, PR, EEE and JS of each
method's eigenvalues against a float64 reference (host LAPACK for n <= 4096, cuSOLVER float64 above), relative.
Speed: medians, with the floors: 4/3 n^3 flops at 67 TFLOP/s (the H200's float64 tensor-core rate) and, for
cuSOLVER's one-stage reduction, ~n^3/3 float64 words at 4.8 TB/s.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from nerve_plugin.eigen import BatchedEigensolver
from nerve_plugin.spectrum import (
    EIG_FLOOR,
    compute_eee,
    compute_js,
    compute_participation_ratio,
    compute_spectral_entropy,
)

FLOPS = 67e12
BANDWIDTH_BYTES = 4.8e12


def timed(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return sorted(out)[len(out) // 2]


def orthogonal(n, generator):
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, device="cuda", generator=generator))
    return q * torch.sign(torch.diagonal(r))


def spectra(n, generator):
    """(name, matrix) pairs of the test spectra."""
    k = torch.arange(1, n + 1, dtype=torch.float64, device="cuda")
    power = k**-1.0
    out = []
    for name, lam in (
        ("power law", power),
        ("power law + 4 x 1e3", torch.cat([power[:4] * 0 + 1e3 * power.median(), power[4:]])),
        ("power law + 4 x 1e6", torch.cat([power[:4] * 0 + 1e6 * power.median(), power[4:]])),
        ("near-degenerate clusters", 1.0 + 1e-9 * (k % 7) + (k > n // 2) * 1e-3),
    ):
        q = orthogonal(n, generator)
        out.append((name, (q * lam) @ q.T))
    x = torch.randn(n // 2, n, dtype=torch.float64, device="cuda", generator=generator)
    x[:, :8] *= 300.0  # a few massive features
    x = x - x.mean(0)
    out.append((f"covariance of N = {n // 2} < n rows", x.T @ x / (x.shape[0] - 1)))
    return out


def metrics(eigs):
    eigs = eigs.to(torch.float64).cpu().flip(-1).clamp_min(EIG_FLOOR)
    p = eigs / eigs.sum()
    return {"SE": compute_spectral_entropy(p), "PR": compute_participation_ratio(eigs), "EEE": compute_eee(p)}, p


def precision(sizes):
    print("| n | spectrum | method | SE | PR | EEE | JS (vs the previous spectrum) |")
    print("|---|---|---|---|---|---|---|")
    generator = torch.Generator(device="cuda").manual_seed(0)
    solver = BatchedEigensolver(graphs=False)
    for n in sizes:
        cases = spectra(n, generator)
        mats = torch.stack([m for _, m in cases])
        reference = [torch.linalg.eigvalsh(m.cpu() if n <= 4096 else m) for _, m in cases]
        ours, fell_back = solver.eigvalsh(list(mats))
        methods = {
            "nerve batched": [e.flip(-1) for e in ours],
            "eigvalsh fp32": [torch.linalg.eigvalsh(m.float()).double() for m in mats],
            "eigvalsh fp64 (cuSOLVER)": [torch.linalg.eigvalsh(m) for m in mats],
        }
        ref_metrics = [metrics(r) for r in reference]
        for method, values in methods.items():
            previous = None
            for (name, _), ref, got in zip(cases, ref_metrics, values):
                mine, p = metrics(got)
                errors = {key: abs(mine[key] - ref[0][key]) / abs(ref[0][key]) for key in mine}
                js = ""
                if previous is not None:
                    js_ref = compute_js(ref[1], previous[0])
                    js = f"{abs(compute_js(p, previous[1]) - js_ref) / js_ref:.1e}"
                previous = (ref[1], p)
                print(
                    f"| {n} | {name} | {method} | {errors['SE']:.1e} | {errors['PR']:.1e} | {errors['EEE']:.1e} "
                    f"| {js} |"
                )
        print(f"(batched fallbacks: {sorted(fell_back)})")


def speed(shapes, reference=True, panel=None):
    print(
        "| matrices | eigvalsh fp64 | eigvalsh fp32 | nerve batched | band | chase | bisection | "
        "compute floor (4/3 n^3 at 67 TF) | one-stage traffic floor | batched / floor | eigvalsh fp64 / batched |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    from nerve_plugin.eigen.band import reduce_to_band
    from nerve_plugin.eigen.chase import band_to_tridiagonal
    from nerve_plugin.eigen.tridiagonal import tridiagonal_eigvalsh

    generator = torch.Generator(device="cuda").manual_seed(1)
    for batch, n in shapes:
        x = torch.randn(n, n, dtype=torch.float64, device="cuda", generator=generator)
        a = (x + x.T) / 2
        # cuSOLVER solves one matrix after another (measured: batches and streams do not overlap): time one.
        reps = 1 if n > 10000 else 2
        fp64 = timed(lambda: torch.linalg.eigvalsh(a), reps) * batch if reference else math.nan
        fp32 = timed(lambda: torch.linalg.eigvalsh(a.float()), reps) * batch if reference else math.nan
        if panel:
            import nerve_plugin.eigen.band as band_module

            band_module._CUDA_DEFAULT_PANEL = panel
        solver = BatchedEigensolver()
        mats = [a] * batch
        solver.eigvalsh(mats)  # compiles and captures
        ours = timed(lambda: solver.eigvalsh(mats), 2)
        work = a.expand(batch, n, n).clone()
        band_s = timed(lambda: reduce_to_band(work.copy_(a.expand(batch, n, n))), 1)
        band = reduce_to_band(work.copy_(a.expand(batch, n, n)))
        chase_s = timed(lambda: band_to_tridiagonal(band), 1)
        d, e, _ = band_to_tridiagonal(band)
        bisect_s = timed(lambda: tridiagonal_eigvalsh(d, e), 1)
        work = band = None  # freed before the next size (a del would leave the lambdas above unbound names)
        floor = batch * 4 / 3 * n**3 / FLOPS
        traffic = batch * n**3 / 3 * 8 / BANDWIDTH_BYTES
        print(
            f"| {batch} x {n} | {fp64:.3f} s | {fp32:.3f} s | {ours:.3f} s | {band_s:.3f} s (eager) "
            f"| {chase_s:.3f} s | {bisect_s:.3f} s | {floor * 1e3:.1f} ms | {traffic * 1e3:.0f} ms "
            f"| {ours / floor:.1f}x | {fp64 / ours:.1f}x |"
        )
        solver.release()
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", action="store_true")
    parser.add_argument("--precision-sizes", default="3072,8192")
    parser.add_argument("--speed", default=None, help="comma-separated BxN shapes")
    parser.add_argument("--no-reference", action="store_true", help="skip the eigvalsh timings")
    parser.add_argument("--panel", default=None, help="panel QR method of the band stage (default: its default)")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    if args.precision or not args.speed:
        precision([int(v) for v in args.precision_sizes.split(",")])
    if args.speed or not args.precision:
        shapes = args.speed or "24x3072,32x8192,1x14336,1x28672"
        print(f"panel method: {args.panel or 'default'}")
        speed([tuple(int(v) for v in s.split("x")) for s in shapes.split(",")], not args.no_reference, args.panel)


if __name__ == "__main__":
    main()
