"""Where diffmem keeps what it can recompute (anchor subspaces, base-file hashes)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$DIFFMEM_CACHE`` if set, else ``$XDG_CACHE_HOME/diffmem``, else ``~/.cache/diffmem``."""
    if os.environ.get("DIFFMEM_CACHE"):
        return Path(os.environ["DIFFMEM_CACHE"])
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "diffmem"
