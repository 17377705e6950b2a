"""How channel scores become channel weights: the selection rules every filter shares.

A weight of 1 keeps a channel, 0 drops it, and values in between scale it (the soft rule).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

RULES = ("threshold", "fraction", "energy", "soft", "uniform", "all")
SCOPES = ("layer", "global")


@dataclass
class Selection:
    """Turn per-channel scores (higher = keep) into per-channel weights.

    Args:
        rule: "threshold" keeps channels scoring at least ``threshold``; "fraction" keeps the top ``keep_fraction``
            of channels; "energy" keeps top-scoring channels until they hold ``keep_fraction`` of the update's
            energy (sum of sigma^2); "soft" scales each channel by ``clamp(score / threshold, 0, 1)``; "uniform"
            scales every channel by ``sqrt(keep_fraction)`` (the whole LoRA turned down to that energy share);
            "all" keeps everything (a no-op filter, useful as a control).
        threshold: the score a channel needs under "threshold" and "soft". For BAF scores it is relative to the
            chance level of a random direction, so 1.0 means "better aligned than chance".
        keep_fraction: share of channels ("fraction") or of update energy ("energy", "uniform") to keep.
        scope: "layer" applies "fraction"/"energy" within each module; "global" ranks all channels of the LoRA
            together (scores must then be comparable across modules, as relative alignments are).
    """

    rule: str = "threshold"
    threshold: float = 1.0
    keep_fraction: float = 0.5
    scope: str = "layer"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if not 0.0 <= self.keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in [0, 1], got {self.keep_fraction}")


def top_fraction_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 for the ``round(fraction * n)`` highest scores, 0 elsewhere (ties broken by position, stably)."""
    count = round(fraction * scores.numel())
    mask = torch.zeros_like(scores)
    if count > 0:
        order = torch.sort(scores, descending=True, stable=True).indices
        mask[order[:count]] = 1.0
    return mask


def top_energy_mask(scores: torch.Tensor, sigma: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 for the highest-scoring channels whose sigma^2 first reaches ``fraction`` of the total, 0 elsewhere."""
    mask = torch.zeros_like(scores)
    power = sigma.to(torch.float64).square()
    total = float(power.sum())
    if total == 0.0 or fraction == 0.0:
        return mask
    order = torch.sort(scores, descending=True, stable=True).indices
    reached = torch.cumsum(power[order], 0) / total
    count = int((reached < fraction - 1e-12).sum()) + 1
    mask[order[:count]] = 1.0
    return mask


def channel_weights(scores: torch.Tensor, sigma: torch.Tensor, selection: Selection) -> torch.Tensor:
    """Weights of one module's channels under ``selection`` (the "layer" scope)."""
    rule = selection.rule
    if rule == "threshold":
        return (scores >= selection.threshold).to(torch.float32)
    if rule == "fraction":
        return top_fraction_mask(scores, selection.keep_fraction)
    if rule == "energy":
        return top_energy_mask(scores, sigma, selection.keep_fraction)
    if rule == "soft":
        if selection.threshold <= 0:
            raise ValueError("the soft rule needs a positive threshold")
        return (scores / selection.threshold).clamp(0.0, 1.0).to(torch.float32)
    if rule == "uniform":
        return torch.full_like(scores, selection.keep_fraction**0.5, dtype=torch.float32)
    return torch.ones_like(scores, dtype=torch.float32)


def select(
    scores: Mapping[str, torch.Tensor], sigmas: Mapping[str, torch.Tensor], selection: Selection
) -> dict[str, torch.Tensor]:
    """Weights for every module's channels; "fraction" and "energy" rank across modules under the global scope."""
    if selection.scope == "layer" or selection.rule not in ("fraction", "energy") or not scores:
        return {name: channel_weights(scores[name], sigmas[name], selection) for name in scores}
    names = list(scores)
    sizes = [scores[name].numel() for name in names]
    flat_scores = torch.cat([scores[name].float() for name in names])
    flat_sigma = torch.cat([sigmas[name].float() for name in names])
    if selection.rule == "fraction":
        flat = top_fraction_mask(flat_scores, selection.keep_fraction)
    else:
        flat = top_energy_mask(flat_scores, flat_sigma, selection.keep_fraction)
    return dict(zip(names, torch.split(flat, sizes), strict=True))
