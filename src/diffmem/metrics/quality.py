"""Quality measures that a mitigation must not destroy: held-out denoising loss and CLIP score."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from diffmem.errors import DiffmemError, FileFormatError
from diffmem.metrics.checks import check_features
from diffmem.metrics.features import ModuleEmbedder, features_of, preprocessor_settings


def evaluation_timesteps(num_samples: int, per_sample: int, num_train_timesteps: int) -> torch.Tensor:
    """Stratified timesteps [num_samples, per_sample]: sample i takes the midpoints of `per_sample` equal
    strata of [0, T), shifted by i / num_samples of a stratum, so the whole range is covered evenly and the
    evaluation needs no random timesteps."""
    width = num_train_timesteps / per_sample
    offsets = (torch.arange(num_samples, dtype=torch.float64) / num_samples)[:, None]
    grid = (torch.arange(per_sample, dtype=torch.float64)[None, :] + offsets) * width
    return grid.floor().long().clamp(0, num_train_timesteps - 1)


def denoising_inputs(
    scheduler,
    samples: torch.Tensor,
    embeds: torch.Tensor,
    timesteps_per_sample: int = 8,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy inputs, timesteps, text states, targets) of the DDPM training objective (Ho et al. 2020) for every
    sample at `timesteps_per_sample` stratified timesteps (`evaluation_timesteps`), noise fixed by `seed`: the same
    arguments give the same noisy inputs, so models compared on them see exactly the same data. Arguments as
    `denoising_loss`."""
    if samples.ndim != 4 or embeds.ndim != 3 or samples.shape[0] != embeds.shape[0] or samples.shape[0] == 0:
        raise ValueError(
            f"need samples [N, C, H, W] and embeds [N, L, D] with the same N >= 1, got {tuple(samples.shape)} "
            f"and {tuple(embeds.shape)}"
        )
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")
    count = samples.shape[0]
    timesteps = evaluation_timesteps(count, timesteps_per_sample, scheduler.config.num_train_timesteps).flatten()
    x0 = samples.float().repeat_interleave(timesteps_per_sample, dim=0)
    context = embeds.repeat_interleave(timesteps_per_sample, dim=0)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    noisy = scheduler.add_noise(x0, noise, timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, timesteps)
    return noisy, timesteps, context, target


def prediction_errors(unet: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                      target: torch.Tensor) -> torch.Tensor:
    """Per-input mean squared error of the UNet's prediction, [N], differentiable (`denoising_inputs`' outputs)."""
    parameter = next(unet.parameters())
    prediction = unet(noisy.to(parameter.device, parameter.dtype), timesteps.to(parameter.device),
                      encoder_hidden_states=context.to(parameter.device, parameter.dtype)).sample
    return F.mse_loss(prediction.float().cpu(), target, reduction="none").flatten(1).mean(dim=1)


@torch.no_grad()
def denoising_loss(
    unet: torch.nn.Module,
    scheduler,
    samples: torch.Tensor,
    embeds: torch.Tensor,
    timesteps_per_sample: int = 8,
    seed: int = 0,
    batch_size: int = 64,
) -> float:
    """Mean squared error of the UNet's prediction on held-out data at fixed noise and timesteps (the DDPM
    training objective, Ho et al. 2020), so two models are compared on exactly the same noisy inputs.

    Args:
        samples: clean UNet inputs [N, C, H, W] (pixels in [-1, 1] for a pixel model, latents for SD).
        embeds: text-encoder output for each sample's caption, [N, L, D].
        scheduler: a diffusers training scheduler (`add_noise`, `config.num_train_timesteps`,
            `config.prediction_type` "epsilon" or "v_prediction"; DDPM/DDIM schedulers have all three).
        timesteps_per_sample: stratified timesteps per sample (see `evaluation_timesteps`).
        seed: seed of the noise; the same seed gives the same noisy inputs for every model.
    """
    noisy, timesteps, context, target = denoising_inputs(scheduler, samples, embeds, timesteps_per_sample, seed)
    total = 0.0
    for start in range(0, noisy.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        total += float(prediction_errors(unet, noisy[sl], timesteps[sl], context[sl], target[sl]).sum())
    return total / noisy.shape[0]


def clip_score_from_features(
    image_features: torch.Tensor, text_features: torch.Tensor, scale: float = 100.0
) -> float:
    """Mean over pairs of `scale * max(cos(image_i, text_i), 0)` (Hessel et al. 2021, CLIPScore; scale 100 as in
    torchmetrics and the diffusion literature, Hessel et al. use 2.5)."""
    check_features(image_features, "image_features")
    check_features(text_features, "text_features")
    if image_features.shape != text_features.shape:
        raise ValueError(f"need one caption per image: {tuple(image_features.shape)} vs {tuple(text_features.shape)}")
    cosine = F.cosine_similarity(image_features.to(torch.float64), text_features.to(torch.float64), dim=1)
    return float((scale * cosine.clamp_min(0)).mean())


class ClipScorer:
    """CLIP score with a CLIP model from a local Hugging Face folder (model, tokenizer and
    preprocessor_config.json; nothing is downloaded)."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPModel

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise DiffmemError("is not a Hugging Face CLIP model folder (no config.json)", folder)
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval().to(device)
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise FileFormatError(f"could not load a CLIP model and tokenizer from this folder ({exc})", folder) from None
        self.device = torch.device(device)
        self.images = ModuleEmbedder(self.image_features, f"clip:{folder.name}", device=device,
                                     **preprocessor_settings(folder))

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return features_of(self.model.get_image_features(pixel_values=pixel_values))

    @torch.no_grad()
    def text_features(self, captions: Sequence[str]) -> torch.Tensor:
        """Projected CLIP text features [N, D] of captions (truncated to the model's context length)."""
        tokens = self.tokenizer(list(captions), padding=True, truncation=True, return_tensors="pt").to(self.device)
        return features_of(self.model.get_text_features(**tokens)).float().cpu()

    def __call__(self, images: torch.Tensor, captions: Sequence[str]) -> float:
        """CLIP score of images [N, 3, H, W] in [0, 1] against their captions."""
        if len(captions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        return clip_score_from_features(self.images(images), self.text_features(captions))

