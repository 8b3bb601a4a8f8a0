"""The NerVE paper's model variants as TOML options: ``model.name = "nerve_llama"`` plus a ``[variant]`` section.

config.py: the ``[variant]`` dataclass, its keys, defaults and checks (merge its ``JobConfig`` into the job's
custom config module). It imports no torchtitan; the model and its TrainSpec, derived from llama3's in
torchtitan, are nerve_plugin/torchtitan/variants/.
"""

from .config import Variant, VariantConfigError

__all__ = ["Variant", "VariantConfigError", "SPEC_NAME"]

SPEC_NAME = "nerve_llama"
