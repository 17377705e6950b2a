"""Argument checks shared by the metric functions (shapes, not values)."""

from __future__ import annotations

import torch


def check_images(images: torch.Tensor, name: str = "images") -> None:
    """Raise ValueError unless `images` is a floating [N, C, H, W] tensor."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{name} must have shape [N, C, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a float tensor with values in [0, 1], got dtype {images.dtype}")


def check_features(features: torch.Tensor, name: str = "features") -> None:
    """Raise ValueError unless `features` is a floating [N, D] tensor with N >= 1."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"{name} must have shape [N, D] with N >= 1, got {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got dtype {features.dtype}")
