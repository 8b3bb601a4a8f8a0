"""Muon on torchtitan 0.3.0: ``MuonContainer.Config`` as a ``Trainer.Config``'s ``optimizer``.

0.2.2 selects nerve's Muon with ``[optimizer] name = "Muon"`` and a ``[muon]`` section; 0.3.0 builds the optimizer
from ``optimizer = OptimizersContainer.Config(param_groups=[...])``, so nerve's Muon is a container config of its
own that carries the same ``[muon]`` keys (``MuonSection``: defaults, checks, messages) as ``optimizer.muon``.
``with_muon(config)`` swaps it in for any config; nerve's registry offers every config function with a ``_muon``
suffix (``--config llama3_debugmodel_muon --optimizer.muon.ns_dtype float32``).

One ``nerve_plugin.muon.Muon`` per model part: Muon on the hidden matrices (``muon.muon_params``), AdamW on the
rest with the config's AdamW param group's kwargs (lr, betas, eps, weight_decay: what ``default_adamw`` makes),
bitwise torch.optim.Muon + torch.optim.AdamW. Each group carries ``param_names``, from which 0.3.0's checkpointer
builds its FQN-keyed optimizer state. 0.3.0's own ``DistMuon`` (CUDA-only, DTensor-only, no TP/PP) is the
alternative on GPUs; nerve's runs on CPUs too, under FSDP/HSDP and PP, and is the one the 0.2.2 route trains with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torchtitan.components.checkpointer.utils import canonical_fqn
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.tools.logging import logger

from nerve_plugin.muon import Muon as MuonOptimizer
from nerve_plugin.muon import split_params
from nerve_plugin.torchtitan.muon import MuonConfigError, MuonSection, muon_optimizer_kwargs
from nerve_plugin.torchtitan.v0_3.trainer import config_values


class MuonContainer(OptimizersContainer):
    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        muon: MuonSection = field(default_factory=MuonSection)
        """nerve's Muon (the [muon] keys of torchtitan 0.2.2); AdamW for the rest takes the AdamW param group's
        kwargs."""

    def __init__(self, config: Config, *, model_parts) -> None:
        kwargs = muon_kwargs(config)
        self.model_parts = model_parts
        self.optimizers = []
        all_params = []
        for i, model in enumerate(model_parts):
            names = {id(p): canonical_fqn(n) for n, p in model.named_parameters()}
            groups = split_params(model, config.muon.muon_params)
            for group in groups:
                group["param_names"] = [names[id(p)] for p in group["params"]]
            optimizer = MuonOptimizer(groups, **kwargs)
            logger.info(f"Muon (model part {i}): {optimizer.describe()}")
            self.optimizers.append(optimizer)
            all_params.extend(p for g in groups for p in g["params"])
        self._validate_params(all_params)
        self._post_init(all_params)


def _adamw_kwargs(config: MuonContainer.Config) -> dict:
    groups = config.param_groups
    if len(groups) != 1 or groups[0].optimizer_name != "AdamW" or groups[0].pattern != ".*":
        described = [(g.pattern, g.optimizer_name) for g in groups]
        raise MuonConfigError(
            f"optimizer.param_groups = {described} is not allowed with nerve's Muon: expected one catch-all AdamW "
            f"group (pattern '.*', as default_adamw makes), whose kwargs the non-Muon parameters get; choose the "
            f"Muon matrices with optimizer.muon.muon_params"
        )
    return dict(groups[0].optimizer_kwargs)


def muon_kwargs(config: MuonContainer.Config) -> dict:
    """nerve_plugin.muon.Muon's arguments from the container config, as 0.2.2's builder makes them of [optimizer]
    and [muon]."""
    implementation = config.implementation
    adamw = {
        **_adamw_kwargs(config),
        "fused": implementation in ("fused", "fused_opt_states_bf16"),
        "foreach": implementation == "foreach",
    }
    return muon_optimizer_kwargs(config.muon, adamw)


def with_muon(config, muon: MuonSection | None = None):
    """``config`` (a Trainer.Config) with nerve's Muon as its optimizer, the AdamW param group kept for the rest."""
    values = config_values(config.optimizer)
    values.pop("muon", None)
    config.optimizer = MuonContainer.Config(**values, muon=muon if muon is not None else MuonSection())
    return config
