"""Memorization and quality metrics: pure functions over image and feature batches.

Images are float32 tensors in [0, 1] shaped [N, 3, H, W]. Each family lives in its own module:
`copy` (tiled L2 copy test), `extraction` (Carlini/MemControl extraction attack), `features` (image
embedders), `amd` (AMD and embedding copy test), `fid`, `wen` (Wen et al.'s data-free detector), `roc`
(ROC AUC, TPR at fixed FPR) and `quality` (denoising loss, CLIP score).
"""

from diffmem.metrics.copy import (
    CopyConfig,
    CopyResult,
    copy_decisions,
    copy_decisions_from_distances,
    copy_rate,
    nearest_neighbours,
    relative_distance,
    tiled_l2,
)

__all__ = [
    "CopyConfig",
    "CopyResult",
    "copy_decisions",
    "copy_decisions_from_distances",
    "copy_rate",
    "nearest_neighbours",
    "relative_distance",
    "tiled_l2",
]
