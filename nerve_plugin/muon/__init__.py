"""Muon for hidden matrices, AdamW for the rest: one exact, FSDP2-distributed torch optimizer (framework-free).

See ``optimizer.py``; torchtitan's glue (``[optimizer] name = "Muon"``, the ``[muon]`` section) is
``nerve_plugin.torchtitan.muon``.
"""

from .optimizer import (
    ADJUST_LR_RULES,
    NS_COEFFICIENTS,
    NS_EPS,
    NS_STEPS,
    Muon,
    RowLayout,
    adjusted_lr,
    hidden_matrix_names,
    newton_schulz,
    row_layout,
    split_params,
)

__all__ = [
    "ADJUST_LR_RULES",
    "NS_COEFFICIENTS",
    "NS_EPS",
    "NS_STEPS",
    "Muon",
    "RowLayout",
    "adjusted_lr",
    "hidden_matrix_names",
    "newton_schulz",
    "row_layout",
    "split_params",
]
