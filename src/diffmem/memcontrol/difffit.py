"""DiffFit: learnable scale factors on the attention and feed-forward branches, plus biases and norms (Xie et al.
2023, "DiffFit: Unlocking Transferability of Large Diffusion Models via Simple Parameter-Efficient Fine-Tuning")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffmem.errors import DiffmemError
from diffmem.memcontrol.functional import scale_output_rows

GAMMA = "difffit_gamma"
BRANCHES = ("attn1", "attn2", "ff")
NORMS = (torch.nn.LayerNorm, torch.nn.GroupNorm)


@dataclass(frozen=True)
class DiffFitConfig:
    """Where DiffFit trains, and how.

    Attributes:
        lr: AdamW learning rate. Xie et al. report that DiffFit wants about 10x the learning rate of full
            fine-tuning; the world's full fine-tune uses 1e-4, so 1e-3 here.
        biases: also train the biases inside the masked attention modules (BitFit-style, as DiffFit does).
        norms: also train the LayerNorm/GroupNorm weights inside the masked attention modules (as DiffFit does).
    """

    lr: float = 1e-3
    biases: bool = True
    norms: bool = True


def scale_by_gamma(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the branch output times the module's gamma (per channel, last dim)."""
    return output * getattr(module, GAMMA)


def transformer_blocks(unet: torch.nn.Module, modules: Sequence[str]) -> list[torch.nn.Module]:
    """The transformer blocks (modules with `attn1` and `ff` branches) inside `modules`."""
    roots = tuple(f"{m}." for m in modules)
    return [block for name, block in unet.named_modules()
            if name.startswith(roots) and hasattr(block, "attn1") and hasattr(block, "ff")]


def branch_width(block: torch.nn.Module) -> int:
    """Channels of the block's residual stream (what each branch adds to)."""
    return block.attn1.to_out[0].out_features


def apply_difffit(unet: torch.nn.Module, modules: Sequence[str], config: DiffFitConfig | None = None
                  ) -> list[torch.nn.Parameter]:
    """Put a gamma (ones, so the model is unchanged) on the attn1/attn2/ff branches of every transformer block in
    `modules` and switch on their biases and norms; returns everything to train."""
    config = config or DiffFitConfig()
    trainable = []
    for block in transformer_blocks(unet, modules):
        width = branch_width(block)
        for branch_name in BRANCHES:
            branch = getattr(block, branch_name, None)
            if branch is None:
                continue
            gamma = torch.nn.Parameter(torch.ones(width))
            branch.register_parameter(GAMMA, gamma)
            branch.register_forward_hook(scale_by_gamma)
            trainable.append(gamma)
    roots = tuple(f"{m}." for m in modules)
    for name, layer in unet.named_modules():
        if not name.startswith(roots):
            continue
        if config.norms and isinstance(layer, NORMS):
            trainable.extend(p for p in layer.parameters(recurse=False))
        elif config.biases and getattr(layer, "bias", None) is not None and isinstance(layer.bias, torch.nn.Parameter):
            trainable.append(layer.bias)
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def output_layer(branch: torch.nn.Module) -> torch.nn.Linear:
    """The last linear layer of a branch, whose output the gamma scales (`to_out.0` or the feed-forward's last)."""
    if hasattr(branch, "to_out"):
        if getattr(branch, "residual_connection", False) or getattr(branch, "rescale_output_factor", 1.0) != 1.0:
            raise DiffmemError("cannot merge a DiffFit gamma into an attention module with an inner residual "
                               "connection or output rescaling")
        return branch.to_out[0]
    linears = [m for m in branch.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1]


@torch.no_grad()
def merge_difffit(unet: torch.nn.Module) -> None:
    """Fold every gamma into the linear layer in front of it and remove the gammas and their hooks (in place)."""
    for branch in list(unet.modules()):
        gamma = branch._parameters.get(GAMMA)
        if gamma is None:
            continue
        layer = output_layer(branch)
        weight, bias = scale_output_rows(layer.weight, layer.bias, gamma)
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
        del branch._parameters[GAMMA]
        for key, hook in list(branch._forward_hooks.items()):
            if hook is scale_by_gamma:
                del branch._forward_hooks[key]
