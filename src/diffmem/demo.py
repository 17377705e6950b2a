"""The demo behind ``make demo``: measure the example LoRA's memorization, filter it, measure again, scan both
without the training data, report.

Everything comes from the repository: the embedded world's committed base and example memorizing LoRA (faces
duplicated in training, listed in its manifest), `diffmem filter` for the mitigation, `diffmem.metrics` for the
copy test against the training images, and `diffmem scan` for the verdict a platform gets without them. The output
folder gets ``report.html`` (open it in a browser), ``summary.md``, ``summary.json``, and the two scans' own reports
in ``scan-before/`` and ``scan-after/``.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from matplotlib.figure import Figure

from diffmem.filters import BAFConfig, FilterConfig
from diffmem.formats.safetensors_io import write_atomic
from diffmem.metrics.copy import paired_tiled_l2
from diffmem.pipeline import filter_file
from diffmem.progress import progress_bar
from diffmem.report import figure_tag, html_page, html_table, img_tag, markdown_table, short_path
from diffmem.scan import ScanConfig, scan_lora, write_scan
from diffmem.scan.loop import rescan
from diffmem.scan.run import ScanResult
from diffmem.world.check import (
    CheckSettings,
    example_lora_path,
    manifest_images,
    own_copy_rate,
    write_example_lora,
)
from diffmem.world.data import ImageSet
from diffmem.world.diffusion import denoising_loss
from diffmem.world.lora import apply_lora
from diffmem.world.model import BASE_FILE, assets_dir, load_base, load_unet_file

DEMO_SETTINGS = CheckSettings(generations=4, seed=1000)
#: The demo's scans: `diffmem scan`'s defaults (about 75 s each on 2 cores, docs/scan.md).
DEMO_SCAN = ScanConfig()


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
    scan: ScanConfig | None = DEMO_SCAN,
) -> dict:
    """Filter the example LoRA (or ``lora``, a world LoRA with its ``.json`` manifest beside it) against the
    committed base (or ``base``, a world UNet file), measure memorization and quality before and after, scan both
    with ``scan``'s settings (None: no scan), and write the report. Returns the summary numbers.

    The example LoRA is first written into ``out_dir`` with the kohya dataset metadata a trainer writes (the
    committed file predates it; the weights are the same), so the scan reads its header as a real LoRA's."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if lora is None:
        lora = write_example_lora(out_dir / "example.safetensors")
        write_atomic(example_lora_path().with_suffix(".json").read_bytes(), lora.with_suffix(".json"))
    lora = Path(lora)
    manifest = json.loads(lora.with_suffix(".json").read_text())
    config = config or BAFConfig()
    steps = progress_bar(total=6 + 2 * (scan is not None), desc="demo", unit="step", disable=not progress)

    filtered_path = out_dir / f"{lora.stem}.filtered.safetensors"
    base_arg = base
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
    }
    scans = None
    if scan is not None:
        scan_base = "world" if base_arg is None else base_path
        before = scan_lora(lora, scan_base, scan)
        steps.update()
        scans = (before, rescan(before, filtered_path))
        steps.update()
        for folder, result in zip(("scan-before", "scan-after"), scans):
            write_scan(result, out_dir / folder, protect=[lora, filtered_path])
        summary["scan"] = {name: scan_summary(result) for name, result in zip(("lora", "filtered"), scans)}
    summary["seconds"] = round(time.perf_counter() - started, 1)
    write_report(out_dir, summary, duplicated, measured, distances, settings.generations, scans)
    steps.update()
    steps.close()
    return summary


def scan_summary(result: ScanResult) -> dict:
    """The numbers of a scan the demo reports: verdict, risk and the evidence."""
    summary = result.summary()
    return {"verdict": summary["verdict"], "risk": summary["risk"], "rule": summary["rule"], **summary["evidence"]}


def scan_section(scans: tuple[ScanResult, ScanResult]) -> str:
    """The report's data-free part: both scans' verdicts and the images the first one extracted."""
    rows = [[label, result.verdict, f"{result.risk:.2f}",
             "—" if result.largest_ratio is None else f"{result.largest_ratio.wen_ratio:.2f}",
             len(result.kept_groups), f'<a href="{folder}/report.html">{folder}/report.html</a>']
            for label, result, folder in zip(("example LoRA", "filtered LoRA"), scans, ("scan-before", "scan-after"))]
    before = scans[0]
    pictures = "".join(img_tag(before.samples[g.prompt][0][g.representative], 128, g.prompt or "(empty prompt)")
                       for g in before.kept_groups)
    return ("<h2>Without the training images: diffmem scan</h2>"
            "<p>What a platform that receives only the LoRA and its base can find: candidate prompts from the "
            "LoRA's header, Wen et al.'s first-step statistic against the base, and model-guided extraction "
            "(FineXtract). The verdict's rule is provisional (docs/scan.md).</p>"
            + html_table(["", "verdict", "risk", "largest Wen ratio", "extracted groups", "report"], rows)
            + (f"<p>Images the scan extracted from the example LoRA:</p><p>{pictures}</p>" if pictures else ""))


