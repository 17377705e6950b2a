"""Adversarial fine-tuning (Kowalczuk et al. 2025, "Finding Dori: Memorization in Text-to-Image Diffusion Models Is
Not Local", seed 002): a global mitigation that does not assume memorization sits in a few neurons.

Each round searches adversarial text embeddings for every memorized image with the Dori attack
(`diffmem.attack.dori_attack`, from several starts), then fine-tunes every UNet weight so that those embeddings (and
the memorized captions themselves) denoise towards a *surrogate* image, one the model would draw had it never
memorized the target (by default a generation of the base model, which never saw it), while the ordinary denoising
loss on other training data holds quality. Training goes through `diffmem.world.train.finetune_loop`, the loop every
world fine-tune uses: the adversarial pairs and the ordinary data are one training multiset, mixed by
`adversarial_rows`. File I/O lives in `diffmem.mitigations.commands`.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from diffmem.attack.dori import dori_attack
from diffmem.attack.search_loss import final_search_loss
from diffmem.errors import DiffmemError
from diffmem.formats.safetensors_io import sha256_file, write_atomic
from diffmem.mitigations.run import load_world_model, read_manifest, save_world_unet
from diffmem.mitigations.settings import AdversarialFinetuneConfig  # defined there, without diffusers
from diffmem.world.check import manifest_images
from diffmem.world.data import ImageSet
from diffmem.world.diffusion import WORLD_GUIDANCE, WORLD_STEPS, generate
from diffmem.world.model import load_base, load_unet_file
from diffmem.world.text import encode_prompts
from diffmem.world.train import finetune_loop, table_contexts


def adversarial_rows(adversarial: int, ordinary: int, share: float) -> torch.Tensor:
    """Rows of a training multiset whose uniform draws hit the first `adversarial` rows with probability close to
    `share` and the next `ordinary` rows otherwise: adversarial rows repeated, ordinary rows once."""
    if adversarial < 1:
        raise ValueError("need at least one adversarial row")
    if ordinary == 0 or share == 1.0:
        return torch.arange(adversarial)
    repeats = max(1, round(share / (1 - share) * ordinary / adversarial))
    return torch.cat([torch.arange(adversarial).repeat(repeats), torch.arange(adversarial, adversarial + ordinary)])


def paired_training_set(embeddings: torch.Tensor, surrogates: torch.Tensor, ordinary: ImageSet
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, contexts, caption index) of one training set holding the pairs (embedding i, surrogate i) first and
    the ordinary images with their captions after, in `diffmem.world.train.table_contexts`' layout: context row 0 is
    the empty prompt (for caption dropout), image row r trains with context row `caption_index[r]`."""
    if len(embeddings) != len(surrogates):
        raise ValueError(f"{len(embeddings)} embeddings but {len(surrogates)} surrogate images")
    contexts = [encode_prompts([""]), embeddings]
    if len(ordinary):
        contexts.append(encode_prompts(ordinary.captions))
    images = torch.cat([surrogates, ordinary.images]) if len(ordinary) else surrogates
    return images, torch.cat(contexts), torch.arange(1, 1 + len(images))


def surrogate_images(model: UNet2DConditionModel, captions: list[str], seed: int = 0, steps: int = WORLD_STEPS,
                     guidance: float = WORLD_GUIDANCE) -> torch.Tensor:
    """One generation per caption from `model` (a model that did not memorize them, e.g. the base): the image each
    memorized caption and its adversarial embeddings are taught to produce instead of the training image."""
    return generate(model, captions, [seed + i for i in range(len(captions))], steps=steps, guidance=guidance)


@dataclass
class AdversarialRound:
    """One round: the Dori loss each search reached (mean of its last 10 steps, per image and start, before that
    round's update) and the fine-tuning loss after it."""

    search_loss: dict[str, list[float]]
    finetune_loss: float | None


@dataclass
class AdversarialResult:
    """The adversarially fine-tuned UNet (eval mode, frozen), every embedding it was trained against
    ([E, tokens, dim]; image index of each in `embedding_image`), the surrogates, and what each round did."""

    unet: UNet2DConditionModel
    embeddings: torch.Tensor
    embedding_image: list[int]
    surrogates: torch.Tensor
    rounds: list[AdversarialRound]
    wall_time_s: float

    def report(self) -> dict:
        return {"rounds": [asdict(r) for r in self.rounds], "embeddings": len(self.embeddings),
                "wall_time_s": round(self.wall_time_s, 1)}


