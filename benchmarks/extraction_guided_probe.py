"""A first look at the extraction-guided filter (issue 18, section 5) before the evidence grid measures it: on a few
world LoRAs, the filter at several shares of the update energy against turning the whole LoRA down (`scale`) and
against random channels of the whole LoRA at the same energy, each measured as `diffmem bench` measures a variant
(copy rate of the duplicated captions, held-out denoising loss, FID; `diffmem.bench.evaluate.measure`).

    python benchmarks/extraction_guided_probe.py --out runs/extraction-guided --json docs/extraction-guided.json \
        --lora example --lora runs/scan-population/eval/mem-faces-r32-s300-d3x150-204.safetensors \
        [--energies 0.9 0.8 0.6] [--scale-energies 0.4 0.25] [--threads 1]

`example` is the committed example LoRA with the kohya metadata a world fine-tune writes today (as
benchmarks/scan_speed.py scans it); any other LoRA needs its training manifest (.json) beside it. The scan and the
channel scores of each LoRA are cached in `--out` (a rerun measures without scanning again); the rows are appended
to `--out`/rows.jsonl as they are measured, `--json` collects them, and the tables are printed at the end
(docs/extraction-guided.md shows them). The LoRA files of the scan population are not
committed (only their manifests and scans): `python benchmarks/scan_population.py` retrains them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from diffmem.bench.evaluate import Probe, measure
from diffmem.bench.settings import BenchSettings
from diffmem.filters import RandomConfig, ScaleConfig, Selection
from diffmem.formats.base import open_base
from diffmem.formats.lora import read_lora
from diffmem.formats.safetensors_io import write_atomic
from diffmem.mitigations.extraction_guided import (
    ExtractionGuidedConfig,
    extraction_guided_lora,
    scan_and_score,
)
from diffmem.pipeline import filter_lora
from diffmem.world.check import example_lora_path, write_example_lora
from diffmem.world.lora import apply_lora
from diffmem.world.model import load_base
from diffmem.world.settings import world_base_path


def lora_and_manifest(name: str, out: Path) -> tuple[Path, dict]:
    """The LoRA file to probe and its training manifest ("example": the committed one, with today's metadata)."""
    if name == "example":
        path = out / "example.safetensors"
        if not path.exists():
            write_example_lora(path)
        return path, json.loads(example_lora_path().with_suffix(".json").read_text())
    path = Path(name)
    return path, json.loads(path.with_suffix(".json").read_text())


def cached_scores(path: Path, base, out: Path) -> dict[str, torch.Tensor]:
    """The LoRA's extraction-guided channel scores, computed once (scan and attributions) and kept in `out`."""
    cache = out / f"{path.stem}.scores.pt"
    if cache.exists():
        return torch.load(cache)
    started = time.perf_counter()
    scores = scan_and_score(read_lora(path), base)
    torch.save(scores, cache)
    print(f"{path.stem}: scanned and scored in {time.perf_counter() - started:.0f} s", flush=True)
    return scores


def quality_kept(row: dict, lora: dict, base: dict) -> float | None:
    """Share of the LoRA's held-out loss gain over the base that `row` keeps (as `diffmem bench` reports it)."""
    gain = base["heldout_loss"] - lora["heldout_loss"]
    return (base["heldout_loss"] - row["heldout_loss"]) / gain if gain > 0 else None


def markdown(rows: list[dict]) -> str:
    """One table per LoRA: every variant's energy kept, copy rate, held-out loss, quality kept and FID."""
    parts = []
    for name in dict.fromkeys(r["lora"] for r in rows):
        mine = {r["variant"]: r for r in rows if r["lora"] == name}
        lines = ["| variant | energy kept | copy rate | captions copied | held-out loss | quality kept | FID |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        for variant, row in mine.items():
            kept = quality_kept(row, mine["lora"], mine["base"]) if {"lora", "base"} <= set(mine) else None
            lines.append(f"| {variant} | {row['energy_kept']:.2f} | {row['copy_rate']:.0%} | {row['captions_copied']} | "
                         f"{row['heldout_loss']:.5f} | {'-' if kept is None else f'{kept:.0%}'} | {row['fid']:.2f} |")
        parts.append(f"`{name}`\n\n" + "\n".join(lines))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lora", action="append", required=True, help="'example' or a world LoRA with its manifest")
    parser.add_argument("--out", type=Path, default=Path("runs/extraction-guided"))
    parser.add_argument("--json", type=Path, default=None, help="collect every row here")
    parser.add_argument("--energies", type=float, nargs="+", default=[0.9, 0.8, 0.6])
    parser.add_argument("--scale-energies", type=float, nargs="*", default=[0.4, 0.25],
                        help="further energies of `scale` alone, to trace its curve")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "rows.jsonl"
    done = {(r["lora"], r["variant"]) for r in map(json.loads, rows_path.read_text().splitlines())} \
        if rows_path.exists() else set()
    base_path = world_base_path("world")
    base, base_unet, settings = open_base(base_path), load_base(), BenchSettings()
    for name in args.lora:
        path, manifest = lora_and_manifest(name, args.out)
        lora, probe = read_lora(path), Probe.from_manifest(manifest)
        scores = cached_scores(path, base, args.out)

        def measured(variant: str, filtered, energy: float, path: Path = path, probe: Probe = probe) -> None:
            if (path.stem, variant) in done:
                return
            started = time.perf_counter()
            numbers, _ = measure(base_unet if filtered is None else apply_lora(base_unet, filtered), probe, settings)
            row = {"lora": path.stem, "variant": variant, "energy_kept": round(energy, 4), **numbers,
                   "seconds": round(time.perf_counter() - started)}
            print(json.dumps(row), flush=True)
            with open(rows_path, "a") as handle:
                handle.write(json.dumps(row) + "\n")

        measured("lora", lora, 1.0)
        measured("base", None, 0.0)
        for energy in args.energies:
            config = ExtractionGuidedConfig(selection=Selection(rule="energy", keep_fraction=energy, scope="global"))
            measured(f"extraction-guided@energy={energy:g}", extraction_guided_lora(lora, base, config, scores),
                     energy)
            result = filter_lora(lora, base, RandomConfig(selection=Selection(rule="energy", keep_fraction=energy,
                                                                             scope="global")))
            measured(f"random-global@energy={energy:g}", result.lora, result.report.energy_kept)
        for energy in [*args.energies, *args.scale_energies]:
            result = filter_lora(lora, base, ScaleConfig(selection=Selection(rule="uniform", keep_fraction=energy)))
            measured(f"scale@energy={energy:g}", result.lora, result.report.energy_kept)
    if args.json is not None:
        record = {"command": shlex.join(["python", "benchmarks/extraction_guided_probe.py", *sys.argv[1:]]),
                  "settings": asdict(settings),
                  "rows": [json.loads(line) for line in rows_path.read_text().splitlines()]}
        write_atomic((json.dumps(record, indent=2) + "\n").encode(), args.json)
    print(markdown([json.loads(line) for line in rows_path.read_text().splitlines()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
