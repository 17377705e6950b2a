"""`scan --filter`: scan a LoRA, filter it, scan the filtered LoRA, and attack the filtered LoRA towards the images
the first scan extracted, all without training data.

A filter can remove a memorized image from the model, or only the prompt that led to it. The second scan alone
cannot tell these apart: it samples the same candidate prompts again. So the images the first scan extracted
serve as the targets of the Dori attack (Kowalczuk et al. 2025, "Finding Dori": optimise the conditioning until
the model denoises towards a target) on the filtered LoRA. Where Dori still finds a conditioning whose fresh
generations come back within the scan's near-identical distance of an extracted image, the image is still in the
model.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from diffmem.attack.dori import DoriConfig, run_dori
from diffmem.backends import Backend, open_backend
from diffmem.evaluation.sampling import SamplingSettings
from diffmem.filters import BAFConfig, FilterConfig
from diffmem.formats.safetensors_io import write_atomic
from diffmem.metrics.copy import LUMINANCE_COPY_DISTANCE, CopyConfig
from diffmem.pipeline import filter_file, filtered_name
from diffmem.scan.report import render_loop_html
from diffmem.scan.run import ScanResult, input_paths, scan_lora, write_scan
from diffmem.scan.score import ScanConfig
from diffmem.world.settings import world_base_path

#: Verdicts of the loop, in the order `loop_verdict` checks them.
LOOP_VERDICTS = ("nothing to fix", "still memorizing", "images still reachable", "removed", "unsure")


@dataclass(frozen=True)
class LoopConfig:
    """Settings of `scan --filter` beyond the scan's own.

    Attributes:
        attack_targets: Dori attacks this many extracted images (the largest kept groups first). 3: each attack
            costs `dori.steps` optimiser steps plus 2 x `generations` trajectories; a memorizing world LoRA yields
            one group per memorized caption, so 3 covers the strongest ones within a few CPU-minutes.
        dori: the attack's settings, the paper's by default (50 Adam steps at lr 0.1, 8 noisy copies per step,
            started from the group's own prompt).
        generations: fresh generations judged per conditioning (the start and the one Dori found). 8, as the scan.
        copied_share: an extracted image counts as still reachable when at least this share of the fresh generations
            from Dori's conditioning lies within the scan's `group_threshold` of it. 1/8, one generation of the
            default 8: an attacker needs the image once, and 0.1 is close (the base's own generations of the
            example LoRA's extracted prompts lie 0.34 to 0.48 from the extracted images, docs/scan.md).
        luminance_distance: the same generations are also tested by `luminance_tiled_l2` (blind to a global colour
            cast, which RGB tiled L2 is not: after the world example's scale-down, Dori brought all three attacked
            faces back under colour casts that RGB missed, docs/scan.md); a generation within this distance counts
            as a copy too. 0.5, `diffmem.metrics.copy.LUMINANCE_COPY_DISTANCE` (calibrated on the world's faces).
    """

    attack_targets: int = 3
    dori: DoriConfig = field(default_factory=DoriConfig)
    generations: int = 8
    copied_share: float = 0.125
    luminance_distance: float = LUMINANCE_COPY_DISTANCE

    def __post_init__(self) -> None:
        if self.attack_targets < 0:
            raise ValueError(f"attack_targets must be at least 0, got {self.attack_targets}")
        if self.generations < 1:
            raise ValueError(f"generations must be at least 1, got {self.generations}")
        if not 0 < self.copied_share <= 1:
            raise ValueError(f"copied_share must be in (0, 1], got {self.copied_share}")


@dataclass(frozen=True)
class AttackRow:
    """Dori on the filtered LoRA towards one extracted image: the share of fresh generations within the scan's
    near-identical distance of it (RGB tiled L2) from the start (the group's prompt) and from the conditioning Dori
    found, and the same shares by the colour-blind luminance test (`luminance_tiled_l2`)."""

    prompt: str
    group_size: int
    start_copy_share: float
    attack_copy_share: float
    start_median_distance: float
    attack_median_distance: float
    reachable: bool
    start_luminance_share: float = 0.0
    attack_luminance_share: float = 0.0
    attack_median_luminance_distance: float = 0.0
    target: torch.Tensor | None = field(default=None, repr=False)  # [3, H, W], the extracted image
    generated: torch.Tensor | None = field(default=None, repr=False)  # [N, 3, H, W] from Dori's conditioning

    def row(self) -> dict:
        """JSON-ready numbers (the images stay out)."""
        return {key: round(value, 4) if isinstance(value, float) else value for key, value in asdict(self).items()
                if key not in ("target", "generated")}


@dataclass
class LoopResult:
    """The scan before and after filtering, the filter's report and the attacks on the filtered LoRA."""

    before: ScanResult
    after: ScanResult
    filtered: Path | None
    filter_report: dict
    attacks: list[AttackRow]
    loop_config: LoopConfig = field(default_factory=LoopConfig)

    @property
    def verdict(self) -> str:
        """One of `LOOP_VERDICTS` (see `loop_verdict`)."""
        return loop_verdict(self.before.verdict, self.after.verdict, self.attacks)

    def summary(self) -> dict:
        """JSON-ready: the loop's verdict, both scans' summaries, the filter and the attack rows."""
        return {"verdict": self.verdict, "before": self.before.summary(), "after": self.after.summary(),
                "filtered": None if self.filtered is None else str(self.filtered), "filter": self.filter_report,
                "attacks": [a.row() for a in self.attacks],
                "loop_settings": {"attack_targets": self.loop_config.attack_targets,
                                  "dori_steps": self.loop_config.dori.steps,
                                  "generations": self.loop_config.generations,
                                  "copied_share": self.loop_config.copied_share,
                                  "luminance_distance": self.loop_config.luminance_distance}}


def loop_verdict(before: str, after: str, attacks: Sequence[AttackRow]) -> str:
    """What the loop says about the filter:

    - "nothing to fix": the first scan did not say memorizing;
    - "still memorizing": the filtered LoRA's own scan says memorizing;
    - "images still reachable": Dori brings back an extracted image from the filtered LoRA (the filter removed the
      prompts' way to it, not the image);
    - "removed": the filtered LoRA scans "not memorizing" and no attacked image is reachable;
    - "unsure": anything else (the filtered scan is unsure)."""
    if before != "memorizing":
        return "nothing to fix"
    if after == "memorizing":
        return "still memorizing"
    if any(a.reachable for a in attacks):
        return "images still reachable"
    return "removed" if after == "not memorizing" else "unsure"


def rescan(before: ScanResult, lora: str | Path, **options) -> ScanResult:
    """Scan `lora` (a filtered version of `before`'s LoRA) on exactly `before`'s candidate prompts and settings:
    its candidates come first as given prompts, so a header the filter changed cannot change what is sampled.
    `options`: `scan_lora`'s device, dtype, progress, model_config and models."""
    same_prompts = [p.prompt for p in before.prompts if p.prompt]
    config = replace(before.config, max_prompts=max(before.config.max_prompts, len(same_prompts)))
    return scan_lora(lora, before.base, config, prompts=same_prompts, **options)


def attack_extracted(result: ScanResult, model: Backend, config: LoopConfig) -> list[AttackRow]:
    """Dori on `model` (the base with the filtered LoRA merged, as `open_backend` opens it) towards the
    representatives of `result`'s largest kept groups (`config`)."""
    groups = sorted(result.kept_groups, key=lambda g: -g.size)[:config.attack_targets]
    if not groups:
        return []
    settings = SamplingSettings(generations=config.generations, steps=result.config.steps,
                                guidance=result.config.guidance, seed=result.config.seed)
    copy = CopyConfig(tiles=result.config.tiles, distance_threshold=result.config.group_threshold)
    rows = []
    for group in groups:
        target = result.samples[group.prompt][0][group.representative][None].float().clamp(0, 1)
        outcome = run_dori(model, target, group.prompt, config.dori, settings=settings, copy=copy)
        attack_luminance_share = outcome.after.luminance_rate(config.luminance_distance)
        rows.append(AttackRow(
            prompt=group.prompt, group_size=group.size, start_copy_share=outcome.before.rate,
            attack_copy_share=outcome.after.rate,
            start_median_distance=float(outcome.before.distance.median()),
            attack_median_distance=float(outcome.after.distance.median()),
            reachable=max(outcome.after.rate, attack_luminance_share) >= config.copied_share,
            start_luminance_share=outcome.before.luminance_rate(config.luminance_distance),
            attack_luminance_share=attack_luminance_share,
            attack_median_luminance_distance=float(outcome.after.luminance_distance.median()),
            target=target[0], generated=outcome.after.generated))
    return rows


def scan_filter_attack(
    lora: str | Path,
    base: str | Path = "world",
    filter_config: FilterConfig | None = None,
    scan_config: ScanConfig | None = None,
    loop_config: LoopConfig | None = None,
    filtered_output: str | Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    prompts: Sequence[str] = (),
    model_config: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> LoopResult:
    """Scan `lora`, filter it (BAF by default) into `filtered_output` (a temporary file, removed, when None), scan
    the filtered LoRA with the same candidate prompts and settings, and attack it with Dori towards the images the
    first scan extracted (`attack_extracted`). The base is opened once and the filtered LoRA once."""
    scan_config, loop_config = scan_config or ScanConfig(), loop_config or LoopConfig()
    lora = Path(lora)
    options = {"device": device, "dtype": dtype, "progress": progress, "model_config": model_config}
    reference = open_backend(base, None, device, dtype, model_config)
    before = scan_lora(lora, base, scan_config, prompts=prompts, **options,
                       models=(open_backend(base, lora, device, dtype, model_config), reference))
    with tempfile.TemporaryDirectory(prefix="diffmem-scan-") as scratch:
        output = Path(filtered_output) if filtered_output is not None else Path(scratch) / filtered_name(lora)
        report = filter_file(lora, world_base_path(base), output, filter_config or BAFConfig(), cache_dir=cache_dir,
                             progress=False)
        try:
            filtered = open_backend(base, output, device, dtype, model_config)
            after = rescan(before, output, **options, models=(filtered, reference))
            attacks = attack_extracted(before, filtered, loop_config)
        except BaseException:  # no filtered LoRA left behind without the loop's verdict on it
            output.unlink(missing_ok=True)
            raise
    record = {key: value for key, value in report.to_dict().items()
              if key in ("method", "config", "channels_kept", "channels_total", "energy_kept")}
    return LoopResult(before=before, after=after, filtered=None if filtered_output is None else output,
                      filter_report=record, attacks=attacks, loop_config=loop_config)


def write_loop(result: LoopResult, out_dir: str | Path, protect: Sequence[str | Path] = ()) -> dict[str, Path]:
    """Write before/ and after/ (each a scan's summary.json and report.html), loop.json and report.html linking them
    into `out_dir`, each file atomically; the LoRA, the filtered LoRA, a base file and `protect` are never
    overwritten."""
    out_dir = Path(out_dir)
    keep = [*protect, *(p for p in (result.filtered,) if p is not None)]
    written = {f"before/{name}": path for name, path in write_scan(result.before, out_dir / "before", keep).items()}
    written |= {f"after/{name}": path for name, path in write_scan(result.after, out_dir / "after", keep).items()}
    inputs = input_paths(result.before, keep)
    contents = {"loop.json": json.dumps(result.summary(), indent=2) + "\n", "report.html": render_loop_html(result)}
    written |= {name: write_atomic(text.encode("utf-8"), out_dir / name, inputs) for name, text in
                contents.items()}
    return written

