"""Lazy package names (PEP 562): a package lists which of its submodules defines each public name, and the name is
imported from there when first used.

Importing any `diffmem.<package>.<module>` runs the package's `__init__` first, so an eager import there would make
every light module of the package (a command's settings, read for `--help`) cost the heavy ones too (diffusers,
the world's model). Several packages need the same two functions; they come from here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, module_of: Mapping[str, str],
               namespace: Mapping[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of `package`: a name in `module_of` is `<package>.<module_of[name]>.<name>`,
    imported on first use; `dir()` lists those names beside the package's own `namespace` (its `globals()`), so tab
    completion finds them before they are loaded."""

    def __getattr__(name: str) -> Any:
        if name in module_of:
            return getattr(importlib.import_module(f"{package}.{module_of[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*namespace, *module_of})

    return __getattr__, __dir__
