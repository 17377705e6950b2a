"""Write docs/results.md from benchmark rows: tables with 95% intervals over seeds, Pareto plots, image grids.

Text after the `HAND_WRITTEN` marker in an existing results file is kept, so the reasoning written by people
survives a regeneration; everything above it is rebuilt from the rows.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffmem.bench.evaluate import retained
from diffmem.bench.stats import copy_rate_at_quality, format_interval, mean_interval
from diffmem.formats.safetensors_io import write_atomic
from diffmem.report import between_markers, image_grid, markdown_table, png_description, save_png

HAND_WRITTEN = "<!-- Everything below this line is written by hand and kept when `diffmem bench` regenerates the file. -->"

#: Variants shown in the image grids, top to bottom.
GRID_VARIANTS = ("lora", "base", "baf", "baf@energy=0.8", "random@energy=0.8", "magnitude@energy=0.8",
                 "scale@energy=0.8", "peft-intruder")

#: Marker colours of the Pareto plots, one per method.
METHOD_COLOURS = {"baf": "tab:blue", "baf-right": "tab:cyan", "inverse-baf": "tab:purple", "random": "tab:grey",
                  "magnitude": "tab:orange", "base-gain": "tab:green", "intruder": "tab:brown", "scale": "tab:pink",
                  "peft-intruder": "tab:red", "none": "black", "base": "black"}


def with_retention(rows: list[dict]) -> list[dict]:
    """Rows plus ``quality_kept`` (share of the fine-tune's held-out-loss gain kept), ``memorization_kept`` (share
    of its duplicated-image loss gain kept) and, for style fine-tunes, ``style_kept`` (share of the style's success
    on held-out captions that the LoRA added over the base), each relative to its own fine-tune's LoRA and base
    rows."""
    anchors = defaultdict(dict)
    for row in rows:
        if row["variant"] in ("lora", "base"):
            anchors[row["finetune"]][row["variant"]] = row
    out = []
    for row in rows:
        pair = anchors[row["finetune"]]
        extra = {}
        if "lora" in pair and "base" in pair:
            extra["quality_kept"] = retained(row["heldout_loss"], pair["base"]["heldout_loss"],
                                             pair["lora"]["heldout_loss"])
            extra["memorization_kept"] = retained(row["duplicated_loss"], pair["base"]["duplicated_loss"],
                                                  pair["lora"]["duplicated_loss"])
            if all("style_success" in r for r in (row, pair["base"], pair["lora"])):
                # Higher is better here, and `retained`'s share is the same either way round.
                extra["style_kept"] = retained(row["style_success"], pair["base"]["style_success"],
                                               pair["lora"]["style_success"])
        out.append(row | extra)
    return out


def by_setting(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """{setting: {variant: rows over seeds}}, settings and variants in first-seen order."""
    grouped: dict[str, dict[str, list[dict]]] = {}
    for row in rows:
        grouped.setdefault(row["setting"], {}).setdefault(row["variant"], []).append(row)
    return grouped


def column(rows: list[dict], key: str) -> list[float]:
    """The non-missing values of `key`."""
    return [r[key] for r in rows if r.get(key) is not None]


def cell(rows: list[dict], key: str, digits: int = 2, percent: bool = False) -> str:
    """Mean ± 95% interval of `key` over rows, or "-"."""
    values = column(rows, key)
    return format_interval(values, digits, percent) if values else "-"


def measured_cell(rows: list[dict], key: str, digits: int = 2, percent: bool = False) -> str:
    """`cell`, saying over how many of the rows when only some of them have `key` (a measurement added to the bench
    after the others were measured)."""
    count = len(column(rows, key))
    return cell(rows, key, digits, percent) + (f" ({count} of {len(rows)})" if 0 < count < len(rows) else "")


TABLE_HEADER = ["variant", "seeds", "energy kept", "channels kept", "copy rate", "copies of any image",
                "images copied", "captions copied (of 5)", "own distance", "extracted", "AMD", "quality kept",
                "memorization kept", "FID"]


def is_style(variants: dict[str, list[dict]]) -> bool:
    """Whether a setting's rows measure a style's success (its tables get a "style kept" column)."""
    return any("style_kept" in r for rows in variants.values() for r in rows)


def setting_table(variants: dict[str, list[dict]]) -> str:
    """All variants of one setting, one row each (with a "style kept" column for a style setting)."""
    style = is_style(variants)
    lines = []
    for key, rows in variants.items():
        kept = (f"{sum(r['channels_kept'] for r in rows) / sum(r['channels_total'] for r in rows):.0%}"
                if "channels_kept" in rows[0] else "-")
        lines.append([
            key, len(rows), cell(rows, "energy_kept", 0, True), kept, cell(rows, "copy_rate", 0, True),
            measured_cell(rows, "any_copy_rate", 0, True), measured_cell(rows, "images_copied", 1),
            cell(rows, "captions_copied", 1), cell(rows, "own_distance", 3), cell(rows, "extracted", 1),
            cell(rows, "amd", 3), cell(rows, "quality_kept", 0, True), cell(rows, "memorization_kept", 0, True),
            cell(rows, "fid", 2),
        ] + ([cell(rows, "style_kept", 0, True)] if style else []))
    return markdown_table(TABLE_HEADER + (["style kept"] if style else []), lines)


def copying_finetunes(variants: dict[str, list[dict]]) -> tuple[dict[str, list[dict]], list[str]]:
    """`variants` without the fine-tunes whose LoRA copies nothing (a filter has nothing to remove there), and
    those fine-tunes' names."""
    silent = sorted(r["finetune"] for r in variants.get("lora", []) if r["copy_rate"] <= 0)
    kept = {key: [r for r in rows if r["finetune"] not in silent] for key, rows in variants.items()}
    return {key: rows for key, rows in kept.items() if rows}, silent


