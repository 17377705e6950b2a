"""LoRA on the attention projections of the masked modules, through PEFT (Hu et al. 2022, "LoRA: Low-Rank
Adaptation of Large Language Models")."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffmem.world.lora import ATTENTION_PROJECTIONS


@dataclass(frozen=True)
class LoraMaskConfig:
    """LoRA settings for MemControl's LoRA baseline.

    Attributes:
        rank / alpha: rank 4 and alpha 4 (scale alpha / rank = 1), the defaults of diffusers'
            `train_text_to_image_lora.py` for Stable Diffusion.
        lr: AdamW learning rate, 1e-4 as in that script.
        targets: the attention projections it adapts (`to_q`, `to_k`, `to_v`, `to_out.0`, as that script does).
    """

    rank: int = 4
    alpha: float = 4.0
    lr: float = 1e-4
    targets: tuple[str, ...] = ATTENTION_PROJECTIONS


def target_regex(modules: Sequence[str], targets: Sequence[str]) -> str:
    """PEFT `target_modules` regex: the `targets` projections inside `modules` (full-name match)."""
    roots = "|".join(re.escape(m) for m in modules)
    leaves = "|".join(re.escape(t) for t in targets)
    return rf"({roots})\..*\.({leaves})"


def apply_lora(unet: torch.nn.Module, modules: Sequence[str], config: LoraMaskConfig | None = None
               ) -> list[torch.nn.Parameter]:
    """Inject LoRA (B = 0, so the model is unchanged) into the projections inside `modules`; returns its factors."""
    from peft import LoraConfig, inject_adapter_in_model

    config = config or LoraMaskConfig()
    if not modules:
        return []
    lora_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=target_regex(modules, config.targets),
                             init_lora_weights=True, lora_dropout=0.0)
    inject_adapter_in_model(lora_config, unet)
    trainable = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def merge_lora(unet: torch.nn.Module) -> None:
    """Merge every injected LoRA into its base layer and put the base layer back in its place (in place)."""
    for name, layer in list(unet.named_modules()):
        if hasattr(layer, "base_layer") and hasattr(layer, "merge"):
            layer.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent_name) if parent_name else unet, child, layer.base_layer)
