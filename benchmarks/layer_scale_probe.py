"""Where in the UNet does a LoRA's copying sit? (issue 18, section 5: "soft scaling tuned per layer".) Each group of
a world LoRA's modules (a UNet block, or a role: the cross-attention keys and values that read the caption, the
rest of the transformer blocks, the convolutions) is turned down to `--factor` of its update while the rest of the
LoRA stays whole, and the model is measured as `diffmem bench` measures a variant (copy rate of the duplicated
captions, held-out denoising loss; `diffmem.bench.evaluate.measure`), beside the whole LoRA and the base.

This is an oracle look, not a filter: it reads the copy rate on the training captions, which a data-free filter
cannot. If no group carries the copies while leaving the held-out gain (quality kept >= 90% with the copy rate
down by >= 90%), no per-layer turn-down chosen data-free can beat turning the whole LoRA down either, on this LoRA.

    python benchmarks/layer_scale_probe.py --lora runs/bench-evidence/finetunes/faces-r32-conv-d5x100-cos-tuned-s5.safetensors \
        --out runs/layer-probe [--factor 0] [--threads 1]
    python benchmarks/layer_scale_probe.py --lora ... --out runs/layer-probe --group up_blocks_0 --group all --factor 0.6
    python benchmarks/layer_scale_probe.py --collect runs/layer-probe --json docs/layer-scale.json

`--group` (repeatable) measures only the groups named; "all" (every module, so `scale` at the factor squared of the
update energy) is measured only when named, the baseline a group's turn-down is read against, and so are a block's
parts (``up_blocks_0.attentions``, ``up_blocks_0.resnets``, ``up_blocks_0.upsamplers``).

Any LoRA of the world with its training manifest (.json) beside it. Rows are appended to `--out`/rows.jsonl as
they are measured (a rerun skips what is there); `--collect` writes them with the commands into one JSON file and
prints the table (docs/bench.md shows it).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from diffmem.bench.evaluate import Probe, measure, retained
from diffmem.bench.run import add_probe_arguments, append_row, collect_probe, read_rows
from diffmem.bench.settings import BenchSettings
from diffmem.filters.caption_readers import reads_caption
from diffmem.formats.lora import LoraFile, read_lora
from diffmem.world.lora import apply_lora, lora_targets
from diffmem.world.model import load_base


def module_groups(lora: LoraFile, unet: torch.nn.Module) -> dict[str, list[str]]:
    """The probe's groups of module names: one per UNet block (``down_blocks_1``, ``mid_block``, ...) in file
    order, then the three roles by the world `unet` module each updates: the caption readers (the cross-attention
    keys and values, the only weights that see the caption; `reads_caption`, what the caption-readers filter
    drops), the rest of the transformer blocks, the convolutions; then "all" and each block's parts
    (``up_blocks_0.attentions``, ``up_blocks_0.resnets``, ...), measured only when asked for by `--group`)."""
    groups: dict[str, list[str]] = {}
    parts: dict[str, list[str]] = {}
    for name in lora.modules:
        block = re.search(r"(down_blocks_\d+|up_blocks_\d+|mid_block)(?:_(attentions|resnets|upsamplers|downsamplers))?",
                          name)
        groups.setdefault(block.group(1) if block else "outside the blocks", []).append(name)
        if block and block.group(2):
            parts.setdefault(f"{block.group(1)}.{block.group(2)}", []).append(name)
    roles = {"cross-attention k,v": [], "rest of the transformer": [], "convolutions": []}
    for name, (path, _) in lora_targets(unet, lora).items():
        role = ("cross-attention k,v" if reads_caption(path) else
                "rest of the transformer" if ".attentions." in path else "convolutions")
        roles[role].append(name)
    # "all" at a factor f is `scale` at f squared of the energy: the baseline a group's turn-down must beat.
    return (groups | {role: names for role, names in roles.items() if names} | {"all": list(lora.modules)}
            | dict(sorted(parts.items())))


def turned_down(base_unet: torch.nn.Module, lora: LoraFile, names: list[str], factor: float) -> torch.nn.Module:
    """The base with `lora` merged whole except the modules `names`, merged at `factor`."""
    chosen = set(names)
    whole = replace(lora, modules={n: m for n, m in lora.modules.items() if n not in chosen})
    unet = apply_lora(base_unet, whole)
    if factor:
        unet = apply_lora(unet, replace(lora, modules={n: lora.modules[n] for n in names}), scale=factor)
    return unet


def energy_share(lora: LoraFile, names: list[str]) -> float:
    """The share of the LoRA's update energy held by the modules `names`."""
    return sum(float(lora.modules[n].delta().double().square().sum()) for n in names) / lora.update_energy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lora", type=Path, help="a world LoRA with its manifest (.json) beside it")
    parser.add_argument("--factor", type=float, default=0.0, help="what each group is turned down to (0: dropped)")
    parser.add_argument("--group", action="append", default=[],
                        help="only this group (repeatable; default every group), e.g. up_blocks_0")
    add_probe_arguments(parser, "runs/layer-probe")
    args = parser.parse_args(argv)
    if args.collect is not None:
        print(markdown(collect_probe(args.collect, args.json)))
        return 0
    if args.lora is None:
        parser.error("--lora is required (or --collect)")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "rows.jsonl"
    done = {(r["lora"], r["group"], r["factor"]) for r in read_rows(rows_path)}
    command = shlex.join(["python", "benchmarks/layer_scale_probe.py", *(sys.argv[1:] if argv is None else argv)])
    lora, base_unet, settings = read_lora(args.lora), load_base(), BenchSettings()
    probe = Probe.from_manifest(json.loads(args.lora.with_suffix(".json").read_text()))
    plan = [("lora", [], 1.0), ("base", list(lora.modules), 0.0)]
    groups = module_groups(lora, base_unet)
    unknown = sorted(set(args.group) - set(groups))
    if unknown:
        parser.error(f"--group: {', '.join(unknown)} is not a group of this LoRA (it has {', '.join(groups)})")
    plan += [(group, names, args.factor) for group, names in groups.items()
             if group in args.group or (not args.group and group != "all" and "." not in group)]
    for group, names, factor in plan:
        if (args.lora.stem, group, factor) in done:
            continue
        started = time.perf_counter()
        unet = base_unet if group == "base" else turned_down(base_unet, lora, names, factor)
        row = {"lora": args.lora.stem, "group": group, "factor": factor, "modules": len(names),
               "energy_share": round(energy_share(lora, names), 4), "command": command,
               **measure(unet, probe, settings)[0], "seconds": round(time.perf_counter() - started)}
        print(json.dumps(row), flush=True)
        append_row(rows_path, row)
    return 0