def adversarial_finetune(
    unet: UNet2DConditionModel,
    memorized: ImageSet,
    ordinary: ImageSet,
    surrogates: torch.Tensor,
    config: AdversarialFinetuneConfig | None = None,
    progress: bool = False,
) -> AdversarialResult:
    """Adversarially fine-tune a copy of `unet` (`unet` is untouched) against Dori embeddings for every image of
    `memorized` (with its caption), mapping them to `surrogates` [len(memorized), 3, H, W], with the ordinary loss on
    `ordinary` (other training data; may be empty)."""
    config = config or AdversarialFinetuneConfig()
    if len(memorized) == 0:
        raise DiffmemError("adversarial fine-tuning needs at least one memorized image")
    if tuple(surrogates.shape) != tuple(memorized.images.shape):
        raise DiffmemError(f"need one surrogate image per memorized image: surrogates {tuple(surrogates.shape)}, "
                           f"memorized {tuple(memorized.images.shape)}")
    began = time.time()
    model = copy.deepcopy(unet).train().requires_grad_(True)
    trainable = list(model.parameters())
    embeddings: list[torch.Tensor] = []
    owner: list[int] = []
    if config.include_captions:
        embeddings.append(encode_prompts(memorized.captions))
        owner.extend(range(len(memorized)))
    rounds = []
    for round_index in range(config.rounds):
        search_loss: dict[str, list[float]] = {start: [] for start in config.starts}
        for image_index, (image, caption) in enumerate(zip(memorized.images, memorized.captions)):
            for start_index, start in enumerate(config.starts):
                # A seed per round and start: later rounds look for new triggers, not the same search again.
                seed = config.search.seed + 1000 * (round_index + 1) + 100 * start_index + image_index
                search = replace(config.search, start=start, seed=seed)
                result = dori_attack(model, image[None], caption, search)
                embeddings.append(result.embedding)
                owner.append(image_index)
                search_loss[start].append(round(final_search_loss(result.losses), 5))
        found = torch.cat(embeddings)
        images, contexts, caption_index = paired_training_set(found, surrogates[owner], ordinary)
        rows = adversarial_rows(len(found), len(ordinary), config.adversarial_share)
        loss = finetune_loop(model, trainable, images, rows, table_contexts(contexts, caption_index),
                             steps=config.steps_per_round, batch_size=config.batch_size, lr=config.lr,
                             caption_dropout=config.caption_dropout, noise_offset=config.noise_offset,
                             seed=config.seed + round_index, progress=progress,
                             desc=f"adversarial round {round_index + 1}/{config.rounds}")
        rounds.append(AdversarialRound(search_loss, None if loss is None else round(loss, 5)))
    return AdversarialResult(model.eval().requires_grad_(False), torch.cat(embeddings), owner, surrogates, rounds,
                             time.time() - began)


def adversarial_finetune_files(
    out: str | Path,
    lora: str | Path | None = None,
    base: str | Path | None = None,
    manifest: str | Path | None = None,
    surrogate_base: str | Path | None = None,
    config: AdversarialFinetuneConfig | None = None,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Adversarially fine-tune a world model (`base`, default the committed one, plus an optional `lora`) against
    the memorized images of its fine-tune manifest (default: the `.json` beside `lora`, else beside `base`).

    Memorized = the manifest's duplicated images; ordinary data = its once-seen images; surrogates = generations of
    `surrogate_base` (default: `base` when a LoRA is given, the committed world base otherwise) for the duplicated
    captions. Writes the UNet (float32, world UNet file that `load_unet_file`, `diffmem attack dori --base`, `bench`
    and `world check` read) to `out` and a manifest in `diffmem world finetune`'s layout to `<out minus suffix>.json`
    (atomic; never over an input). `command` is the command line the manifest records. Returns that manifest."""
    config = config or AdversarialFinetuneConfig()
    out = Path(out)
    manifest_path = Path(manifest) if manifest is not None else Path(lora or base or "").with_suffix(".json")
    if manifest is None and lora is None and base is None:
        raise DiffmemError("give --lora or --base (a world fine-tune with its manifest beside it), or --manifest")
    record = read_manifest(manifest_path)
    inputs = tuple(Path(p) for p in (lora, base, manifest_path, surrogate_base) if p is not None)
    if out.resolve() in {p.resolve() for p in inputs} or out.with_suffix(".json").resolve() in {
            p.resolve() for p in inputs}:
        raise DiffmemError("refusing to overwrite an input file; choose another --out", out)
    memorized = manifest_images(record, "duplicated")
    ordinary = manifest_images(record, "seen_once") if record.get("seen_once") else memorized.subset([])
    unet = load_world_model(base, lora)
    if surrogate_base is not None:
        reference_model, reference_name = load_unet_file(surrogate_base), str(surrogate_base)
    elif lora is not None:
        reference_model, reference_name = load_world_model(base, None), str(base or "committed world base")
    else:
        reference_model, reference_name = load_base(), "committed world base"
    surrogates = surrogate_images(reference_model, memorized.captions, config.seed, config.surrogate_steps,
                                  config.surrogate_guidance)
    result = adversarial_finetune(unet, memorized, ordinary, surrogates, config, progress)
    save_world_unet(result.unet, out, "adversarial", protect=inputs)
    written = {
        "command": command,
        "data": record["data"],
        "duplicated": record["duplicated"],
        "seen_once": record.get("seen_once", []),
        "heldout": record["heldout"],
        "settings": {"format": "full", "mitigation": "adversarial"},
        "adversarial": {"config": config.to_dict(), "source_manifest": str(manifest_path),
                        "lora": None if lora is None else str(lora), "base": str(base or "committed world base"),
                        "surrogate_base": reference_name,
                        **result.report()},
        "sha256": sha256_file(out),
    }
    write_atomic((json.dumps(written, indent=2) + "\n").encode(), out.with_suffix(".json"), protect=inputs)
    return written
