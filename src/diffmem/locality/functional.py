"""Pure statistics behind seed 002's locality claims (Kowalczuk et al. 2025, "Finding Dori: Memorization in
Text-to-Image Diffusion Models Is Not Local"): distances between text embeddings, overlap of neuron or weight
selections, and what overlap two random selections of the same sizes would have by chance.

Embeddings are [tokens, dim] (or [N, tokens, dim] where a function says so); selections are bool tensors, True
where a unit (neuron, weight, channel) is selected. No model, no file: see `diffmem.locality.experiment`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: The four embedding distances every comparison reports, in this order.
DISTANCE_KINDS = ("cosine_per_token", "cosine_pooled", "l2_per_token", "l2_pooled")


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"need two embeddings of the same shape [tokens, dim], got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")


def cosine_distance_per_token(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over token positions of 1 - cos(x_t, y_t) (seed 002, sec. 4: where replication triggers lie)."""
    _check_pair(x, y)
    return float((1 - F.cosine_similarity(x.double(), y.double(), dim=-1)).mean())


def cosine_distance_pooled(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - cos of the token-averaged embeddings (seed 002, sec. 4)."""
    _check_pair(x, y)
    return float(1 - F.cosine_similarity(x.double().mean(0), y.double().mean(0), dim=0))


def l2_distance_per_token(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over token positions of ||x_t - y_t||_2 (seed 002, sec. 4)."""
    _check_pair(x, y)
    return float((x.double() - y.double()).norm(dim=-1).mean())


def l2_distance_pooled(x: torch.Tensor, y: torch.Tensor) -> float:
    """||mean_t x_t - mean_t y_t||_2 of the token-averaged embeddings (seed 002, sec. 4)."""
    _check_pair(x, y)
    return float((x.double().mean(0) - y.double().mean(0)).norm())


def embedding_distances(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """All of `DISTANCE_KINDS` between two [tokens, dim] embeddings (seed 002, sec. 4)."""
    return {
        "cosine_per_token": cosine_distance_per_token(x, y),
        "cosine_pooled": cosine_distance_pooled(x, y),
        "l2_per_token": l2_distance_per_token(x, y),
        "l2_pooled": l2_distance_pooled(x, y),
    }


def pairwise_embedding_distances(embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
    """{kind: [N, N] symmetric matrix} of `DISTANCE_KINDS` between all pairs of [N, tokens, dim] embeddings."""
    if embeddings.ndim != 3:
        raise ValueError(f"need embeddings [N, tokens, dim], got {tuple(embeddings.shape)}")
    e = embeddings.double()
    unit = F.normalize(e, dim=-1)
    per_token_cos = 1 - torch.einsum("atd,btd->abt", unit, unit).mean(-1)
    pooled = e.mean(1)
    pooled_unit = F.normalize(pooled, dim=-1)
    per_token_l2 = (e[:, None] - e[None]).norm(dim=-1).mean(-1)
    return {
        "cosine_per_token": per_token_cos,
        "cosine_pooled": 1 - pooled_unit @ pooled_unit.T,
        "l2_per_token": per_token_l2,
        "l2_pooled": torch.cdist(pooled, pooled),
    }


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The entries above the diagonal of a square [N, N] matrix, as a flat tensor (each pair once)."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"need a square matrix, got {tuple(matrix.shape)}")
    rows, cols = torch.triu_indices(*matrix.shape, offset=1)
    return matrix[rows, cols]


def spread(values: torch.Tensor) -> dict[str, float]:
    """min, median, mean and max of a flat set of distances (the scale an adversarial distance is read against)."""
    if values.numel() == 0:
        raise ValueError("need at least one distance")
    v = values.double().flatten()
    return {"min": float(v.min()), "median": float(v.median()), "mean": float(v.mean()), "max": float(v.max())}


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A and B| / |A or B| of two bool selections of the same units; 1 for two empty (identical) selections
    (seed 002, sec. 4: agreement of neuron and weight sets)."""
    if a.shape != b.shape:
        raise ValueError(f"selections cover different units: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.bool(), b.bool()
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def expected_random_jaccard(units: int, size_a: int, size_b: int) -> float:
    """E[Jaccard] of two independent uniformly random selections of `size_a` and `size_b` out of `units`: the
    overlap k is hypergeometric, J = k / (a + b - k) (the chance level a measured agreement is read against)."""
    if not 0 <= size_a <= units or not 0 <= size_b <= units:
        raise ValueError(f"selection sizes {size_a}, {size_b} must lie in [0, {units}]")
    if size_a + size_b == 0:
        return 1.0
    log_total = _log_comb(units, size_b)
    expected = 0.0
    for k in range(max(0, size_a + size_b - units), min(size_a, size_b) + 1):
        log_p = _log_comb(size_a, k) + _log_comb(units - size_a, size_b - k) - log_total
        expected += math.exp(log_p) * k / (size_a + size_b - k)
    return expected


def expected_layered_jaccard(units: Sequence[int], sizes_a: Sequence[int], sizes_b: Sequence[int]) -> float:
    """Chance Jaccard of two selections drawn at random within each layer with the given per-layer sizes, pooled
    over layers: E|A and B| / (|A| + |B| - E|A and B|) with E|A and B| = sum_l a_l b_l / n_l (a ratio of
    expectations; close to the exact mean when the overlaps are not tiny)."""
    if not len(units) == len(sizes_a) == len(sizes_b):
        raise ValueError("need one unit count and two sizes per layer")
    overlap = sum(a * b / n for n, a, b in zip(units, sizes_a, sizes_b) if n)
    total = sum(sizes_a) + sum(sizes_b) - overlap
    return 1.0 if total == 0 else overlap / total


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the `k` largest entries along the last dimension (ties broken by position)."""
    if not 0 <= k <= scores.shape[-1]:
        raise ValueError(f"k must lie in [0, {scores.shape[-1]}], got {k}")
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter(-1, scores.topk(k, dim=-1).indices, True) if k else mask


def top_share_count(units: int, share: float) -> int:
    """How many units the top `share` of `units` holds: ceil(share * units), at least 1."""
    if not 0 < share <= 1:
        raise ValueError(f"share must lie in (0, 1], got {share}")
    return min(units, max(1, math.ceil(share * units - 1e-9)))


def selection_agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float | int]:
    """Jaccard of two selections of the same units beside the chance Jaccard of random selections of their sizes,
    and their ratio (seed 002, sec. 4: how little pruning methods agree)."""
    size_a, size_b, units = int(a.bool().sum()), int(b.bool().sum()), a.numel()
    measured, chance = jaccard(a, b), expected_random_jaccard(units, size_a, size_b)
    return {"jaccard": measured, "chance": chance, "units": units, "size_a": size_a, "size_b": size_b,
            "overlap": int((a.bool() & b.bool()).sum())}


def layered_agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """`selection_agreement` per layer and pooled over all layers (chance pooled with `expected_layered_jaccard`)
    for two {layer: bool selection} maps over the same layers."""
    if a.keys() != b.keys():
        raise ValueError(f"selections cover different layers: {sorted(a)} vs {sorted(b)}")
    layers = {name: selection_agreement(a[name], b[name]) for name in a}
    units = [layers[n]["units"] for n in a]
    sizes_a = [layers[n]["size_a"] for n in a]
    sizes_b = [layers[n]["size_b"] for n in a]
    overlap = sum(layers[n]["overlap"] for n in a)
    union = sum(sizes_a) + sum(sizes_b) - overlap
    overall = {"jaccard": 1.0 if union == 0 else overlap / union,
               "chance": expected_layered_jaccard(units, sizes_a, sizes_b),
               "units": sum(units), "size_a": sum(sizes_a), "size_b": sum(sizes_b), "overlap": overlap}
    return {"overall": overall, "layers": layers}


def activation_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two per-neuron activation vectors [neurons] (seed 002, sec. 4: activation divergence)."""
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"need two activation vectors of the same length, got {tuple(a.shape)}, {tuple(b.shape)}")
    return float(F.cosine_similarity(a.double(), b.double(), dim=0))
