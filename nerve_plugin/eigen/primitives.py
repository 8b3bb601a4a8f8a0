"""Triton building blocks shared by the solver's kernels: Householder scalars and the bounded wait."""

import triton
import triton.language as tl

# Polls of a counter before a program gives up waiting (about 1 us each on an H200, so seconds). No wait
# should ever reach it; it turns a bug into a flagged matrix the caller solves another way, not a hang.
SPIN_LIMIT = tl.constexpr(1 << 24)


@triton.jit
def householder_scalars(alpha, below_norm2):
    """LAPACK larfg for a vector x = (alpha, rest) with ||rest||^2 = below_norm2: (beta, tau, scale) such that
    H = I - tau v v^T with v = (1, rest / scale) maps x to beta e_1. A zero rest gives tau = 0 (H = I) and
    beta = alpha, without dividing by zero."""
    nontrivial = below_norm2 > 0.0
    norm = tl.sqrt(alpha * alpha + below_norm2)
    beta = tl.where(alpha >= 0.0, -norm, norm)
    scale = tl.where(nontrivial, alpha - beta, 1.0)  # |alpha - beta| = |alpha| + norm: no cancellation
    tau = tl.where(nontrivial, (beta - alpha) / tl.where(nontrivial, beta, 1.0), 0.0)
    return tl.where(nontrivial, beta, alpha), tau, scale


@triton.jit
def wait_until(counter_ptr, flag_ptr, need):
    """Poll ``counter_ptr`` (acquire) until it reaches ``need``, at most SPIN_LIMIT times; a timeout sets the
    flag, and a flag already set ends the wait at once (the flagged result is discarded anyway, and the other
    programs must not each spend the whole limit)."""
    polls = 0
    while (
        (tl.atomic_add(counter_ptr, 0, sem="acquire") < need)
        & (polls < SPIN_LIMIT)
        & (tl.load(flag_ptr, volatile=True) == 0)
    ):
        polls += 1
    if polls >= SPIN_LIMIT:
        tl.atomic_xchg(flag_ptr, 1)
