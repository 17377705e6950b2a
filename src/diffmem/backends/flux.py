"""Flux (Black Forest Labs' rectified-flow transformer) behind the interfaces of diffmem's UNet sampling loop.

How the loop's definitions carry over (decided here, documented in docs/audit.md):
- The model works on unpacked latents [C, H, W]; `FluxDenoiser` packs them into 2x2 patches, builds the image and
  text position ids, and unpacks the predicted velocity, exactly as `FluxPipeline.__call__` does.
- Flux-dev is guidance-distilled: the guidance strength is an *input* of the transformer (`guidance_embeds`), not a
  mix of two predictions. `FluxDenoiser.guidance` carries it (3.5, FluxPipeline's default). The loop's
  classifier-free mix then runs at scale 1.0, which returns the conditional velocity alone, so the images are
  Flux's own; the unconditional (empty-prompt) velocity is still computed, and Wen et al.'s statistic is the norm
  of the conditional minus unconditional velocity.
- The scheduler is the pipeline's flow-matching Euler scheduler with Flux's sigmas `linspace(1, 1/steps)` and the
  resolution-dependent shift `mu` (`calculate_shift`); the transformer sees `timestep / 1000`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from diffmem.backends.base import Backend, Conditioning, batched, mse_per_sample

#: FluxPipeline's default distilled guidance strength.
FLUX_GUIDANCE = 3.5


class FluxDenoiser(torch.nn.Module):
    """A Flux transformer called like a diffusers UNet on unpacked latents [B, C, H, W].

    `added_cond_kwargs` carries `pooled_projections` (the CLIP pooled embedding) per sample."""

    def __init__(self, transformer: torch.nn.Module, guidance: float = FLUX_GUIDANCE) -> None:
        super().__init__()
        self.transformer = transformer
        self.guidance = guidance
        self.config = transformer.config

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: Mapping[str, torch.Tensor] | None = None) -> SimpleNamespace:
        batch, channels, height, width = sample.shape
        packed = FluxPipeline._pack_latents(sample, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, sample.device, sample.dtype)
        text_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=sample.device, dtype=sample.dtype)
        timestep = torch.as_tensor(timestep, device=sample.device, dtype=sample.dtype).expand(batch)
        guidance = None
        if self.config.guidance_embeds:
            guidance = torch.full((batch,), self.guidance, device=sample.device, dtype=torch.float32)
        pooled = (added_cond_kwargs or {})["pooled_projections"]
        velocity = self.transformer(hidden_states=packed, timestep=timestep / 1000, guidance=guidance,
                                    pooled_projections=pooled, encoder_hidden_states=encoder_hidden_states,
                                    txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        # vae_scale_factor 1 here: the latents are already at latent resolution.
        return SimpleNamespace(sample=FluxPipeline._unpack_latents(velocity, height, width, 1))


class FlowMatchingSampler:
    """A flow-matching Euler scheduler behind the DDIM-style interface (`set_timesteps`, `timesteps`,
    `init_noise_sigma`, `scale_model_input`, `step`) with Flux's sigmas and shift for a given latent size."""

    init_noise_sigma = 1.0

    def __init__(self, scheduler, latent_height: int, latent_width: int) -> None:
        self.scheduler = copy.deepcopy(scheduler)
        config = self.scheduler.config
        sequence = (latent_height // 2) * (latent_width // 2)
        self.mu = calculate_shift(sequence, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                  config.get("base_shift", 0.5), config.get("max_shift", 1.15))

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        self.scheduler.set_timesteps(sigmas=sigmas, mu=self.mu, device=device)
        self.timesteps = self.scheduler.timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(prev_sample=self.scheduler.step(model_output, timestep, sample).prev_sample)


def flux_decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Unpacked Flux latents -> images in [0, 1] (the VAE's scaling and shift undone, as FluxPipeline decodes)."""
    config = vae.config
    parameter = next(vae.parameters())
    scaled = latents.to(parameter.device, parameter.dtype) / config.scaling_factor + config.shift_factor
    with torch.no_grad():
        images = vae.decode(scaled).sample.float().cpu()
    return ((images + 1) / 2).clamp(0, 1)


def flux_encode_images(vae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> unpacked Flux latents (the posterior's mean, scaled and shifted as Flux trains)."""
    config = vae.config
    parameter = next(vae.parameters())
    with torch.no_grad():
        latents = vae.encode(images.to(parameter.device, parameter.dtype) * 2 - 1).latent_dist.mean.float()
    return (latents - config.shift_factor) * config.scaling_factor


def shifted_sigmas(u: torch.Tensor, mu: float) -> torch.Tensor:
    """Flux's resolution-dependent time shift of uniform noise levels u in (0, 1): e^mu / (e^mu + 1/u - 1), the
    same shift its sampling schedule uses (`FlowMatchEulerDiscreteScheduler.time_shift`, exponential)."""
    return math.exp(mu) / (math.exp(mu) + (1 / u - 1))


class FluxBackend(Backend):
    """A loaded `FluxPipeline`: conditioning is T5's hidden states plus the pooled CLIP embedding
    (`pooled_projections`); the denoiser is `FluxDenoiser`; sampling is the flow-matching Euler scheduler with
    distilled guidance inside the model and the loop's own mix at 1.0.

    The denoising loss is flow matching (Lipman et al. 2023; Esser et al. 2024, "Scaling Rectified Flow
    Transformers"): x_t = (1 - s) x_0 + s * noise with target velocity noise - x_0, s drawn uniformly and shifted
    as sampling shifts it at this resolution. NeMo's value layers are the text stream's value projections of the
    joint-attention blocks (`transformer_blocks.*.attn.add_v_proj`); the single-stream blocks fuse text and image
    into one projection and are left out. Wanda prunes the image stream's feed-forward output (`ff.net.2`)."""

    family = "flux"
    default_steps, default_guidance = 28, 1.0
    value_blocks = ("transformer_blocks",)

    def __init__(self, pipe, name: str, guidance: float = FLUX_GUIDANCE) -> None:
        self.pipe, self.name = pipe, name
        # The VAE's own sample size is the resolution the model was trained at (1024 for FLUX.1); FluxPipeline's
        # default otherwise.
        size = getattr(pipe.vae.config, "sample_size", None) or pipe.default_sample_size * pipe.vae_scale_factor
        size = size[0] if isinstance(size, list | tuple) else size
        latent = 2 * (size // (pipe.vae_scale_factor * 2))
        self.denoiser = FluxDenoiser(pipe.transformer, guidance)
        self.scheduler = FlowMatchingSampler(pipe.scheduler, latent, latent)
        self.sample_shape = (pipe.transformer.config.in_channels // 4, latent, latent)
        self.image_size = (latent * pipe.vae_scale_factor,) * 2

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        embeds, pooled, _ = self.pipe.encode_prompt(list(prompts), prompt_2=None, device=self.device,
                                                    num_images_per_prompt=1)
        return Conditioning(embeds, {"pooled_projections": pooled})

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return batched(lambda chunk: flux_decode(self.pipe.vae, chunk), samples)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return batched(lambda chunk: flux_encode_images(self.pipe.vae, chunk), images.float())

    def denoising_loss(self, x0: torch.Tensor, conditioning: Conditioning, generator: torch.Generator | None = None,
                       reduce: bool = True) -> torch.Tensor:
        x0 = x0.float().cpu()
        noise = torch.randn(x0.shape, generator=generator)
        u = torch.rand((x0.shape[0],), generator=generator).clamp(1e-4, 1 - 1e-4)
        sigma = shifted_sigmas(u, self.scheduler.mu).view(-1, 1, 1, 1)
        noisy = (1 - sigma) * x0 + sigma * noise
        per_sample = mse_per_sample(self.predict(noisy, sigma.flatten() * 1000, conditioning),
                                    (noise - x0).to(self.device))
        return per_sample.mean() if reduce else per_sample

    def value_layers(self, blocks: Sequence[str] | None = None) -> dict[str, torch.nn.Linear]:
        blocks = tuple(blocks or self.value_blocks)
        # Paths start with "transformer." (the FluxDenoiser wrapper); the block is the transformer's top level.
        return self.linear_layers(lambda path: path.endswith("attn.add_v_proj") and path.split(".")[1] in blocks)
