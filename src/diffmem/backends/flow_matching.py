"""What the flow-matching (rectified-flow) transformers, Flux and Stable Diffusion 3, share behind `Backend`.

Both are trained as Esser et al. 2024 ("Scaling Rectified Flow Transformers") describe: x_t = (1 - s) x_0 + s noise,
the network predicts the velocity noise - x_0, and sampling walks the sigmas of diffusers'
`FlowMatchEulerDiscreteScheduler` down from 1 with the Euler update. They differ in how the sigmas are shifted
(Flux: by `mu` of the resolution, on sigmas `linspace(1, 1/steps)`; SD3: a static `shift`), in how the transformer
is called (`FluxDenoiser`, `SD3Denoiser`) and in their prompts; the rest is here, written once:

- `FlowMatchingSampler`: the scheduler behind the DDIM-style interface of the shared sampling loop, and the same
  shift applied to the training loss's noise levels (so training and sampling agree on where the noise is);
- `decode_latents` / `encode_latents`: the VAE with both its scaling and its shift factor (SD's VAEs have no
  shift; these models' do);
- `FlowMatchingBackend`: decode, encode_images, the flow-matching loss and the joint-attention value layers.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import torch

from diffmem.backends.base import Backend, batched


class FlowMatchingSampler:
    """A `FlowMatchEulerDiscreteScheduler` behind the DDIM-style interface of the sampling loop (`set_timesteps`,
    `timesteps`, `init_noise_sigma`, `scale_model_input`, `step`), which the scheduler itself lacks in part.

    Args:
        scheduler: the pipeline's scheduler (copied: schedulers keep state between steps).
        mu: the resolution-dependent shift, passed where the scheduler shifts dynamically (`use_dynamic_shifting`);
            None otherwise, where the scheduler applies its static `shift`.
        linear_sigmas: pass sigmas `linspace(1, 1/steps)` as FluxPipeline does, instead of the scheduler's own
            `set_timesteps(steps)` spacing, which StableDiffusion3Pipeline uses.
    """

    init_noise_sigma = 1.0

    def __init__(self, scheduler, mu: float | None = None, linear_sigmas: bool = False) -> None:
        self.scheduler = copy.deepcopy(scheduler)
        self.mu = mu
        self.linear_sigmas = linear_sigmas
        if self.scheduler.config.get("use_dynamic_shifting", False) and mu is None:
            raise ValueError("this flow-matching scheduler shifts by resolution: pass its mu")

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        if self.linear_sigmas:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
            self.scheduler.set_timesteps(sigmas=sigmas, mu=self.mu, device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device, mu=self.mu)
        self.timesteps = self.scheduler.timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(prev_sample=self.scheduler.step(model_output, timestep, sample).prev_sample)

    def shift(self, u: torch.Tensor) -> torch.Tensor:
        """Noise levels u in (0, 1) shifted as `set_timesteps` shifts its sigmas: by `mu` (Flux: e^mu / (e^mu +
        1/u - 1) for the exponential shift) where the scheduler shifts dynamically, else by the static `shift`
        (SD3: shift * u / (1 + (shift - 1) * u)). Karras-like respacings and `shift_terminal` only respace the
        sampling grid and are not applied."""
        scheduler = self.scheduler
        if scheduler.config.get("use_dynamic_shifting", False):
            return scheduler.time_shift(self.mu, 1.0, u)
        shift = scheduler.shift
        return shift * u / (1 + (shift - 1) * u)


def decode_latents(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Latents [N, C, H, W] -> images in [0, 1] on the CPU, the VAE's scaling and shift undone as FluxPipeline and
    StableDiffusion3Pipeline decode."""
    config = vae.config
    parameter = next(vae.parameters())
    scaled = latents.to(parameter.device, parameter.dtype) / config.scaling_factor + config.shift_factor
    with torch.no_grad():
        images = vae.decode(scaled).sample.float().cpu()
    return ((images + 1) / 2).clamp(0, 1)


def encode_latents(vae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> latents: the posterior's mean (a deterministic x_0 per image, as fine-tuning scripts
    cache latents), shifted and scaled as these models are trained."""
    config = vae.config
    parameter = next(vae.parameters())
    with torch.no_grad():
        latents = vae.encode(images.to(parameter.device, parameter.dtype) * 2 - 1).latent_dist.mean.float()
    return (latents - config.shift_factor) * config.scaling_factor


class FlowMatchingBackend(Backend):
    """A flow-matching pipeline (`pipe`, with a VAE with scale and shift) whose `denoiser` wraps its transformer as
    `denoiser.transformer` and predicts velocities, and whose `scheduler` is a `FlowMatchingSampler`.

    - The denoising loss is flow matching: x_t = (1 - s) x_0 + s noise with target velocity noise - x_0, s drawn
      uniformly and then shifted as sampling shifts it (`FlowMatchingSampler.shift`); the transformer sees the
      timestep s * 1000, as the pipelines pass it.
    - NeMo's value layers are the text stream's value projections of the joint-attention blocks
      (`transformer_blocks.*.attn.add_v_proj`): the values the image tokens read from the prompt, the counterpart
      of a UNet's cross-attention `attn2.to_v`. Wanda prunes the image stream's feed-forward output (`ff.net.2`,
      the base lookup; the text stream's `ff_context.net.2` is not matched).
    """

    pipe: object
    scheduler: FlowMatchingSampler
    value_blocks = ("transformer_blocks",)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return batched(lambda chunk: decode_latents(self.pipe.vae, chunk), samples)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return batched(lambda chunk: encode_latents(self.pipe.vae, chunk), images.float())

    def training_pair(self, x0: torch.Tensor, noise: torch.Tensor,
                      u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sigma = self.scheduler.shift(u.clamp(1e-4, 1 - 1e-4)).view(-1, 1, 1, 1)
        return (1 - sigma) * x0 + sigma * noise, sigma.flatten() * 1000, noise - x0

    def value_layers(self, blocks: Sequence[str] | None = None) -> dict[str, torch.nn.Linear]:
        blocks = tuple(blocks or self.value_blocks)
        # Paths start with "transformer." (the denoiser wrapper); the block is the transformer's top level.
        return self.linear_layers(lambda path: path.endswith("attn.add_v_proj") and path.split(".")[1] in blocks)
