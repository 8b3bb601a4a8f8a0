"""Why GPU Grams are summed in row chunks: the error of one bf16 Gram X^T X (fp32 output) against float64,
by reduction length, for a plain matmul, fp32 and TF32 upcasts, and chunks of 256 rows summed in float64.
Measured on an H100: 1.3e-6 at 1000 rows, 2e-5 at 8384 rows, 3e-7 with chunks. A benchmark, not a test."""

import torch


def main() -> None:
    torch.manual_seed(0)
    d = 2048
    for n in (1000, 8384):
        for mean in (0.0, 1.0):
            x = torch.randn(n, d, device="cuda") @ (torch.randn(d, d, device="cuda") / d**0.5)
            x = (x + mean * torch.randn(d, device="cuda").sign()).bfloat16()
            ref = x.double().T @ x.double()
            grams = {"mm, fp32 out": torch.mm(x.T, x, out_dtype=torch.float32)}
            torch.backends.cuda.matmul.allow_tf32 = False
            grams["fp32 upcast"] = x.float().T @ x.float()
            torch.backends.cuda.matmul.allow_tf32 = True
            grams["tf32 upcast"] = x.float().T @ x.float()
            torch.backends.cuda.matmul.allow_tf32 = False
            grams["256-row chunks"] = sum(torch.mm(c.T, c, out_dtype=torch.float32).double() for c in x.split(256))
            errors = ", ".join(f"{k} {float((g.double() - ref).norm() / ref.norm()):.1e}" for k, g in grams.items())
            print(f"rows {n:5d}, mean {mean}: {errors}")


if __name__ == "__main__":
    main()
