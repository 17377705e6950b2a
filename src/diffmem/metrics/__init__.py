"""Memorization and quality metrics: pure functions over image and feature batches.

Images are float32 tensors in [0, 1] shaped [N, 3, H, W]. Each family lives in its own module:
`copy` (tiled L2 copy test), `extraction` (Carlini/MemControl extraction attack), `features` (image
embedders), `amd` (AMD and embedding copy test), `fid`, `wen` (Wen et al.'s data-free detector), `roc`
(ROC AUC, TPR at fixed FPR) and `quality` (denoising loss, CLIP score). See docs/metrics.md.
"""

from diffmem.metrics.amd import (
    EmbeddingCopyResult,
    amd,
    amd_images,
    cosine_similarities,
    embedding_copy_decisions,
)
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
from diffmem.metrics.extraction import ExtractionConfig, ExtractionResult, PromptExtraction, extraction_attack
from diffmem.metrics.features import ImageEmbedder, ModuleEmbedder, PixelEmbedder, embed, load_embedder
from diffmem.metrics.fid import feature_statistics, fid, fid_from_features, frechet_distance
from diffmem.metrics.quality import ClipScorer, clip_score_from_features, denoising_loss
from diffmem.metrics.roc import roc_auc, roc_curve, tpr_at_fpr
from diffmem.metrics.wen import (
    WenConfig,
    WenTrace,
    conditional_difference_norms,
    sample_with_wen_scores,
    wen_score,
)

__all__ = [
    "ClipScorer",
    "CopyConfig",
    "CopyResult",
    "EmbeddingCopyResult",
    "ExtractionConfig",
    "ExtractionResult",
    "ImageEmbedder",
    "ModuleEmbedder",
    "PixelEmbedder",
    "PromptExtraction",
    "WenConfig",
    "WenTrace",
    "amd",
    "amd_images",
    "clip_score_from_features",
    "conditional_difference_norms",
    "copy_decisions",
    "copy_decisions_from_distances",
    "copy_rate",
    "cosine_similarities",
    "denoising_loss",
    "embed",
    "embedding_copy_decisions",
    "extraction_attack",
    "feature_statistics",
    "fid",
    "fid_from_features",
    "frechet_distance",
    "load_embedder",
    "nearest_neighbours",
    "relative_distance",
    "roc_auc",
    "roc_curve",
    "sample_with_wen_scores",
    "tiled_l2",
    "tpr_at_fpr",
    "wen_score",
]
