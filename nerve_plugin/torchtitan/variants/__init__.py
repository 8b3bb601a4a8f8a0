"""The NerVE paper's model variants on torchtitan: ``model.name = "nerve_llama"`` plus a ``[variant]`` section.

model.py: the variant model derived from torchtitan's llama3; train_spec.py: the TrainSpec "nerve_llama". The
``[variant]`` section itself (keys, defaults, checks) imports no torchtitan: nerve_plugin/variants/config.py.
"""

from nerve_plugin.variants import SPEC_NAME, Variant, VariantConfigError

__all__ = ["SPEC_NAME", "Variant", "VariantConfigError", "get_train_spec"]


def get_train_spec():
    from .train_spec import get_train_spec as build

    return build()
