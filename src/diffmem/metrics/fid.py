"""Fréchet distance between Gaussian fits of two feature sets (Heusel et al. 2017, "GANs trained by a two
time-scale update rule"), with a pluggable feature network."""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffmem.metrics.checks import check_features
from diffmem.metrics.features import embed


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64 (Heusel et al. 2017)."""
    check_features(features)
    if features.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {features.shape[0]}")
    x = features.to(torch.float64)
    mean = x.mean(dim=0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix via its eigendecomposition."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(
    mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor
) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two Gaussians (Heusel et al. 2017)."""
    mean_a, mean_b = mean_a.to(torch.float64), mean_b.to(torch.float64)
    cov_a, cov_b = cov_a.to(torch.float64), cov_b.to(torch.float64)
    if mean_a.shape != mean_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (*mean_a.shape, *mean_a.shape):
        raise ValueError(
            f"mismatched statistics: means {tuple(mean_a.shape)}, {tuple(mean_b.shape)}; "
            f"covariances {tuple(cov_a.shape)}, {tuple(cov_b.shape)}"
        )
    # tr((S_a S_b)^(1/2)) equals the sum of square roots of the eigenvalues of the symmetric PSD matrix
    # S_a^(1/2) S_b S_a^(1/2); eigh on it is stable where scipy's sqrtm of the non-symmetric product can
    # return complex parts or NaN for singular covariances (fewer samples than dimensions).
    root_a = psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    diff = mean_a - mean_b
    value = diff @ diff + torch.trace(cov_a) + torch.trace(cov_b) - 2 * trace_sqrt
    return float(value.clamp_min(0))


def fid_from_features(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets [N, D] (Heusel et al. 2017)."""
    return frechet_distance(*feature_statistics(real_features), *feature_statistics(fake_features))


def fid(
    real: torch.Tensor,
    fake: torch.Tensor,
    embedder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 64,
) -> float:
    """FID of images [N, 3, H, W] in [0, 1] in the feature space of `embedder` (Heusel et al. 2017); by default
    the project's copy-detection embedder (`diffmem.metrics.embedder`), which suits 32 x 32 world images."""
    if embedder is None:
        from diffmem.metrics.embedder import load_copy_embedder

        embedder = load_copy_embedder()
    return fid_from_features(embed(embedder, real, batch_size), embed(embedder, fake, batch_size))
