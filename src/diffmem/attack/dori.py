"""The Dori attack (Kowalczuk et al. 2025, "Finding Dori: Memorization in Text-to-Image Diffusion Models Is Not
Local", seed 002): optimise a text embedding so that a (possibly mitigated) model denoises towards a memorized
image, then ask whether fresh generations from that embedding copy the image.

The search works on the model's whole conditioning (`diffmem.backends.Conditioning`): the text states `[tokens,
dim]` the denoiser receives as `encoder_hidden_states` and, for SDXL, Flux and SD3, the pooled embedding; not on token
ids, so it can reach embeddings no prompt produces. Every function takes any `diffmem.backends.Backend` (the world,
SD 1.x/2.x, SDXL, Flux) or a bare world UNet. Success is never read off the search loss: `attack_success` samples
new images from the embedding and applies the copy tests of `diffmem.metrics.copy` to them. Files are read and
written by `diffmem.attack.commands`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from diffmem.attack.settings import START_KINDS, DoriConfig  # noqa: F401 (defined there, without a model library)
from diffmem.backends import Backend, Conditioning, as_backend
from diffmem.errors import DiffmemError
from diffmem.evaluation.sampling import SamplingSettings, seeds_for
from diffmem.metrics.copy import (
    LUMINANCE_COPY_DISTANCE,
    CopyConfig,
    copy_decisions,
    luminance_tiled_l2,
    paired_tiled_l2,
)
from diffmem.world.text import encode_prompts

if TYPE_CHECKING:  # a bare world UNet is accepted too; naming its type needs no diffusers import at run time
    from diffusers import UNet2DConditionModel

#: Added conditioning that is not an embedding of the prompt, so Dori does not search it.
NOT_SEARCHED = frozenset({"time_ids"})


@dataclass(frozen=True)
class DoriResult:
    """The conditioning found, the one the search started from (each one row), and the loss of every step.

    `embedding` and `start` are their text-encoder states [1, tokens, dim] (all of the conditioning for the world
    and SD 1.x/2.x)."""

    conditioning: Conditioning
    start_conditioning: Conditioning
    losses: list[float] = field(default_factory=list)

    @property
    def embedding(self) -> torch.Tensor:
        return self.conditioning.context

    @property
    def start(self) -> torch.Tensor:
        return self.start_conditioning.context


def random_embedding_like(embedding: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian values with the overall standard deviation of `embedding` (Dori's random start)."""
    return embedding.std() * torch.randn(embedding.shape, generator=generator)


