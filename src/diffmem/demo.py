"""The demo behind ``make demo``: measure the example LoRA's memorization, filter it, measure again, report.

Everything comes from the repository: the embedded world's committed base and example memorizing LoRA (faces
duplicated in training, listed in its manifest), `diffmem filter` for the mitigation, `diffmem.metrics` for the
copy test. The output folder gets ``report.html`` (open it in a browser), ``summary.md`` and ``summary.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from diffmem.filters import BAFConfig, FilterConfig
from diffmem.formats.safetensors_io import write_atomic
from diffmem.metrics.copy import paired_tiled_l2
from diffmem.pipeline import filter_file
from diffmem.report import html_page, html_table, img_tag, markdown_table
from diffmem.world.check import CheckSettings, example_lora_path, manifest_images, own_copy_rate
from diffmem.world.data import ImageSet
from diffmem.world.diffusion import denoising_loss
from diffmem.world.lora import apply_lora
from diffmem.world.model import BASE_FILE, assets_dir, load_base, load_unet_file

DEMO_SETTINGS = CheckSettings(generations=4, seed=1000)


def own_distances(generated: torch.Tensor, training: torch.Tensor, generations: int) -> torch.Tensor:
    """Tiled-L2 distance of each generation to its own caption's training image, shaped [captions, generations]."""
    return paired_tiled_l2(generated, training.repeat_interleave(generations, dim=0)).view(-1, generations)


def run_demo(
    out_dir: str | Path = "demo-out",
    lora: str | Path | None = None,
    base: str | Path | None = None,
    config: FilterConfig | None = None,
    settings: CheckSettings = DEMO_SETTINGS,
    progress: bool = True,
) -> dict:
    """Filter the example LoRA (or ``lora``, a world LoRA with its ``.json`` manifest beside it) against the
    committed base (or ``base``, a world UNet file), measure memorization and quality before and after, and write
    the report. Returns the summary numbers."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lora = Path(lora) if lora is not None else example_lora_path()
    manifest = json.loads(lora.with_suffix(".json").read_text())
    config = config or BAFConfig()
    steps = tqdm(total=6, desc="demo", unit="step", disable=not progress)

    filtered_path = out_dir / f"{lora.stem}.filtered.safetensors"
    base_path = Path(base) if base is not None else assets_dir() / BASE_FILE
    report = filter_file(lora, base_path, filtered_path, config, cache_dir=out_dir / "cache")
    steps.update()
    base = load_base() if base is None else load_unet_file(base_path)
    tuned, filtered = apply_lora(base, lora), apply_lora(base, filtered_path)
    duplicated, heldout = manifest_images(manifest, "duplicated"), manifest_images(manifest, "heldout")
    reference = ImageSet.concat([duplicated, manifest_images(manifest, "seen_once")]).images

    measured = {}
    for name, model in (("lora", tuned), ("filtered", filtered), ("base", base)):
        measured[name] = own_copy_rate(model, duplicated, reference, settings)
        steps.update()
    losses = {name: denoising_loss(model, heldout.images, heldout.captions)
              for name, model in (("lora", tuned), ("filtered", filtered), ("base", base))}
    steps.update()
    distances = {name: own_distances(measured[name]["generated"], duplicated.images, settings.generations)
                 for name in measured}

    summary = {
        "lora": str(lora),
        "base": str(base_path),
        "filtered": str(filtered_path),
        "filter": {"method": report.method, "config": report.config, "channels_kept": report.channels_kept,
                   "channels_total": report.channels_total, "energy_kept": round(report.energy_kept, 4)},
        "copy_rate_own": {name: measured[name]["copy_rate_own"] for name in measured},
        "captions_copied_in_half": {name: measured[name]["captions_copied_in_half"] for name in measured},
        "median_own_distance": {name: round(float(distances[name].median()), 4) for name in distances},
        "heldout_denoising_loss": {name: round(value, 5) for name, value in losses.items()},
        "duplicated_captions": len(duplicated),
        "settings": asdict(settings),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_report(out_dir, summary, duplicated, measured, distances, settings.generations)
    steps.update()
    steps.close()
    return summary


def captioned(image: torch.Tensor, distance: float) -> str:
    """A generation with its distance to the training image written under it."""
    return (f'<span style="display:inline-block;text-align:center;margin:2px">'
            f'{img_tag(image, 64, f"tiled L2 {distance:.3f}")}<br><small>{distance:.3f}</small></span>')


def write_report(out_dir: Path, summary: dict, duplicated: ImageSet, measured: dict, distances: dict,
                 generations: int) -> None:
    """``report.html`` (image rows per duplicated caption), ``summary.md`` and ``summary.json``."""
    header = ["", "example LoRA", "filtered LoRA", "base model"]
    rows = [
        ["near-copies of the training image", *(f"{summary['copy_rate_own'][n]:.0%}" for n in ("lora", "filtered", "base"))],
        ["captions copied in at least half of the generations",
         *(f"{summary['captions_copied_in_half'][n]} / {summary['duplicated_captions']}"
           for n in ("lora", "filtered", "base"))],
        ["median tiled-L2 distance to the training image",
         *(summary["median_own_distance"][n] for n in ("lora", "filtered", "base"))],
        ["held-out denoising loss (lower = learned the domain)",
         *(summary["heldout_denoising_loss"][n] for n in ("lora", "filtered", "base"))],
    ]
    filter_line = (f"{summary['filter']['method']} kept {summary['filter']['channels_kept']} of "
                   f"{summary['filter']['channels_total']} channels ({summary['filter']['energy_kept']:.1%} of the "
                   "update energy)")
    image_rows = []
    for i, caption in enumerate(duplicated.captions):
        cells = [caption, img_tag(duplicated.images[i], 64, "training image")]
        for name in ("lora", "filtered"):
            pictures = measured[name]["generated"][i * generations : (i + 1) * generations]
            cells.append("".join(captioned(p, float(d)) for p, d in zip(pictures, distances[name][i])))
        image_rows.append(cells)
    body = (
        f"<p>Base: <code>{summary['base']}</code>. LoRA: <code>{summary['lora']}</code>, trained with some "
        f"training images duplicated (the memorization case; its manifest lists them). Filter: {filter_line}.</p>"
        + html_table(header, rows)
        + "<h2>Duplicated captions: training image, LoRA generations, filtered-LoRA generations</h2>"
        + '<p class="note">Number under each generation: tiled-L2 distance to the training image (max over 16 tiles '
        "of the RMS difference; Carlini et al. 2023). Small = near-copy.</p>"
        + html_table(["caption", "training image", "example LoRA", "filtered LoRA"], image_rows)
        + f'<p class="note">Generated by <code>make demo</code> in {summary["seconds"]} s; settings '
        f"{summary['settings']}.</p>"
    )
    write_atomic(html_page("diffmem demo: filtering a memorizing LoRA", body).encode(), out_dir / "report.html")
    markdown = ("# diffmem demo\n\n" + filter_line + "\n\n" + markdown_table(header, rows) + "\n")
    write_atomic(markdown.encode(), out_dir / "summary.md")
    write_atomic(json.dumps(summary, indent=2).encode(), out_dir / "summary.json")
