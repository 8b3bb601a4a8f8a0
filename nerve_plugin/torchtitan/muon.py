"""``[optimizer] name = "Muon"`` for torchtitan: Muon on the hidden matrices, AdamW on the rest.

    [optimizer]
    name = "Muon"
    lr = 8e-4             # both kinds of group: with adjust_lr = "match_rms_adamw" one lr serves both
    weight_decay = 0.1    # both, unless [muon] weight_decay is set
    beta1 = 0.9           # beta1, beta2, eps, implementation: the AdamW group's, as for name = "AdamW"

    [muon]
    momentum = 0.95

One ``nerve_plugin.muon.Muon`` per model part, inside an ``OptimizersContainer``: torchtitan's LR scheduler drives
both groups, its checkpointer saves both states (per parameter, through DCP), its gradient clipping and step
hooks see one optimizer. Under FSDP2/HSDP each matrix is orthogonalised by one owner rank (see
``nerve_plugin/muon/optimizer.py``); PP and CP need nothing more (each stage steps its own parameters over its
own data-parallel group); TP is refused at start-up. MoE specs keep torchtitan's expert-bias hook, and their
grouped (3-D) expert weights go to AdamW.

Version-neutral: the ``[muon]`` section (``MuonSection``) and the container builder. Each torchtitan version's
adapter plugs them in (0.2.2: ``v0_2/train_spec.py`` ``wrap_muon``, and the section as a ``muon`` field of the
custom JobConfig).
"""

# No `from __future__ import annotations`: torchtitan merges config dataclasses by their real field types.

from dataclasses import dataclass, field

import torch

from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.tools.logging import logger

from nerve_plugin.config_checks import SectionChecks, is_number
from nerve_plugin.muon import ADJUST_LR_RULES, NS_COEFFICIENTS, NS_EPS, NS_STEPS
from nerve_plugin.muon import Muon as MuonOptimizer
from nerve_plugin.muon import split_params

OPTIMIZER_NAME = "Muon"  # the [optimizer] name that selects it
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class MuonConfigError(ValueError):
    pass


@dataclass
class MuonSection:
    """The ``[muon]`` section: read only when ``[optimizer] name = "Muon"``."""

    momentum: float = 0.95
    """Momentum of the gradient average Newton-Schulz orthogonalises."""

    nesterov: bool = True
    """Orthogonalise the Nesterov look-ahead (gradient lerped toward the momentum) instead of the momentum."""

    ns_steps: int = NS_STEPS
    """Newton-Schulz iterations (bf16)."""

    ns_coefficients: list[float] = field(default_factory=lambda: list(NS_COEFFICIENTS))
    """(a, b, c) of the quintic Newton-Schulz polynomial a X + b (X X^T) X + c (X X^T)^2 X."""

    eps: float = NS_EPS
    """Floor of the Frobenius norm Newton-Schulz divides by."""

    adjust_lr: str = "match_rms_adamw"
    """Per-matrix lr: "match_rms_adamw" (lr x 0.2 sqrt(max(rows, cols)): the update's RMS matches AdamW's, so
    [optimizer] lr and weight_decay carry over) or "original" (lr x sqrt(max(1, rows/cols)); needs a Muon-sized
    lr, e.g. [muon] lr = 0.02)."""

    lr: float | None = None
    """The Muon group's lr before the per-matrix adjustment; unset: [optimizer] lr. The LR schedule scales it."""

    weight_decay: float | None = None
    """Decoupled weight decay of the Muon group (multiplied by its lr, not the adjusted one, as in
    torch.optim.Muon); unset: [optimizer] weight_decay, the Moonshot recipe "match_rms_adamw" is made for."""

    muon_params: list[str] = field(default_factory=list)
    """fnmatch patterns over parameter names: the matching parameters (each must be 2-D) get Muon, the others
    AdamW. Empty: every 2-D parameter except embeddings and the output head ("output", "lm_head")."""

    ns_dtype: str = "bfloat16"
    """Newton-Schulz (and exchange) dtype: "bfloat16" (torch.optim.Muon's, bitwise the same results) or "float32"
    (more accurate; faster on CPUs without bf16 matrix units)."""

    bucket_mb: float = 512.0
    """Newton-Schulz input per rank and bucket, in MiB of bf16. Each bucket costs 2 all-to-alls per step; a
    bucket holds at most bucket_mb x (FSDP group size) MiB of matrices, at least one. 0: a single bucket."""

    def __post_init__(self):
        check = SectionChecks("muon", MuonConfigError)
        check.number("momentum", self.momentum, "a number in [0, 1)", lambda v: 0 <= v < 1)
        check.boolean("nesterov", self.nesterov)
        check.integer("ns_steps", self.ns_steps, "an integer in [1, 99]", lambda v: 1 <= v < 100)
        if (
            not isinstance(self.ns_coefficients, (list, tuple))
            or len(self.ns_coefficients) != 3
            or not all(is_number(v) for v in self.ns_coefficients)
        ):
            check.fail("ns_coefficients", self.ns_coefficients, "a list of 3 finite numbers [a, b, c]")
        check.number("eps", self.eps, "a finite number > 0", lambda v: v > 0)
        check.choice("adjust_lr", self.adjust_lr, ADJUST_LR_RULES)
        if self.lr is not None:
            check.number("lr", self.lr, "a finite number >= 0, or unset for [optimizer] lr", lambda v: v >= 0)
        if self.weight_decay is not None:
            check.number(
                "weight_decay",
                self.weight_decay,
                "a finite number >= 0, or unset for [optimizer] weight_decay",
                lambda v: v >= 0,
            )
        if not isinstance(self.muon_params, list) or any(not isinstance(p, str) or not p for p in self.muon_params):
            check.fail("muon_params", self.muon_params, "a list of non-empty fnmatch patterns (empty for the default)")
        check.choice("ns_dtype", self.ns_dtype, NS_DTYPES)
        check.number("bucket_mb", self.bucket_mb, "a finite number >= 0 (0: one bucket)", lambda v: v >= 0)