def perturb_embedding(embedding: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """`embedding` plus Gaussian noise of standard deviation `scale` times the embedding's own."""
    return embedding + scale * embedding.std() * torch.randn(embedding.shape, generator=generator)


def as_conditioning(embedding: Conditioning | torch.Tensor) -> Conditioning:
    """A conditioning as given; text-encoder states alone as the conditioning of the world or SD 1.x/2.x."""
    return embedding if isinstance(embedding, Conditioning) else Conditioning(embedding)


def start_conditioning(encode: Callable[[list[str]], Conditioning], prompt: str,
                       config: DoriConfig | None = None) -> Conditioning:
    """The one-row conditioning a search for `prompt`'s image starts from (`encode`: a backend's), as
    `config.start` and `config.start_noise` say: the prompt's own, random values with the scale of each of its
    searched tensors, or an unrelated prompt's; noise is added to the searched tensors only."""
    config = config or DoriConfig()
    generator = torch.Generator().manual_seed(config.seed)
    chosen = config.unrelated_prompt if config.start == "unrelated" else prompt
    own = encode([chosen]).map(lambda tensor: tensor.float().cpu())
    searched = searched_keys(own)
    start = Conditioning(
        random_embedding_like(own.context, generator) if config.start == "random" else own.context,
        {key: random_embedding_like(value, generator) if config.start == "random" and key in searched else value
         for key, value in own.added.items()})
    if not config.start_noise:
        return start
    return Conditioning(perturb_embedding(start.context, config.start_noise, generator),
                        {key: perturb_embedding(value, config.start_noise, generator) if key in searched else value
                         for key, value in start.added.items()})


def start_embedding(prompt: str, config: DoriConfig | None = None) -> torch.Tensor:
    """The world's [1, tokens, dim] start embedding for `prompt` (`start_conditioning` on the world)."""
    return start_conditioning(lambda prompts: Conditioning(encode_prompts(prompts)), prompt, config).context


def searched_keys(conditioning: Conditioning) -> tuple[str, ...]:
    """The added-conditioning tensors Dori optimises besides the text states: the embeddings (SDXL's pooled
    text_encoder_2 embedding, Flux's pooled CLIP embedding), not SDXL's time ids, which state the image size and
    crop rather than the prompt."""
    return tuple(key for key in conditioning.added if key not in NOT_SEARCHED)


def check_target(model: Backend | UNet2DConditionModel, target: torch.Tensor) -> torch.Tensor:
    """`target` as a [1, 3, H, W] float image in [0, 1] of the size the model generates, or a clear error."""
    backend = as_backend(model)
    if target.ndim == 3:
        target = target[None]
    shape = (3, *backend.image_size)
    if target.ndim != 4 or target.shape[0] != 1 or tuple(target.shape[1:]) != shape:
        raise DiffmemError(f"the target image has shape {tuple(target.shape)}, but this model generates "
                           f"[{shape[0]}, {shape[1]}, {shape[2]}] images; resize the target first")
    if not target.is_floating_point() or not torch.isfinite(target).all() or target.min() < 0 or target.max() > 1:
        raise DiffmemError("the target image must be a finite float tensor with values in [0, 1]")
    return target.float()


def check_conditioning(model: Backend | UNet2DConditionModel,
                       embedding: Conditioning | torch.Tensor) -> Conditioning:
    """`embedding` as one finite row of conditioning shaped like the model's own, or a clear error."""
    backend, conditioning = as_backend(model), as_conditioning(embedding)
    if conditioning.context.ndim == 2:
        conditioning = conditioning.map(lambda tensor: tensor[None])
    reference = backend.unconditional()
    for key, tensor in [("text embedding", conditioning.context), *conditioning.added.items()]:
        expected = reference.context if key == "text embedding" else reference.added.get(key)
        if expected is None:
            raise DiffmemError(f"this model takes no {key!r} conditioning")
        if tensor.ndim != expected.ndim or tensor.shape[0] != 1 or tensor.shape[-1] != expected.shape[-1]:
            where = "cross-attention" if key == "text embedding" else f"{key!r} input"
            raise DiffmemError(f"the {key} has shape {tuple(tensor.shape)}, but this model's {where} takes "
                               f"[1, {'tokens, ' if tensor.ndim == 3 else ''}{expected.shape[-1]}]")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise DiffmemError(f"the {key} must be a finite float tensor")
    missing = set(reference.added) - set(conditioning.added)
    if missing:
        raise DiffmemError(f"the conditioning lacks {', '.join(sorted(missing))}, which this model takes")
    return conditioning.map(lambda tensor: tensor.float())


def check_embedding(model: Backend | UNet2DConditionModel, embedding: torch.Tensor) -> torch.Tensor:
    """`embedding` as a finite [1, tokens, dim] text context for the model, or a clear error."""
    return check_conditioning(model, embedding).context


def dori_search(
    model: Backend | UNet2DConditionModel, target: torch.Tensor, start: Conditioning | torch.Tensor,
    config: DoriConfig | None = None,
) -> DoriResult:
    """Minimise the model's denoising loss on `target` over the conditioning (text states and, for SDXL, Flux and SD3,
    the pooled embedding), with fresh noise and timesteps every step (Kowalczuk et al. 2025, "Finding Dori"; for
    an epsilon model || eps - eps_theta(x_t, t, y) ||^2, for Flux the flow-matching loss). The model's weights are
    left untouched."""
    config, backend = config or DoriConfig(), as_backend(model)
    target = check_target(backend, target)
    start = check_conditioning(backend, start).detach()
    searched = searched_keys(start)
    variables = {"context": start.context.clone().requires_grad_(True),
                 **{key: start.added[key].clone().requires_grad_(True) for key in searched}}
    optimizer = torch.optim.Adam(list(variables.values()), lr=config.lr)
    # A generator of its own, offset from the start's, so the step noise does not replay the start noise.
    generator = torch.Generator().manual_seed(config.seed + 1)
    x0 = backend.encode_images(target).expand(config.batch_size, -1, -1, -1)
    denoiser = backend.denoiser
    was_training = denoiser.training
    denoiser.eval()
    losses = []

    def current() -> Conditioning:
        return Conditioning(variables["context"], {key: variables.get(key, value)
                                                   for key, value in start.added.items()})

    try:
        for _ in range(config.steps):
            loss = backend.denoising_loss(x0, current().expand(config.batch_size), generator)
            # Gradients for the conditioning only: the model's parameters may require grad and must not accumulate.
            for variable, grad in zip(variables.values(), torch.autograd.grad(loss, list(variables.values()))):
                variable.grad = grad
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        denoiser.train(was_training)
    return DoriResult(conditioning=current().detach(), start_conditioning=start, losses=losses)


def dori_attack(
    model: Backend | UNet2DConditionModel, target: torch.Tensor, prompt: str, config: DoriConfig | None = None
) -> DoriResult:
    """Dori search for `target` on the model, started as `config` says from `prompt` (`start_conditioning`)."""
    config = config or DoriConfig()
    backend = as_backend(model)
    return dori_search(backend, target, start_conditioning(backend.encode, prompt, config), config)


def reference_row(image: torch.Tensor, reference: torch.Tensor, tolerance: float = 0.5 / 255) -> int | None:
    """Row of `reference` [N, C, H, W] holding `image` [C, H, W] up to `tolerance` per pixel (None if no row does).

    The tolerance absorbs an 8-bit PNG round trip, so a target read from a file finds its training image.
    """
    gaps = (reference - image).flatten(1).abs().amax(dim=1)
    best = int(gaps.argmin()) if len(gaps) else -1
    return best if best >= 0 and float(gaps[best]) <= tolerance else None


@dataclass(frozen=True)
class AttackSuccess:
    """Fresh generations from one embedding judged against the target image.

    `generated` [N, 3, H, W]; `distance` [N] tiled L2 of each generation to the target (Carlini et al. 2023);
    `is_copy` [N] the copy decision; `rate` the fraction of copies; `test` which copy test decided;
    `luminance_distance` [N] the tiled L2 of normalised luminance to the target (`luminance_tiled_l2`), a second copy
    test that a global colour cast does not fool (`luminance_rate`).
    """

    generated: torch.Tensor
    distance: torch.Tensor
    is_copy: torch.Tensor
    test: str
    luminance_distance: torch.Tensor

    @property
    def rate(self) -> float:
        return float(self.is_copy.float().mean()) if self.is_copy.numel() else 0.0

    def luminance_rate(self, threshold: float = LUMINANCE_COPY_DISTANCE) -> float:
        """Fraction of generations within `threshold` of the target by `luminance_tiled_l2`: copies the colour-blind
        test counts, including those under a colour cast that the RGB test (`rate`) misses."""
        copies = self.luminance_distance <= threshold
        return float(copies.float().mean()) if copies.numel() else 0.0


def attack_success(
    model: Backend | UNet2DConditionModel,
    embedding: Conditioning | torch.Tensor,
    target: torch.Tensor,
    reference: torch.Tensor | None = None,
    settings: SamplingSettings | None = None,
    copy: CopyConfig | None = None,
) -> AttackSuccess:
    """Does `embedding` (a conditioning, or text states alone) make the model replicate `target`? Sample
    `settings.generations` fresh images from it (seeds from `settings.seed`, the model's sampler with guidance
    against the empty prompt) and test each for a copy of `target`.

    With `reference` (the training images, `target` among them) a generation is a copy when Carlini et al.'s
    relative test passes and its nearest reference image is `target`, as in `diffmem.world.check`. Without it
    there is nothing to be relative to, so `copy.distance_threshold` on the tiled L2 to `target` decides alone
    (it must then be set).
    """
    settings, copy, backend = settings or SamplingSettings(), copy or CopyConfig(), as_backend(model)
    target = check_target(backend, target)
    conditioning = check_conditioning(backend, embedding)
    seeds = seeds_for(1, settings)
    generated = backend.generate(conditioning.expand(len(seeds)), seeds, steps=settings.steps,
                                 guidance=settings.guidance)
    distance = paired_tiled_l2(generated, target.expand_as(generated), copy.tiles)
    luminance = luminance_tiled_l2(generated.clamp(0, 1), target.clamp(0, 1), copy.tiles)[:, 0]
    if reference is None:
        if copy.distance_threshold is None:
            raise DiffmemError("without reference images the copy test needs an absolute distance threshold "
                               "(CopyConfig.distance_threshold)")
        return AttackSuccess(generated, distance, distance <= copy.distance_threshold, "absolute tiled L2",
                             luminance)
    row = reference_row(target[0], reference)
    if row is None:
        raise DiffmemError("the target image is not among the reference images; pass the training set it "
                           "belongs to, or no reference and an absolute distance threshold")
    result = copy_decisions(generated, reference, copy)
    return AttackSuccess(generated, distance, result.is_copy & (result.nearest_index == row), "Carlini relative",
                         luminance)


@dataclass(frozen=True)
class DoriOutcome:
    """A Dori search and what it achieved: fresh generations from the start embedding (`before`) and from the
    embedding found (`after`), each judged against the target."""

    result: DoriResult
    before: AttackSuccess
    after: AttackSuccess

    def summary(self) -> dict:
        """The numbers of the outcome, JSON-ready."""
        return {
            "copy_rate_before": round(self.before.rate, 4),
            "copy_rate_after": round(self.after.rate, 4),
            "median_distance_before": round(float(self.before.distance.median()), 4),
            "median_distance_after": round(float(self.after.distance.median()), 4),
            "luminance_copy_rate_before": round(self.before.luminance_rate(), 4),
            "luminance_copy_rate_after": round(self.after.luminance_rate(), 4),
            "copy_test": self.after.test,
            "loss_first": round(self.result.losses[0], 5),
            "loss_last10_mean": round(sum(self.result.losses[-10:]) / len(self.result.losses[-10:]), 5),
            "embedding_shift": round(float((self.result.embedding - self.result.start).norm()
                                           / self.result.start.norm().clamp_min(1e-12)), 4),
        }


def run_dori(
    model: Backend | UNet2DConditionModel,
    target: torch.Tensor,
    prompt: str,
    config: DoriConfig | None = None,
    reference: torch.Tensor | None = None,
    settings: SamplingSettings | None = None,
    copy: CopyConfig | None = None,
) -> DoriOutcome:
    """Dori search for `target` from `prompt` (`dori_attack`), with `attack_success` of its start and of its result."""
    backend = as_backend(model)
    result = dori_attack(backend, target, prompt, config)
    return DoriOutcome(
        result=result,
        before=attack_success(backend, result.start_conditioning, target, reference, settings, copy),
        after=attack_success(backend, result.conditioning, target, reference, settings, copy),
    )
