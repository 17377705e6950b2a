"""Wen et al.'s data-free memorization detector (ICLR 2024, "Detecting, explaining, and mitigating
memorization in diffusion models").

A memorized prompt pulls the sample towards one image from the first steps on, so the text-conditional part
of the noise prediction, `eps(x_t, c) - eps(x_t, empty)`, is unusually large. The detection score is its L2
norm averaged over the sampling steps (and over a few generations per prompt). No training data is needed.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch


def conditional_difference_norms(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm of `eps(x_t, c) - eps(x_t, empty)` over all non-batch dims, [N] (Wen et al. 2024)."""
    if eps_cond.shape != eps_uncond.shape:
        raise ValueError(f"prediction shapes differ: {tuple(eps_cond.shape)} vs {tuple(eps_uncond.shape)}")
    difference = (eps_cond.detach().to(torch.float64) - eps_uncond.detach().to(torch.float64))
    return torch.linalg.vector_norm(difference.reshape(difference.shape[0], -1), dim=1)


def wen_score(step_norms: torch.Tensor) -> torch.Tensor:
    """Detection score: mean over sampling steps (dim 0) of the conditional-difference norms (Wen et al. 2024)."""
    if step_norms.ndim < 1 or step_norms.shape[0] == 0:
        raise ValueError(f"step_norms must be [T, ...] with T >= 1, got {tuple(step_norms.shape)}")
    return step_norms.mean(dim=0)


@dataclass(frozen=True)
class WenConfig:
    """Sampling settings for the detector (Wen et al. 2024, sec. 4).

    Args:
        num_inference_steps: DDIM steps; 50 as in Wen et al. for Stable Diffusion. The score averages over all
            of them; Wen et al. show the first step alone already separates well (`WenTrace.first_step`).
        guidance_scale: classifier-free guidance used for the trajectory, 7.5 as in Wen et al. for SD.
        generations: samples per prompt whose scores are averaged, 4 as in Wen et al.
        batch_size: samples per UNet call (the conditional and unconditional halves double it).
    """

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    generations: int = 4
    batch_size: int = 32


@dataclass(frozen=True)
class WenTrace:
    """Per-step norms [T, P, G] and final samples [P, G, C, H, W] in the UNet's space (pixels in [-1, 1] for
    a pixel model, latents for a latent model) of a guided sampling run."""

    step_norms: torch.Tensor
    samples: torch.Tensor

    @property
    def per_generation(self) -> torch.Tensor:
        """Score of every generation, [P, G]."""
        return wen_score(self.step_norms)

    @property
    def scores(self) -> torch.Tensor:
        """Score of every prompt (mean over steps and generations), [P]; higher = more likely memorized."""
        return self.per_generation.mean(dim=1)

    @property
    def first_step(self) -> torch.Tensor:
        """Score of every prompt from the first sampling step only, [P] (Wen et al. 2024, fig. 2)."""
        return self.step_norms[0].mean(dim=1)


