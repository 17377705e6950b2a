"""The world's settings and where its committed weights lie, in a module that imports no model library (the
sampling settings of every study refer to these, `diffmem.evaluation.sampling`; the filter finds the base here)."""

from importlib import resources
from pathlib import Path

#: 25 DDIM steps (where the world's samples stop changing visibly) and guidance 3 (a small pixel model needs less
#: than Stable Diffusion's 7.5). Every world default refers to these two.
WORLD_STEPS, WORLD_GUIDANCE = 25, 3.0

#: The committed base UNet's file name inside `assets_dir()`.
BASE_FILE = "base.safetensors"


def assets_dir() -> Path:
    """Folder of the committed world weights inside the installed package."""
    return Path(str(resources.files("diffmem.world") / "assets"))