def paired_differences(variants: dict[str, list[dict]], first: str, second: str, key: str) -> list[float]:
    """`key` of variant `first` minus that of `second`, per fine-tune that has both."""
    seconds = {r["finetune"]: r for r in variants.get(second, [])}
    return [r[key] - seconds[r["finetune"]][key] for r in variants.get(first, [])
            if r["finetune"] in seconds and r.get(key) is not None and seconds[r["finetune"]].get(key) is not None]


#: The methods the comparison table sets against each baseline at the same budget.
COMPARED = ("baf", "baf-right", "extraction-guided")


def comparison_table(variants: dict[str, list[dict]], budgets: list[str], ours: tuple[str, ...] = COMPARED) -> str:
    """Each of `ours` minus each baseline at the same budget: copy rate and quality kept, paired by fine-tune."""
    lines = []
    for budget in budgets:
        for score in ours:
            mine = f"{score}@{budget}"
            if mine not in variants:
                continue
            for other in ("random", "magnitude", "base-gain", "intruder", "inverse-baf", "scale"):
                theirs = f"{other}@{budget}"
                copy = paired_differences(variants, mine, theirs, "copy_rate")
                quality = paired_differences(variants, mine, theirs, "quality_kept")
                if copy:
                    energy = (f"{cell(variants[mine], 'energy_kept', 0, True)} / "
                              f"{cell(variants[theirs], 'energy_kept', 0, True)}")
                    lines.append([budget, f"{score} - {other}", len(copy), energy, format_interval(copy, 0, True),
                                  format_interval(quality, 0, True) if quality else "-"])
    if not lines:
        return ""
    return markdown_table(["budget", "difference", "fine-tunes", "energy kept (method / baseline)",
                           "copy rate (lower = the method removes more)",
                           "quality kept (higher = the method keeps more)"], lines)


#: The baselines each filter is matched against at equal quality: turning the whole LoRA down, and random channels.
EQUAL_QUALITY_BASELINES = ("scale", "random")


