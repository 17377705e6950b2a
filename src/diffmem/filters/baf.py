"""Base-Anchored Filtering (BAF): keep the LoRA channels aligned with the base weight's principal subspace.

Seed paper: "Filtering Memorization from Parameter-Space in Diffusion Models", arXiv 2605.10439. The paper publishes
the idea but no formula, threshold or code; the scoring below is our reading of it, documented in docs/filter.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffmem.filters.core import FilterConfig, ModuleView
from diffmem.filters.selection import Selection
from diffmem.spectral import COMBINES, SIDES, relative_alignment


@dataclass
class BAFConfig(FilterConfig):
    """Configuration of Base-Anchored Filtering (arXiv 2605.10439).

    Each LoRA update ``dW`` is split into rank-1 spectral channels ``sigma_i u_i v_i^T``; each channel is scored by
    how much of ``u_i`` (output side) and ``v_i`` (input side) lies in the top-k singular subspaces of the base
    weight ``W0``, divided by what a random direction would score (k / dim). Channels aligned with the base are read
    as generalisable adaptation and kept; weakly aligned ones as likely carriers of memorized content and dropped.

    Args:
        side: "right" (default: input space only), "left" (output space only) or "both" (the two relative scores
            combined; our first reading of the paper). The default is measured, not argued (docs/results.md,
            `diffmem bench`): over three seeds of the world's memorizing LoRA, "right" at the chance threshold cut
            near-copies from 51% to 8% where "both" left 40%, with FID unchanged; at an equal energy budget neither
            side picks better channels than random ones, and scaling the whole LoRA down kept more quality.
        combine: how "both" merges the two relative scores: "mean" (default), "min" or "product" (geometric mean).
        energy: the anchors are the fewest singular directions of ``W0`` holding this share of ``||W0||_F^2``.
            0.5 keeps the dominant half of the base's energy, a subspace well short of the whole space, so that
            alignment with it is informative (at 1.0 every direction is "aligned").
        anchor_rank: a fixed k instead of ``energy`` (None, the default, uses ``energy``).
        selection: the keep rule. The default keeps channels whose relative alignment is at least 1.0, i.e. better
            aligned than chance: a rule that needs no per-LoRA tuning (docs/results.md compares it with fixed
            energy and channel budgets).
    """

    name: str = field(default="baf", init=False)
    side: str = "right"
    combine: str = "mean"
    energy: float = 0.5
    anchor_rank: int | None = None
    selection: Selection = field(default_factory=lambda: Selection(rule="threshold", threshold=1.0))

    def __post_init__(self) -> None:
        # A typo (side="rigth") must fail here, not silently fall back or fail module by module mid-filter.
        if self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {self.side!r}")
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {self.combine!r}")
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.anchor_rank is not None and self.anchor_rank < 1:
            raise ValueError(f"anchor_rank must be at least 1, got {self.anchor_rank}")

    def score(self, view: ModuleView) -> torch.Tensor:
        """Relative alignment of each channel with the base's principal subspaces."""
        anchors = view.anchors(self.energy, self.anchor_rank, self.side)
        return relative_alignment(view.channels, anchors, self.side, self.combine)


@dataclass
class InverseBAFConfig(BAFConfig):
    """The opposite of BAF: keep the *least* aligned channels (an ablation; arXiv 2605.10439 predicts it keeps
    memorization). Same anchors as `BAFConfig`; the default keeps the least aligned half of the channels."""

    name: str = field(default="inverse-baf", init=False)
    selection: Selection = field(default_factory=lambda: Selection(rule="fraction", keep_fraction=0.5))

    def score(self, view: ModuleView) -> torch.Tensor:
        """Negated relative alignment."""
        return -super().score(view)
