"""Image embedders: the feature spaces that AMD, the embedding copy test and FID are computed in.

An embedder is anything callable on images [N, 3, H, W] in [0, 1] that returns features [N, D] and has a
`name` (reports say which feature space a number was measured in). Users can bring their own network as a
TorchScript / torch.export file or a local Hugging Face model folder; nothing is ever downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from diffmem.errors import DiffmemError, FileFormatError
from diffmem.metrics.checks import check_images


@runtime_checkable
class ImageEmbedder(Protocol):
    """Maps images [N, 3, H, W] in [0, 1] to features [N, D]; `name` identifies the feature space."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class PixelEmbedder:
    """Raw pixels, optionally average-pooled to `size` x `size`: the feature space of no learned network."""

    def __init__(self, size: int | None = None) -> None:
        self.size = size
        self.name = "pixels" if size is None else f"pixels{size}"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        if self.size is not None:
            images = F.adaptive_avg_pool2d(images, self.size)
        return images.reshape(images.shape[0], -1)


class ModuleEmbedder:
    """A torch module as an embedder, with the resizing and normalisation its training used.

    Args:
        module: maps preprocessed images [N, 3, S, S] to features [N, D] (or to [N, D, 1, 1], flattened).
        name: the feature space's name in reports.
        image_size: resize inputs (bilinear, antialiased) to this size first; None keeps the input size.
        mean, std: per-channel normalisation applied after resizing, `(x - mean) / std`. The defaults
            (0 and 1) leave images in [0, 1].
        device: where the module runs; inputs are moved there and features come back on the CPU.
    """

    def __init__(
        self,
        module: Callable[[torch.Tensor], torch.Tensor],
        name: str,
        image_size: int | tuple[int, int] | None = None,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        if isinstance(module, torch.nn.Module):
            module = module.to(self.device)
            # Exported programs are already in inference form and refuse eval().
            if not isinstance(module, torch.fx.GraphModule):
                module = module.eval()
        self.module = module
        self.name = name
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize and normalise images as the module expects."""
        check_images(images)
        images = images.to(torch.float32)
        if self.image_size is not None and tuple(images.shape[-2:]) != tuple(self.image_size):
            images = F.interpolate(images, size=self.image_size, mode="bilinear", antialias=True, align_corners=False)
        return (images - self.mean) / self.std

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        features = self.module(self.preprocess(images).to(self.device))
        return features.reshape(features.shape[0], -1).float().cpu()


class HuggingFaceEmbedder(ModuleEmbedder):
    """Image features from a transformers vision model: `get_image_features` when the model has it (CLIP,
    SigLIP), else `image_embeds`, else `pooler_output`, else the token mean of `last_hidden_state`."""

    def __init__(self, model: torch.nn.Module, name: str, **kwargs) -> None:
        self.model = model
        super().__init__(self.forward_features, name, **kwargs)
        self.model = model.eval().to(self.device)

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if hasattr(self.model, "get_image_features"):
            return features_of(self.model.get_image_features(pixel_values=pixel_values))
        out = self.model(pixel_values=pixel_values)
        for key in ("image_embeds", "pooler_output"):
            value = getattr(out, key, None)
            if value is not None:
                return value
        return out.last_hidden_state.mean(dim=1)


def features_of(output) -> torch.Tensor:
    """Projected features from a transformers `get_*_features` call, which returns a tensor in transformers 4
    and a model output holding them in `pooler_output` in transformers 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def embed(embedder: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Features [N, D] of images [N, 3, H, W], computed in batches without gradients."""
    check_images(images)
    if images.shape[0] == 0:
        raise ValueError("cannot embed an empty batch of images")
    parts = [embedder(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    features = torch.cat(parts).float()
    if features.ndim != 2 or features.shape[0] != images.shape[0]:
        name = getattr(embedder, "name", type(embedder).__name__)
        raise ValueError(f"embedder {name!r} returned shape {tuple(features.shape)} for {images.shape[0]} images")
    return features


def preprocessor_settings(folder: Path) -> dict:
    """image_size/mean/std for ModuleEmbedder from a Hugging Face preprocessor_config.json, if present."""
    config_path = folder / "preprocessor_config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"not valid JSON ({exc})", config_path) from None
    settings: dict = {}
    size = config.get("crop_size") if config.get("do_center_crop") else config.get("size")
    if isinstance(size, dict):
        size = (size["height"], size["width"]) if "height" in size else size.get("shortest_edge")
    if size is not None:
        settings["image_size"] = size
    if config.get("do_normalize", True) and "image_mean" in config:
        settings["mean"] = config["image_mean"]
        settings["std"] = config["image_std"]
    return settings


def load_embedder(path: str | Path, device: str | torch.device = "cpu", name: str | None = None) -> ModuleEmbedder:
    """Load a user's feature network from a local path: a TorchScript file (.pt/.ts/.torchscript), a torch.export
    archive (.pt2) or a Hugging Face model folder (config.json). TorchScript and export modules receive images
    in [0, 1] at their given size; Hugging Face models get the resizing and normalisation of their
    preprocessor_config.json. Loading TorchScript runs the file's TorchScript code: load only files you trust."""
    path = Path(path)
    if not path.exists():
        raise DiffmemError("no such embedder file or folder", path)
    label = name or path.stem
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileFormatError("is a folder without config.json: not a Hugging Face model folder", path)
        from transformers import AutoModel

        try:
            model = AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise FileFormatError(f"could not load a Hugging Face model from this folder ({exc})", path) from None
        return HuggingFaceEmbedder(model, label, device=device, **preprocessor_settings(path))
    if path.suffix == ".pt2":
        try:
            module = torch.export.load(str(path)).module()
        except Exception as exc:  # torch.export raises many types for a bad archive
            raise FileFormatError(f"not a torch.export archive ({exc})", path) from None
        return ModuleEmbedder(module, label, device=device)
    if path.suffix in {".pt", ".ts", ".torchscript", ".pth", ".jit"}:
        try:
            module = torch.jit.load(str(path), map_location=device)
        except RuntimeError as exc:
            raise FileFormatError(
                f"not a TorchScript file ({str(exc).splitlines()[0]}); plain state dicts cannot be used as an "
                "embedder because they carry no architecture",
                path,
            ) from None
        module.eval()
        return ModuleEmbedder(module, label, device=device)
    raise FileFormatError(
        "unknown embedder format: expected a TorchScript file (.pt, .ts), a torch.export archive (.pt2) or a "
        "Hugging Face model folder",
        path,
    )
