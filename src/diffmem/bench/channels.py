"""Channel-level truth: ablate single LoRA channels, label each memorizing or generalizing from what its removal
does, and ask how well each data-free score separates the two groups (issue 5).

The seed paper (arXiv 2605.10439) claims a "clear structural separation" between memorizing and reusable
channels. Here the labels come from the model itself: removing channel i (``sigma_i u_i v_i^T``) from the merged
fine-tune moves three numbers, each expressed as a share of the gap between the fine-tune and the base:

- ``memorization_share``: of the denoising loss on the duplicated training images (their own captions);
- ``generalization_share``: of the denoising loss on held-out images;
- ``copy_share``: of the tiled-L2 distance from duplicated-caption generations to their training images.

A channel is *memorizing* when it carries a larger share of the memorization gap than of the generalization gap.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from diffmem.bench.evaluate import BenchSettings, Probe, duplicated_generations, own_distances
from diffmem.filters import (
    BAFConfig,
    BaseGainConfig,
    IntruderConfig,
    MagnitudeConfig,
    RandomConfig,
)
from diffmem.formats.lora import read_lora
from diffmem.formats.safetensors_io import write_atomic
from diffmem.metrics.roc import roc_auc
from diffmem.pipeline import filter_lora, module_channels
from diffmem.progress import progress_bar
from diffmem.world.diffusion import WORLD_GUIDANCE, denoising_loss
from diffmem.world.lora import apply_lora, module_paths
from diffmem.world.model import BASE_FILE, assets_dir, load_base

#: Data-free scores compared on the same channels (higher = predicted generalizing, i.e. keep).
SCORERS = {
    "baf": BAFConfig(side="both"),
    "baf-left": BAFConfig(side="left"),
    "baf-right": BAFConfig(side="right"),
    "magnitude": MagnitudeConfig(),
    "base-gain": BaseGainConfig(),
    "intruder": IntruderConfig(),
    "random": RandomConfig(),
}


@dataclass(frozen=True)
class ChannelTruthConfig:
    """Which channels are ablated and how their effect is measured.

    Args:
        per_module: ablate the `per_module` largest channels (by singular value) of every module; small channels
            move nothing measurable, so labels for them would be noise.
        max_channels: keep at most this many of those, the largest first (None: all).
        copy_generations: generations per duplicated caption for the copy-distance probe (0 skips it).
        steps / guidance / seed: sampling of that probe, as in `BenchSettings`.
        timesteps_per_image: stratified timesteps per image of the two denoising losses.
    """

    per_module: int = 1
    max_channels: int | None = None
    copy_generations: int = 1
    steps: int = 10
    guidance: float = WORLD_GUIDANCE
    seed: int = 1000
    timesteps_per_image: int = 4


def probe_numbers(unet, probe: Probe, config: ChannelTruthConfig) -> dict[str, float]:
    """Duplicated-image loss, held-out loss and mean own copy distance of one model."""
    numbers = {
        "duplicated_loss": denoising_loss(unet, probe.duplicated.images, probe.duplicated.captions,
                                          timesteps_per_image=config.timesteps_per_image),
        "heldout_loss": denoising_loss(unet, probe.heldout.images, probe.heldout.captions,
                                       timesteps_per_image=config.timesteps_per_image),
    }
    if config.copy_generations:
        settings = BenchSettings(generations=config.copy_generations, steps=config.steps, guidance=config.guidance,
                                 seed=config.seed)
        generated = duplicated_generations(unet, probe, settings)
        numbers["copy_distance"] = float(own_distances(generated, probe, config.copy_generations).mean())
    return numbers


def share(changed: float, tuned: float, base: float) -> float:
    """How far `changed` moved from the fine-tune's value back towards the base's, as a share of the gap."""
    return (changed - tuned) / (base - tuned) if base != tuned else 0.0


def ablate_channels(lora_path: str | Path, manifest: dict, config: ChannelTruthConfig = ChannelTruthConfig(),
                    progress: bool = True) -> dict:
    """Ablate the chosen channels of a world LoRA one at a time; return every channel's effects and scores."""
    started = time.perf_counter()
    lora = read_lora(lora_path)
    base_path = assets_dir() / BASE_FILE
    base = load_base()
    tuned = apply_lora(base, lora)
    probe = Probe.from_manifest(manifest)
    reference = {"lora": probe_numbers(tuned, probe, config), "base": probe_numbers(base, probe, config)}
    scores = {name: {m.name: m.scores for m in filter_lora(lora, base_path, scorer).report.modules}
              for name, scorer in SCORERS.items()}

    paths = module_paths(tuned)
    weights = dict(tuned.named_modules())
    picked = []
    for name, module in lora.modules.items():
        channels = module_channels(module)
        for index in range(min(config.per_module, channels.count)):
            picked.append((float(channels.sigma[index]), name, index, channels))
    picked.sort(key=lambda item: -item[0])
    if config.max_channels is not None:
        picked = picked[: config.max_channels]

    records = []
    for sigma, name, index, channels in progress_bar(picked, desc="ablating channels", unit="channel", disable=not progress):
        weight = weights[paths[lora.modules[name].lookup]].weight
        original = weight.detach().clone()
        rank_one = sigma * torch.outer(channels.u[:, index], channels.v[:, index])
        with torch.no_grad():
            weight -= rank_one.reshape(weight.shape).to(weight.dtype)
        numbers = probe_numbers(tuned, probe, config)
        with torch.no_grad():
            weight.copy_(original)
        record = {
            "module": name, "index": index, "sigma": sigma,
            "memorization_share": share(numbers["duplicated_loss"], reference["lora"]["duplicated_loss"],
                                        reference["base"]["duplicated_loss"]),
            "generalization_share": share(numbers["heldout_loss"], reference["lora"]["heldout_loss"],
                                          reference["base"]["heldout_loss"]),
            "scores": {scorer: by_module[name][index] for scorer, by_module in scores.items()},
        }
        if "copy_distance" in numbers:
            record["copy_share"] = share(numbers["copy_distance"], reference["lora"]["copy_distance"],
                                         reference["base"]["copy_distance"])
        records.append(record)
    return {"lora": str(lora_path), "config": asdict(config), "reference": reference, "channels": records,
            "channels_in_lora": sum(m.rank if m.kind in ("lora", "locon") else 0 for m in lora.modules.values()),
            "seconds": round(time.perf_counter() - started, 1)}