def trade_off_curve(variants: dict[str, list[dict]], method: str, finetune: str,
                    copy_key: str = "copy_rate") -> list[tuple[float, float]]:
    """``(quality kept, copy rate)`` of `method`'s variants on one fine-tune, with the base (no energy) and the
    LoRA (all of it) at the ends, in the order of the update energy kept; `copy_key` names the copy rate
    (``any_copy_rate``: copies of any training image), and rows without it are left out."""
    rows = [r for rs in variants.values() for r in rs if r["finetune"] == finetune and r.get("quality_kept") is not None
            and r.get(copy_key) is not None and (r["method"] == method or r["variant"] in ("base", "lora"))]
    ordered = sorted(rows, key=lambda r: 0.0 if r["variant"] == "base" else r.get("energy_kept", 1.0))
    return [(r["quality_kept"], r[copy_key]) for r in ordered]


def equal_quality_table(variants: dict[str, list[dict]], baselines: tuple[str, ...] = EQUAL_QUALITY_BASELINES,
                        copy_key: str = "copy_rate") -> str:
    """Every filter's copy rate (`copy_key`) minus each baseline's at the same quality kept (the baseline's curve
    read at the filter's quality, `copy_rate_at_quality`), paired by fine-tune. A fine-tune where the baseline never
    keeps that much quality is left out of the difference and counted."""
    lines = []
    for key, rows in variants.items():
        method = rows[0]["method"]
        if key in ("lora", "base") or method in baselines:
            continue
        for baseline in baselines:
            differences, unmatched = [], 0
            for row in rows:
                if row.get("quality_kept") is None or row.get(copy_key) is None:
                    continue
                matched = copy_rate_at_quality(trade_off_curve(variants, baseline, row["finetune"], copy_key),
                                               row["quality_kept"])
                if matched is None:
                    unmatched += 1
                else:
                    differences.append(row[copy_key] - matched)
            if differences or unmatched:
                lines.append([key, baseline, len(differences), unmatched, cell(rows, "quality_kept", 0, True),
                              format_interval(differences, 0, True) if differences else "-"])
    if not lines:
        return ""
    return markdown_table(["variant", "baseline", "fine-tunes", "baseline never that good", "quality kept",
                           "copy rate minus the baseline's at that quality (below 0: the filter removes more)"],
                          lines)


#: Issue 18's goal for a data-free filter: remove at least this share of the LoRA's near-copies while keeping at
#: least this share of its held-out gain (and of its style, on a style LoRA).
GOAL_SHARE = 0.9


def meets_goal(row: dict, lora: dict, share: float = GOAL_SHARE, copy_key: str = "copy_rate") -> bool:
    """Whether `row` removes `share` of the copy rate (`copy_key`) of its fine-tune's `lora` row and keeps `share` of
    the held-out gain (and of the style, where measured). A LoRA that copies nothing has nothing to remove: never
    met."""
    if lora[copy_key] <= 0 or row.get("quality_kept") is None:
        return False
    kept = [row["quality_kept"]] + ([row["style_kept"]] if row.get("style_kept") is not None else [])
    removed = 1 - row[copy_key] / lora[copy_key]
    return removed >= share - 1e-9 and min(kept) >= share  # rates are counts over 30: round-off, not a margin


def goal_table(variants: dict[str, list[dict]], share: float = GOAL_SHARE) -> str:
    """For each variant, on how many of its fine-tunes it `meets_goal`: counting copies of the caption's own image,
    and, on the fine-tunes where both the variant and the LoRA were measured for it, copies of any training image."""
    loras = {r["finetune"]: r for r in variants.get("lora", [])}
    lines = []
    for key, rows in variants.items():
        if key in ("lora", "base") or not all(r["finetune"] in loras for r in rows):
            continue
        own = sum(meets_goal(r, loras[r["finetune"]], share) for r in rows)
        measured = [r for r in rows if "any_copy_rate" in r and "any_copy_rate" in loras[r["finetune"]]]
        any_image = sum(meets_goal(r, loras[r["finetune"]], share, "any_copy_rate") for r in measured)
        lines.append([key, f"{own} of {len(rows)}", f"{any_image} of {len(measured)}" if measured else "-"])
    return markdown_table(["variant", f"fine-tunes where it removes {share:.0%} of the copies and keeps {share:.0%} of "
                                      "the quality", "the same, counting copies of any training image"],
                          lines) if lines else ""


