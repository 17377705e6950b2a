"""Extraction-guided channel removal: a data-free filter that drops the LoRA channels its own extracted images lean on
(issue 18, section 5; a candidate measured by `diffmem bench`, not a published method).

Weight-space scores (BAF, base gain, magnitude) cannot tell memorizing channels from generalizing ones on the world
(docs/results.md, "Channel-level truth": AUC 0.57 at best). The labels there come from what removing a channel
does to the loss on the duplicated training images against the loss on held-out images. Without the training data,
`diffmem scan` supplies a stand-in for each: the images it extracts (dense groups of near-identical model-guided
generations that the base does not draw; FineXtract, Wu et al., ICML 2025) for the memorized images, and the rest
of its generations for the LoRA's ordinary output. This module scores every channel by those two shares:

- each channel i of a module (``sigma_i u_i v_i^T``, `diffmem.spectral.Channels`) gets a gate g_i, the LoRA is
  ``W0 + sum_i g_i sigma_i u_i v_i^T``, and the gates go from 0 (the base) to 1 (the LoRA) together;
- the channel's share of the loss decrease on a set of images is its integrated gradient (Sundararajan et al.
  2017, "Axiomatic Attribution for Deep Networks", ICML) along that path, divided by the whole decrease: the shares
  of all channels add up to 1 (completeness), so shares compare across modules and sets;
- score = ordinary share - extracted share (higher = keep), the quantity behind the memorizing label of
  `diffmem.bench.channels`; the default rule drops the lowest-scoring channels that hold 10% of the update energy.

World LoRAs only, for now: the gradients are taken through the world UNet (`diffmem.world`). The maths is
`channel_attributions`; `scan_and_score` and `extraction_guided_lora` are the whole filter, which the bench runs as
its ``extraction-guided@energy=...`` transforms.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel

from diffmem.errors import DiffmemError
from diffmem.filters import FilterConfig, ModuleView, Selection
from diffmem.formats.base import BaseCheckpoint
from diffmem.formats.lora import LoraFile
from diffmem.metrics.quality import denoising_inputs, prediction_errors
from diffmem.pipeline import channels_of, filter_lora
from diffmem.scan.run import ScanResult, scan_lora
from diffmem.scan.score import ScanConfig
from diffmem.spectral import Channels
from diffmem.world.diffusion import noise_scheduler, to_model_range
from diffmem.world.lora import lora_targets
from diffmem.world.model import load_unet_file
from diffmem.world.text import encode_prompts

#: Noisy inputs per forward and backward pass (bounds the activations a backward pass holds).
BATCH = 64


@dataclass
class ExtractionGuidedConfig:
    """How channels are scored from a scan and which are dropped.

    Args:
        path_points: points of the midpoint rule along the gate path 0 -> 1 (gradients taken at (k + 0.5) /
            path_points). 4: on a LoRA the loss along the path is smooth, and the test checks that the shares add
            up to 1 within a few percent.
        timesteps_per_image: stratified timesteps per image (`diffmem.metrics.quality.evaluation_timesteps`), noise
            fixed by `seed`. 8, as the held-out loss of `diffmem.bench`.
        ordinary_images: at most this many of the scan's generations outside every extracted group make the
            ordinary set (spread over its prompts). 32.
        selection: which channels are kept by score (ordinary share - extracted share). Default: the highest
            scoring channels of the whole LoRA that hold 90% of its update energy (the lowest-scoring 10% of the
            energy dropped). A budget, not the threshold 0 that mirrors the memorizing label: on the example LoRA
            that threshold dropped 56% of the energy and left a held-out loss worse than the base's
            (docs/extraction-guided.md, which also measures this default against scale and random channels).
        scan: the scan that extracts the images (`diffmem scan`'s defaults).
        seed: the noise of the denoising losses.
    """

    path_points: int = 4
    timesteps_per_image: int = 8
    ordinary_images: int = 32
    selection: Selection = field(default_factory=lambda: Selection(rule="energy", keep_fraction=0.9,
                                                                   scope="global"))
    scan: ScanConfig = field(default_factory=ScanConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.path_points, self.timesteps_per_image, self.ordinary_images) < 1:
            raise ValueError("path_points, timesteps_per_image and ordinary_images must be at least 1")


@dataclass
class GivenScoresConfig(FilterConfig):
    """Channel scores computed elsewhere (here: from a model and images), per module in channel order."""

    name: str = field(default="given-scores", init=False)
    scores: dict[str, list[float]] = field(default_factory=dict)

    def score(self, view: ModuleView) -> torch.Tensor:
        scores = self.scores.get(view.name)
        if scores is None or len(scores) != view.channels.count:
            raise DiffmemError(f"module {view.name}: no score for each of its {view.channels.count} channels")
        return torch.tensor(scores, dtype=torch.float32)


def gated_unet(base: UNet2DConditionModel, lora: LoraFile, channels: dict[str, Channels], gate: float,
               ) -> tuple[UNet2DConditionModel, dict[str, torch.nn.Parameter]]:
    """A copy of `base` with every channel of `lora` merged at `gate` (``W0 + gate * dW``), and the merged weights by
    LoRA module name, the only parameters that require gradients."""
    unet = copy.deepcopy(base).requires_grad_(False)
    weights = {}
    for name, (_, weight) in lora_targets(unet, lora).items():
        with torch.no_grad():
            weight += gate * channels[name].dense().reshape(weight.shape).to(weight.dtype)
        weights[name] = weight.requires_grad_(True)
    return unet, weights


def channel_attributions(
    base: UNet2DConditionModel,
    lora: LoraFile,
    images: torch.Tensor,
    prompts: Sequence[str],
    config: ExtractionGuidedConfig | None = None,
    channels: dict[str, Channels] | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """Each channel's integrated gradient of the mean denoising loss of `images` ([N, 3, H, W] in [0, 1], each with
    its prompt) along the path from the base (every gate 0) to the LoRA (every gate 1), and the loss change of the
    whole path, L(1) - L(0). The attributions add up to that change (completeness), up to the midpoint rule's
    error. `channels`: the LoRA's channels when already computed (`diffmem.pipeline.channels_of`)."""
    if images.shape[0] != len(prompts) or images.shape[0] == 0:
        raise ValueError(f"need one prompt per image and at least one image, got {images.shape[0]} and {len(prompts)}")
    config = config or ExtractionGuidedConfig()
    channels = channels if channels is not None else channels_of(dict(lora.modules))
    inputs = denoising_inputs(noise_scheduler(), to_model_range(images.float()), encode_prompts(list(prompts)),
                              config.timesteps_per_image, config.seed)
    count = inputs[0].shape[0]
    totals = {name: torch.zeros(channel.count, dtype=torch.float64) for name, channel in channels.items()}
    for point in range(config.path_points):
        unet, weights = gated_unet(base, lora, channels, (point + 0.5) / config.path_points)
        for start in range(0, count, BATCH):  # gradients of the mean, accumulated batch by batch
            batch = [tensor[start:start + BATCH] for tensor in inputs]
            (prediction_errors(unet, *batch).sum() / count).backward()
        for name, weight in weights.items():
            channel = channels[name]
            gradient = weight.grad.reshape(channel.u.shape[0], -1).to(torch.float32)
            # d loss / d g_i = sigma_i u_i^T G v_i, for every channel at once.
            totals[name] += (channel.sigma * (channel.u * (gradient @ channel.v)).sum(dim=0)).double()
    with torch.no_grad():
        tuned = gated_unet(base, lora, channels, 1.0)[0]
        change = sum(float(prediction_errors(tuned, *batch).sum() - prediction_errors(base, *batch).sum())
                     for batch in zip(*[tensor.split(BATCH) for tensor in inputs])) / count
    return {name: (total / config.path_points).float() for name, total in totals.items()}, change


