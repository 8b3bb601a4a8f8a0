"""The float64 reference the metric tests compare nerve with: numpy only, written from the definitions (README,
"The metrics"), sharing no code with nerve_plugin but the eigenvalue floor, a convention rather than math.

    ref = of_rows(rows)          # rows [N, D] -> {"tokens", "cov", "eigenvalues", "p", <metric>: value}
    ref = metrics(eigenvalues)   # a spectrum (descending, floored) -> {"p", <metric>: value}
    js(ref_pre["p"], ref_post["p"])
"""

import numpy as np

from nerve_plugin.spectrum import EIG_FLOOR


def covariance(rows: np.ndarray) -> np.ndarray:
    """Unbiased covariance of the rows [N, D], float64."""
    rows = np.asarray(rows, dtype=np.float64)
    centred = rows - rows.mean(axis=0)
    return centred.T @ centred / (rows.shape[0] - 1)


def eigenvalues(cov: np.ndarray) -> np.ndarray:
    """Descending, floored at EIG_FLOOR."""
    return np.maximum(np.sort(np.linalg.eigvalsh(cov))[::-1], EIG_FLOOR)


def metrics(eigs: np.ndarray) -> dict:
    """SE, PR and EEE of a spectrum, and its normalisation p."""
    p = eigs / eigs.sum()
    d = len(p)
    eee = np.clip(np.mean(np.cumsum(p) - np.arange(1, d + 1) / d) / 0.5, 0.0, 1.0)
    return {
        "p": p,
        "spectral_entropy": float(-(p * np.log(p)).sum()),
        "participation_ratio": float(eigs.sum() ** 2 / (eigs**2).sum()),
        "eee": float(eee),
    }


def of_rows(rows: np.ndarray) -> dict:
    """Everything of one tap, from its activations."""
    cov = covariance(rows)
    eigs = eigenvalues(cov)
    return {"tokens": len(rows), "cov": cov, "eigenvalues": eigs, **metrics(eigs)}


def js(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence of two normalised spectra, natural log; 0 log 0 = 0."""
    m = (p + q) / 2

    def kl(a):
        nonzero = a > 0
        return float((a[nonzero] * np.log(a[nonzero] / m[nonzero])).sum())

    return 0.5 * kl(p) + 0.5 * kl(q)