# -- the optimizers ---------------------------------------------------------------------------------------------------


class MuonOptimizersContainer(OptimizersContainer):
    """torchtitan's container holding one ``nerve_plugin.muon.Muon`` per model part (state_dict, load_state_dict,
    step and zero_grad are the container's own)."""

    def __init__(self, model_parts, muon_kwargs: dict, muon_params: list[str]) -> None:
        self.model_parts = model_parts
        self.optimizers = []
        all_params = []
        for model in model_parts:
            groups = split_params(model, muon_params)
            self.optimizers.append(MuonOptimizer(groups, **muon_kwargs))
            all_params.extend(p for g in groups for p in g["params"])
        self._validate_length(len(model_parts))
        self._post_init(all_params, {"lr": muon_kwargs["lr"]})


def muon_optimizer_kwargs(section: MuonSection, adamw: dict) -> dict:
    """nerve_plugin.muon.Muon's arguments: the ``[muon]`` section, and ``adamw``, the AdamW group's kwargs (lr,
    betas, eps, weight_decay, fused/foreach), whose lr and weight_decay the Muon group takes where the section
    leaves them unset. One place for both torchtitan versions."""
    return {
        "lr": adamw["lr"] if section.lr is None else section.lr,
        "weight_decay": adamw.get("weight_decay", 0.0) if section.weight_decay is None else section.weight_decay,
        "momentum": section.momentum,
        "nesterov": section.nesterov,
        "ns_coefficients": tuple(float(c) for c in section.ns_coefficients),
        "eps": section.eps,
        "ns_steps": section.ns_steps,
        "adjust_lr_fn": section.adjust_lr,
        "bucket_mb": section.bucket_mb,
        "ns_dtype": NS_DTYPES[section.ns_dtype],
        "adamw": adamw,
    }


def build_muon_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager=None, muon_config=None):
    """The OptimizersBuilder for ``[optimizer] name = "Muon"``; ``muon_config`` is the ``[muon]`` section."""
    muon_config = muon_config if muon_config is not None else MuonSection()
    _check_parallelism(optimizer_config, parallel_dims, ft_manager)
    implementation = optimizer_config.implementation
    # the AdamW group: exactly what torchtitan's own build_optimizers makes of [optimizer]
    adamw = {
        "lr": optimizer_config.lr,
        "betas": (optimizer_config.beta1, optimizer_config.beta2),
        "eps": optimizer_config.eps,
        "weight_decay": optimizer_config.weight_decay,
        "fused": implementation == "fused",
        "foreach": implementation == "foreach",
    }
    muon_kwargs = muon_optimizer_kwargs(muon_config, adamw)
    container = MuonOptimizersContainer(model_parts, muon_kwargs, muon_config.muon_params)
    for i, optimizer in enumerate(container.optimizers):
        logger.info(f"Muon (model part {i}): {optimizer.describe()}")
    return container


def _check_parallelism(optimizer_config, parallel_dims, ft_manager) -> None:
    """Refuse, at start-up and on every rank alike, what Muon cannot do."""
    if parallel_dims.tp_enabled:
        raise MuonConfigError(
            f"[optimizer] name = 'Muon' is not allowed with parallelism.tensor_parallel_degree = {parallel_dims.tp}: "
            "expected tensor_parallel_degree = 1 (Newton-Schulz needs whole matrices; Muon gathers FSDP row "
            "shards, not tensor-parallel ones)"
        )
    if optimizer_config.early_step_in_backward:
        raise MuonConfigError(
            "[optimizer] early_step_in_backward = True is not allowed with name = 'Muon': expected False (Muon "
            "steps all matrices together, with collectives)"
        )
    if ft_manager is not None and getattr(ft_manager, "enabled", False):
        raise MuonConfigError("[optimizer] name = 'Muon' is not allowed with fault_tolerance.enable: expected AdamW")


# -- the TrainSpec -----------------------------------------------------------------------------------------------------


def muon_config(job_config) -> MuonSection:
    config = getattr(job_config, "muon", None) if job_config is not None else None
    if config is None:
        logger.warning("[optimizer] name = 'Muon' without a [muon] section in the JobConfig: using its defaults")
        return MuonSection()
    return config
