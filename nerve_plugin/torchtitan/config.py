"""The module torchtitan 0.2.2 jobs name as their custom config module; it holds nothing of its own.

    [job]
    custom_config_module = "nerve_plugin.torchtitan.config"

torchtitan imports it and merges its ``JobConfig`` (``[nerve]``, ``[muon]``, ``[variant]``) into its own. The
sections are version-neutral (sections.py, muon.py, nerve_plugin/variants/config.py); the TOML merging and its
checks are 0.2.2's (v0_2/config.py).
"""

from nerve_plugin.torchtitan.sections import Nerve, NerveConfigError
from nerve_plugin.torchtitan.v0_2.config import JobConfig

__all__ = ["JobConfig", "Nerve", "NerveConfigError"]
