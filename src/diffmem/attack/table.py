"""Memorization of model variants (a mitigation each) on memorized captions: as prompted, and under the Dori attack.

`robustness_table` is the measurement behind a robustness table (every mitigation x Dori, issue 8): for each
model, the copy rate of fresh generations from each memorized caption, the copy rate of fresh generations from
the embedding Dori finds for that caption's image, and the held-out denoising loss as a quality figure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from diffusers import UNet2DConditionModel
from tqdm import tqdm

from diffmem.attack.dori import DoriConfig, attack_success, dori_attack
from diffmem.metrics.copy import CopyConfig
from diffmem.world.check import CheckSettings
from diffmem.world.data import ImageSet
from diffmem.world.diffusion import denoising_loss
from diffmem.world.text import encode_prompts


@dataclass(frozen=True)
class RobustnessRow:
    """One model's memorization of the captions of `images`, as prompted and under Dori, with its quality.

    Rates are fractions of all fresh generations (captions x generations) that copy their caption's image;
    `captions_copied_*` counts captions with at least half their generations copies; `heldout_loss` is the
    held-out denoising loss (lower = better model of the data), None when no held-out set was given.
    """

    model: str
    captions: int
    copy_rate_prompt: float
    copy_rate_dori: float
    captions_copied_prompt: int
    captions_copied_dori: int
    per_caption_prompt: list[float]
    per_caption_dori: list[float]
    heldout_loss: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def robustness_row(
    name: str,
    unet: UNet2DConditionModel,
    images: ImageSet,
    reference: torch.Tensor,
    config: DoriConfig | None = None,
    settings: CheckSettings | None = None,
    copy: CopyConfig | None = None,
    heldout: ImageSet | None = None,
    progress: bool = False,
) -> RobustnessRow:
    """Copy rates of `unet` on each caption of `images` (its own image the target, `reference` the training set the
    relative copy test compares with), from the caption's embedding and from Dori's embedding for its image.
    `progress` shows a bar per model (a search and two rounds of sampling per caption take minutes on a CPU)."""
    prompted, attacked = [], []
    pairs = list(zip(images.images, images.captions))
    for image, caption in tqdm(pairs, desc=name, unit="caption", disable=not progress, leave=False):
        prompted.append(attack_success(unet, encode_prompts([caption]), image, reference, settings, copy).rate)
        result = dori_attack(unet, image, caption, config)
        attacked.append(attack_success(unet, result.embedding, image, reference, settings, copy).rate)
    loss = None if heldout is None else round(denoising_loss(unet, heldout.images, heldout.captions), 5)
    return RobustnessRow(
        model=name,
        captions=len(images),
        copy_rate_prompt=round(sum(prompted) / len(prompted), 4),
        copy_rate_dori=round(sum(attacked) / len(attacked), 4),
        captions_copied_prompt=sum(rate >= 0.5 for rate in prompted),
        captions_copied_dori=sum(rate >= 0.5 for rate in attacked),
        per_caption_prompt=[round(rate, 3) for rate in prompted],
        per_caption_dori=[round(rate, 3) for rate in attacked],
        heldout_loss=loss,
    )


def robustness_table(
    models: Mapping[str, UNet2DConditionModel],
    images: ImageSet,
    reference: torch.Tensor,
    config: DoriConfig | None = None,
    settings: CheckSettings | None = None,
    copy: CopyConfig | None = None,
    heldout: ImageSet | None = None,
    progress: bool = False,
) -> list[RobustnessRow]:
    """`robustness_row` for every named model, on the same captions, seeds and search settings."""
    return [robustness_row(name, unet, images, reference, config, settings, copy, heldout, progress)
            for name, unet in models.items()]


def markdown_rows(rows: list[RobustnessRow]) -> str:
    """The table as markdown: one line per model."""
    from diffmem.report import markdown_table

    header = ["model", "copy rate, captions", "copy rate, Dori", "captions copied (prompt / Dori)",
              "held-out denoising loss"]
    return markdown_table(header, [
        [r.model, f"{r.copy_rate_prompt:.1%}", f"{r.copy_rate_dori:.1%}",
         f"{r.captions_copied_prompt} / {r.captions_copied_dori} of {r.captions}",
         "" if r.heldout_loss is None else f"{r.heldout_loss:.5f}"]
        for r in rows
    ])
