"""nerve for torchtitan 0.2.2: the only sub-package that imports torchtitan.

Name it in the job's TOML and turn NerVE on:

    [experimental]
    custom_import = "nerve_plugin.torchtitan"

    [job]
    custom_config_module = "nerve_plugin.torchtitan.config"

    [nerve]
    enable = true

Importing it registers nerve's TrainSpecs under torchtitan's own model names, and on a machine without a GPU
switches torchtitan to CPU mode (see cpu_mode.py); with a GPU that step does nothing.
"""

from .cpu_mode import enable_cpu_mode
from .integration import install

enable_cpu_mode()
install()
