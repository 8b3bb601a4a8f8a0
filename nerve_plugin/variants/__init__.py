"""The NerVE paper's model variants as TOML options: ``model.name = "nerve_llama"`` plus a ``[variant]`` section.

config.py: the ``[variant]`` dataclass (merge its ``JobConfig`` into the job's custom config module);
model.py: the variant model derived from torchtitan's llama3; train_spec.py: the TrainSpec "nerve_llama".
Importing this package imports torchtitan only through model.py / train_spec.py on first use.
"""

from .config import Variant, VariantConfigError

__all__ = ["Variant", "VariantConfigError", "get_train_spec", "SPEC_NAME"]

SPEC_NAME = "nerve_llama"


def get_train_spec():
    from .train_spec import get_train_spec as build

    return build()
