"""The module that earlier versions of patches/0002 import: forks that applied such a patch keep working.

Their Trainer calls ``wrap_train_spec`` on every spec when nerve's mark is missing; it returns a spec that
nerve wrapped already as it is, so nothing is wrapped twice. New code: ``nerve_plugin.torchtitan.v0_2.train_spec``.
"""

from nerve_plugin.torchtitan.v0_2.train_spec import wrap_train_spec

__all__ = ["wrap_train_spec"]
