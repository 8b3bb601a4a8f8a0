"""nerve: NerVE (Nonlinear Eigenspectrum Dynamics in FFNs) for torchtitan.

The core (this package, without ``nerve_plugin.torchtitan``) works on any ``nn.Module``:
taps (hooks) -> streaming covariance statistics -> distributed merge -> float64 eigen-spectrum metrics.
"""

from .spectrum import (
    SpectrumMetrics,
    compute_covariance,
    compute_eee,
    compute_js,
    compute_participation_ratio,
    compute_sorted_eigs,
    compute_spectral_entropy,
    normalize_eigs,
    spectrum_metrics,
)
from .records import METRICS, LayerRecord, Metric, TapResult
from .monitor import MonitorConfig, NerveMonitor, ParallelGroups
from .stats import CovarianceStats, reduce_stats
from .taps import BUILTIN_SPECS, FFNTaps, TapPoint, TapSpec
from .writers import JsonlWriter, TensorBoardWriter
from .loop import NerveLoop, ffn_spec  # the entry point for hand-written training loops

__all__ = [
    "BUILTIN_SPECS",
    "CovarianceStats",
    "FFNTaps",
    "JsonlWriter",
    "LayerRecord",
    "METRICS",
    "Metric",
    "MonitorConfig",
    "NerveLoop",
    "NerveMonitor",
    "ParallelGroups",
    "TapResult",
    "SpectrumMetrics",
    "TapPoint",
    "TapSpec",
    "TensorBoardWriter",
    "reduce_stats",
    "compute_covariance",
    "compute_eee",
    "compute_js",
    "compute_participation_ratio",
    "compute_sorted_eigs",
    "compute_spectral_entropy",
    "ffn_spec",
    "normalize_eigs",
    "spectrum_metrics",
]
