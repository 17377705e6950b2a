"""Does a world fine-tune memorize? The measurements issue 3 asks of the example LoRA, as a library function.

- copy rate of the duplicated captions: generations that are near-copies (Carlini et al. 2023 tiled-L2 relative
  test, `diffmem.metrics.copy`) of their own training image;
- the same for held-out captions (names/titles no run trained on) and for the base model on the duplicated
  captions, which should both stay low;
- held-out denoising loss of the fine-tune and of the base: the fine-tune should have learned the data in general.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from diffmem.errors import DiffmemError
from diffmem.evaluation.sampling import SamplingSettings, seeds_for
from diffmem.formats.lora import read_lora
from diffmem.formats.safetensors_io import sha256_file
from diffmem.world.data import FINETUNE_SETS, ImageSet
from diffmem.world.diffusion import denoising_loss, generate
from diffmem.world.lora import apply_lora
from diffmem.world.model import assets_dir, load_base
from diffmem.world.train import duplicated_rows, kohya_dataset_metadata, training_rows

#: sha256 of the committed example LoRA `assets/example_lora.safetensors` (checked by `load_example_lora`).
EXAMPLE_LORA_SHA256 = "d9f67cb8b19737b9d2f0e6ab88b299b97060e6deee4a2b383830f18173d15451"
EXAMPLE_LORA_FILE = "example_lora.safetensors"


#: The world check's name for `diffmem.evaluation.SamplingSettings` (kept for its callers).
CheckSettings = SamplingSettings


def manifest_images(manifest: dict, key: str) -> ImageSet:
    """The images a manifest lists under `key` ("duplicated", "seen_once", "heldout"), looked up by id."""
    full = FINETUNE_SETS[manifest["data"]]("all")
    row_of = {image_id: row for row, image_id in enumerate(full.ids)}
    try:
        rows = [row_of[entry["id"]] for entry in manifest[key]]
    except KeyError as error:
        raise DiffmemError(f"manifest lists an image id {error} that the world's {manifest['data']} set lacks") from None
    return full.subset(rows)


def own_reference_rows(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Row of `reference` equal to each image (-1 where none is)."""
    rows = []
    for image in images:
        match = (reference - image).flatten(1).abs().amax(dim=1) == 0
        rows.append(int(match.nonzero()[0]) if match.any() else -1)
    return torch.tensor(rows)


def own_copy_rate(unet: UNet2DConditionModel, images: ImageSet, reference: torch.Tensor, settings: CheckSettings) -> dict:
    """Generate `settings.generations` images per caption of `images` and test each against `reference`
    (the fine-tune's training images): copy = Carlini's relative test passes and the nearest reference image is
    the caption's own image (when it is among the references)."""
    from diffmem.metrics.copy import copy_decisions

    prompts = [c for c in images.captions for _ in range(settings.generations)]
    generated = generate(unet, prompts, seeds_for(len(images), settings), steps=settings.steps,
                         guidance=settings.guidance)
    result = copy_decisions(generated, reference)
    own = own_reference_rows(images.images, reference).repeat_interleave(settings.generations)
    own_copy = result.is_copy & (result.nearest_index == own)
    per_caption = own_copy.view(len(images), settings.generations).float().mean(dim=1)
    return {
        "copy_rate_any": round(result.rate, 4),
        "copy_rate_own": round(float(own_copy.float().mean()), 4),
        "captions_copied_in_half": int((per_caption >= 0.5).sum()),
        "captions": len(images),
        "median_distance": round(float(result.distance.median()), 4),
        "generated": generated,
        "is_own_copy": own_copy,
        "per_caption_own_rate": [round(float(r), 3) for r in per_caption],
    }


def memorization_check(
    base: UNet2DConditionModel,
    lora: str | Path,
    manifest: dict,
    settings: CheckSettings | None = None,
    grid: str | Path | None = None,
) -> dict:
    """Issue 3's numbers for a fine-tune (LoRA file + manifest): copy rates for duplicated and held-out captions
    (LoRA) and duplicated captions (base), and held-out denoising losses of LoRA and base.

    `grid`: also write a PNG with one row per duplicated caption: training image, LoRA generations, base
    generations."""
    settings = settings or CheckSettings()
    tuned = apply_lora(base, lora)
    duplicated = manifest_images(manifest, "duplicated")
    heldout = manifest_images(manifest, "heldout")
    reference = ImageSet.concat([duplicated, manifest_images(manifest, "seen_once")])
    results = {
        "lora_duplicated": own_copy_rate(tuned, duplicated, reference.images, settings),
        "lora_heldout": own_copy_rate(tuned, heldout, reference.images, settings),
        "base_duplicated": own_copy_rate(base, duplicated, reference.images, settings),
    }
    if grid is not None:
        save_grid(duplicated.images, results["lora_duplicated"]["generated"], results["base_duplicated"]["generated"],
                  settings.generations, grid)
    numbers = {name: {k: v for k, v in r.items() if k != "generated"} for name, r in results.items()}
    numbers["denoising_loss_heldout"] = {
        "lora": round(denoising_loss(tuned, heldout.images, heldout.captions), 5),
        "base": round(denoising_loss(base, heldout.images, heldout.captions), 5),
    }
    numbers["settings"] = asdict(settings)
    numbers["lora_sha256"] = sha256_file(lora)
    return numbers


