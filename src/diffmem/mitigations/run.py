"""File-level runs of the pruning mitigations: read the model and the prompts, run a method, write the mask (and,
for a world model, optionally the pruned UNet), and measure a world model's memorization and quality before and
after."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from diffmem.errors import DiffmemError, FileFormatError
from diffmem.formats.safetensors_io import save_file, write_atomic
from diffmem.mitigations.pruning import (
    WeightMasks,
    apply_masks,
    check_masks_fit,
    load_masks,
    masked_count,
    random_masks,
    save_masks,
)


@dataclass
class Prompts:
    """The prompts a pruning method needs: memorized ones to mitigate, ordinary ones for activation statistics,
    and non-memorized calibration prompts for NeMo's memorization threshold."""

    memorized: list[str]
    ordinary: list[str] = field(default_factory=list)
    calibration: list[str] = field(default_factory=list)


def read_manifest(path: str | Path) -> dict:
    """A world fine-tune manifest (`diffmem world finetune` writes it beside the LoRA)."""
    path = Path(path)
    if not path.is_file():
        raise DiffmemError("no such manifest file", path)
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FileFormatError(f"is not a JSON manifest ({error})", path) from None
    if not isinstance(manifest, dict) or not {"data", "duplicated", "heldout"} <= manifest.keys():
        raise FileFormatError("is not a world fine-tune manifest (needs `data`, `duplicated`, `heldout`)", path)
    return manifest


def manifest_prompts(manifest: dict) -> Prompts:
    """Memorized = the duplicated captions; ordinary = held-out and seen-once captions (the fine-tune did not
    memorize them); calibration = the held-out captions alone (never trained on)."""
    from diffmem.world.check import manifest_images

    captions = {key: manifest_images(manifest, key).captions for key in ("duplicated", "seen_once", "heldout")
                if manifest.get(key)}
    return Prompts(captions["duplicated"], captions.get("heldout", []) + captions.get("seen_once", []),
                   captions.get("heldout", []))


def load_world_model(base: str | Path | None, lora: str | Path | None) -> UNet2DConditionModel:
    """The committed world base (or a world UNet file) with an optional LoRA merged in."""
    from diffmem.world.lora import apply_lora
    from diffmem.world.model import load_base, load_unet_file

    unet = load_base() if base is None else load_unet_file(base)
    return unet if lora is None else apply_lora(unet, lora)


def save_world_unet(unet: UNet2DConditionModel, path: str | Path, method: str,
                    protect: Sequence[str | Path] = ()) -> Path:
    """Write a pruned world UNet in float32 (so no weight but the pruned ones changes), loadable by
    `diffmem.world.model.load_unet_file`."""
    from diffmem.world.model import config_of, unet_metadata, unet_tensors

    return save_file(unet_tensors(unet, torch.float32), path,
                     unet_metadata(config_of(unet), {"diffmem_mitigation": method}), protect=tuple(protect))


def measure_before_after(before: UNet2DConditionModel, after: UNet2DConditionModel, manifest: dict) -> dict:
    """The benchmark's numbers (copy rate on the duplicated captions, held-out loss, FID, ...) of both models."""
    from diffmem.bench.evaluate import BenchSettings, Probe, measure

    probe, settings = Probe.from_manifest(manifest), BenchSettings()
    return {"before": measure(before, probe, settings)[0], "after": measure(after, probe, settings)[0]}


def write_outputs(
    unet: UNet2DConditionModel | None,
    masks: WeightMasks,
    method: str,
    report: dict,
    out: Path,
    unet_out: Path | None,
    json_out: Path | None,
    protect: Sequence[str | Path],
    family: str | None = None,
) -> dict:
    """Write the mask file (its metadata naming the model `family`), and the pruned world UNet (`unet_out`, which
    needs `unet`) and the JSON report when asked; returns the report with the pruned count added."""
    report = {**report, "pruned_weights": masked_count(masks)}
    save_masks(masks, out, method, report, protect=tuple(protect), family=family)
    if unet_out is not None:
        if unet is None:
            raise DiffmemError("writing a pruned UNet file needs the world UNet")
        save_world_unet(apply_masks(unet, masks), unet_out, method, protect=(*protect, out))
    if json_out is not None:
        write_atomic((json.dumps(report, indent=2) + "\n").encode(), json_out, protect=(*protect, out))
    return report


def apply_mask_file(
    masks_path: str | Path,
    base: str | Path | None,
    lora: str | Path | None,
    out: str | Path | None = None,
    random_seed: int | None = None,
    manifest: str | Path | None = None,
) -> dict:
    """Apply a mask file to a world model (base + optional LoRA): write the pruned UNet to `out`, and measure before
    and after when a `manifest` is given. `random_seed` applies a random mask of the same structure instead
    (`random_masks`), the control that tells a method's choice of weights from the mere number it zeroes."""
    masks, method, report = load_masks(masks_path)
    family = report.get("family", "world")
    if family != "world":
        raise DiffmemError(f"the mask was made for a {family} model; `mitigate apply` prunes world models only "
                           "(on a pipeline, open it with diffmem.backends.open_backend and use "
                           "diffmem.mitigations.pruning.masked_backend)", masks_path)
    unet = load_world_model(base, lora)
    check_masks_fit(unet, masks, masks_path)
    if random_seed is not None:
        masks, method = random_masks(masks, random_seed), f"{method}-random"
    pruned = apply_masks(unet, masks)
    protect = [p for p in (masks_path, base, lora, manifest) if p is not None]
    result = {"method": method, "pruned_weights": masked_count(masks)}
    if out is not None:
        save_world_unet(pruned, out, method, protect=protect)
        result["out"] = str(out)
    if manifest is not None:
        result["measure"] = measure_before_after(unet, pruned, read_manifest(manifest))
    return result
