"""The embedded world (diffmem's tiny pixel-space UNet and its fixed text encoder) as a `Backend`.

Its sampling and loss are the world's own functions (`diffmem.world.diffusion`), so every method gives on the world
exactly the numbers it gave before backends existed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import UNet2DConditionModel

from diffmem.backends.base import Backend, Conditioning
from diffmem.world.diffusion import (
    TRAIN_TIMESTEPS,
    WORLD_GUIDANCE,
    WORLD_STEPS,
    add_noise,
    ddim_step,
    ddim_timesteps,
    from_model_range,
    generate_from_context,
    to_model_range,
    training_loss_x0,
)
from diffmem.world.lora import apply_lora
from diffmem.world.model import load_base, load_unet_file
from diffmem.world.text import encode_prompts


class WorldDDIMScheduler:
    """The world's own DDIM sampler (`diffmem.world.diffusion`: its timesteps, its clipped eta = 0 update) behind
    the part of the diffusers scheduler interface that the sampling loops use, so sampled images are exactly those
    of `diffmem.world.generate`."""

    init_noise_sigma = 1.0

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        steps = ddim_timesteps(num_inference_steps)
        self.timesteps = torch.tensor(steps, device=device)
        self.previous = dict(zip(steps, [*steps[1:], -1]))

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | int, sample: torch.Tensor) -> SimpleNamespace:
        t = int(timestep)
        return SimpleNamespace(prev_sample=ddim_step(sample, model_output, t, self.previous[t]))


class WorldBackend(Backend):
    """A world UNet (the committed base or a world UNet file, any LoRA merged) with the world's text encoder."""

    family = "world"
    default_steps, default_guidance = WORLD_STEPS, WORLD_GUIDANCE

    def __init__(self, unet: UNet2DConditionModel, name: str = "world base") -> None:
        self.denoiser = unet
        self.name = name
        self.scheduler = WorldDDIMScheduler()
        size = unet.config.sample_size
        self.sample_shape = (unet.config.in_channels, size, size)
        self.image_size = (size, size)
        # The world's attention sits in its up blocks too (docs/pruning.md), so NeMo searches every block.
        self.value_blocks = ("down_blocks", "mid_block", "up_blocks")

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        return Conditioning(encode_prompts(list(prompts)))

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return from_model_range(samples.float().cpu())

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return to_model_range(images.float())

    def training_pair(self, x0: torch.Tensor, noise: torch.Tensor,
                      u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        timesteps = (u * TRAIN_TIMESTEPS).long().clamp(0, TRAIN_TIMESTEPS - 1)
        return add_noise(x0, noise, timesteps), timesteps, noise

    def denoising_loss(self, x0: torch.Tensor, conditioning: Conditioning, generator: torch.Generator | None = None,
                       reduce: bool = True) -> torch.Tensor:
        # The world's own loss (integer timesteps drawn directly), so its attacks and fine-tunes are unchanged.
        return training_loss_x0(self.denoiser, x0, conditioning.context, generator, reduce)

    @torch.no_grad()
    def generate(self, conditioning: Conditioning, seeds: Sequence[int], steps: int | None = None,
                 guidance: float | None = None, batch_size: int = 64) -> torch.Tensor:
        # The world's own sampler, batch for batch as `diffmem.world.generate` draws it.
        return generate_from_context(self.denoiser, conditioning.context, seeds, steps or self.default_steps,
                                     self.default_guidance if guidance is None else guidance, batch_size)


def world_backend(base: str | Path | None = None, lora: str | Path | None = None, device: str = "cpu") -> WorldBackend:
    """The world (committed base when `base` is None or "world", else a world UNet file), with an optional LoRA in
    any format diffmem reads merged in."""
    base = None if base is None or str(base) == "world" else Path(base)
    unet = load_base() if base is None else load_unet_file(base)
    name = "world base" if base is None else base.name
    if lora is not None:
        unet = apply_lora(unet, lora)
        name += f" + {Path(lora).name}"
    return WorldBackend(unet.to(device).eval(), name)
