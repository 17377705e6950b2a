"""Measure one world model (a fine-tune, a filtered fine-tune, or the base) the way the benchmark compares them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel

from diffmem.bench.settings import BenchSettings  # defined there, without diffusers
from diffmem.metrics.amd import amd
from diffmem.metrics.copy import copy_decisions, paired_tiled_l2
from diffmem.metrics.extraction import extraction_attack
from diffmem.metrics.features import embed
from diffmem.metrics.fid import fid_from_features
from diffmem.world.check import manifest_images, own_reference_rows
from diffmem.world.data import ImageSet
from diffmem.world.diffusion import denoising_loss, generate
from diffmem.world.style import style_success


@dataclass
class Probe:
    """What a fine-tune is measured against, read once from its manifest: the duplicated images (with captions),
    everything it trained on (the copy test's references), the held-out images of its data set, and which data set
    it is ("style" adds the style's success on held-out captions to the quality numbers)."""

    duplicated: ImageSet
    reference: torch.Tensor
    heldout: ImageSet
    embedder: object
    data: str = "faces"
    reference_features: torch.Tensor = field(init=False)
    heldout_features: torch.Tensor = field(init=False)
    own_index: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.reference_features = embed(self.embedder, self.reference)
        self.heldout_features = embed(self.embedder, self.heldout.images)
        self.own_index = own_reference_rows(self.duplicated.images, self.reference)

    @classmethod
    def from_manifest(cls, manifest: dict, embedder=None) -> Probe:
        """The probe of a world fine-tune's manifest (`diffmem world finetune` writes it)."""
        if embedder is None:
            from diffmem.metrics.embedder import load_copy_embedder

            embedder = load_copy_embedder()
        duplicated = manifest_images(manifest, "duplicated")
        reference = ImageSet.concat([duplicated, manifest_images(manifest, "seen_once")]).images
        return cls(duplicated, reference, manifest_images(manifest, "heldout"), embedder, manifest.get("data", "faces"))


def duplicated_generations(unet: UNet2DConditionModel, probe: Probe, settings: BenchSettings) -> torch.Tensor:
    """`settings.generations` images per duplicated caption, [captions * generations, 3, H, W], caption-major."""
    prompts = [c for c in probe.duplicated.captions for _ in range(settings.generations)]
    seeds = [settings.seed + i for i in range(len(prompts))]
    return generate(unet, prompts, seeds, steps=settings.steps, guidance=settings.guidance)


def own_distances(generated: torch.Tensor, probe: Probe, generations: int) -> torch.Tensor:
    """Tiled-L2 distance of each duplicated-caption generation (caption-major) to its own training image."""
    return paired_tiled_l2(generated, probe.duplicated.images.repeat_interleave(generations, dim=0))


def heldout_generations(unet: UNet2DConditionModel, probe: Probe, settings: BenchSettings, per_caption: int,
                        first_seed: int) -> torch.Tensor:
    """`per_caption` images of each held-out caption (caption-major), from seeds `first_seed`, `first_seed` + 1, ..."""
    prompts = [c for c in probe.heldout.captions for _ in range(per_caption)]
    return generate(unet, prompts, [first_seed + i for i in range(len(prompts))], steps=settings.steps,
                    guidance=settings.guidance)


def quality_generations(unet: UNet2DConditionModel, probe: Probe, settings: BenchSettings) -> torch.Tensor:
    """`settings.quality_generations` images per held-out caption (seeds after those of the copy test)."""
    return heldout_generations(unet, probe, settings, settings.quality_generations, settings.seed + 100_000)


#: Generations per held-out caption that a style fine-tune's style success is read on (96 images for the style
#: set's 24 held-out captions). One per caption, as FID uses, moves the share in steps of 4 points with a binomial
#: error near 9 at a success of 70%: too coarse for issue 18's "keep 90% of the style". Not a `BenchSettings` field,
#: so that rows of the other data sets keep their settings id.
STYLE_GENERATIONS = 4


def style_generations(unet: UNet2DConditionModel, probe: Probe, settings: BenchSettings) -> torch.Tensor:
    """`STYLE_GENERATIONS` images per held-out caption (seeds after those of `quality_generations`)."""
    return heldout_generations(unet, probe, settings, STYLE_GENERATIONS, settings.seed + 200_000)


#: What `measure` reports of every model, the keys of its numbers (a style fine-tune's rows add ``style_success``).
MEASUREMENTS = ("copy_rate", "any_copy_rate", "images_copied", "captions_copied", "own_distance", "extracted", "amd",
                "heldout_loss", "duplicated_loss", "fid")


def measure(unet: UNet2DConditionModel, probe: Probe, settings: BenchSettings) -> tuple[dict, torch.Tensor]:
    """Memorization and quality numbers of one model, and its duplicated-caption generations.

    - copy_rate: share of duplicated-caption generations that pass Carlini's relative tiled-L2 test against the
      training images with their own caption's image as nearest (`diffmem.metrics.copy`);
    - any_copy_rate: share that pass the same test with any training image as nearest: a model that draws a
      memorized image for another caption (a filter that unbinds images from their captions, docs/caption-readers.md)
      copies no less for it;
    - images_copied: how many different training images those copies are of;
    - captions_copied: duplicated captions copied in at least half of their generations;
    - own_distance: median tiled-L2 distance of a generation to its own caption's training image;
    - extracted: training images the extraction attack recovers from those generations (Carlini et al. 2023);
    - amd: average minimum cosine distance to the training images in the copy embedder's space (MemControl; low =
      memorized);
    - heldout_loss / duplicated_loss: denoising loss on the held-out images and on the duplicated images (their
      own captions), at fixed noise;
    - fid: FID of held-out-caption generations against the held-out images, copy-embedder features;
    - style_success (style fine-tunes only): share of `STYLE_GENERATIONS` generations per held-out caption in the
      style (`diffmem.world.style.style_success`), what a style LoRA is for.
    """
    generated = duplicated_generations(unet, probe, settings)
    decisions = copy_decisions(generated, probe.reference)
    own = probe.own_index.repeat_interleave(settings.generations)
    own_copy = decisions.is_copy & (decisions.nearest_index == own)
    per_caption = own_copy.view(len(probe.duplicated), settings.generations).float().mean(dim=1)
    own_distance = own_distances(generated, probe, settings.generations)
    per_prompt = generated.view(len(probe.duplicated), settings.generations, *generated.shape[1:])
    extraction = extraction_attack(per_prompt, train=probe.reference)
    features = embed(probe.embedder, generated)
    quality = quality_generations(unet, probe, settings)
    numbers = {
        "copy_rate": round(float(own_copy.float().mean()), 4),
        "any_copy_rate": round(decisions.rate, 4),
        "images_copied": len(set(decisions.nearest_index[decisions.is_copy].tolist())),
        "captions_copied": int((per_caption >= 0.5).sum()),
        "own_distance": round(float(own_distance.median()), 4),
        "extracted": extraction.extracted_images,
        "amd": round(amd(features, probe.reference_features), 4),
        "heldout_loss": round(denoising_loss(unet, probe.heldout.images, probe.heldout.captions,
                                             timesteps_per_image=settings.timesteps_per_image), 6),
        "duplicated_loss": round(denoising_loss(unet, probe.duplicated.images, probe.duplicated.captions,
                                                timesteps_per_image=settings.timesteps_per_image), 6),
        "fid": round(fid_from_features(probe.heldout_features, embed(probe.embedder, quality)), 3),
    }
    if probe.data == "style":
        numbers["style_success"] = round(style_success(style_generations(unet, probe, settings)), 4)
    return numbers, generated


def retained(value: float, base: float, tuned: float) -> float | None:
    """Share of the fine-tune's change from `base` to `tuned` that a mitigated model's `value` keeps
    (1 = all of it, 0 = back at the base); None when the fine-tune changed nothing."""
    if tuned == base:
        return None
    return (base - value) / (base - tuned)