def markdown(rows: list[dict]) -> str:
    """Per LoRA, one line per group turned down: its modules and share of the update energy, the copy rate, and
    the share of the LoRA's copy rate, held-out gain and (a style LoRA) style success kept; the LoRA's own line is
    100%, the base's 0%. The goal is issue 18's: at most 10% of the copy rate, at least 90% of the gain and style.
    Rows measured since the bench counts copies of any training image (`any_copy_rate`) show that share too, and
    whether the goal holds counted that way; a LoRA's last row of a group is the one shown."""
    latest = {(r["lora"], r["group"], r["factor"]): r for r in rows}
    rows = list(latest.values())
    lines = ["| LoRA | group turned down (to factor) | modules | energy share | copy rate | copy rate kept | "
             "quality kept | style kept | meets the goal | copies of any image | meets it counting any image |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def share(value: float | None) -> str:
        return "-" if value is None else f"{round(value, 2) + 0.0:.0%}"  # + 0.0: no "-0%"

    def kept(row: dict, whole: dict, key: str) -> float | None:
        return row[key] / whole[key] if key in row and key in whole and whole[key] else None

    def meets(copies: float | None, quality: float | None, style: float | None) -> str:
        if copies is None:
            return "-"
        goal = quality is not None and quality >= 0.9 and copies <= 0.1 and (style is None or style >= 0.9)
        return "yes" if goal else "no"

    for stem in sorted({r["lora"] for r in rows}):
        mine = [r for r in rows if r["lora"] == stem]
        whole = next(r for r in mine if r["group"] == "lora")
        base = next(r for r in mine if r["group"] == "base")
        for row in mine:
            if row["group"] == "lora":
                continue
            quality = retained(row["heldout_loss"], base["heldout_loss"], whole["heldout_loss"])
            style = (retained(row["style_success"], base["style_success"], whole["style_success"])
                     if "style_success" in row else None)
            copies, any_copies = kept(row, whole, "copy_rate"), kept(row, whole, "any_copy_rate")
            label = "all (the base)" if row["group"] == "base" else f"{row['group']} (to {row['factor']:g})"
            any_rate = f"{row['any_copy_rate']:.0%}" if "any_copy_rate" in row else "-"
            lines.append(f"| {stem} | {label} | {row['modules']} | {row['energy_share']:.0%} | "
                         f"{row['copy_rate']:.0%} | {share(copies)} | {share(quality)} | {share(style)} | "
                         f"{meets(copies, quality, style)} | {any_rate} | {meets(any_copies, quality, style)} |")
        style_whole = "100%" if "style_success" in whole else "-"
        any_whole = f"{whole['any_copy_rate']:.0%}" if "any_copy_rate" in whole else "-"
        lines.append(f"| {stem} | none (the LoRA) | 0 | 0% | {whole['copy_rate']:.0%} | 100% | 100% | {style_whole} "
                     f"| no | {any_whole} | {'no' if 'any_copy_rate' in whole else '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