def decrease_shares(attributions: dict[str, torch.Tensor], change: float) -> dict[str, torch.Tensor]:
    """Each channel's share of the loss decrease the LoRA brings (its attribution over the whole change); all zero
    when the LoRA does not lower the loss on these images."""
    if change >= 0:
        return {name: torch.zeros_like(a) for name, a in attributions.items()}
    return {name: a / change for name, a in attributions.items()}


def scan_sets(result: ScanResult, limit: int) -> tuple[tuple[torch.Tensor, list[str]], tuple[torch.Tensor, list[str]]]:
    """((extracted images, prompts), (ordinary images, prompts)) of a scan: the representative of every kept group,
    and up to `limit` of the fine-tune's generations in no kept group, taken round-robin over the prompts."""
    extracted = [(result.samples[g.prompt][0][g.representative], g.prompt) for g in result.kept_groups]
    grouped = {(g.prompt, m) for g in result.kept_groups for m in g.members}
    pools = [[(images[i], prompt) for i in range(images.shape[0]) if (prompt, i) not in grouped]
             for prompt, (images, _) in result.samples.items()]
    ordinary = []
    while len(ordinary) < limit and any(pools):
        for pool in pools:
            if pool and len(ordinary) < limit:
                ordinary.append(pool.pop(0))

    def stacked(pairs):
        return (torch.stack([image.float().clamp(0, 1) for image, _ in pairs]) if pairs else torch.zeros(0),
                [prompt for _, prompt in pairs])

    return stacked(extracted), stacked(ordinary)


