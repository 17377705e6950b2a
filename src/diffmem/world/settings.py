"""The world's settings, its UNet's architecture and where its committed weights lie, in a module that imports no
model library (the sampling settings of every study refer to these, `diffmem.evaluation.sampling`; the filter finds
the base here; `diffmem world --help` shows the architecture's defaults without loading diffusers)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

#: 25 DDIM steps (where the world's samples stop changing visibly) and guidance 3 (a small pixel model needs less
#: than Stable Diffusion's 7.5). Every world default refers to these two.
WORLD_STEPS, WORLD_GUIDANCE = 25, 3.0

#: The committed base UNet's file name inside `assets_dir()`.
BASE_FILE = "base.safetensors"


def assets_dir() -> Path:
    """Folder of the committed world weights inside the installed package."""
    return Path(str(resources.files("diffmem.world") / "assets"))


@dataclass(frozen=True)
class UNetConfig:
    """Shape of the world's UNet.

    Stable Diffusion 1.x (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models")
    stacks `CrossAttnDownBlock2D` blocks and one attention-free `DownBlock2D`, mirrored by `UpBlock2D` and
    `CrossAttnUpBlock2D` on the way up, with a cross-attention mid block. The world keeps these block classes
    (so LoRA key names are SD's: `down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k`, ...) on three
    resolutions, 32, 16 and 8 pixels. Unlike SD, which has attention everywhere but its coarsest level, the
    world has it at 16 and 8 only (plain `DownBlock2D`/`UpBlock2D` at 32): self-attention over 1024 tokens
    at 32 x 32 took 60% of a training step on this CPU (measured with the torch profiler).

    Attributes:
        sample_size: image side in pixels; the world is 32 x 32 RGB.
        channels: 3, the world diffuses RGB pixels directly (no VAE: there is no pretrained one here).
        block_out_channels: widths per resolution; (32, 64, 96) gives about 3 M parameters and trains at about
            1.3 CPU-seconds per batch-16 step (see docs/world.md); width is cheap at the coarse resolutions.
        layers_per_block: resnet (+ transformer) layers per down block (SD uses 2; one keeps the world fast).
        attention_head_dim: channels per attention head (diffusers' `attention_head_dim`).
        cross_attention_dim: width of the text context, 384 = all-MiniLM-L6-v2 hidden size.
        norm_num_groups: GroupNorm groups; SD uses 32, which is too many for 32-channel blocks.
        down_block_types / up_block_types: SD's block classes, kept so LoRA key names match SD's.
    """

    sample_size: int = 32
    channels: int = 3
    block_out_channels: tuple[int, ...] = (32, 64, 96)
    layers_per_block: int = 1
    attention_head_dim: int = 16
    cross_attention_dim: int = 384
    norm_num_groups: int = 16
    down_block_types: tuple[str, ...] = field(
        default=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    )
    up_block_types: tuple[str, ...] = field(default=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> UNetConfig:
        tuples = {"block_out_channels", "down_block_types", "up_block_types"}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in values.items()})
