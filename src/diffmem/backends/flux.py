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

What Flux shares with SD3 (the sampler's interface, the VAE's scale and shift, the flow-matching loss, the
joint-attention value layers) is in `diffmem.backends.flow_matching`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from diffmem.backends.base import Conditioning
from diffmem.backends.flow_matching import FlowMatchingBackend, FlowMatchingSampler

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


def flux_sampler(scheduler, latent_height: int, latent_width: int) -> FlowMatchingSampler:
    """The flow-matching sampler as FluxPipeline sets it up: sigmas `linspace(1, 1/steps)` and the shift `mu` of
    the packed sequence length (2 x 2 latent patches) at this latent size."""
    config = scheduler.config
    sequence = (latent_height // 2) * (latent_width // 2)
    mu = calculate_shift(sequence, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    return FlowMatchingSampler(scheduler, mu=mu, linear_sigmas=True)


class FluxBackend(FlowMatchingBackend):
    """A loaded `FluxPipeline`: conditioning is T5's hidden states plus the pooled CLIP embedding
    (`pooled_projections`); the denoiser is `FluxDenoiser`; sampling is the flow-matching Euler scheduler with
    distilled guidance inside the model and the loop's own mix at 1.0.

    The denoising loss (flow matching, Lipman et al. 2023; s shifted by `mu` of this resolution), decoding and the
    layers are `FlowMatchingBackend`'s. NeMo's value layers are the text stream's value projections of the
    double-stream blocks (`transformer_blocks.*.attn.add_v_proj`); the single-stream blocks fuse text and image
    into one projection and are left out. Wanda prunes the image stream's feed-forward output (`ff.net.2`)."""

    family = "flux"
    default_steps, default_guidance = 28, 1.0

    def __init__(self, pipe, name: str, guidance: float = FLUX_GUIDANCE) -> None:
        self.pipe, self.name = pipe, name
        # The VAE's own sample size is the resolution the model was trained at (1024 for FLUX.1); FluxPipeline's
        # default otherwise.
        size = getattr(pipe.vae.config, "sample_size", None) or pipe.default_sample_size * pipe.vae_scale_factor
        size = size[0] if isinstance(size, list | tuple) else size
        latent = 2 * (size // (pipe.vae_scale_factor * 2))
        self.denoiser = FluxDenoiser(pipe.transformer, guidance)
        self.scheduler = flux_sampler(pipe.scheduler, latent, latent)
        self.sample_shape = (pipe.transformer.config.in_channels // 4, latent, latent)
        self.image_size = (latent * pipe.vae_scale_factor,) * 2

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        embeds, pooled, _ = self.pipe.encode_prompt(list(prompts), prompt_2=None, device=self.device,
                                                    num_images_per_prompt=1)
        return Conditioning(embeds, {"pooled_projections": pooled})