def extraction_guided_scores(lora: LoraFile, base_file: str, result: ScanResult,
                             config: ExtractionGuidedConfig | None = None) -> dict[str, torch.Tensor]:
    """Per module, per channel: ordinary share - extracted share of the loss decrease (`channel_attributions` on
    `scan_sets(result)`). Every score is 0 when the scan extracted nothing (nothing to remove) or left no ordinary
    generation."""
    config = config or ExtractionGuidedConfig()
    channels = channels_of(dict(lora.modules))
    (extracted, extracted_prompts), (ordinary, ordinary_prompts) = scan_sets(result, config.ordinary_images)
    if not extracted_prompts or not ordinary_prompts:
        return {name: torch.zeros(channel.count) for name, channel in channels.items()}
    base = load_unet_file(base_file)
    memorized = decrease_shares(*channel_attributions(base, lora, extracted, extracted_prompts, config, channels))
    usual = decrease_shares(*channel_attributions(base, lora, ordinary, ordinary_prompts, config, channels))
    return {name: usual[name] - memorized[name] for name in channels}


def scan_and_score(lora: LoraFile, base: BaseCheckpoint,
                   config: ExtractionGuidedConfig | None = None) -> dict[str, torch.Tensor]:
    """Scan the world LoRA file `lora` on `base` (`config.scan`) and score its channels from what the scan
    extracted (`extraction_guided_scores`)."""
    config = config or ExtractionGuidedConfig()
    if lora.path is None:
        raise DiffmemError("the extraction-guided filter scans the LoRA file: give a LoRA read from a file")
    result = scan_lora(lora.path, str(base.path), config.scan)
    return extraction_guided_scores(lora, str(base.path), result, config)


def extraction_guided_lora(lora: LoraFile, base: BaseCheckpoint, config: ExtractionGuidedConfig | None = None,
                           scores: dict[str, torch.Tensor] | None = None) -> LoraFile:
    """`lora` (a world LoRA file) with the channels `config.selection` picks by their extraction-guided scores kept
    (`scores`, or `scan_and_score` now)."""
    config = config or ExtractionGuidedConfig()
    scores = scores if scores is not None else scan_and_score(lora, base, config)
    given = GivenScoresConfig(selection=config.selection,
                              scores={name: score.tolist() for name, score in scores.items()})
    return filter_lora(lora, base, given).lora
