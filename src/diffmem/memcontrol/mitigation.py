"""Training-time memorization mitigations MemControl compares with and combines: random word addition (Somepalli
et al. 2023) and Wen et al.'s threshold mitigation (ICLR 2024)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache

import torch

from diffmem.memcontrol.functional import insert_random_words
from diffmem.memcontrol.settings import MITIGATIONS, MitigationConfig  # noqa: F401 (defined there)
from diffmem.metrics.wen import conditional_difference_norms
from diffmem.world.diffusion import TRAIN_TIMESTEPS, add_noise, predict_noise, to_model_range
from diffmem.world.text import encode_prompts, text_encoder
from diffmem.world.train import ContextFn


@cache
def word_vocabulary() -> tuple[str, ...]:
    """Whole words of the world text encoder's vocabulary (alphabetic ASCII, 3 letters or more), sorted."""
    vocabulary = text_encoder().tokenizer.get_vocab()
    return tuple(sorted(w for w in vocabulary if w.isascii() and w.isalpha() and len(w) >= 3))


def random_word_contexts(captions: Sequence[str], caption_index: torch.Tensor, probability: float,
                         vocabulary: Sequence[str] | None = None) -> ContextFn:
    """Contexts of kept captions after random word addition; a dropped caption gets the empty prompt."""
    words = list(vocabulary if vocabulary is not None else word_vocabulary())

    def context_of(picked: torch.Tensor, keep: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        texts = [insert_random_words(captions[int(caption_index[row])], words, probability, generator) if kept else ""
                 for row, kept in zip(picked.tolist(), keep.tolist())]
        return encode_prompts(texts)

    return context_of


def threshold_mitigated_loss(threshold: float) -> Callable[..., torch.Tensor]:
    """The DDPM loss without the samples whose conditional-difference norm at their timestep is >= `threshold`
    (Wen et al. 2024, sec. 5 "mitigation during training"); mean over the kept samples of the batch."""
    empty = encode_prompts([""])

    def loss_fn(unet: torch.nn.Module, images: torch.Tensor, context: torch.Tensor,
                generator: torch.Generator | None = None, noise_offset: float = 0.0) -> torch.Tensor:
        x0 = to_model_range(images)
        noise = torch.randn(x0.shape, generator=generator)
        if noise_offset:
            noise = noise + noise_offset * torch.randn((*x0.shape[:2], 1, 1), generator=generator)
        timesteps = torch.randint(0, TRAIN_TIMESTEPS, (x0.shape[0],), generator=generator)
        x_t = add_noise(x0, noise, timesteps)
        eps = predict_noise(unet, x_t, timesteps, context)
        with torch.no_grad():
            eps_empty = predict_noise(unet, x_t, timesteps, empty.expand(x0.shape[0], -1, -1))
        keep = (conditional_difference_norms(eps, eps_empty) < threshold).to(eps.dtype)
        per_image = ((eps - noise) ** 2).mean(dim=(1, 2, 3))
        return (per_image * keep).sum() / keep.sum().clamp_min(1.0)

    return loss_fn


@torch.no_grad()
def training_norms(unet: torch.nn.Module, images: torch.Tensor, captions: Sequence[str], draws: int = 4,
                   seed: int = 0, timestep: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """||eps(x_t, c) - eps(x_t, empty)|| at uniform training timesteps (or at `timestep`), what the threshold
    mitigation compares: `draws` noisy copies per image; returns (norms [draws * N], timesteps [draws * N]),
    image-major per draw."""
    generator = torch.Generator().manual_seed(seed)
    x0 = to_model_range(images).repeat(draws, 1, 1, 1)
    context = encode_prompts(list(captions)).repeat(draws, 1, 1)
    noise = torch.randn(x0.shape, generator=generator)
    timesteps = torch.randint(0, TRAIN_TIMESTEPS, (x0.shape[0],), generator=generator)
    if timestep is not None:
        timesteps = torch.full_like(timesteps, timestep)
    x_t = add_noise(x0, noise, timesteps)
    eps = predict_noise(unet, x_t, timesteps, context)
    eps_empty = predict_noise(unet, x_t, timesteps, encode_prompts([""]).expand(x0.shape[0], -1, -1))
    return conditional_difference_norms(eps, eps_empty).float(), timesteps
