"""Every config function of torchtitan 0.3.0's models, by its own name, as a ``NerveTrainer.Config``.

``--module nerve_plugin.torchtitan.v0_3 --config llama3_8b`` finds ``llama3_8b`` in
``torchtitan.models.llama3.config_registry`` (the model is the name's longest known prefix) and returns its config
with every field as torchtitan set it, plus ``nerve`` at its defaults (off); ``<config>_muon`` the same with
nerve's Muon as its optimizer (muon.py).
"""

from __future__ import annotations

import functools
import importlib

from nerve_plugin.torchtitan.cpu_mode import enable_cpu_mode

# torchtitan imports this module (--module) before it builds the Trainer's device and process group: the place
# where CPU mode must be on (on a machine with a GPU it does nothing).
enable_cpu_mode()

from nerve_plugin.torchtitan.v0_3.trainer import NerveTrainer, config_values  # noqa: E402


def _models() -> list[str]:
    from torchtitan.models import _supported_models

    return sorted(_supported_models, key=len, reverse=True)  # "qwen3_5" before "qwen3"


def _registry(model: str):
    """torchtitan's config registry of ``model``, or None where its optional dependencies are missing."""
    try:
        return importlib.import_module(f"torchtitan.models.{model}.config_registry")
    except ImportError:
        return None


def _registry_of(name: str):
    model = next((m for m in _models() if name.startswith(m + "_") or name == m), None)
    return _registry(model) if model is not None else None


def as_nerve_config(config) -> NerveTrainer.Config:
    """A torchtitan ``Trainer.Config`` as a ``NerveTrainer.Config``: the same field values, ``nerve`` off."""
    return NerveTrainer.Config(**config_values(config))


def nerve_debug_stdlib() -> NerveTrainer.Config:
    """nerve's main job (nerve-demo; 0.2.2: configs/debug_stdlib.toml): torchtitan's tiny llama3 debugmodel
    pre-trained offline on the Python standard library's source with nerve's shipped BPE vocabulary, NerVE on at
    every 10th step (all layers). Runs as is on a CPU or on GPUs."""
    from torchtitan.components.metrics import MetricsProcessor
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    from nerve_plugin.torchtitan.v0_3.data import CorpusDataLoader, CorpusTokenizer

    config = as_nerve_config(llama3_debugmodel())
    config.dump_folder = "./outputs/nerve_debug"
    config.hf_assets_path = ""  # empty: nerve's shipped vocabulary (2048 tokens, the debugmodel's vocab_size)
    config.tokenizer = CorpusTokenizer.Config()
    config.dataloader = CorpusDataLoader.Config(seed=0)
    config.training.local_batch_size = 4
    config.training.seq_len = 128
    config.training.steps = 40
    config.training.max_norm = 1.0
    for group in config.optimizer.param_groups:
        group.optimizer_kwargs["lr"] = 3e-3
    config.lr_scheduler.warmup_steps = 5
    config.lr_scheduler.decay_ratio = None
    # a 6M-parameter model has nothing to save; recomputation would only slow the CPU run
    config.activation_checkpoint = None
    config.metrics = MetricsProcessor.Config(log_freq=5, enable_tensorboard=True, save_tb_folder="tb")
    config.checkpoint.enable = False
    config.validator.enable = False
    config.debug.seed = 0  # the same initial weights every run (torchtitan draws them unseeded otherwise)
    config.nerve.enable = True
    config.nerve.log_freq = 10
    config.nerve.max_overhead = 0  # every layer at every logged step: the demo's table shows them all
    return config


MUON_SUFFIX = "_muon"  # <config>_muon: the same config with nerve's Muon as its optimizer (muon.py)


def __getattr__(name: str):
    muon = name.endswith(MUON_SUFFIX)
    base = name.removesuffix(MUON_SUFFIX)
    if base.startswith("_"):
        raise AttributeError(name)
    function = globals().get(base) if base != name else None
    if function is None:
        registry = _registry_of(base)
        function = getattr(registry, base, None) if registry is not None else None
    if function is None or not callable(function):
        raise AttributeError(name)

    @functools.wraps(function)
    def config_function() -> NerveTrainer.Config:
        config = as_nerve_config(function())
        if muon:
            from nerve_plugin.torchtitan.v0_3.muon import with_muon

            with_muon(config)
        return config

    return config_function


def __dir__() -> list[str]:
    names = []
    for model in _models():
        registry = _registry(model)
        if registry is not None:
            names += [n for n in dir(registry) if n.startswith(model) and callable(getattr(registry, n))]
    names += ["nerve_debug_stdlib"]
    return sorted({*names, *(n + MUON_SUFFIX for n in names)})
