"""Test-only custom import: nerve's TrainSpec wrapper around tt_synthetic's synthetic llama3.

Use with `--experimental.custom_import tt_nerve --model.name nerve_test_llama3_nerve` and
`--job.custom_config_module nerve_plugin.torchtitan.config`.
"""

import tt_synthetic

import nerve_plugin.torchtitan  # noqa: F401  (CPU mode, config, wrapped built-in specs)
from nerve_plugin.torchtitan.v0_2.train_spec import wrap_train_spec
from torchtitan.protocols.train_spec import get_train_spec, register_train_spec

SPEC_NAME = tt_synthetic.SPEC_NAME + "_nerve"

try:
    register_train_spec(SPEC_NAME, wrap_train_spec(get_train_spec(tt_synthetic.SPEC_NAME), "llama3"))
except ValueError:  # already registered
    pass
