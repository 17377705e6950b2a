"""Stable Diffusion 1.x/2.x and SDXL pipelines (diffusers) as `Backend`s, and loading any supported pipeline
(these, Flux and SD3, whose backends are `diffmem.backends.flux` and `diffmem.backends.sd3`).

- Conditioning: the text encoder's last hidden states; for SDXL both encoders' states concatenated, plus the pooled
  text_encoder_2 embedding and the size/crop time ids of a full-size uncropped image as `added_cond_kwargs`, as
  `StableDiffusionXLPipeline` builds them. With `force_zeros_for_empty_prompt` (the SDXL base's default) the empty
  prompt is all zeros, as SDXL samples its unconditional branch.
- Sampling: DDIM from the pipeline's scheduler config (Wen et al.'s protocol).
- Training target: the scheduler's `prediction_type`, epsilon (SD 1.x, SDXL) or v (SD 2.x 768-v), at timesteps
  drawn uniformly from the training schedule (`DDPMScheduler` of the same config).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from diffmem.backends.base import Backend, Conditioning, batched
from diffmem.errors import DiffmemError, FileFormatError
from diffmem.formats.base import open_base

PIPELINE_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL", "flux": "Flux",
                  "sd3": "Stable Diffusion 3"}
PIPELINE_CLASSES = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline,
                    "sdxl": StableDiffusionXLPipeline, "flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}


def pipeline_family(path: Path) -> str:
    """The model family of a diffusers folder or single-file checkpoint ("sd1", "sd2", "sdxl", "flux", "sd3"),
    read from its weights' key names and shapes (`diffmem.formats.base.open_base`), no tensor loaded."""
    return open_base(path).family


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32, config: str | Path | None = None,
                  families: tuple[str, ...] = ("sd1", "sd2", "sdxl", "flux", "sd3")):
    """A diffusers pipeline of one of `families` (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`,
    `FluxPipeline`, `StableDiffusion3Pipeline`) from a diffusers folder (model_index.json) or a single-file
    checkpoint, loaded offline on the CPU without safety checker; another family is refused in one line.

    A single file holds weights but not the components' configs (layer sizes, tokenizer, scheduler): diffusers
    takes them from its Hugging Face cache, or from `config`, a local diffusers folder of the same architecture
    (e.g. a Stable Diffusion 1.5 folder for any SD 1.x fine-tune)."""
    # Loading bars of every component would bury diffmem's one-line errors and its own progress bar.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    path = Path(path)
    if not path.exists():
        raise DiffmemError("no such model file or folder", path)
    if config is not None and not (Path(config) / "model_index.json").is_file():
        raise DiffmemError("the config of a single-file checkpoint must be a diffusers pipeline folder (with "
                           "model_index.json)", config)
    family = pipeline_family(path)
    if family not in families:
        supported = ", ".join(PIPELINE_NAMES[f] for f in families)
        raise FileFormatError(f"is a {family} model; this command supports {supported} pipelines", path)
    extra = {"safety_checker": None, "requires_safety_checker": False} if family in ("sd1", "sd2") else {}
    try:
        if path.is_dir():
            return PIPELINE_CLASSES[family].from_pretrained(path, local_files_only=True, dtype=dtype, **extra)
        options = {} if config is None else {"config": str(config)}
        return PIPELINE_CLASSES[family].from_single_file(str(path), local_files_only=True, dtype=dtype, **options)
    except (OSError, ValueError, KeyError) as exc:
        hint = ("; a single-file checkpoint needs its architecture's configs: pass --config with a local diffusers "
                "folder of the same architecture" if path.is_file() and config is None else "")
        raise FileFormatError(f"could not load a {PIPELINE_NAMES[family]} pipeline offline ({exc}){hint}",
                              path) from None


def pixel_to_images(samples: torch.Tensor) -> torch.Tensor:
    """Decoded samples in [-1, 1] to images in [0, 1] on the CPU."""
    return ((samples.float().cpu() + 1) / 2).clamp(0, 1)


def unet_latent_size(pipe) -> tuple[int, int]:
    """[H, W] of a UNet pipeline's latents (the UNet's sample size); images are `vae_scale_factor` times larger."""
    size = pipe.unet.config.sample_size
    return (size, size) if isinstance(size, int) else tuple(size)


def zero_empty_prompts(pipe, prompts: Sequence[str], embeds: torch.Tensor) -> torch.Tensor:
    """SDXL samples its unconditional branch from zero embeddings when `force_zeros_for_empty_prompt` is set (the
    SDXL base's default), not from an encoded empty prompt; diffmem does the same, so Wen's difference is taken
    against what the model is really guided away from."""
    if not getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        return embeds
    empty = torch.tensor([prompt == "" for prompt in prompts], device=embeds.device)
    return torch.where(empty.view(-1, *[1] * (embeds.ndim - 1)), torch.zeros_like(embeds), embeds)


class StableDiffusionBackend(Backend):
    """A loaded `StableDiffusionPipeline` (SD 1.x/2.x) or `StableDiffusionXLPipeline` (SDXL)."""

    def __init__(self, pipe, name: str, family: str) -> None:
        self.pipe, self.name, self.family = pipe, name, family
        self.denoiser = pipe.unet
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.training_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
        height, width = unet_latent_size(pipe)
        self.sample_shape = (pipe.unet.config.in_channels, height, width)
        self.image_size = (height * pipe.vae_scale_factor, width * pipe.vae_scale_factor)
        self.default_steps, self.default_guidance = 50, 7.5
        self.is_xl = family == "sdxl"
        if self.is_xl:
            self.time_ids = pipe._get_add_time_ids(self.image_size, (0, 0), self.image_size, torch.float32,
                                                   text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        prompts = list(prompts)
        encoded = self.pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
        if not self.is_xl:
            return Conditioning(encoded[0])
        context, pooled = zero_empty_prompts(self.pipe, prompts, encoded[0]), encoded[2]
        pooled = zero_empty_prompts(self.pipe, prompts, pooled)
        return Conditioning(context, {"text_embeds": pooled,
                                      "time_ids": self.time_ids.expand(len(prompts), -1).to(pooled.device)})

    @torch.no_grad()
    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        scale = vae.config.scaling_factor
        return batched(lambda chunk: pixel_to_images(vae.decode(chunk.to(vae.device, vae.dtype) / scale).sample),
                       samples)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        scale = vae.config.scaling_factor
        # The posterior's mean: a deterministic x_0 per image, as fine-tuning scripts cache latents.
        return batched(lambda chunk: vae.encode(chunk.to(vae.device, vae.dtype) * 2 - 1).latent_dist.mean.float()
                       * scale, images.float())

    def training_pair(self, x0: torch.Tensor, noise: torch.Tensor,
                      u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        schedule = self.training_schedule
        steps = schedule.config.num_train_timesteps
        timesteps = (u * steps).long().clamp(0, steps - 1)
        noisy = schedule.add_noise(x0, noise, timesteps)
        if schedule.config.prediction_type == "v_prediction":
            return noisy, timesteps, schedule.get_velocity(x0, noise, timesteps)
        return noisy, timesteps, noise
