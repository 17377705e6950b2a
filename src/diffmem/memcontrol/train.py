"""Fine-tune the world base with a PEFT method under a MemControl mask, optionally with a mitigation, through
`diffmem.world.train.finetune_loop` (the loop every world fine-tune uses)."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from diffmem.errors import DiffmemError
from diffmem.formats.safetensors_io import save_file, sha256_file, write_atomic
from diffmem.memcontrol.mask import Mask, check_mask_fits, mask_to_dict
from diffmem.memcontrol.methods import check_method, merge, prepare
from diffmem.memcontrol.mitigation import random_word_contexts, threshold_mitigated_loss
from diffmem.memcontrol.settings import (  # noqa: F401 (defined there, without torch)
    QUICK_LR_SCALE,
    QUICK_TRAIN,
    MemControlTrainConfig,
)
from diffmem.world.data import FINETUNE_SETS
from diffmem.world.diffusion import training_loss
from diffmem.world.model import BASE_SHA256, config_of, load_base, load_unet_file, unet_metadata, unet_tensors
from diffmem.world.text import encode_prompts
from diffmem.world.train import (
    caption_table,
    duplicated_rows,
    finetune_loop,
    image_records,
    table_contexts,
    training_rows,
)


def once_seen_rows(train_size: int, duplicated: list[int], share: float, seed: int) -> list[int]:
    """`share` of the non-duplicated training rows (rounded), drawn with `seed`, sorted."""
    rest = [r for r in range(train_size) if r not in set(duplicated)]
    count = round(share * len(rest))
    return sorted(np.random.default_rng(seed + 7).choice(rest, size=count, replace=False).tolist()) if count else []


@dataclass
class MaskedFinetune:
    """A trained (merged) UNet with the rows it saw."""

    unet: UNet2DConditionModel
    duplicated: list[int]
    seen_once: list[int]
    trainable_parameters: int
    final_loss_ema: float | None
    wall_time_s: float


def finetune_with_mask(base: UNet2DConditionModel, config: MemControlTrainConfig, mask: Mask | None = None,
                       progress: bool = True) -> MaskedFinetune:
    """Fine-tune a copy of `base` with `config.method` under `mask` (every attention module when None) and return
    it with the method merged into plain weights; `base` is untouched."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    method = check_method(config.method)
    if mask is not None:
        if not method.masked:
            raise DiffmemError(f"method {config.method!r} takes no mask")
        check_mask_fits(mask, base)
    train_set = FINETUNE_SETS[config.data]("train")
    count, repeats = config.duplicate
    duplicated = duplicated_rows(len(train_set), count, config.seed)
    seen_once = once_seen_rows(len(train_set), duplicated, config.rest_share, config.seed)
    rows = torch.cat([training_rows(len(train_set), duplicated, repeats, False) if duplicated else
                      torch.zeros(0, dtype=torch.long), torch.tensor(seen_once, dtype=torch.long)])
    if len(rows) == 0:
        raise DiffmemError("nothing to train on: no duplicated images and rest_share 0")
    captions, caption_index = caption_table(train_set)

    unet = copy.deepcopy(base).train()
    trainable = prepare(unet, config.method, mask)
    mitigation = config.mitigation
    if mitigation.kind == "rwa":
        context_of = random_word_contexts(captions, caption_index, mitigation.rwa_probability)
    else:
        context_of = table_contexts(encode_prompts(captions), caption_index)
    loss_fn = threshold_mitigated_loss(mitigation.threshold) if mitigation.kind == "threshold" else training_loss
    began = time.time()
    running = None
    if trainable:
        running = finetune_loop(unet, trainable, train_set.images, rows, context_of, steps=config.steps,
                                batch_size=config.batch_size, lr=config.learning_rate,
                                caption_dropout=config.caption_dropout, noise_offset=config.noise_offset,
                                seed=config.seed, loss_fn=loss_fn, progress=progress,
                                desc=f"memcontrol {config.method}")
    wall = time.time() - began
    merged = merge(unet).eval().requires_grad_(False)
    return MaskedFinetune(merged, duplicated, seen_once, sum(p.numel() for p in trainable), running, wall)


def manifest_of(result: MaskedFinetune, config: MemControlTrainConfig, mask: Mask | None,
                command: str | None = None) -> dict:
    """The fine-tune's manifest in `diffmem world finetune`'s layout (so `diffmem.bench` and `world check` read it)
    plus the method, mask and mitigation; `command` is the command line it records."""
    train_set, heldout = FINETUNE_SETS[config.data]("train"), FINETUNE_SETS[config.data]("heldout")
    settings = {**asdict(config), "duplicate": list(config.duplicate), "lr": config.learning_rate, "format": "full"}
    return {
        "command": command,
        "settings": settings,
        "mask": None if mask is None else mask_to_dict(mask),
        "data": config.data,
        "duplicated": image_records(train_set, result.duplicated),
        "seen_once": image_records(train_set, result.seen_once),
        "heldout": image_records(heldout, list(range(len(heldout)))),
        "trainable_parameters": result.trainable_parameters,
        "final_loss_ema": None if result.final_loss_ema is None else round(result.final_loss_ema, 5),
        "wall_time_s": round(result.wall_time_s, 1),
    }


def train_masked(out: str | Path, config: MemControlTrainConfig, mask: Mask | None = None,
                 base: str | Path | None = None, progress: bool = True, command: str | None = None) -> dict:
    """Fine-tune the world base (the committed one, or a world UNet file) with a method under `mask`; write the
    merged UNet (float32, so small PEFT updates survive) to `out` and its manifest to `<out minus suffix>.json`.
    Returns the manifest."""
    out = Path(out)
    if base is None:
        base_unet, base_sha = load_base(), BASE_SHA256
    else:
        base_unet, base_sha = load_unet_file(base), sha256_file(base)
    result = finetune_with_mask(base_unet, config, mask, progress)
    protect = () if base is None else (base,)
    save_file(unet_tensors(result.unet, torch.float32), out,
              unet_metadata(config_of(base_unet), {"diffmem_world": "memcontrol", "diffmem_method": config.method}),
              protect=protect)
    manifest = {**manifest_of(result, config, mask, command), "base_sha256": base_sha, "sha256": sha256_file(out)}
    write_atomic((json.dumps(manifest, indent=2) + "\n").encode(), out.with_suffix(".json"), protect=protect)
    return manifest

