"""The inputs a study reads from disk: prompt files and folders of images, checked, with one-line errors that
name the file."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from diffmem.errors import DiffmemError, FileFormatError
from diffmem.report import load_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize images [N, 3, H, W] to `size` (bilinear, antialiased), so that they compare pixel by pixel."""
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def load_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a text file, without surrounding spaces; lines starting with '#' are comments."""
    path = Path(path)
    if not path.is_file():
        raise DiffmemError("no such prompts file", path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise FileFormatError("is not a UTF-8 text file with one prompt per line", path) from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise FileFormatError("holds no prompts (one per line; '#' starts a comment)", path)
    return prompts


def load_image_folder(folder: str | Path, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, list[str]]:
    """Images of a folder (png, jpg, webp, bmp; sorted by name) as [N, 3, H, W] in [0, 1] and their file names.
    Images of different sizes need `size` (they are resized to it)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DiffmemError("no such folder of training images", folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileFormatError(f"holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})", folder)
    tensors = []
    for file in files:
        tensor = load_image(file)[None]
        if size is not None and tuple(tensor.shape[-2:]) != tuple(size):
            tensor = resize_images(tensor, size)
        tensors.append(tensor)
    shapes = {tuple(t.shape[-2:]) for t in tensors}
    if len(shapes) > 1:
        raise FileFormatError(f"holds images of different sizes {sorted(shapes)}; resize them first", folder)
    return torch.cat(tensors), [f.name for f in files]
