"""The NerVE paper's model variants on torchtitan: ``model.name = "nerve_llama"`` plus a ``[variant]`` section.

model.py: the variant model derived from torchtitan's llama3; its 0.2.2 TrainSpec "nerve_llama" is
../v0_2/variant_spec.py. The ``[variant]`` section itself (keys, defaults, checks) imports no torchtitan:
nerve_plugin/variants/config.py.
"""

from nerve_plugin.variants import SPEC_NAME, Variant, VariantConfigError

__all__ = ["SPEC_NAME", "Variant", "VariantConfigError"]
