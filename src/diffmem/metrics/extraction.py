"""The generate-and-filter extraction attack (Carlini et al. 2023, as used by MemControl).

Many generations per training prompt; two generations are joined by an edge when their tiled L2 distance is
below a threshold; a prompt is extracted when the largest connected group of its generations reaches a minimum
size (a model that memorized the image keeps producing it, one that generalises does not). Optionally the group
must also match a training image, so that a mode collapse onto something not in the data does not count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from diffmem.metrics.checks import check_images
from diffmem.metrics.copy import tiled_l2


@dataclass(frozen=True)
class ExtractionConfig:
    """Settings of the extraction attack (Carlini et al. 2023; MemControl, Dutt et al. 2024).

    Args:
        edge_threshold: two generations are near-identical when their tiled RMS distance (images in [0, 1]) is
            below this. 0.1 means about 25 grey levels RMS in the worst tile. Carlini et al. tuned theirs per
            model; re-tune for other image domains. Measured on the world's example LoRA (docs/audit.md): no
            prompt forms a group of 3 at 0.1 there, because its copies of a face differ in colour tint.
        min_component: a prompt is extracted when its largest group of near-identical generations has at least
            this many members. 3, MemControl's value (Carlini et al. used cliques of 10 among 500 generations;
            MemControl used 50 generations per prompt).
        tiles: tiles per side of the tiled L2 distance, 4 (16 tiles) as in Carlini et al.
        match_threshold: when training images are given, the group must contain a generation within this tiled
            distance of a training image for the prompt to count. None means `edge_threshold`.
    """

    edge_threshold: float = 0.1
    min_component: int = 3
    tiles: int = 4
    match_threshold: float | None = None


@dataclass(frozen=True)
class PromptExtraction:
    """Outcome for one prompt: the members of its largest group of near-identical generations, whether it
    was extracted, and (when training images were given) the training image the group reproduces."""

    members: tuple[int, ...]
    extracted: bool
    matched_train_index: int | None = None
    match_distance: float | None = None

    @property
    def largest_component(self) -> int:
        """Size of the largest group of near-identical generations."""
        return len(self.members)


@dataclass(frozen=True)
class ExtractionResult:
    """Per-prompt outcomes plus the headline count of extracted training images."""

    prompts: tuple[PromptExtraction, ...]

    @property
    def extracted_prompts(self) -> int:
        """Number of prompts whose generations form a large enough group (and match, when checked)."""
        return sum(p.extracted for p in self.prompts)

    @property
    def extracted_images(self) -> int:
        """Distinct training images extracted; without training images, the number of extracted prompts."""
        matched = {p.matched_train_index for p in self.prompts if p.extracted}
        if matched and None not in matched:
            return len(matched)
        return self.extracted_prompts


def largest_component(distances: torch.Tensor, threshold: float) -> tuple[int, ...]:
    """Members of the largest connected component of the graph `distance < threshold` (Carlini et al. 2023)."""
    if distances.ndim != 2 or distances.shape[0] != distances.shape[1]:
        raise ValueError(f"distances must be a square [G, G] matrix, got {tuple(distances.shape)}")
    if distances.shape[0] == 0:
        return ()
    adjacency = (distances < threshold).cpu().numpy()
    np.fill_diagonal(adjacency, False)
    _, labels = connected_components(csr_matrix(adjacency), directed=False)
    counts = np.bincount(labels)
    # Ties go to the component holding the lowest generation index, so the result is deterministic.
    biggest = int(np.argmax(counts))
    return tuple(int(i) for i in np.flatnonzero(labels == biggest))


def extract_prompt(
    generations: torch.Tensor,
    config: ExtractionConfig = ExtractionConfig(),
    train: torch.Tensor | None = None,
) -> PromptExtraction:
    """Extraction outcome for the G generations [G, 3, H, W] of one prompt (Carlini et al. 2023)."""
    check_images(generations, "generations")
    members = largest_component(tiled_l2(generations, generations, config.tiles), config.edge_threshold)
    big_enough = len(members) >= config.min_component
    if train is None:
        return PromptExtraction(members=members, extracted=big_enough)
    check_images(train, "train")
    to_train = tiled_l2(generations[list(members)], train, config.tiles)
    flat = int(torch.argmin(to_train))
    best_distance = float(to_train.flatten()[flat])
    best_index = flat % train.shape[0]
    limit = config.edge_threshold if config.match_threshold is None else config.match_threshold
    matches = best_distance < limit
    return PromptExtraction(
        members=members,
        extracted=big_enough and matches,
        matched_train_index=best_index if matches else None,
        match_distance=best_distance,
    )


def extraction_attack(
    generations: torch.Tensor | Sequence[torch.Tensor],
    config: ExtractionConfig = ExtractionConfig(),
    train: torch.Tensor | None = None,
) -> ExtractionResult:
    """Run the attack on generations [P, G, 3, H, W] (or P tensors [G, 3, H, W]) (Carlini et al. 2023; MemControl)."""
    if isinstance(generations, torch.Tensor) and generations.ndim != 5:
        raise ValueError(f"generations must have shape [P, G, C, H, W], got {tuple(generations.shape)}")
    return ExtractionResult(prompts=tuple(extract_prompt(g, config, train) for g in generations))
