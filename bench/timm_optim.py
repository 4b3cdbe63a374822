"""timm's Lamb, Lars and Adan, loaded from their source files without running timm's `__init__`.

`import timm.optim` runs `timm/__init__.py`, which imports the model zoo and with it
torchvision: a GPU machine with torch, triton and timm but no torchvision (or a torchvision built
for another torch) could not import it. The three optimizer modules themselves need only torch
and their siblings in `timm/optim/` (`_helpers`, `_types`), so they are loaded by path, as
submodules of a stand-in package whose `__path__` is the installed `timm/optim` folder.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

# The stand-in package: not "timm", so that a real `import timm` elsewhere is not shadowed.
PACKAGE = "_timm_optim_by_path"
CLASSES = {"LAMB": ("lamb", "Lamb"), "LARS": ("lars", "Lars"), "Adan": ("adan", "Adan")}


class TimmNotInstalled(ImportError):
    pass


def timm_optim_folder(search_path: list[str] | None = None) -> Path:
    """The installed `timm/optim` folder, found without importing timm (None: sys.path)."""
    spec = importlib.machinery.PathFinder.find_spec("timm", search_path)
    if spec is None or not spec.submodule_search_locations:
        raise TimmNotInstalled("timm not installed (`pip install --no-deps timm` is enough)")
    return Path(next(iter(spec.submodule_search_locations))) / "optim"


def timm_optimizer(optimizer: str, search_path: list[str] | None = None) -> type:
    """timm's class for `optimizer` ("LAMB", "LARS" or "Adan"), loaded by path."""
    folder = timm_optim_folder(search_path)
    stem, class_name = CLASSES[optimizer]
    package = sys.modules.get(PACKAGE)
    if package is None or package.__path__ != [str(folder)]:
        package = types.ModuleType(PACKAGE, doc=f"timm's optimizers loaded from {folder} (timm's __init__ not run)")
        package.__path__ = [str(folder)]
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]  # modules from another timm folder
        sys.modules[PACKAGE] = package
    name = f"{PACKAGE}.{stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, folder / f"{stem}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: its relative imports look its package up
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return getattr(sys.modules[name], class_name)
