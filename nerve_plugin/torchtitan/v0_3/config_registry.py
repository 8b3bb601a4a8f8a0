"""Every config function of torchtitan 0.3.0's models, by its own name, as a ``NerveTrainer.Config``.

``--module nerve_plugin.torchtitan.v0_3 --config llama3_8b`` finds ``llama3_8b`` in
``torchtitan.models.llama3.config_registry`` (the model is the name's longest known prefix) and returns its config
with every field as torchtitan set it, plus ``nerve`` at its defaults (off).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

from nerve_plugin.torchtitan.v0_3.trainer import NerveTrainer


def _models() -> list[str]:
    from torchtitan.models import _supported_models

    return sorted(_supported_models, key=len, reverse=True)  # "qwen3_5" before "qwen3"


def _registry_of(name: str):
    for model in _models():
        if name.startswith(model + "_") or name == model:
            try:
                return importlib.import_module(f"torchtitan.models.{model}.config_registry")
            except ImportError:
                return None
    return None


def as_nerve_config(config) -> NerveTrainer.Config:
    """A torchtitan ``Trainer.Config`` as a ``NerveTrainer.Config``: the same field values, ``nerve`` off."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    return NerveTrainer.Config(**values)


def __getattr__(name: str):
    registry = _registry_of(name) if not name.startswith("_") else None
    function = getattr(registry, name, None) if registry is not None else None
    if function is None or not callable(function):
        raise AttributeError(name)

    @functools.wraps(function)
    def config_function() -> NerveTrainer.Config:
        return as_nerve_config(function())

    return config_function


def __dir__() -> list[str]:
    names = []
    for model in _models():
        try:
            registry = importlib.import_module(f"torchtitan.models.{model}.config_registry")
        except ImportError:
            continue
        names += [n for n in dir(registry) if n.startswith(model) and callable(getattr(registry, n))]
    return sorted(set(names))
