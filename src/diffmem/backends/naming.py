"""What `--base` names, decided from the path and a file's header alone (no model module imported): the world, or a
pipeline folder / checkpoint."""

from __future__ import annotations

from pathlib import Path

from diffmem.formats.safetensors_io import read_header


def is_world_file(path: Path) -> bool:
    """True when `path` is a world UNet saved by diffmem (its safetensors metadata carries the UNet config)."""
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    _, metadata = read_header(path)
    return "diffmem_unet_config" in metadata


def is_world_base(base: str | Path | None) -> bool:
    """True when `--base` names the world: None or "world" (the committed base) or a world UNet file; anything else
    is a pipeline folder or checkpoint."""
    return base is None or str(base) == "world" or is_world_file(Path(base))