#: Quality axes of the Pareto plots: row key -> axis label.
QUALITY_AXES = {
    "quality_kept": "quality kept: share of the LoRA's held-out-loss gain (1 = LoRA, 0 = base)",
    "fid": "FID of held-out captions' generations (lower = better; copy-embedder features)",
}


def pareto_plot(variants: dict[str, list[dict]], title: str, path: Path, quality_key: str = "quality_kept") -> Path:
    """Copy rate against a quality measure (`QUALITY_AXES`), mean over seeds, one colour per method; budgets of a
    method joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    lines = defaultdict(list)
    for key, rows in variants.items():
        quality, copy = column(rows, quality_key), column(rows, "copy_rate")
        if not quality or not copy:
            continue
        x, y = mean_interval(quality)[0], mean_interval(copy)[0]
        method = rows[0]["method"]
        colour = METHOD_COLOURS.get(method, "tab:cyan")
        if rows[0]["budget"] == "energy":
            lines[method].append((rows[0]["level"], x, y))
            axes.scatter(x, y, color=colour, s=24)
        elif rows[0]["budget"] == "fraction":
            axes.scatter(x, y, color=colour, marker="s", s=30)
        else:
            marker = "*" if method == "baf" else "D"
            axes.scatter(x, y, color=colour, marker=marker, s=90 if marker == "*" else 40, zorder=3)
            axes.annotate(key, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    for method, points in lines.items():
        points.sort()
        axes.plot([p[1] for p in points], [p[2] for p in points], color=METHOD_COLOURS.get(method, "tab:cyan"),
                  label=method, linewidth=1.2)
    axes.set_xlabel(QUALITY_AXES[quality_key])
    axes.set_ylabel("copy rate of duplicated captions")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    if lines:
        axes.legend(fontsize=7, loc="best")
    figure.text(0.01, 0.01, "lines: energy budgets; squares: BAF's kept channel share; star: BAF default rule",
                fontsize=6)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def image_panel(images_dir: Path, finetunes: list[str], path: Path) -> str | None:
    """The sample figure of a setting at `path`, one strip per `GRID_VARIANTS` entry (first generation of each
    duplicated caption) stacked, drawn from the first of `finetunes` whose images are in `images_dir`; returns
    its caption, which the PNG also carries. When none of them has images (the work folder of a later session
    holds only the committed rows), a figure already at `path` that carries its caption is kept as it is: it
    shows rows the report still holds. None when there is nothing to show."""
    for finetune in finetunes:
        files = [images_dir / finetune / f"{key}.png" for key in GRID_VARIANTS]
        shown = [key for key, file in zip(GRID_VARIANTS, files) if file.exists()]
        if not shown:
            continue
        strips = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1).float() / 255
                  for f in files if f.exists()]
        width = max(s.shape[2] for s in strips)
        padded = torch.stack([torch.nn.functional.pad(s, (0, width - s.shape[2]), value=1.0) for s in strips])
        caption = (f"First generation of each duplicated caption, `{finetune}`; rows top to bottom: "
                   f"{', '.join(shown)}.")
        save_png(image_grid(padded, columns=1), path, scale=3, description=caption)
        return caption
    return png_description(path)


#: Filters with a rule of their own and no budget (issue 18, section 5's candidates), shown fine-tune by fine-tune
#: beside `scale` at the same quality: means over seeds hide where a rule works and where it does not.
BY_FINETUNE = ("caption-readers", "first-up-block")


def by_finetune_table(variants: dict[str, list[dict]], keys: tuple[str, ...] = BY_FINETUNE) -> str:
    """For each of `keys`, one line per fine-tune: the LoRA's and the variant's copy rates (own image, any image),
    the held-out gain (and style) kept, `scale`'s copy rates at that quality (its curve read at the variant's
    quality, `copy_rate_at_quality`; "-" where `scale` never keeps that much) and whether the variant `meets_goal`
    both ways."""
    loras = {r["finetune"]: r for r in variants.get("lora", [])}
    style = is_style(variants)

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{value:.0%}"

    lines = []
    for key in keys:
        for row in sorted(variants.get(key, []), key=lambda r: r["finetune"]):
            lora = loras.get(row["finetune"])
            if lora is None or row.get("quality_kept") is None:
                continue
            rates, at_quality, goals = [], [], []
            for copy_key in ("copy_rate", "any_copy_rate"):
                if row.get(copy_key) is None or lora.get(copy_key) is None:  # a row older than this measurement
                    for column in (rates, at_quality, goals):
                        column.append("-")
                    continue
                rates.append(f"{percent(lora[copy_key])} -> {percent(row[copy_key])}")
                curve = trade_off_curve(variants, "scale", row["finetune"], copy_key)
                at_quality.append(percent(copy_rate_at_quality(curve, row["quality_kept"])))
                goals.append("yes" if meets_goal(row, lora, copy_key=copy_key) else "no")
            lines.append([key, row["finetune"], *rates, percent(row["quality_kept"])]
                         + ([percent(row.get("style_kept"))] if style else [])
                         + [" / ".join(at_quality), " / ".join(goals)])
    if not lines:
        return ""
    return markdown_table(["variant", "fine-tune", "copy rate, LoRA -> variant",
                           "copies of any image, LoRA -> variant", "quality kept"] + (["style kept"] if style else [])
                          + ["scale at that quality: copy rate / any image", "goal: own / any image"], lines)


def render_results(rows: list[dict], work: Path, out: Path, channels: dict | None = None) -> str:
    """The generated part of docs/results.md; figures are written next to it under ``results/``."""
    rows = with_retention(rows)
    grouped = by_setting(rows)
    figures = out.parent / "results"
    parts = [
        "# Does BAF work? Benchmark results\n",
        "Generated by `diffmem bench` (see docs/bench.md) from `" + str(work / "results.jsonl") + "`; do not edit "
        "above the hand-written marker. Every number is a mean over the fine-tunes (seeds) of a setting, with the "
        "half-width of its 95% Student-t interval when there are two seeds or more.\n",
        "Columns: **copy rate**, share of duplicated-caption generations that are near-copies of their own "
        "training image (Carlini's tiled-L2 relative test); **copies of any image**, share that are near-copies "
        "of any training image (the same test; a model that draws a memorized image for another caption copies no "
        "less; \"(k of n)\": measured on k of the n fine-tunes, rows older than this measurement lack it); "
        "**images copied**, how many different training images those copies are of; **captions copied**, "
        "duplicated captions copied in at least half their generations; **own distance**, median tiled-L2 distance to that image; **extracted**, "
        "training images the extraction attack recovers; **AMD**, average minimum cosine distance to the training "
        "images (copy embedder; low = memorized); **quality kept**, share of the LoRA's held-out denoising-loss "
        "gain over the base that survives (100% = the LoRA, 0% = the base: the LoRA's effect on its concept); "
        "**memorization kept**, the same for the loss on the duplicated images; **FID**, held-out captions' "
        "generations against held-out images (copy-embedder features, 20 or 12 images: compare within a table "
        "only). Budgets: `@energy=e` keeps the best-scoring channels of each module until they hold e of its "
        "update energy; `@fraction=matched` keeps in every module the share of channels that BAF's default "
        "rule kept over the whole LoRA. `peft-intruder` is PEFT's `reduce_intruder_dimension` with PEFT's "
        "defaults on every module (its own rule, no budget; not our `intruder` channel filter, docs/filter.md): "
        "its energy kept is the share of the LoRA's update energy that its output holds, and it keeps no "
        "channels as such.\n",
    ]
    if rows:
        settings = rows[0]["settings"]
        parts.append(f"Sampling: {settings['generations']} generations per duplicated caption, "
                     f"{settings['quality_generations']} per held-out caption, {settings['steps']} DDIM steps, "
                     f"guidance {settings['guidance']}, seeds from {settings['seed']}, the same for every model.\n")
    for setting, variants in grouped.items():
        finetunes = sorted({r["finetune"] for rs in variants.values() for r in rs})
        parts.append(f"## {setting}\n")
        parts.append(f"Fine-tunes: {', '.join(f'`{f}`' for f in finetunes)}.\n")
        copying, silent = copying_finetunes(variants)
        if silent:
            parts.append(f"Left out of the comparisons below (their LoRA copies nothing, so there is nothing to "
                         f"remove; the table of all variants keeps them): {', '.join(f'`{f}`' for f in silent)}.\n")
        budgets = sorted({k.split("@", 1)[1] for k in variants if "@" in k and k.split("@", 1)[0] in COMPARED})
        comparison = comparison_table(copying, budgets)
        if comparison:
            parts.append("BAF (two-sided, and right side only) and the extraction-guided filter against each "
                         "baseline at the same budget, paired by fine-tune:\n\n" + comparison + "\n")
        parts.append(setting_table(variants) + "\n")
        equal = equal_quality_table(copying)
        if equal:
            parts.append("Each filter against `scale` and `random` at equal quality: the baseline's copy rate where "
                         "its measured budgets, joined by straight lines, keep the filter's share of the held-out "
                         "gain (the lowest such copy rate), paired by fine-tune:\n\n" + equal + "\n")
        equal_any = equal_quality_table(copying, copy_key="any_copy_rate")
        if equal_any:
            parts.append("The same, counting copies of any training image (on the fine-tunes measured for it):\n\n"
                         + equal_any + "\n")
        finetune_by_finetune = by_finetune_table(copying)
        if finetune_by_finetune:
            parts.append("The filters with a rule of their own and no budget, fine-tune by fine-tune, beside `scale` "
                         "read at the same quality (as in the equal-quality tables):\n\n" + finetune_by_finetune
                         + "\n")
        goal = goal_table(copying)
        if goal:
            parts.append("Issue 18's goal, fine-tune by fine-tune (a share of the LoRA's own copy rate removed, a "
                         "share of its held-out gain kept, and of its style on a style LoRA):\n\n" + goal + "\n")
        plot = pareto_plot(variants, setting, figures / f"pareto-{setting}.png")
        fid_plot = pareto_plot(variants, setting, figures / f"pareto-fid-{setting}.png", "fid")
        parts.append(f"![memorization against held-out loss, {setting}](results/{plot.name}) "
                     f"![memorization against FID, {setting}](results/{fid_plot.name})\n")
        panel = figures / f"samples-{setting}.png"
        caption = image_panel(work / "images", finetunes, panel)
        if caption is not None:
            parts.append(f"{caption}\n\n![samples, {setting}](results/{panel.name})\n")
    if channels:
        parts.append(render_channels(channels, figures))
    return "\n".join(parts)


def render_channels(channels: dict, figures: Path) -> str:
    """The channel-level truth section (see `diffmem.bench.channels`)."""
    from diffmem.bench.channels import channel_section

    return channel_section(channels, figures)


def write_results(rows: list[dict], work: str | Path, out: str | Path, channels: dict | None = None) -> Path:
    """Regenerate `out` (docs/results.md) from `rows`, keeping its hand-written tail."""
    work, out = Path(work), Path(out)
    tail = between_markers(out.read_text() if out.exists() else None, HAND_WRITTEN) or ""
    body = render_results(rows, work, out, channels)
    write_atomic((body.rstrip() + "\n\n" + HAND_WRITTEN + tail).encode(), out)
    return out


def load_channels(path: str | Path) -> dict | None:
    """Channel-truth results written by the channel step of `diffmem bench`, or None when there are none yet."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None
