"""nerve-demo's former home, kept for ``python -m nerve_plugin.torchtitan.demo`` and imports from here: the demo
is nerve_plugin/demo.py (outside this package, so that ``nerve-demo --help`` does not import torchtitan)."""

import sys

from nerve_plugin.demo import *  # noqa: F401,F403
from nerve_plugin.demo import main

if __name__ == "__main__":
    sys.exit(main())
