"""The settings of `diffmem bench` and `diffmem bench-real` (how models are sampled and scored, which variants
run), in a module that imports no model library, so their `--help` shows the defaults without loading diffusers.
`diffmem.bench.evaluate` and `diffmem.bench.real` re-export what they used to define."""

from __future__ import annotations

from dataclasses import dataclass

from diffmem.bench.grid import FULL_PLAN, QUICK_PLAN, VARIATION_PLAN
from diffmem.errors import DiffmemError
from diffmem.world.settings import WORLD_GUIDANCE


@dataclass(frozen=True)
class BenchSettings:
    """How each model of the benchmark is sampled and scored.

    Args:
        generations: generations per duplicated caption for the copy test, AMD and extraction. 6 x 5 captions
            keeps one model's measurement near half a minute on one CPU thread; every model uses the same seeds,
            so differences between mitigations are not sampling noise between seeds.
        quality_generations: generations per held-out caption for FID.
        steps: DDIM steps. 10, not the world's 25: on the example LoRA the per-caption copy rates at 10 and
            25 steps differ by at most one generation in eight (`diffmem bench --steps` to change it).
        guidance: classifier-free guidance scale, as everywhere in the world.
        seed: first sampling seed.
        timesteps_per_image: stratified timesteps per image of the denoising losses.
    """

    generations: int = 6
    quality_generations: int = 1
    steps: int = 10
    guidance: float = WORLD_GUIDANCE
    seed: int = 1000
    timesteps_per_image: int = 8


#: The plans of variants `diffmem bench-real --plan` names.
PLANS = {"quick": QUICK_PLAN, "variation": VARIATION_PLAN, "full": FULL_PLAN}


@dataclass(frozen=True)
class RealBenchSettings:
    """How every model (base, LoRA, filtered LoRA) is sampled and scored; rows measured with other settings are
    kept apart (`settings_id`).

    Args:
        generations: images per suspected caption. 4, Wen et al.'s number per prompt; the extraction attack
            needs at least 3 near-identical generations of a caption to call it extracted.
        heldout_generations: images per held-out caption (for FID).
        steps: sampling steps. 25, the usual interactive setting for Stable Diffusion 1.x/2.x.
        guidance: classifier-free guidance scale. None (default): the model's own (`Backend.default_guidance`:
            7.5 for Stable Diffusion, also Wen et al.'s; 7.0 for SD3; 1.0 for Flux, whose distilled guidance is
            inside the model).
        seed: generation g of every caption starts from the noise of seed `seed + g` (a CPU generator, so the
            noise is the same on every device); held-out captions use seeds from `seed + 10000`.
        timesteps_per_image: stratified noise levels per image of the denoising losses (as the world benchmark).
        embedder: the feature space of AMD and FID: "pixelsN" (raw pixels average-pooled to N x N, no learned
            network), "safety-checker" (the CLIP image encoder SD 1.x folders ship) or a feature-network file
            given with ``--embedder``. Default "pixels16": the project's copy embedder is trained on the world's
            32 x 32 images only, no learned network for real photos ships with diffmem, and not every base has a
            safety checker.
        copy_distance: optional absolute bound on the tiled-L2 distance that a copy must also meet
            (`CopyConfig.distance_threshold`); None uses Carlini et al.'s relative test alone.
    """

    generations: int = 4
    heldout_generations: int = 1
    steps: int = 25
    guidance: float | None = None
    seed: int = 0
    timesteps_per_image: int = 8
    embedder: str = "pixels16"
    copy_distance: float | None = None

    def __post_init__(self) -> None:
        if self.generations < 1 or self.heldout_generations < 1 or self.steps < 1:
            raise DiffmemError("generations, held-out generations and steps must each be at least 1")
