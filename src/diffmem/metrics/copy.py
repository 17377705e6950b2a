"""Pixel-space copy tests: tiled L2 distance and Carlini's relative nearest-neighbour criterion.

All functions take float images in [0, 1] shaped [N, 3, H, W] (or a precomputed distance matrix) and are
pure: no files, no randomness, no model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffmem.metrics.checks import check_images


def image_tiles(images: torch.Tensor, tiles: int = 4) -> list[torch.Tensor]:
    """Split images into tiles x tiles non-overlapping tiles, each flattened to [N, D_tile] (Carlini et al. 2023)."""
    if tiles < 1:
        raise ValueError(f"tiles must be >= 1, got {tiles}")
    height, width = images.shape[-2:]
    if height < tiles or width < tiles:
        raise ValueError(f"cannot cut {height}x{width} images into {tiles}x{tiles} tiles")
    out = []
    for row in torch.tensor_split(images, tiles, dim=-2):
        for tile in torch.tensor_split(row, tiles, dim=-1):
            out.append(tile.reshape(images.shape[0], -1))
    return out


def tiled_rms(a: torch.Tensor, b: torch.Tensor, tiles: int = 4) -> torch.Tensor:
    """Max over tiles of the per-tile RMS difference of two stacks of same-shaped arrays [N, C, H, W], [Na, Nb]."""
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    result = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    for tile_a, tile_b in zip(image_tiles(a64, tiles), image_tiles(b64, tiles)):
        # The direct (non-matmul) path keeps identical tiles at exactly 0 instead of ~1e-4 rounding noise.
        per_tile = torch.cdist(tile_a, tile_b, compute_mode="donot_use_mm_for_euclid_dist")
        result = torch.maximum(result, per_tile / math.sqrt(tile_a.shape[1]))
    return result.to(torch.float32)


def check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    """Both stacks are images of the same shape (`check_images`), or a clear error."""
    check_images(a, "a")
    check_images(b, "b")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"image shapes differ: {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}")


def tiled_l2(a: torch.Tensor, b: torch.Tensor, tiles: int = 4) -> torch.Tensor:
    """Max over tiles of the per-tile RMS difference, [Na, Nb] (Carlini et al. 2023, "Extracting training data")."""
    check_pair(a, b)
    return tiled_rms(a, b, tiles)


#: Rec. 601 luma weights of R, G and B.
LUMA = (0.299, 0.587, 0.114)


def normalized_luminance(images: torch.Tensor) -> torch.Tensor:
    """Each image's luminance with its own mean removed and divided by its own standard deviation, [N, 1, H, W]: the
    same picture under another global brightness, contrast or colour cast (of a grey image: every channel an
    affine map of one) gives the same array."""
    weights = torch.tensor(LUMA, dtype=torch.float64).view(1, 3, 1, 1)
    luminance = (images.detach().to(torch.float64) * weights).sum(dim=1, keepdim=True)
    centred = luminance - luminance.mean(dim=(1, 2, 3), keepdim=True)
    return centred / centred.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)


#: A luminance copy: `luminance_tiled_l2` at most this. 0.5: on the world's 80 training faces, two different faces
#: are at least 0.81 apart (1st percentile 1.09), a face under a colour cast plus noise of 0.05 at most 0.40 from
#: itself (median 0.22); RGB tiled L2 puts the same cast copies at a median 0.09 and different faces at >= 0.17.
LUMINANCE_COPY_DISTANCE = 0.5


def luminance_tiled_l2(a: torch.Tensor, b: torch.Tensor, tiles: int = 4) -> torch.Tensor:
    """Tiled L2 of `normalized_luminance`, [Na, Nb]: a copy test that a global colour shift does not fool. RGB tiled
    L2 misses a training face returned under a colour cast (the Dori attack and adversarial fine-tuning both
    produce them on the world, docs/scan.md and docs/robustness.md); this distance does not, at the cost of
    ignoring colour altogether."""
    check_pair(a, b)
    return tiled_rms(normalized_luminance(a), normalized_luminance(b), tiles)


def paired_tiled_l2(a: torch.Tensor, b: torch.Tensor, tiles: int = 4) -> torch.Tensor:
    """Tiled L2 of each image of `a` to the image at the same row of `b`, [N] (Carlini et al. 2023)."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"need as many images in a as in b, got {a.shape[0]} and {b.shape[0]}")
    return torch.stack([tiled_l2(x[None], y[None], tiles)[0, 0] for x, y in zip(a, b)]) if a.shape[0] else torch.zeros(0)