@torch.no_grad()
def sample_with_wen_scores(
    unet: torch.nn.Module,
    scheduler,
    prompt_embeds: torch.Tensor,
    empty_embeds: torch.Tensor,
    config: WenConfig = WenConfig(),
    generator: torch.Generator | None = None,
    sample_shape: tuple[int, int, int] | None = None,
    step_kwargs: Mapping[str, object] | None = None,
    added_cond: Mapping[str, torch.Tensor] | None = None,
    empty_added_cond: Mapping[str, torch.Tensor] | None = None,
) -> WenTrace:
    """Guided sampling that records `||eps(x_t, c) - eps(x_t, empty)||` at every step (Wen et al. 2024).

    Works with any diffusers `UNet2DConditionModel` whose forward takes `(sample, timestep,
    encoder_hidden_states)` (SD 1.x/2.x and the diffmem world; SDXL with `added_cond`) and
    any diffusers scheduler (pass a `DDIMScheduler` to follow Wen et al.; it is copied, not modified).

    Args:
        prompt_embeds: text-encoder output per prompt, [P, L, D].
        empty_embeds: encoding of the empty prompt, [1, L, D] (or [P, L, D]).
        generator: CPU generator for the initial noise, so results do not depend on the device.
        sample_shape: [C, H, W] of the UNet input; defaults to the UNet config's channels and sample size.
        step_kwargs: extra arguments of `scheduler.step`, e.g. `{"use_clipped_model_output": True}` for a sampler
            that recomputes the noise from the clipped x0 (as the diffmem world's DDIM does).
        added_cond, empty_added_cond: SDXL's added conditioning (`{"text_embeds": pooled [P, D], "time_ids":
            [P, 6]}`) of the prompts and of the empty prompt ([1, ...]), passed to the UNet as
            `added_cond_kwargs`; None for UNets without added conditioning.
    """
    if prompt_embeds.ndim != 3:
        raise ValueError(f"prompt_embeds must be [P, L, D], got {tuple(prompt_embeds.shape)}")
    if empty_embeds.ndim != 3 or empty_embeds.shape[1:] != prompt_embeds.shape[1:]:
        raise ValueError(
            f"empty_embeds must be [1, L, D] matching prompt_embeds {tuple(prompt_embeds.shape)}, "
            f"got {tuple(empty_embeds.shape)}"
        )
    if empty_embeds.shape[0] not in (1, prompt_embeds.shape[0]):
        raise ValueError(f"empty_embeds must hold 1 or {prompt_embeds.shape[0]} rows, got {empty_embeds.shape[0]}")
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    if sample_shape is None:
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        sample_shape = (unet.config.in_channels, *size)
    prompts, generations = prompt_embeds.shape[0], config.generations
    conds = prompt_embeds.repeat_interleave(generations, dim=0)
    empties = empty_embeds.expand(prompts, -1, -1).repeat_interleave(generations, dim=0)
    noise = torch.randn((prompts * generations, *sample_shape), generator=generator, dtype=torch.float32)
    if (added_cond is None) != (empty_added_cond is None):
        raise ValueError("give added_cond and empty_added_cond together")
    added = empty_added = None
    if added_cond is not None:
        added = {k: v.repeat_interleave(generations, dim=0) for k, v in added_cond.items()}
        empty_added = {k: empty_added_cond[k].expand(prompts, *v.shape[1:]).repeat_interleave(generations, dim=0)
                       for k, v in added_cond.items()}

    norms, samples = [], []
    for start in range(0, prompts * generations, config.batch_size):
        stop = min(start + config.batch_size, prompts * generations)
        unet_kwargs = {}
        if added is not None:
            unet_kwargs["added_cond_kwargs"] = {
                k: torch.cat([empty_added[k][start:stop], added[k][start:stop]]).to(device, dtype) for k in added
            }
        chunk_norms, chunk_samples = guided_sampling_chunk(
            unet, copy.deepcopy(scheduler), noise[start:stop].to(device, dtype),
            conds[start:stop].to(device, dtype), empties[start:stop].to(device, dtype), config, step_kwargs or {},
            unet_kwargs,
        )
        norms.append(chunk_norms)
        samples.append(chunk_samples)
    step_norms = torch.cat(norms, dim=1).reshape(-1, prompts, generations)
    all_samples = torch.cat(samples).reshape(prompts, generations, *sample_shape)
    return WenTrace(step_norms=step_norms, samples=all_samples)


def guided_sampling_chunk(
    unet: torch.nn.Module,
    scheduler,
    noise: torch.Tensor,
    conds: torch.Tensor,
    empties: torch.Tensor,
    config: WenConfig,
    step_kwargs: Mapping[str, object],
    unet_kwargs: Mapping[str, object] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of classifier-free-guided sampling: (norms [T, B], final samples [B, C, H, W]). `unet_kwargs`
    (e.g. SDXL's `added_cond_kwargs`, unconditional half first) go to every UNet call."""
    scheduler.set_timesteps(config.num_inference_steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    context = torch.cat([empties, conds])
    norms = []
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([x, x]), t)
        eps_uncond, eps_cond = unet(model_in, t, encoder_hidden_states=context, **(unet_kwargs or {})).sample.chunk(2)
        norms.append(conditional_difference_norms(eps_cond, eps_uncond).cpu())
        guided = eps_uncond + config.guidance_scale * (eps_cond - eps_uncond)
        x = scheduler.step(guided, t, x, **step_kwargs).prev_sample
    return torch.stack(norms), x.float().cpu()
