"""The world's denoiser: a small diffusers `UNet2DConditionModel` with Stable Diffusion's block layout.

Module names (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`, `...attn2...`, `...ff.net.0.proj`,
`proj_in`, `proj_out`, `resnets`) are the ones SD 1.x LoRAs target, so every LoRA tool in diffmem sees the same
key names on this model as on a real SD UNet, only with smaller matrices.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from diffmem.errors import BadWeightsError, DiffmemError
from diffmem.formats.safetensors_io import load_file, sha256_file
from diffmem.world.settings import BASE_FILE, UNetConfig, assets_dir

#: sha256 of the committed base weights, `assets/base.safetensors` (checked by `load_base`).
BASE_SHA256 = "328f6ffbbe7967438f4c22332290c93e1c343b2d6cb011c486ac9617458a108e"


def build_unet(config: UNetConfig | None = None) -> UNet2DConditionModel:
    """A freshly initialised world UNet (deterministic only under a fixed `torch.manual_seed`)."""
    config = config or UNetConfig()
    return UNet2DConditionModel(
        sample_size=config.sample_size,
        in_channels=config.channels,
        out_channels=config.channels,
        down_block_types=config.down_block_types,
        up_block_types=config.up_block_types,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        attention_head_dim=config.attention_head_dim,
        cross_attention_dim=config.cross_attention_dim,
        norm_num_groups=config.norm_num_groups,
    )


def count_parameters(unet: torch.nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in unet.parameters())


def load_unet_file(path: str | Path, expected_sha256: str | None = None) -> UNet2DConditionModel:
    """Load a world UNet saved by `save_unet` (config in the safetensors metadata), in float32.

    `expected_sha256` pins the file: a different file is refused with a `BadWeightsError`.
    """
    path = Path(path)
    if expected_sha256 is not None:
        actual = sha256_file(path) if path.exists() else None
        if actual != expected_sha256:
            raise BadWeightsError(
                f"sha256 is {actual}, expected {expected_sha256}: the committed world weights were changed or "
                "damaged; restore them with `git checkout` or retrain with `diffmem world train-base`",
                path,
            )
    tensors, metadata = load_file(path)
    if "diffmem_unet_config" not in metadata:
        raise DiffmemError("has no `diffmem_unet_config` metadata: not a world UNet saved by diffmem", path)
    config = UNetConfig.from_dict(json.loads(metadata["diffmem_unet_config"]))
    unet = build_unet(config)
    missing, unexpected = unet.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if missing or unexpected:
        raise DiffmemError(
            f"does not match the world UNet: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})",
            path,
        )
    return unet.eval().requires_grad_(False)


def unet_tensors(unet: UNet2DConditionModel, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """State dict of a world UNet cast to `dtype`, ready for safetensors."""
    return {k: v.detach().to(dtype).contiguous() for k, v in unet.state_dict().items()}


def unet_metadata(config: UNetConfig, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Metadata stored with saved world UNets (the config that `load_unet_file` rebuilds from)."""
    return {"diffmem_unet_config": config.to_json(), "format": "pt", **(extra or {})}


def config_of(unet: UNet2DConditionModel) -> UNetConfig:
    """The `UNetConfig` a diffusers UNet built by `build_unet` corresponds to."""
    c = unet.config
    return UNetConfig(
        sample_size=c.sample_size,
        channels=c.in_channels,
        block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block,
        attention_head_dim=c.attention_head_dim,
        cross_attention_dim=c.cross_attention_dim,
        norm_num_groups=c.norm_num_groups,
        down_block_types=tuple(c.down_block_types),
        up_block_types=tuple(c.up_block_types),
    )


def load_base() -> UNet2DConditionModel:
    """The committed base world UNet (float32, eval mode, frozen), sha256-checked."""
    return load_unet_file(assets_dir() / BASE_FILE, expected_sha256=BASE_SHA256)
