"""Benchmark-only flavors, imported through ``--experimental.custom_import bench.tt_flavors``.

"1B": llama3 with dim 2048, 16 layers, FFN hidden 8192 (SwiGLU), GQA 16/8 heads: 0.98B parameters with
nerve's 2048-token vocabulary. Also registers nerve's plugin (this module replaces its custom_import).
"""

from torchtitan.models.llama3 import TransformerModelArgs, llama3_args

import nerve_plugin.torchtitan  # noqa: F401  (registers nerve's TrainSpecs)

llama3_args["1B"] = TransformerModelArgs(
    dim=2048,
    n_layers=16,
    n_heads=16,
    n_kv_heads=8,
    vocab_size=2048,
    ffn_dim_multiplier=1.5,
    multiple_of=256,
    rope_theta=500000,
)
