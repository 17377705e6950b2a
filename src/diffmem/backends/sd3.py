"""Stable Diffusion 3 / 3.5 (Stability AI's MMDiT, `StableDiffusion3Pipeline`) as a `Backend`.

How the sampling loop's definitions carry over (decided here, documented in docs/backends.md):
- Conditioning is what `StableDiffusion3Pipeline.encode_prompt` builds: the penultimate hidden states of CLIP-L and
  CLIP-G side by side, zero-padded to T5's width and followed by T5's states (the joint-attention text stream),
  plus both CLIPs' projected pooled embeddings side by side (`pooled_projections`). The empty prompt is encoded,
  not zeroed, as the pipeline encodes its negative prompt.
- `SD3Denoiser` calls the transformer like a UNet on latents [C, H, W]: SD3's transformer patchifies inside, so
  nothing is packed (unlike Flux), and it takes the scheduler's timestep (sigma * 1000) as it is.
- SD3 is not guidance-distilled: classifier-free guidance mixes two predictions, 7.0 by default, 28 steps, as
  the pipeline's defaults. The sampler is the pipeline's flow-matching Euler scheduler with its own
  `set_timesteps(steps)` spacing and SD3's static `shift` (3.0), so the images are the pipeline's own.
- The loss, decoding and layers are the flow-matching ones (`diffmem.backends.flow_matching`): s uniform, then
  shift * s / (1 + (shift - 1) * s) with the scheduler's shift, as sampling shifts its sigmas.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from diffmem.backends.base import Conditioning
from diffmem.backends.flow_matching import FlowMatchingBackend, FlowMatchingSampler

#: StableDiffusion3Pipeline's defaults (`num_inference_steps`, `guidance_scale`).
SD3_STEPS, SD3_GUIDANCE = 28, 7.0


class SD3Denoiser(torch.nn.Module):
    """An `SD3Transformer2DModel` called like a diffusers UNet on latents [B, C, H, W].

    `added_cond_kwargs` carries `pooled_projections` per sample. The timestep goes in unscaled (sigma * 1000), as
    StableDiffusion3Pipeline passes it, expanded to the batch."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.config = transformer.config

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: Mapping[str, torch.Tensor] | None = None) -> SimpleNamespace:
        timestep = torch.as_tensor(timestep, device=sample.device).expand(sample.shape[0])
        pooled = (added_cond_kwargs or {})["pooled_projections"]
        velocity = self.transformer(hidden_states=sample, timestep=timestep, pooled_projections=pooled,
                                    encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        return SimpleNamespace(sample=velocity)


def sd3_sampler(scheduler, latent_height: int, latent_width: int, patch_size: int) -> FlowMatchingSampler:
    """The flow-matching sampler as StableDiffusion3Pipeline sets it up: the scheduler's own spacing and static
    shift, or, for a scheduler that shifts by resolution (`use_dynamic_shifting`), the pipeline's `mu` of the
    patch sequence length at this latent size."""
    config = scheduler.config
    mu = None
    if config.get("use_dynamic_shifting", False):
        sequence = (latent_height // patch_size) * (latent_width // patch_size)
        mu = calculate_shift(sequence, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.16))
    return FlowMatchingSampler(scheduler, mu=mu)


class SD3Backend(FlowMatchingBackend):
    """A loaded `StableDiffusion3Pipeline` (SD 3 / 3.5): conditioning is the joint text states plus the pooled CLIP
    embeddings (`pooled_projections`); the denoiser is `SD3Denoiser`; sampling is the pipeline's flow-matching Euler
    scheduler with classifier-free guidance.

    NeMo's value layers are the text stream's value projections of every joint-attention block
    (`transformer_blocks.*.attn.add_v_proj`), the last block included: its context stream is `context_pre_only`
    (no text output projection, no text feed-forward), but its image tokens still attend to the text's keys and
    values, so its `add_v_proj` is used as in the other blocks. SD3.5's second, image-only attention (`attn2` of
    `dual_attention_layers`) reads no text and is left out. Wanda prunes the image stream's feed-forward output
    (`ff.net.2`); the text stream's `ff_context` is not matched."""

    family = "sd3"
    default_steps, default_guidance = SD3_STEPS, SD3_GUIDANCE

    def __init__(self, pipe, name: str) -> None:
        self.pipe, self.name = pipe, name
        config = pipe.transformer.config
        # The transformer's sample size is the latent resolution the pipeline samples at by default (128 for SD3,
        # 1024-pixel images).
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        self.denoiser = SD3Denoiser(pipe.transformer)
        self.scheduler = sd3_sampler(pipe.scheduler, height, width, config.patch_size)
        self.sample_shape = (config.in_channels, height, width)
        self.image_size = (height * pipe.vae_scale_factor, width * pipe.vae_scale_factor)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(list(prompts), prompt_2=None, prompt_3=None, device=self.device,
                                                       num_images_per_prompt=1, do_classifier_free_guidance=False)
        return Conditioning(embeds, {"pooled_projections": pooled})
