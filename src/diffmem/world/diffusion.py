"""Diffusion maths of the world: the noise schedule, the DDPM training loss, DDIM sampling with classifier-free
guidance, and a deterministic held-out denoising loss.

Images live in [0, 1] outside this module and in [-1, 1] inside it. The UNet predicts the added noise epsilon.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from diffmem.formats.lora import LoraFile
from diffmem.world.settings import WORLD_GUIDANCE, WORLD_STEPS
from diffmem.world.text import encode_prompts

#: Number of diffusion timesteps (DDPM, Ho et al. 2020).
TRAIN_TIMESTEPS = 1000


def noise_scheduler() -> DDPMScheduler:
    """The world's training schedule: DDPM (Ho et al. 2020) with 1000 steps and the cosine alpha-bar of
    Nichol & Dhariwal 2021 (eq. 17, betas capped at 0.999), epsilon prediction."""
    return DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2")


ALPHAS_CUMPROD = noise_scheduler().alphas_cumprod.float()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4)."""
    abar = ALPHAS_CUMPROD.to(x0.device)[timesteps].view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images to the model's [-1, 1]."""
    return images * 2 - 1


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """The model's [-1, 1] back to [0, 1] images, clipped."""
    return ((x + 1) / 2).clamp(0, 1)


def predict_noise(unet: UNet2DConditionModel, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """epsilon_theta(x_t, t, c) for a batch."""
    return unet(x, timesteps, encoder_hidden_states=context).sample


def training_loss(
    unet: UNet2DConditionModel,
    images: torch.Tensor,
    context: torch.Tensor,
    generator: torch.Generator | None = None,
    reduce: bool = True,
    noise_offset: float = 0.0,
) -> torch.Tensor:
    """Simple DDPM loss || eps - eps_theta(x_t, t, c) ||^2 with t uniform (Ho et al. 2020, eq. 14).

    `noise_offset` adds `noise_offset * N(0, 1)` per image and channel to eps (Guttenberg 2023, "Diffusion with
    offset noise"; kohya's `--noise_offset`), which teaches the model to set each image's mean colour itself
    instead of taking it from the random mean of the starting noise.
    """
    return training_loss_x0(unet, to_model_range(images), context, generator, reduce, noise_offset)


def training_loss_x0(
    unet: UNet2DConditionModel,
    x0: torch.Tensor,
    context: torch.Tensor,
    generator: torch.Generator | None = None,
    reduce: bool = True,
    noise_offset: float = 0.0,
) -> torch.Tensor:
    """`training_loss` on clean samples x0 already in the model's [-1, 1]."""
    noise = torch.randn(x0.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*x0.shape[:2], 1, 1), generator=generator)
    timesteps = torch.randint(0, TRAIN_TIMESTEPS, (x0.shape[0],), generator=generator)
    error = (predict_noise(unet, add_noise(x0, noise, timesteps), timesteps, context) - noise) ** 2
    per_image = error.mean(dim=(1, 2, 3))
    return per_image.mean() if reduce else per_image


@torch.no_grad()
def denoising_loss(
    unet: UNet2DConditionModel,
    images: torch.Tensor,
    captions: Sequence[str],
    seed: int = 0,
    timesteps_per_image: int = 8,
    batch_size: int = 64,
) -> float:
    """Mean held-out denoising loss || eps - eps_theta(x_t, t, c) ||^2 of [0, 1] `images` with their captions, at
    noise fixed by `seed` and stratified timesteps, so two models are compared on the same noisy inputs
    (`diffmem.metrics.quality.denoising_loss` on the world's schedule and text encoder)."""
    from diffmem.metrics.quality import denoising_loss as scheduler_denoising_loss

    return scheduler_denoising_loss(
        unet, noise_scheduler(), to_model_range(images.float()), encode_prompts(list(captions)),
        timesteps_per_sample=timesteps_per_image, seed=seed, batch_size=batch_size,
    )


