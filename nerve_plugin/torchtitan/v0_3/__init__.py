"""torchtitan 0.3.0's seams: a Trainer whose Config has the ``[nerve]`` section, and a config registry.

    torchrun ... -m torchtitan.train --module nerve_plugin.torchtitan.v0_3 --config llama3_debugmodel --nerve.enable

0.3.0 reads no TOML: ``--module`` names a config registry and ``--config`` one of its functions, which returns a
``Trainer.Config``; ``--section.key`` flags override it (tyro). nerve's registry (config_registry.py) offers every
config function of torchtitan's own models under its own name, returning the same config as a
``NerveTrainer.Config`` (trainer.py): torchtitan's fields unchanged, plus ``nerve``. With ``--nerve.enable``
unset, ``NerveTrainer`` is torchtitan's Trainer: nothing is hooked.
"""
