"""Feature-space memorization measures: AMD and the embedding-similarity copy test."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffmem.metrics.checks import check_features
from diffmem.metrics.features import embed

SSCD_COPY_THRESHOLD = 0.5


def cosine_similarities(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of `a` [Na, D] with every row of `b` [Nb, D], as [Na, Nb]."""
    check_features(a, "a")
    check_features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    a64 = F.normalize(a.to(torch.float64), dim=1)
    b64 = F.normalize(b.to(torch.float64), dim=1)
    return a64 @ b64.T


def amd(generated_features: torch.Tensor, train_features: torch.Tensor) -> float:
    """Mean over generated samples of the minimum cosine distance to any training sample (MemControl, eq. 5)."""
    distances = 1.0 - cosine_similarities(generated_features, train_features)
    return float(distances.min(dim=1).values.mean())


def amd_images(
    generated: torch.Tensor, train: torch.Tensor, embedder: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> float:
    """AMD of images [N, 3, H, W] in the feature space of `embedder` (MemControl, eq. 5); by default the project's
    copy-detection embedder."""
    if embedder is None:
        from diffmem.metrics.embedder import load_copy_embedder

        embedder = load_copy_embedder()
    return amd(embed(embedder, generated), embed(embedder, train))


@dataclass(frozen=True)
class EmbeddingCopyResult:
    """Per generated image: highest cosine similarity to a training image, that image's index, and whether the
    similarity exceeds the copy threshold. Tensors of shape [N_generated]."""

    similarity: torch.Tensor
    nearest_index: torch.Tensor
    is_copy: torch.Tensor

    @property
    def rate(self) -> float:
        """Fraction of generated images judged copies."""
        return float(self.is_copy.float().mean()) if self.is_copy.numel() else 0.0


def embedding_copy_decisions(
    generated_features: torch.Tensor, train_features: torch.Tensor, threshold: float = SSCD_COPY_THRESHOLD
) -> EmbeddingCopyResult:
    """Copy when the cosine to the nearest training embedding exceeds `threshold` (SSCD, Somepalli et al. 2023)."""
    similarity, nearest = cosine_similarities(generated_features, train_features).max(dim=1)
    return EmbeddingCopyResult(
        similarity=similarity.to(torch.float32), nearest_index=nearest, is_copy=similarity > threshold
    )
