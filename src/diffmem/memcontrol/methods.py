"""The fine-tuning methods MemControl compares, behind one interface: inject into a UNet under a mask, list the
parameters to train, merge back into plain weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffmem.errors import DiffmemError
from diffmem.memcontrol.attention import AttentionTuningConfig, apply_attention_tuning
from diffmem.memcontrol.difffit import DiffFitConfig, apply_difffit, merge_difffit
from diffmem.memcontrol.lora import LoraMaskConfig, apply_lora, merge_lora
from diffmem.memcontrol.mask import Mask
from diffmem.memcontrol.svdiff import SVDiffConfig, apply_svdiff, merge_svdiff

#: Learning rate of full fine-tuning (the world's `finetune --method full` recommendation).
FULL_LR = 1e-4


@dataclass(frozen=True)
class Method:
    """A fine-tuning method: its config class, how it injects under a mask (`masked`: whether a mask applies at
    all), and how it merges."""

    config: type | None
    apply: Callable[..., list[torch.nn.Parameter]] | None
    merge: Callable[[torch.nn.Module], None] | None
    masked: bool


METHODS: dict[str, Method] = {
    "svdiff": Method(SVDiffConfig, apply_svdiff, merge_svdiff, True),
    "difffit": Method(DiffFitConfig, apply_difffit, merge_difffit, True),
    "attention": Method(AttentionTuningConfig, apply_attention_tuning, None, True),
    "lora": Method(LoraMaskConfig, apply_lora, merge_lora, True),
    "full": Method(None, None, None, False),
    "none": Method(None, None, None, False),
}


def check_method(name: str) -> Method:
    """The method called `name`, or a clear error listing the known ones."""
    if name not in METHODS:
        raise DiffmemError(f"unknown fine-tuning method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def default_lr(name: str) -> float:
    """The learning rate a method's config defaults to (full fine-tuning's for `full`)."""
    method = check_method(name)
    return method.config().lr if method.config is not None else FULL_LR


def scaled_lr(name: str, lr: float | None, scale: float) -> float:
    """`lr` when given, else `scale` times method `name`'s own learning rate (`default_lr`): one factor for every
    method keeps the published ratios between them."""
    return lr if lr is not None else default_lr(name) * scale


def prepare(unet: torch.nn.Module, name: str, mask: Mask | None = None, config=None) -> list[torch.nn.Parameter]:
    """Freeze `unet`, inject method `name` into the modules `mask` switches on (every attention module when
    `mask` is None), and return the parameters to train (in place; `full` trains all, `none` nothing)."""
    method = check_method(name)
    unet.requires_grad_(False)
    if name == "full":
        unet.requires_grad_(True)
        return list(unet.parameters())
    if name == "none":
        return []
    if mask is None:
        from diffmem.memcontrol.mask import derive_mask

        mask = derive_mask(unet, "layers")
    if config is not None and not isinstance(config, method.config):
        raise DiffmemError(f"method {name!r} takes a {method.config.__name__}, got {type(config).__name__}")
    return method.apply(unet, mask.modules, config)


def merge(unet: torch.nn.Module) -> torch.nn.Module:
    """Fold every injected method back into plain weights with the base's parameter names (in place)."""
    for method in METHODS.values():
        if method.merge is not None:
            method.merge(unet)
    return unet
