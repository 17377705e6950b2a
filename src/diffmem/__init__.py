"""diffmem: find, attack and remove training-data memorization in fine-tuned diffusion models."""

from __future__ import annotations

from diffmem.lazy import lazy_names

__version__ = "0.1.0"

__all__ = ["__version__", "filter_file", "filter_lora", "inspect_lora"]


# Lazy, so `import diffmem` stays cheap for the CLI's --help and for tools that only need the version.
__getattr__, __dir__ = lazy_names(__name__, dict.fromkeys(("filter_lora", "filter_file", "inspect_lora"), "pipeline"),
                                  globals())