#: Thumbnail width in the demo's report: the world's 32-pixel images enlarged 4x.
THUMBNAIL = 128
MODELS = (("lora", "example LoRA"), ("filtered", "filtered LoRA"), ("base", "base model"))


def captioned(image: torch.Tensor, distance: float, copy: bool) -> str:
    """A generation with its distance to the training image under it, framed in red when it is a near-copy."""
    frame = "border:3px solid #c62828" if copy else "border:3px solid transparent"
    label = f"{distance:.3f}" + (" copy" if copy else "")
    return (f'<span style="display:inline-block;text-align:center;margin:2px">'
            f'<span style="display:inline-block;{frame}">{img_tag(image, THUMBNAIL, f"tiled L2 {label}")}</span>'
            f"<br><small>{label}</small></span>")


def copy_rate_plot(summary: dict, measured: dict, captions: list[str]) -> str:
    """A bar chart of each duplicated caption's near-copy share for the LoRA, the filtered LoRA and the base."""
    figure = Figure(figsize=(7.5, 2.8), dpi=100)
    axes = figure.subplots()
    width = 0.27
    for offset, (name, label) in enumerate(MODELS):
        rates = measured[name]["per_caption_own_rate"]
        axes.bar([i + (offset - 1) * width for i in range(len(rates))], rates, width, label=label)
    axes.set_xticks(range(len(captions)), [c.rsplit(" of ", 1)[-1] for c in captions], rotation=20, fontsize=8)
    axes.set_ylim(0, 1)
    axes.set_ylabel("near-copy share")
    axes.legend(fontsize=8, frameon=False)
    return figure_tag(figure, "near-copy share per duplicated caption")


def write_report(out_dir: Path, summary: dict, duplicated: ImageSet, measured: dict, distances: dict,
                 generations: int, scans: tuple[ScanResult, ScanResult] | None = None) -> None:
    """``report.html`` (image rows per duplicated caption, then the scans), ``summary.md`` and ``summary.json``."""
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
        cells = [caption, img_tag(duplicated.images[i], THUMBNAIL, "training image")]
        for name, _ in MODELS:
            own = slice(i * generations, (i + 1) * generations)
            pictures, copies = measured[name]["generated"][own], measured[name]["is_own_copy"][own]
            # Two generations a row: four 128-px images side by side in each of three columns would not fit.
            cells.append('<div style="display:grid;grid-template-columns:repeat(2,auto);gap:2px">'
                         + "".join(captioned(picture, float(distance), bool(copy)) for picture, distance, copy
                                   in zip(pictures, distances[name][i], copies)) + "</div>")
        image_rows.append(cells)
    body = (
        f"<p>Base: <code>{html.escape(short_path(summary['base']))}</code>. LoRA: "
        f"<code>{html.escape(short_path(summary['lora']))}</code>, trained with some training images duplicated (the "
        f"memorization case; its manifest lists them). Filter: {filter_line}.</p>"
        + html_table(header, rows)
        + copy_rate_plot(summary, measured, duplicated.captions)
        + "<h2>Duplicated captions: training image, then the generations of the LoRA, the filtered LoRA and the "
        "base</h2>"
        + '<p class="note">Number under each generation: tiled-L2 distance to the training image (max over 16 tiles '
        "of the RMS difference; Carlini et al. 2023). Framed in red: a near-copy (Carlini's relative test against "
        "the training set, nearest image the caption's own).</p>"
        + html_table(["caption", "training image", "example LoRA", "filtered LoRA", "base model"], image_rows)
        + (scan_section(scans) if scans is not None else "")
        + f'<p class="note">Generated by <code>make demo</code> in {summary["seconds"]} s; settings '
        f"{summary['settings']}.</p>"
    )
    write_atomic(html_page("diffmem demo: filtering a memorizing LoRA", body).encode(), out_dir / "report.html")
    markdown = "# diffmem demo\n\n" + filter_line + "\n\n" + markdown_table(header, rows) + "\n"
    if "scan" in summary:
        scan_rows = [[label, summary["scan"][name]["verdict"], f"{summary['scan'][name]['risk']:.2f}",
                      summary["scan"][name]["largest_wen_ratio"], summary["scan"][name]["extracted_groups"]]
                     for label, name in (("example LoRA", "lora"), ("filtered LoRA", "filtered"))]
        markdown += ("\nWithout the training images (`diffmem scan`, provisional rule):\n\n"
                     + markdown_table(["", "verdict", "risk", "largest Wen ratio", "extracted groups"], scan_rows)
                     + "\n")
    write_atomic(markdown.encode(), out_dir / "summary.md")
    write_atomic(json.dumps(summary, indent=2).encode(), out_dir / "summary.json")
