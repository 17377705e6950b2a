"""Model-guided extraction (FineXtract; Wu et al., "Revealing the Unseen: Extracting Training Data from Fine-Tuned
Diffusion Models", ICML 2025), on any pair of diffmem backends.

A fine-tune's distribution is its base's plus what the fine-tuning data added. FineXtract pushes sampling further
along that difference, so the samples concentrate on what the fine-tune learned beyond the base (for a memorizing
LoRA: its training images), then clusters many generations and keeps the dense clusters. Here the prediction at
every sampling step is

    eps = eps_ft(x, empty) + s * (eps_ft(x, c) - eps_ft(x, empty)) + lam * (eps_ft(x, c) - eps_base(x, c))

with `s` the model's classifier-free guidance and `lam` the model-guidance strength (`lam = 0`: ordinary sampling
of the fine-tune). The sampling loop is the one every diffmem method uses (`diffmem.metrics.wen.
guided_sampling_chunk`): `model_guided_denoiser` puts the two networks behind the one-denoiser call signature the
loop takes, so no sampler logic is repeated here.

The generations of a prompt are then grouped by tiled L2 (Carlini et al. 2023; `diffmem.metrics.extraction`), and a
group of at least `min_group` near-identical generations is a candidate extraction unless the base alone produces
it too (one of the base's own generations for the same prompt and seeds lies within the same distance of the
group's representative): a mode of the base is not evidence that the fine-tune memorized anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from diffmem.backends import Backend, Conditioning
from diffmem.metrics.copy import tiled_l2
from diffmem.metrics.extraction import largest_component
from diffmem.metrics.wen import WenConfig, guided_sampling_chunk

#: The call signature of a denoiser as the sampling loops call it: (x, t, encoder_hidden_states=...,
#: added_cond_kwargs=...) -> an object whose `.sample` is the prediction.
Denoiser = Callable[..., SimpleNamespace]


def model_guided_denoiser(tuned: Denoiser, base: Denoiser, lam: float, guidance: float,
                          base_conditioning: Conditioning) -> Denoiser:
    """A denoiser for `guided_sampling_chunk` whose guided prediction is FineXtract's model-guided one.

    The loop calls it on `[x, x]` with the unconditional half first and mixes `u + s * (c - u)`. Returning
    `c + (lam / s) * (eps_ft(x, c) - eps_base(x, c))` as the conditional half makes that mix exactly
    `eps_ft(x, empty) + s * (eps_ft(x, c) - eps_ft(x, empty)) + lam * (eps_ft(x, c) - eps_base(x, c))`, so the loop
    (and with it every backend's sampler) is reused unchanged. `base_conditioning` is the base's own encoding of
    the prompts of this batch (a LoRA that trains the text encoder changes the fine-tune's encoding, not the
    base's); `guidance` must be the `s` the loop mixes with, and non-zero."""
    if guidance == 0:
        raise ValueError("model guidance needs a non-zero classifier-free guidance scale")
    base_kwargs = {"added_cond_kwargs": base_conditioning.added} if base_conditioning.added else {}

    def predict(sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: Mapping[str, torch.Tensor] | None = None) -> SimpleNamespace:
        kwargs = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs else {}
        uncond, cond = tuned(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs).sample.chunk(2)
        if lam == 0:
            return SimpleNamespace(sample=torch.cat([uncond, cond]))
        half = sample.shape[0] // 2
        from_base = base(sample[half:], timestep, encoder_hidden_states=base_conditioning.context,
                         **base_kwargs).sample
        return SimpleNamespace(sample=torch.cat([uncond, cond + (lam / guidance) * (cond - from_base)]))

    return predict


@torch.no_grad()
def model_guided_generate(tuned: Backend, base: Backend, prompt: str, seeds: Sequence[int], lam: float,
                          steps: int | None = None, guidance: float | None = None,
                          batch_size: int = 16) -> torch.Tensor:
    """Images [G, 3, H, W] in [0, 1] of `prompt`, one per seed, sampled from `tuned` with model guidance of strength
    `lam` away from `base` (FineXtract); `steps` and `guidance` default to the tuned model's own. The starting noise
    is `tuned.initial_noise(seeds)`, so a seed gives the same x_T as in `Backend.generate`."""
    seeds = list(seeds)
    steps = steps or tuned.default_steps
    guidance = tuned.default_guidance if guidance is None else guidance
    settings = WenConfig(num_inference_steps=steps, guidance_scale=guidance)
    device, dtype = tuned.device, tuned.dtype
    own, base_own, empty = tuned.encode([prompt]), base.encode([prompt]), tuned.unconditional()
    noise = tuned.initial_noise(seeds)
    images = []
    for start in range(0, len(seeds), batch_size):
        count = len(seeds[start:start + batch_size])
        conds, empties = own.expand(count).to(device, dtype), empty.expand(count).to(device, dtype)
        kwargs = {}
        if conds.added:
            kwargs["added_cond_kwargs"] = {key: torch.cat([empties.added[key], conds.added[key]]) for key in conds.added}
        denoiser = model_guided_denoiser(tuned.denoiser, base.denoiser, lam, guidance,
                                         base_own.expand(count).to(base.device, base.dtype))
        _, samples = guided_sampling_chunk(denoiser, tuned.sampler(), noise[start:start + count].to(device, dtype),
                                           conds.context, empties.context, settings, {}, kwargs)
        images.append(tuned.decode(samples))
    return torch.cat(images) if images else torch.zeros(0, 3, *tuned.image_size)


@dataclass(frozen=True)
class ExtractedGroup:
    """A group of near-identical generations of one prompt.

    Attributes:
        prompt: the prompt the generations were sampled with.
        members: indices (into the prompt's generations, i.e. its seeds) of the group's members.
        representative: the member closest on average to the others (the image a person looks at).
        spread: the largest tiled distance of a member to the representative.
        base_distance: tiled distance of the representative to the nearest of the base's own generations of the
            same prompt and seeds.
        base_also: the base produces it too (`base_distance` below the grouping threshold): not evidence.
    """

    prompt: str
    members: tuple[int, ...]
    representative: int
    spread: float
    base_distance: float
    base_also: bool

    @property
    def size(self) -> int:
        return len(self.members)

    def row(self) -> dict:
        """JSON-ready."""
        return {"prompt": self.prompt, "size": self.size, "members": list(self.members),
                "representative": self.representative, "spread": round(self.spread, 4),
                "base_distance": round(self.base_distance, 4), "base_also": self.base_also}


def near_identical_groups(images: torch.Tensor, threshold: float, min_group: int, tiles: int = 4,
                          distances: torch.Tensor | None = None) -> list[tuple[int, ...]]:
    """Every group of at least `min_group` generations [G, 3, H, W] joined by tiled distances below `threshold`,
    largest first: the largest connected group (`diffmem.metrics.extraction.largest_component`, Carlini et al.
    2023), then the largest among the rest, and so on (a LoRA may have memorized several images of one prompt)."""
    distances = tiled_l2(images, images, tiles) if distances is None else distances
    left = list(range(images.shape[0]))
    groups = []
    while len(left) >= max(min_group, 1):
        found = largest_component(distances[left][:, left], threshold)
        if len(found) < min_group:
            break
        members = tuple(left[i] for i in found)
        groups.append(members)
        left = [i for i in left if i not in members]
    return groups


def representative_of(distances: torch.Tensor, members: Sequence[int]) -> tuple[int, float]:
    """(the medoid of `members`: the member with the smallest mean distance to the others, its largest distance to
    a member), from a [G, G] distance matrix."""
    block = distances[list(members)][:, list(members)]
    best = int(block.mean(dim=1).argmin())
    return members[best], float(block[best].max())


def candidate_groups(prompt: str, tuned_images: torch.Tensor, base_images: torch.Tensor, threshold: float,
                     min_group: int, tiles: int = 4) -> list[ExtractedGroup]:
    """The groups of near-identical generations of `prompt` from the fine-tune (model-guided, [G, 3, H, W]), each
    checked against the base's own generations of the same prompt and seeds: a group whose representative lies
    within `threshold` (tiled L2) of one of them is marked `base_also` (the base makes it without the LoRA)."""
    distances = tiled_l2(tuned_images, tuned_images, tiles)
    groups = []
    for members in near_identical_groups(tuned_images, threshold, min_group, tiles, distances):
        centre, spread = representative_of(distances, members)
        to_base = float(tiled_l2(tuned_images[centre][None], base_images, tiles).min()) if len(base_images) else \
            float("inf")
        groups.append(ExtractedGroup(prompt=prompt, members=members, representative=centre, spread=spread,
                                     base_distance=to_base, base_also=to_base < threshold))
    return groups
