"""The scan's self-contained report.html: the verdict with what it rests on, the candidate extracted images beside the
base's own generations of the same prompts and seeds, and every prompt's scores.

A platform's reviewer decides from the images, not from the number: the report puts each kept group's representative
next to the base's nearest generation, so "the LoRA reproduces this picture and the base does not" can be checked by
eye. Built from `diffmem.report`'s helpers, as the audit's report is.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

import torch

from diffmem.metrics.copy import tiled_l2
from diffmem.report import html_page, html_table, image_grid, img_tag, png_data_uri

if TYPE_CHECKING:  # run and loop import this module; the types are only named here
    from diffmem.scan.loop import LoopResult
    from diffmem.scan.run import ScanResult

#: Thumbnail width in pixels: the world's 32-pixel images are enlarged 4x, a pipeline's are shrunk to it.
THUMBNAIL = 128


def grid_tag(images: torch.Tensor, columns: int, thumbnail: int, title: str) -> str:
    """An `<img>` of a grid of [N, 3, H, W] images, each shown `thumbnail` pixels wide."""
    grid = image_grid(images, columns=columns)
    width = thumbnail * grid.shape[-1] // images.shape[-1]
    return f'<img class="pix" src="{png_data_uri(grid)}" width="{width}" alt="{html.escape(title)}">'


def prompt_label(prompt: str) -> str:
    """A prompt as table-ready HTML (kept as HTML by `html_table`: it starts with '<')."""
    return f"<span>{html.escape(prompt)}</span>" if prompt else "<i>(empty prompt)</i>"


def render_html(result: ScanResult, thumbnail: int = THUMBNAIL) -> str:
    """The whole report as one HTML document (images embedded as PNG data URIs)."""
    summary = result.summary()
    evidence, config = summary["evidence"], result.config
    verdict_class = {"memorizing": "bad", "not memorizing": "good"}.get(result.verdict, "")
    parts = [
        f"<p><b>LoRA:</b> {html.escape(result.lora)}<br><b>Base:</b> {html.escape(result.base)} "
        f"({html.escape(result.family)})</p>",
        f'<p><b>Verdict:</b> <span class="{verdict_class}">{html.escape(result.verdict)}</span> '
        f"(risk {result.risk:.2f} in [0, 1]; rule: <b>{summary['rule']}</b>)</p>",
        f'<p class="note">{html.escape(summary["rule_note"])}</p>',
        *([f'<p class="bad"><b>Caveat:</b> {html.escape(summary["caveat"])}</p>'] if summary["caveat"] else []),
        "<p><b>What it rests on.</b> Wen et al.'s first-step statistic ||eps(x_T, c) - eps(x_T, empty)||: largest "
        f"ratio fine-tune / base {evidence['largest_wen_ratio'] if evidence['largest_wen_ratio'] is not None else '—'}"
        f" (prompt {prompt_label(evidence['largest_wen_ratio_prompt'] or '')}), evidence {evidence['wen']:.2f}. "
        f"Model-guided extraction (FineXtract, model guidance {config.model_guidance:g}): "
        f"{evidence['extracted_groups']} group(s) of at least {config.min_group} near-identical generations "
        f"(tiled L2 below {config.group_threshold:g}) that the base does not produce, "
        f"{evidence['groups_base_also_produces']} more that it does (not evidence); evidence "
        f"{evidence['extraction']:.2f}. Risk = 1 - (1 - Wen evidence)(1 - extraction evidence); "
        f"memorizing at >= {config.risk_memorizing:g}, not memorizing below {config.risk_clear:g}.</p>",
    ]
    kept = result.kept_groups
    if kept:
        parts.append("<h2>Candidate extracted images</h2>")
        rows = []
        for group in kept:
            images, own = result.samples[group.prompt]
            members = images[list(group.members)]
            nearest = "—"
            if own is not None and len(own):
                closest = int(tiled_l2(images[group.representative][None], own, config.tiles).argmin())
                nearest = img_tag(own[closest], thumbnail, "base's nearest generation")
            rows.append([prompt_label(group.prompt), img_tag(images[group.representative], thumbnail, "representative"),
                         grid_tag(members, min(len(members), 8), thumbnail // 2, "group members"), nearest,
                         group.size, group.spread, group.base_distance])
        parts.append(html_table(["prompt", "representative", "members", "base's nearest generation", "size",
                                 "spread", "distance to base"], rows))
    parts.append("<h2>Sampled prompts: the fine-tune (model-guided) and the base, same seeds</h2>")
    rows = []
    for prompt, (images, own) in result.samples.items():
        columns = min(len(images), 8)
        base_html = grid_tag(own, columns, thumbnail // 2, "base") if own is not None else \
            '<span class="note">not sampled (no group to check)</span>'
        rows.append([prompt_label(prompt), grid_tag(images, columns, thumbnail // 2, "fine-tune"), base_html])
    parts.append(html_table(["prompt", "fine-tune", "base"], rows))
    parts.append("<h2>Every candidate prompt</h2>")
    header = ["prompt", "source", "Wen fine-tune", "Wen base", "ratio", "sampled", "kept groups", "base also"]
    table = []
    for row in sorted(summary["prompts"], key=lambda r: -(r["wen_ratio"] or 0)):
        table.append([prompt_label(row["prompt"]), row["source"], "—" if row["wen_tuned"] is None else row["wen_tuned"],
                      "—" if row["wen_base"] is None else row["wen_base"],
                      "—" if row["wen_ratio"] is None else row["wen_ratio"], "yes" if row["sampled"] else "no",
                      row["kept_groups"], row["dropped_groups"]])
    parts.append(html_table(header, table))
    settings = ", ".join(f"{key} {value}" for key, value in summary["settings"].items())
    timings = ", ".join(f"{key} {value:.1f} s" for key, value in summary["timings_s"].items())
    parts.append(f'<p class="note">Settings: {html.escape(settings)}.<br>Time: {html.escape(timings)}.</p>')
    return html_page("diffmem scan (provisional rule)", "".join(parts))


def render_loop_html(result: LoopResult, thumbnail: int = THUMBNAIL) -> str:
    """The `scan --filter` report: the loop's verdict, both scans side by side (each with its own report in before/
    and after/), the filter, and each Dori attack's target beside what the filtered LoRA generates from the
    conditioning Dori found."""
    before, after = result.before.summary(), result.after.summary()
    filter_report = result.filter_report
    verdict_class = {"removed": "good", "nothing to fix": "good"}.get(result.verdict, "bad")
    rows = [[label, s["verdict"], f"{s['risk']:.2f}", s["evidence"]["largest_wen_ratio"] or "—",
             s["evidence"]["extracted_groups"], f'<a href="{folder}/report.html">{folder}/report.html</a>']
            for label, s, folder in (("LoRA", before, "before"), ("filtered LoRA", after, "after"))]
    parts = [
        f"<p><b>LoRA:</b> {html.escape(result.before.lora)}<br><b>Base:</b> {html.escape(result.before.base)} "
        f"({html.escape(result.before.family)})</p>",
        f'<p><b>Loop verdict:</b> <span class="{verdict_class}">{html.escape(result.verdict)}</span></p>',
        f'<p class="note">{html.escape(before["rule_note"])}</p>',
        f"<p><b>Filter:</b> {html.escape(str(filter_report.get('method')))} kept "
        f"{filter_report.get('channels_kept')} of {filter_report.get('channels_total')} channels "
        f"({filter_report.get('energy_kept', 0):.1%} of the update's energy)"
        + (f"; written to {html.escape(str(result.filtered))}" if result.filtered is not None else "") + ".</p>",
        html_table(["", "verdict", "risk", "largest Wen ratio", "extracted groups", "report"], rows),
    ]
    if result.attacks:
        parts.append("<h2>Dori on the filtered LoRA, towards the images the first scan extracted</h2>"
                     f"<p>A target is still reachable when at least {result.loop_config.copied_share:.0%} of the fresh "
                     "generations from the conditioning Dori found are copies of it, by RGB tiled L2 within the "
                     "scan's near-identical distance or by the colour-blind luminance test (tiled L2 of normalised "
                     f"luminance within {result.loop_config.luminance_distance:g}): the filter removed the prompt's "
                     "way to the image, not the image.</p>")
        table = []
        for attack in result.attacks:
            target = img_tag(attack.target, thumbnail, "extracted image") if attack.target is not None else "—"
            generated = grid_tag(attack.generated, min(len(attack.generated), 4), thumbnail // 2, "after Dori") \
                if attack.generated is not None else "—"
            table.append([prompt_label(attack.prompt), target, generated,
                          f"{attack.start_copy_share:.0%} / {attack.start_luminance_share:.0%}",
                          f"{attack.attack_copy_share:.0%} / {attack.attack_luminance_share:.0%}",
                          "yes" if attack.reachable else "no"])
        parts.append(html_table(["prompt", "extracted image", "filtered LoRA after Dori",
                                 "copies from the prompt (RGB / luminance)", "copies after Dori (RGB / luminance)",
                                 "still reachable"], table))
    else:
        parts.append("<p>No image was extracted by the first scan, so there was nothing to attack.</p>")
    return html_page("diffmem scan --filter (provisional rule)", "".join(parts))
