"""Accuracy of the streamed covariance on the GPU paths (bf16/fp16 tensor-core Grams with fp32 output, fp32
Grams), against a float64 two-pass covariance of the same values. Prints relative Frobenius errors."""

import torch

from nerve_plugin import CovarianceStats


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    d, n = 2048, 16384
    mixing = torch.randn(d, d, device="cuda", generator=gen) / d**0.5
    for mean_over_spread in (0.0, 1.0, 10.0):
        rows = torch.randn(n, d, device="cuda", generator=gen) @ mixing
        rows += mean_over_spread * rows.std() * torch.randn(d, device="cuda", generator=gen).sign()
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            x = rows.to(dtype)
            ref = x.double()
            ref = (ref - ref.mean(0)).T @ (ref - ref.mean(0)) / (n - 1)
            stats = CovarianceStats(d, "cuda")
            for chunk in x.split([1000, 4000, 3000, 8384]):
                stats.update(chunk)
            err = float((stats.covariance() - ref).norm() / ref.norm())
            print(f"mean/spread {mean_over_spread:5.1f}  {str(dtype):15s}  relative error {err:.2e}")


if __name__ == "__main__":
    main()
