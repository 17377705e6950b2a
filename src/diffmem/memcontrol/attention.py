"""Attention tuning: fine-tune only the attention layers (Touvron et al. 2022, "Three things everyone should know
about Vision Transformers", sec. 4)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

ATTENTION_LAYERS = ("attn1", "attn2")


@dataclass(frozen=True)
class AttentionTuningConfig:
    """How attention tuning trains.

    Attributes:
        lr: AdamW learning rate; the query/key/value/output weights are full weights, so full fine-tuning's rate
            (1e-4, the world's `--method full` default).
    """

    lr: float = 1e-4


def apply_attention_tuning(unet: torch.nn.Module, modules: Sequence[str], config: AttentionTuningConfig | None = None
                           ) -> list[torch.nn.Parameter]:
    """Switch on every parameter of the self- and cross-attention layers (`attn1`, `attn2`) inside `modules`."""
    roots = tuple(f"{m}." for m in modules)
    trainable = []
    for name, layer in unet.named_modules():
        if name.startswith(roots) and name.rsplit(".", 1)[-1] in ATTENTION_LAYERS:
            trainable.extend(layer.parameters())
    for p in trainable:
        p.requires_grad_(True)
    return trainable
