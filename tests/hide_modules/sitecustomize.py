"""Makes the packages named in VAE_DIST_HIDE_MODULES (comma list) look not installed, in this
process and every Python process it starts (they inherit PYTHONPATH and the variable): as on
the GPU machine, which has no DALI, webdataset or wandb until they are carried there.

Each import finder is wrapped so that it finds nothing under those names: `import webdataset`
raises ModuleNotFoundError and `importlib.util.find_spec("wandb")` returns None, exactly as
for a package that is absent (accelerate's own availability checks see the same).
"""

import os
import sys

_HIDDEN = tuple(n for n in os.environ.get("VAE_DIST_HIDE_MODULES", "").split(",") if n)


def _hidden(name: str) -> bool:
    return any(name == h or name.startswith(h + ".") for h in _HIDDEN)


class _Hiding:
    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if _hidden(name):
            return None
        find = getattr(self._finder, "find_spec", None)
        return find(name, path, target) if find is not None else None

    def __getattr__(self, attr):
        return getattr(self._finder, attr)


if _HIDDEN:
    sys.meta_path[:] = [_Hiding(f) for f in sys.meta_path]