def ddim_timesteps(steps: int) -> list[int]:
    """DDIM timesteps from the last training timestep down, evenly spaced ("trailing" spacing, Lin et al. 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2).

    The first step then sees the noise level at which the pure starting noise really sits (t = 999, almost no
    signal left by the cosine schedule) rather than t = 960 of "leading" spacing.
    """
    return [round(TRAIN_TIMESTEPS - 1 - i * TRAIN_TIMESTEPS / steps) for i in range(steps)]


def ddim_step(x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
    """Deterministic DDIM update x_t -> x_{t_prev} (eta = 0; Song et al. 2021, eq. 12), clipping x0 to [-1, 1]."""
    abar = ALPHAS_CUMPROD[t]
    abar_prev = ALPHAS_CUMPROD[t_prev] if t_prev >= 0 else torch.tensor(1.0)
    x0 = ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
    eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    return abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps


def guided_noise(
    unet: UNet2DConditionModel, x: torch.Tensor, t: int, context: torch.Tensor, empty: torch.Tensor, guidance: float
) -> torch.Tensor:
    """Classifier-free guidance: eps_u + w (eps_c - eps_u) (Ho & Salimans 2022)."""
    steps = torch.full((x.shape[0],), t, dtype=torch.long)
    if guidance == 1.0:
        return predict_noise(unet, x, steps, context)
    both = predict_noise(unet, torch.cat([x, x]), torch.cat([steps, steps]), torch.cat([context, empty]))
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance * (conditional - unconditional)


def initial_noise(seeds: Sequence[int], channels: int = 3, size: int = 32) -> torch.Tensor:
    """Starting noise x_T, one independent generator per seed, so an image depends only on its own seed."""
    return torch.stack([torch.randn((channels, size, size), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def generate(
    unet: UNet2DConditionModel,
    prompts: Sequence[str],
    seeds: Sequence[int] | None = None,
    steps: int = WORLD_STEPS,
    guidance: float = WORLD_GUIDANCE,
    lora: str | Path | LoraFile | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Images [N, 3, 32, 32] in [0, 1] for `prompts`, DDIM sampling with classifier-free guidance.

    Deterministic per (prompt, seed): `seeds[i]` alone fixes image i (default seeds 0..N-1).
    `lora` (a LoRA file in any format `diffmem.formats.lora.read_lora` reads, or a `LoraFile`) is merged into a
    copy of `unet` first (`diffmem.world.lora.apply_lora`).
    """
    if lora is not None:
        from diffmem.world.lora import apply_lora

        unet = apply_lora(unet, lora)
    return generate_from_context(unet, encode_prompts(list(prompts)), seeds, steps, guidance, batch_size)


@torch.no_grad()
def generate_from_context(
    unet: UNet2DConditionModel,
    context: torch.Tensor,
    seeds: Sequence[int] | None = None,
    steps: int = WORLD_STEPS,
    guidance: float = WORLD_GUIDANCE,
    batch_size: int = 64,
) -> torch.Tensor:
    """Images [N, 3, 32, 32] in [0, 1] from cross-attention contexts [N, tokens, dim] (text embeddings, possibly
    optimised ones that no prompt produces), DDIM sampling with classifier-free guidance against the empty prompt.

    Deterministic per (context, seed): `seeds[i]` alone fixes image i (default seeds 0..N-1).
    """
    seeds = list(range(len(context))) if seeds is None else list(seeds)
    if len(seeds) != len(context):
        raise ValueError(f"got {len(context)} contexts but {len(seeds)} seeds")
    was_training = unet.training
    unet.eval()
    size = unet.config.sample_size
    channels = unet.config.in_channels
    out = []
    schedule = ddim_timesteps(steps)
    for start in range(0, len(context), batch_size):
        chunk = context[start : start + batch_size].detach()
        empty = encode_prompts([""]).expand(len(chunk), -1, -1)
        x = initial_noise(seeds[start : start + batch_size], channels, size)
        for i, t in enumerate(schedule):
            t_prev = schedule[i + 1] if i + 1 < len(schedule) else -1
            x = ddim_step(x, guided_noise(unet, x, t, chunk, empty, guidance), t, t_prev)
        out.append(from_model_range(x))
    unet.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, channels, size, size)
