"""LoRA on the world UNet: which modules are adapted (kohya's choice), PEFT injection, saving in kohya or
diffusers/PEFT naming, and applying a LoRA file of any format `diffmem.formats.lora` reads.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from diffmem.errors import BaseMismatchError
from diffmem.formats.lora import LoraFile, lora_from_factors, read_lora, write_lora
from diffmem.formats.names import kohya_name

#: kohya's sd-scripts `networks/lora.py` adapts every Linear of SD's Transformer2DModel blocks: proj_in,
#: proj_out, the feed-forward (ff.net.0.proj, ff.net.2) and these projections of attn1 and attn2.
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
#: Conv layers kohya adds with `conv_dim` (LoCon): ResnetBlock2D convs, down- and up-samplers.
CONV_TARGETS = (r"resnets\.\d+\.conv1", r"resnets\.\d+\.conv2", r"resnets\.\d+\.conv_shortcut",
                r"downsamplers\.0\.conv", r"upsamplers\.0\.conv")
KOHYA_PREFIX = "lora_unet"
PEFT_COMPONENT = "unet"
BASE_MODEL_VERSION = "diffmem_world_v1"


def target_pattern(conv: bool = False) -> str:
    """PEFT `target_modules` regex (full match on module paths) of the layers a world LoRA adapts."""
    attention = "|".join(re.escape(t) for t in ATTENTION_PROJECTIONS)
    block = rf"transformer_blocks\.\d+\.((attn1|attn2)\.({attention})|ff\.net\.0\.proj|ff\.net\.2)"
    pattern = rf".*attentions\.\d+\.(proj_in|proj_out|{block})"
    if conv:
        pattern = rf"({pattern}|.*({'|'.join(CONV_TARGETS)}))"
    return pattern


def lora_factors(peft_unet: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (lora_down = A [r, in(, k, k)], lora_up = B [out, r(, 1, 1)])} of a PEFT-injected UNet."""
    factors = {}
    for path, module in peft_unet.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            factors[path] = (
                module.lora_A["default"].weight.detach().clone(),
                module.lora_B["default"].weight.detach().clone(),
            )
    return factors


def save_lora(
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    path: str | Path,
    rank: int,
    alpha: float,
    fmt: str = "kohya",
    conv: bool = False,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a world LoRA, ``{module path: (lora_down, lora_up)}``, in fp16 as kohya `.safetensors` (with the
    `ss_*` metadata sd-scripts writes; `write_lora` adds the `sshs_*` hashes) or diffusers/PEFT `.safetensors`
    (with `lora_adapter_metadata`, as diffusers' `save_lora_weights`). Key naming lives in `diffmem.formats`."""
    if fmt not in ("kohya", "peft"):
        raise ValueError(f"unknown LoRA format {fmt!r}; choose 'kohya' or 'peft'")
    path = Path(path)
    named = {
        (kohya_name(KOHYA_PREFIX, module) if fmt == "kohya" else f"{PEFT_COMPONENT}.{module}"):
            (up.to(torch.float16).contiguous(), down.to(torch.float16).contiguous())
        for module, (down, up) in factors.items()
    }
    metadata = dict(extra_metadata or {})
    if fmt == "kohya":
        metadata.update({
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(int(alpha) if float(alpha).is_integer() else alpha),
            "ss_network_args": json.dumps({"conv_dim": str(rank), "conv_alpha": str(alpha)} if conv else {}),
            "ss_base_model_version": BASE_MODEL_VERSION,
            "ss_output_name": path.stem,
            "ss_v2": "False",
        })
    else:
        config = {"target_modules": target_pattern(conv), "use_rslora": False, "use_dora": False,
                  "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True}
        metadata["lora_adapter_metadata"] = json.dumps({f"{PEFT_COMPONENT}.{k}": v for k, v in config.items()})
    lora = lora_from_factors(named, "kohya" if fmt == "kohya" else "diffusers", alpha=alpha, metadata=metadata)
    return write_lora(lora, path)


def module_paths(unet: torch.nn.Module) -> dict[str, str]:
    """Every name a LoRA file may give a world UNet module (kohya, diffusers-prefixed, bare path) -> its path."""
    names = {}
    for path, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            names[kohya_name(KOHYA_PREFIX, path)] = path
            names[f"{PEFT_COMPONENT}.{path}"] = path
            names[path] = path
    return names


def lora_targets(unet: torch.nn.Module, lora: LoraFile) -> dict[str, tuple[str, torch.nn.Parameter]]:
    """{LoRA module name: (module path, weight)} of the world UNet weights `lora` updates; a module the UNet lacks,
    or a shape that does not fit, is a `BaseMismatchError` (a LoRA for another base)."""
    names = module_paths(unet)
    modules = dict(unet.named_modules())
    targets = {}
    for name, module in lora.modules.items():
        path = names.get(module.lookup)
        if path is None:
            raise BaseMismatchError(
                f"LoRA module {module.name!r} has no counterpart in the world UNet: this LoRA was trained for "
                "another base model", lora.path)
        weight = modules[path].weight
        if math.prod(module.weight_shape) != weight.numel():
            raise BaseMismatchError(
                f"LoRA module {module.name!r} updates a {tuple(module.weight_shape)} weight but the world UNet's "
                f"{path} is {tuple(weight.shape)}: this LoRA was trained for another base model", lora.path)
        targets[name] = (path, weight)
    return targets


def lora_deltas(unet: torch.nn.Module, lora: LoraFile) -> dict[str, torch.Tensor]:
    """{module path: dense weight update} of `lora` on the world UNet (`lora_targets` checks that it fits)."""
    return {path: lora.modules[name].delta().reshape(weight.shape)
            for name, (path, weight) in lora_targets(unet, lora).items()}


def apply_lora(unet: UNet2DConditionModel, lora: str | Path | LoraFile, scale: float = 1.0) -> UNet2DConditionModel:
    """A copy of `unet` with `lora` (a file in any format `diffmem.formats.lora.read_lora` reads, or an already
    read `LoraFile`) merged into its weights at `scale` (`W + scale * dW`); `unet` itself is untouched."""
    lora = lora if isinstance(lora, LoraFile) else read_lora(lora)
    merged = copy.deepcopy(unet)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for path, delta in lora_deltas(merged, lora).items():
            modules[path].weight += scale * delta.to(modules[path].weight.dtype)
    return merged.eval().requires_grad_(False)
