"""The Dori attack (Kowalczuk et al. 2025, "Finding Dori: Memorization in Text-to-Image Diffusion Models Is Not
Local", seed 002): optimise a text embedding so that a (possibly mitigated) model denoises towards a memorized
image, then ask whether fresh generations from that embedding copy the image.

The search works on the whole cross-attention context `[tokens, dim]` that the UNet receives as
`encoder_hidden_states`, not on token ids, so it can reach embeddings no prompt produces. Success is never read off
the search loss: `attack_success` samples new images from the embedding and applies the copy tests of
`diffmem.metrics.copy` to them. Files are read and written by `diffmem.attack.commands`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel

from diffmem.errors import DiffmemError
from diffmem.metrics.copy import CopyConfig, copy_decisions, paired_tiled_l2
from diffmem.world.check import CheckSettings, seeds_for
from diffmem.world.diffusion import generate_from_context, training_loss
from diffmem.world.text import encode_prompts

START_KINDS = ("prompt", "random", "unrelated")


@dataclass(frozen=True)
class DoriConfig:
    """How the Dori search runs (Kowalczuk et al. 2025, "Finding Dori", seed 002; the paper's settings as
    summarised in notes/methods.md).

    Args:
        steps: Adam steps. 50, the paper's budget ("about 50 steps"); on the world's example LoRA the loss stops
            falling well before that (see docs/attack.md).
        lr: Adam learning rate, 0.1 as in the paper. Large for a text embedding on purpose: the attack may leave
            the neighbourhood of real prompts, which is what shows that replication triggers are not local.
        batch_size: noisy copies of the target per step, 8 as in the paper. Each copy draws its own noise and
            timestep at every step (the ordinary DDPM loss of Ho et al. 2020), so the embedding must work along
            the whole trajectory instead of fitting one noisy sample.
        start: where the search starts. "prompt" (default, the paper's main setting): the memorized prompt's own
            embedding, i.e. the attack on a prompt a mitigation claims to have fixed. "random": Gaussian tokens with
            the prompt embedding's standard deviation. "unrelated": the embedding of `unrelated_prompt`. The paper
            starts from random and unrelated embeddings too, to show that triggers are spread over embedding space.
        unrelated_prompt: the prompt of start="unrelated"; a photo subject the world's base knows, far from faces.
        start_noise: standard deviation of Gaussian noise added to the start, in units of the start embedding's
            own standard deviation. 0 (default) starts exactly at `start`; the paper's "small perturbations of the
            mitigated prompt's embedding" correspond to values below 1.
        seed: seeds the random start, the start noise, and the noise and timesteps of every step.
    """

    steps: int = 50
    lr: float = 0.1
    batch_size: int = 8
    start: str = "prompt"
    unrelated_prompt: str = "a photo of a brick wall"
    start_noise: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.start not in START_KINDS:
            raise ValueError(f"start must be one of {', '.join(START_KINDS)}, got {self.start!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.start_noise >= 0:
            raise ValueError(f"start_noise must be >= 0, got {self.start_noise}")


@dataclass(frozen=True)
class DoriResult:
    """The embedding found ([1, tokens, dim]), the one the search started from, and the loss of every step."""

    embedding: torch.Tensor
    start: torch.Tensor
    losses: list[float] = field(default_factory=list)


def random_embedding_like(embedding: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian tokens with the overall standard deviation of `embedding` (Dori's random start)."""
    return embedding.std() * torch.randn(embedding.shape, generator=generator)


def perturb_embedding(embedding: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """`embedding` plus Gaussian noise of standard deviation `scale` times the embedding's own."""
    return embedding + scale * embedding.std() * torch.randn(embedding.shape, generator=generator)


def start_embedding(prompt: str, config: DoriConfig | None = None) -> torch.Tensor:
    """The [1, tokens, dim] embedding a search for `prompt`'s image starts from, as `config.start` and
    `config.start_noise` say (world text encoder, `diffmem.world.text.encode_prompts`)."""
    config = config or DoriConfig()
    generator = torch.Generator().manual_seed(config.seed)
    embedding = encode_prompts([prompt])
    if config.start == "random":
        embedding = random_embedding_like(embedding, generator)
    elif config.start == "unrelated":
        embedding = encode_prompts([config.unrelated_prompt])
    return perturb_embedding(embedding, config.start_noise, generator) if config.start_noise else embedding


def check_target(unet: UNet2DConditionModel, target: torch.Tensor) -> torch.Tensor:
    """`target` as a [1, C, H, W] float image in [0, 1] that `unet` generates, or a clear error."""
    if target.ndim == 3:
        target = target[None]
    size, channels = unet.config.sample_size, unet.config.in_channels
    if target.ndim != 4 or target.shape[0] != 1 or tuple(target.shape[1:]) != (channels, size, size):
        raise DiffmemError(f"the target image has shape {tuple(target.shape)}, but this model generates "
                           f"[{channels}, {size}, {size}] images; resize the target first")
    if not target.is_floating_point() or not torch.isfinite(target).all() or target.min() < 0 or target.max() > 1:
        raise DiffmemError("the target image must be a finite float tensor with values in [0, 1]")
    return target.float()


def check_embedding(unet: UNet2DConditionModel, embedding: torch.Tensor) -> torch.Tensor:
    """`embedding` as a finite [1, tokens, cross_attention_dim] context for `unet`, or a clear error."""
    if embedding.ndim == 2:
        embedding = embedding[None]
    dim = unet.config.cross_attention_dim
    if embedding.ndim != 3 or embedding.shape[0] != 1 or embedding.shape[2] != dim:
        raise DiffmemError(f"the text embedding has shape {tuple(embedding.shape)}, but this model's "
                           f"cross-attention takes [1, tokens, {dim}]")
    if not embedding.is_floating_point() or not torch.isfinite(embedding).all():
        raise DiffmemError("the text embedding must be a finite float tensor")
    return embedding.float()


def dori_search(
    unet: UNet2DConditionModel, target: torch.Tensor, start: torch.Tensor, config: DoriConfig | None = None
) -> DoriResult:
    """Minimise || eps - eps_theta(x_t, t, y) ||^2 over the text embedding y, with x_0 = `target` and fresh noise and
    timesteps every step (Kowalczuk et al. 2025, "Finding Dori"). The UNet's weights are left untouched."""
    config = config or DoriConfig()
    target = check_target(unet, target)
    start = check_embedding(unet, start)
    embedding = start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([embedding], lr=config.lr)
    # A generator of its own, offset from the start's, so the step noise does not replay the start noise.
    generator = torch.Generator().manual_seed(config.seed + 1)
    images = target.expand(config.batch_size, -1, -1, -1)
    was_training = unet.training
    unet.eval()
    losses = []
    try:
        for _ in range(config.steps):
            loss = training_loss(unet, images, embedding.expand(config.batch_size, -1, -1), generator)
            # Gradient for the embedding only: the UNet's parameters may require grad and must not accumulate any.
            (embedding.grad,) = torch.autograd.grad(loss, [embedding])
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        unet.train(was_training)
    return DoriResult(embedding=embedding.detach(), start=start.detach(), losses=losses)


def dori_attack(
    unet: UNet2DConditionModel, target: torch.Tensor, prompt: str, config: DoriConfig | None = None
) -> DoriResult:
    """Dori search for `target` on `unet`, started as `config` says from `prompt` (`start_embedding`)."""
    config = config or DoriConfig()
    return dori_search(unet, target, start_embedding(prompt, config), config)


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
    `is_copy` [N] the copy decision; `rate` the fraction of copies; `test` which copy test decided.
    """

    generated: torch.Tensor
    distance: torch.Tensor
    is_copy: torch.Tensor
    test: str

    @property
    def rate(self) -> float:
        return float(self.is_copy.float().mean()) if self.is_copy.numel() else 0.0


def attack_success(
    unet: UNet2DConditionModel,
    embedding: torch.Tensor,
    target: torch.Tensor,
    reference: torch.Tensor | None = None,
    settings: CheckSettings | None = None,
    copy: CopyConfig | None = None,
) -> AttackSuccess:
    """Does `embedding` make `unet` replicate `target`? Sample `settings.generations` fresh images from it (seeds
    from `settings.seed`, DDIM with guidance against the empty prompt) and test each for a copy of `target`.

    With `reference` (the training images, `target` among them) a generation is a copy when Carlini et al.'s
    relative test passes and its nearest reference image is `target`, as in `diffmem.world.check`. Without it
    there is nothing to be relative to, so `copy.distance_threshold` on the tiled L2 to `target` decides alone
    (it must then be set).
    """
    settings, copy = settings or CheckSettings(), copy or CopyConfig()
    target = check_target(unet, target)
    embedding = check_embedding(unet, embedding)
    seeds = seeds_for(1, settings)
    generated = generate_from_context(unet, embedding.expand(len(seeds), -1, -1), seeds, steps=settings.steps,
                                      guidance=settings.guidance)
    distance = paired_tiled_l2(generated, target.expand_as(generated), copy.tiles)
    if reference is None:
        if copy.distance_threshold is None:
            raise DiffmemError("without reference images the copy test needs an absolute distance threshold "
                               "(CopyConfig.distance_threshold)")
        return AttackSuccess(generated, distance, distance <= copy.distance_threshold, "absolute tiled L2")
    row = reference_row(target[0], reference)
    if row is None:
        raise DiffmemError("the target image is not among the reference images; pass the training set it "
                           "belongs to, or no reference and an absolute distance threshold")
    result = copy_decisions(generated, reference, copy)
    return AttackSuccess(generated, distance, result.is_copy & (result.nearest_index == row), "Carlini relative")


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
            "copy_test": self.after.test,
            "loss_first": round(self.result.losses[0], 5),
            "loss_last10_mean": round(sum(self.result.losses[-10:]) / len(self.result.losses[-10:]), 5),
            "embedding_shift": round(float((self.result.embedding - self.result.start).norm()
                                           / self.result.start.norm().clamp_min(1e-12)), 4),
        }


def run_dori(
    unet: UNet2DConditionModel,
    target: torch.Tensor,
    prompt: str,
    config: DoriConfig | None = None,
    reference: torch.Tensor | None = None,
    settings: CheckSettings | None = None,
    copy: CopyConfig | None = None,
) -> DoriOutcome:
    """Dori search for `target` from `prompt` (`dori_attack`), with `attack_success` of its start and of its result."""
    result = dori_attack(unet, target, prompt, config)
    return DoriOutcome(
        result=result,
        before=attack_success(unet, result.start, target, reference, settings, copy),
        after=attack_success(unet, result.embedding, target, reference, settings, copy),
    )
