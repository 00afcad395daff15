"""preftune: Direct Preference Optimization, the whole loop."""

import os

# OpenMP threads that spin while waiting stall each other when another process holds a core
# (measured here: 5-10x slower training on a shared 2-core machine). Passive waiting costs
# nothing when the cores are free. It must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


def __getattr__(name):
    # `import preftune; preftune.train(config)` without loading torch at `import preftune`.
    if name == "train":
        import importlib

        return importlib.import_module("preftune.train")
    raise AttributeError(f"module 'preftune' has no attribute {name!r}")