def memorizing_labels(records: list[dict], evidence: str = "memorization_share") -> torch.Tensor:
    """1 where a channel carries a larger share of the memorization gap (`evidence`: the loss or the copy
    distance) than of the generalization gap, else 0."""
    return torch.tensor([float(r[evidence] > r["generalization_share"]) for r in records])


def separation(records: list[dict], evidence: str = "memorization_share") -> dict[str, float | None]:
    """AUC of each score for telling generalizing channels (positives) from memorizing ones; 0.5 = no better than
    chance, 1 = every generalizing channel scores above every memorizing one. None when one group is empty."""
    labels = 1.0 - memorizing_labels(records, evidence)
    if labels.min() == labels.max():
        return {scorer: None for scorer in records[0]["scores"]} if records else {}
    return {scorer: roc_auc(torch.tensor([r["scores"][scorer] for r in records]), labels)
            for scorer in records[0]["scores"]}


def auc_interval(records: list[dict], scorer: str, evidence: str = "memorization_share", resamples: int = 2000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of one score's AUC, resampling channels (Efron & Tibshirani 1993); None when
    a resample cannot have both groups."""
    labels = 1.0 - memorizing_labels(records, evidence)
    scores = torch.tensor([r["scores"][scorer] for r in records])
    if labels.min() == labels.max():
        return None
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(resamples):
        pick = torch.randint(0, len(records), (len(records),), generator=generator)
        if labels[pick].min() != labels[pick].max():
            values.append(roc_auc(scores[pick], labels[pick]))
    values = torch.tensor(values)
    tail = (1 - level) / 2
    return float(values.quantile(tail)), float(values.quantile(1 - tail))


def write_truth(result: dict, path: str | Path) -> Path:
    """Save ablation results as JSON (atomically)."""
    return write_atomic(json.dumps(result, indent=1).encode(), Path(path))


def score_histogram(records: list[dict], scorer: str, path: Path) -> Path:
    """Distributions of one score over memorizing and generalizing channels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = memorizing_labels(records)
    values = torch.tensor([r["scores"][scorer] for r in records])
    figure, axes = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    bins = torch.linspace(float(values.min()), float(values.max()), 25).tolist()
    axes.hist(values[labels == 0].tolist(), bins=bins, alpha=0.6, label="generalizing", color="tab:blue")
    axes.hist(values[labels == 1].tolist(), bins=bins, alpha=0.6, label="memorizing", color="tab:red")
    axes.set_xlabel(f"{scorer} score (higher = kept)")
    axes.set_ylabel("channels")
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def channel_section(result: dict, figures: Path) -> str:
    """Markdown for docs/results.md: what was ablated, group sizes, AUC per score, the BAF histogram."""
    from diffmem.report import markdown_table

    records = result["channels"]
    memorizing = int(memorizing_labels(records).sum())
    by_loss = separation(records, "memorization_share")
    by_copy = separation(records, "copy_share") if records and "copy_share" in records[0] else {}
    def shown(auc: float | None, scorer: str, evidence: str) -> str:
        if auc is None:
            return "-"
        interval = auc_interval(records, scorer, evidence)
        return f"{auc:.2f}" if interval is None else f"{auc:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"

    rows = [[scorer, shown(auc, scorer, "memorization_share"), shown(by_copy.get(scorer), scorer, "copy_share")]
            for scorer, auc in by_loss.items()]
    figure = score_histogram(records, "baf", figures / "channels-baf.png") if records else None
    text = [
        "## Channel-level truth\n",
        f"`diffmem bench` (its channel step) removed {len(records)} channels of `{result['lora']}` one at a time (the "
        f"{result['config']['per_module']} largest of every module; {result['channels_in_lora']} channels in all) "
        f"and measured each removal ({result['seconds']:.0f} s). {memorizing} came out memorizing (their removal "
        "undoes a larger share of the duplicated-image loss gap than of the held-out loss gap), "
        f"{len(records) - memorizing} generalizing.\n",
        "AUC of each data-free score for telling generalizing channels (kept) from memorizing ones (0.5 = chance; "
        "the copy column labels by the copy-distance share instead of the loss share), with 95% bootstrap "
        "intervals over channels:\n",
        markdown_table(["score", "AUC (loss labels)", "AUC (copy labels)"], rows) + "\n",
    ]
    if figure is not None:
        text.append(f"![BAF scores of memorizing and generalizing channels](results/{figure.name})\n")
    return "\n".join(text)
