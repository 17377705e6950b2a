"""Every lazily named attribute of a diffmem package resolves to the object its module defines (a wrong entry in a
package's name table would surface only when a user first touches that name)."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = {"diffmem": None, "diffmem.world": "MODULE_OF", "diffmem.attack": "MODULE_OF",
            "diffmem.locality": "MODULE_OF", "diffmem.mitigations": "LAZY_NAMES", "diffmem.backends": "MODEL_NAMES"}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_lazy_names_resolve_and_are_listed(package):
    module = importlib.import_module(package)
    table = getattr(module, PACKAGES[package]) if PACKAGES[package] else dict.fromkeys(
        ("filter_lora", "filter_file", "inspect_lora"), "pipeline")
    listed = dir(module)
    for name, source in table.items():
        assert name in listed
        assert getattr(module, name) is getattr(importlib.import_module(f"{package}.{source}"), name)
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018 - the attribute access is the test
