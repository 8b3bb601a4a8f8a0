"""NerVE's eigen-spectrum metrics.

Names and meanings follow the original NerVE README, so code written against it can switch imports:

    X [N, D] --compute_covariance--> Sigma [D, D] --compute_sorted_eigs--> lambda (descending, >= 1e-12)
    lambda --normalize_eigs--> p (sums to 1)
    SE  = compute_spectral_entropy(p)        in [0, ln D]
    PR  = compute_participation_ratio(lambda) in [1, D]
    EEE = compute_eee(p)                      in [0, 1]
    JS  = compute_js(p_pre, p_post)           in [0, ln 2]

A training run's records carry the metrics registered in ``records.METRICS`` (these four, computed by the
functions here); ``SpectrumMetrics`` is the original NerVE's per-covariance triple.

Everything is computed in float64: the spectra of FFN activations span many decades and float32 eigen-solves
lose the small eigenvalues that SE and EEE are sensitive to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The floor of every eigenvalue (solvers clamp at it, readers treat values at it as zeros), defined once here.
EIG_FLOOR = 1e-12


def compute_covariance(x: torch.Tensor) -> torch.Tensor:
    """Unbiased covariance (X - mu)^T (X - mu) / (N - 1) of the rows of ``x`` [N, D], in float64."""
    if x.dim() != 2:
        raise ValueError(f"compute_covariance expects a 2-D [N, D] tensor, got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"compute_covariance needs at least 2 rows, got {x.shape[0]}")
    x = x.to(torch.float64)
    centred = x - x.mean(dim=0, keepdim=True)
    return centred.T @ centred / (x.shape[0] - 1)


def compute_sorted_eigs(cov: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric matrix, float64, sorted descending and clamped at 1e-12."""
    cov = cov.to(torch.float64)
    # Only the lower triangle is read by eigvalsh; symmetrising first makes the result independent of
    # which triangle accumulated the last rounding error.
    cov = 0.5 * (cov + cov.T)
    eigs = torch.linalg.eigvalsh(cov)
    return eigs.flip(-1).clamp_min(EIG_FLOOR)


def normalize_eigs(eigs: torch.Tensor) -> torch.Tensor:
    """Eigenvalues divided by their sum: a probability distribution over spectral directions."""
    eigs = eigs.to(torch.float64)
    return eigs / eigs.sum(dim=-1, keepdim=True)


def compute_spectral_entropy(p: torch.Tensor) -> float:
    """Shannon entropy -sum p log p of a normalised spectrum (natural log)."""
    p = p.to(torch.float64)
    return float(-(p * torch.log(p)).sum())


def compute_participation_ratio(eigs: torch.Tensor) -> float:
    """(sum lambda)^2 / sum lambda^2 of raw eigenvalues: the effective number of used directions."""
    eigs = eigs.to(torch.float64)
    return float(eigs.sum() ** 2 / (eigs * eigs).sum())


def compute_eee(p: torch.Tensor) -> float:
    """Eigenvalue Early Enrichment of a descending spectrum: normalised (p) or raw eigenvalues (lambda), as the
    original NerVE's README calls it with either; it is normalised here.

    The mean gap between the cumulative spectrum and the uniform diagonal k/D, scaled by its largest
    possible value 1/2 and clamped to [0, 1]: 0 for an isotropic spectrum, ~1 when one direction holds
    all variance.
    """
    p = p.to(torch.float64)
    p = p / p.sum(dim=-1, keepdim=True)
    d = p.shape[-1]
    diagonal = torch.arange(1, d + 1, dtype=torch.float64, device=p.device) / d
    area = (torch.cumsum(p, dim=-1) - diagonal).mean()
    return float((area / 0.5).clamp(0.0, 1.0))


def compute_js(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence between two normalised spectra of equal length (natural log, <= ln 2)."""
    if p.shape != q.shape:
        raise ValueError(f"compute_js needs spectra of equal shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    p = p.to(torch.float64)
    q = q.to(torch.float64)
    m = 0.5 * (p + q)

    def kl_to_m(a: torch.Tensor) -> torch.Tensor:
        # 0 log 0 = 0: terms where a is zero contribute nothing.
        return torch.where(a > 0, a * (torch.log(a) - torch.log(m)), torch.zeros_like(a)).sum()

    js = 0.5 * kl_to_m(p) + 0.5 * kl_to_m(q)
    return float(js.clamp(0.0, math.log(2.0)))


@dataclass(frozen=True)
class SpectrumMetrics:
    """The per-tap metrics of one covariance matrix, plus the spectrum they came from."""

    spectral_entropy: float
    participation_ratio: float
    eee: float
    eigenvalues: torch.Tensor  # float64, descending, clamped


def spectrum_metrics_from_eigs(eigs: torch.Tensor) -> SpectrumMetrics:
    p = normalize_eigs(eigs)
    return SpectrumMetrics(
        spectral_entropy=compute_spectral_entropy(p),
        participation_ratio=compute_participation_ratio(eigs),
        eee=compute_eee(p),
        eigenvalues=eigs,
    )


def spectrum_metrics(cov: torch.Tensor) -> SpectrumMetrics:
    """SE, PR and EEE of one covariance matrix, from one float64 eigen-solve."""
    return spectrum_metrics_from_eigs(compute_sorted_eigs(cov))