def nearest_neighbours(
    generated: torch.Tensor, train: torch.Tensor, k: int = 1, tiles: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances, indices), each [N_gen, k], of the k training images closest in tiled L2 (Carlini et al. 2023)."""
    distances = tiled_l2(generated, train, tiles)
    if not 1 <= k <= distances.shape[1]:
        raise ValueError(f"k must be between 1 and the number of training images ({distances.shape[1]}), got {k}")
    values, indices = torch.topk(distances, k, dim=1, largest=False, sorted=True)
    return values, indices


def relative_distance(distances: torch.Tensor, neighbours: int = 50) -> torch.Tensor:
    """Nearest distance over the mean of the `neighbours` nearest distances, per row (Carlini et al. 2023, sec. 5)."""
    if distances.ndim != 2 or distances.shape[1] == 0:
        raise ValueError(f"distances must be a non-empty [N, M] matrix, got shape {tuple(distances.shape)}")
    n = min(neighbours, distances.shape[1])
    closest = torch.topk(distances.to(torch.float64), n, dim=1, largest=False, sorted=True).values
    mean = closest.mean(dim=1)
    # All n neighbours at distance 0 (a copy of an image that is itself duplicated): ratio 0/0, call it a copy.
    ratio = torch.where(mean > 0, closest[:, 0] / mean.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return ratio.to(torch.float32)


@dataclass(frozen=True)
class CopyConfig:
    """When a generated image counts as a copy of a training image (Carlini et al. 2023).

    Args:
        tiles: tiles per side for the tiled L2 distance. 4 (16 tiles) as in Carlini et al.: a copy must match
            everywhere, so one region that differs is enough to reject it.
        neighbours: n, the number of nearest training images whose mean distance normalises the nearest one.
            50, Carlini et al.'s value; clipped to the training-set size.
        relative_threshold: a generation is a copy when its nearest distance is at most this fraction of the
            mean distance to its n nearest training images. 0.5 mirrors Carlini et al.'s alpha = 0.5: the copy
            must be at least twice as close as the typical close neighbour.
        distance_threshold: optional absolute bound on the tiled RMS distance (images in [0, 1]) that a copy
            must also meet. None (default) uses the relative test only, which needs no tuning per dataset;
            set it when the training set is too small or too uniform for the relative test (fewer than ~3
            images, or near-duplicates of each other).
    """

    tiles: int = 4
    neighbours: int = 50
    relative_threshold: float = 0.5
    distance_threshold: float | None = None


@dataclass(frozen=True)
class CopyResult:
    """Per generated image: tiled distance to its nearest training image, that image's index, the relative
    distance and the copy decision. All tensors have shape [N_generated]."""

    distance: torch.Tensor
    nearest_index: torch.Tensor
    relative_distance: torch.Tensor
    is_copy: torch.Tensor

    @property
    def rate(self) -> float:
        """Fraction of generated images judged copies."""
        return float(self.is_copy.float().mean()) if self.is_copy.numel() else 0.0


def copy_decisions_from_distances(distances: torch.Tensor, config: CopyConfig = CopyConfig()) -> CopyResult:
    """Copy decisions from a precomputed [N_gen, N_train] distance matrix (Carlini et al. 2023)."""
    distance, nearest = distances.min(dim=1)
    relative = relative_distance(distances, config.neighbours)
    is_copy = relative <= config.relative_threshold
    if config.distance_threshold is not None:
        is_copy &= distance <= config.distance_threshold
    return CopyResult(distance=distance, nearest_index=nearest, relative_distance=relative, is_copy=is_copy)


def copy_decisions(
    generated: torch.Tensor, train: torch.Tensor, config: CopyConfig = CopyConfig()
) -> CopyResult:
    """Nearest training image and copy decision for each generated image (Carlini et al. 2023)."""
    return copy_decisions_from_distances(tiled_l2(generated, train, config.tiles), config)


def copy_rate(generated: torch.Tensor, train: torch.Tensor, config: CopyConfig = CopyConfig()) -> float:
    """Fraction of generated images that copy a training image (Carlini et al. 2023)."""
    return copy_decisions(generated, train, config).rate
