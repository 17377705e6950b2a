"""diffmem: find, attack and remove training-data memorization in fine-tuned diffusion models."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "filter_file", "filter_lora", "inspect_lora"]


def __getattr__(name: str):
    # Lazy, so `import diffmem` stays cheap for the CLI's --help and for tools that only need the version.
    if name in ("filter_lora", "filter_file", "inspect_lora"):
        from diffmem import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'diffmem' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The lazy names above are not in the module's namespace until first used; list them for tab completion.
    return sorted({*globals(), *__all__})