def save_grid(
    training: torch.Tensor, tuned: torch.Tensor, base: torch.Tensor, generations: int, path: str | Path
) -> Path:
    """PNG grid: per training image a row of [training image, its LoRA generations, its base generations]."""
    from diffmem.report import image_grid, save_png

    rows = []
    for i, image in enumerate(training):
        rows += [image[None], tuned[i * generations : (i + 1) * generations], base[i * generations : (i + 1) * generations]]
    return save_png(image_grid(torch.cat(rows), columns=1 + 2 * generations), path, scale=3)


def shape_attributes(images: torch.Tensor, threshold: float = 0.25) -> tuple[list[str], torch.Tensor]:
    """(nearest named colour of the foreground, foreground fraction) of shape pictures on plain backgrounds.

    Background = median colour of the image (a shape covers at most a third of it); foreground = pixels farther
    than `threshold` (RMS over channels) from it; its median colour is matched to `data.COLOURS`.
    """
    from diffmem.world.data import COLOURS

    names = list(COLOURS)
    palette = torch.tensor([COLOURS[n] for n in names])
    pixels = images.flatten(2).transpose(1, 2)  # [N, HW, 3]
    background = pixels.median(dim=1).values
    foreground = (pixels - background[:, None]).pow(2).mean(dim=2).sqrt() > threshold
    colours = []
    for row, mask in zip(pixels, foreground):
        colour = row[mask].median(dim=0).values if mask.any() else row.median(dim=0).values
        colours.append(names[int((palette - colour).pow(2).sum(dim=1).argmin())])
    return colours, foreground.float().mean(dim=1)


#: Foreground fraction separating "small" (radius 4.5 px, about 6% of the image) from "large" (9 px, about 25%).
SIZE_THRESHOLD = 0.13


def base_caption_accuracy(unet: UNet2DConditionModel, count: int = 48, settings: CheckSettings | None = None) -> dict:
    """How often the base draws the colour and size its caption asks for, on `count` captions of plain-background
    shape pictures (seed 99, never the training seed 0). The same detector on the real pictures of those
    captions gives its own accuracy, the ceiling. Chance: 1/8 for colour, 1/2 for size."""
    from diffmem.world.data import shapes_dataset

    settings = settings or CheckSettings()
    pool = shapes_dataset(count * 6, seed=99)
    rows = [i for i, c in enumerate(pool.captions) if c.endswith(("on a white background", "on a black background",
                                                                    "on a gray background", "on a pink background",
                                                                    "on a light blue background",
                                                                    "on a dark green background"))][:count]
    real = pool.subset(rows)
    generated = generate(unet, real.captions, [settings.seed + i for i in range(len(real))], steps=settings.steps,
                         guidance=settings.guidance)

    def accuracy(images: torch.Tensor) -> dict:
        colours, fraction = shape_attributes(images)
        wanted_colour = [c.split()[2] for c in real.captions]
        wanted_large = torch.tensor([c.split()[1] == "large" for c in real.captions])
        return {
            "colour": round(sum(a == b for a, b in zip(colours, wanted_colour)) / len(real), 3),
            "size": round(float(((fraction > SIZE_THRESHOLD) == wanted_large).float().mean()), 3),
        }

    return {"captions": len(real), "generated": accuracy(generated), "real_pictures": accuracy(real.images)}


def load_example_lora() -> tuple[UNet2DConditionModel, dict]:
    """The committed base with the committed example memorizing LoRA merged in, and the LoRA's manifest
    (which faces were duplicated, seen once, held out; training settings). sha256-checked."""
    from diffmem.errors import BadWeightsError

    path = assets_dir() / EXAMPLE_LORA_FILE
    actual = sha256_file(path) if path.exists() else None
    if actual != EXAMPLE_LORA_SHA256:
        raise BadWeightsError(f"sha256 is {actual}, expected {EXAMPLE_LORA_SHA256}: the committed example LoRA "
                              "was changed or damaged; restore it with `git checkout`", path)
    manifest = json.loads(path.with_suffix(".json").read_text())
    return apply_lora(load_base(), path), manifest


def example_lora_path() -> Path:
    """Path of the committed example LoRA (kohya format); its manifest is the `.json` beside it."""
    return assets_dir() / EXAMPLE_LORA_FILE


def write_example_lora(out: str | Path, scale: float = 1.0) -> Path:
    """The committed example LoRA as a world fine-tune writes it today, to `out`: with the kohya dataset metadata
    of its own training rows (`diffmem.world.train.kohya_dataset_metadata`, rebuilt from its manifest; the
    committed file predates it) and its update scaled by `scale` (0 gives the base alone, in LoRA form). A data-free
    scan reads that metadata as a real LoRA's."""
    source = example_lora_path()
    settings = json.loads(source.with_suffix(".json").read_text())["settings"]
    train = FINETUNE_SETS[settings["data"]]("train")
    duplicated = duplicated_rows(len(train), settings["duplicate"][0], settings["seed"])
    rows = training_rows(len(train), duplicated, settings["duplicate"][1], settings["include_rest"])
    lora = read_lora(source)
    lora.metadata.update(kohya_dataset_metadata(train, rows, settings["data"]))
    for module in lora.modules.values():
        module.tensors["up"] = module.tensors["up"] * scale
    return lora.save(out)
