"""Does the world's LoRA recipe leave scale-down a free win? (issue 18, section 1.) A fine-tune of the central
setting (faces, rank 32, LoCon, 5 images x 100, 500 steps of 16) with its held-out loss tracked, at a constant
learning rate (the example LoRA's recipe) or one decayed along a cosine; then its weights at the best tracked step
("tuned") and at the last step ("final"), each as trained and turned down to shares of its update energy
(`scale`), measured as `diffmem bench` measures a variant (`diffmem.bench.evaluate.measure`: copy rate, held-out
loss with noise seed 0, FID), plus the held-out loss under further noise seeds, which shows how much of a
held-out difference is the measurement's own noise.

    python benchmarks/lr_schedule_probe.py --schedule cosine --seed 0 --out runs/lr-schedule [--threads 1]
    python benchmarks/lr_schedule_probe.py --collect runs/lr-schedule --json docs/lr-schedule.json

Each run appends its rows to `--out`/rows.jsonl (a rerun skips what is there and does not train again);
`--collect` writes every row with the commands, and each run's tracked held-out curve, into one JSON file and
prints the table (docs/bench.md shows it).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from diffmem.bench.evaluate import Probe, measure
from diffmem.bench.run import add_probe_arguments, append_row, collect_probe
from diffmem.bench.settings import BenchSettings
from diffmem.filters import ScaleConfig, Selection
from diffmem.formats.base import open_base
from diffmem.formats.lora import read_lora
from diffmem.pipeline import filter_lora
from diffmem.world.diffusion import denoising_loss
from diffmem.world.lora import apply_lora
from diffmem.world.model import load_base
from diffmem.world.settings import FinetuneConfig, world_base_path
from diffmem.world.train import finetune

#: Noise seeds of the extra held-out measurements (seed 0 is the bench's own).
EXTRA_NOISE_SEEDS = (1, 2, 3)


def trained(schedule: str, seed: int, lr: float, out: Path, threads: int) -> dict[str, Path]:
    """The tracked run and its best step, trained once into `out`."""
    stem = f"faces-{schedule}-lr{lr:g}-s{seed}"
    final, tuned = out / f"{stem}-final.safetensors", out / f"{stem}-tuned.safetensors"
    if not (final.exists() and tuned.exists()):
        config = FinetuneConfig(seed=seed, lr=lr, lr_schedule=schedule, heldout_every=25, threads=threads)
        finetune(final, config, best_out=tuned, progress=False)
    return {"final": final, "tuned": tuned}


def measured(unet, probe: Probe, settings: BenchSettings) -> dict:
    """`diffmem bench`'s numbers for `unet`, plus its held-out loss under `EXTRA_NOISE_SEEDS`."""
    numbers, _ = measure(unet, probe, settings)
    extra = {str(s): round(denoising_loss(unet, probe.heldout.images, probe.heldout.captions, seed=s,
                                          timesteps_per_image=settings.timesteps_per_image), 6)
             for s in EXTRA_NOISE_SEEDS}
    return {**numbers, "heldout_loss_other_noise": extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="cosine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.7, 0.5, 0.25],
                        help="shares of the update energy `scale` keeps")
    add_probe_arguments(parser, "runs/lr-schedule")
    args = parser.parse_args(argv)
    if args.collect is not None:
        print(markdown(collect_probe(args.collect, args.json)))
        return 0
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "rows.jsonl"
    done = {(r["lora"], r["variant"]) for r in map(json.loads, rows_path.read_text().splitlines())} \
        if rows_path.exists() else set()
    command = shlex.join(["python", "benchmarks/lr_schedule_probe.py", *(sys.argv[1:] if argv is None else argv)])
    paths = trained(args.schedule, args.seed, args.lr, args.out, args.threads)
    base, base_unet, settings = open_base(world_base_path("world")), load_base(), BenchSettings()
    for stage, path in paths.items():
        manifest = json.loads(path.with_suffix(".json").read_text())
        lora, probe = read_lora(path), Probe.from_manifest(manifest)
        run = {"lora": path.stem, "schedule": args.schedule, "lr": args.lr, "seed": args.seed, "command": command}
        for level in (1.0, *args.scales):
            variant = "lora" if level == 1.0 else f"scale@energy={level:g}"
            if (path.stem, variant) in done:
                continue
            scaled = lora if level == 1.0 else filter_lora(
                lora, base, ScaleConfig(selection=Selection(rule="uniform", keep_fraction=level))).lora
            started = time.perf_counter()
            row = {**run, "stage": stage, "trained_steps": manifest["trained_steps"], "variant": variant,
                   "energy_kept": level, **measured(apply_lora(base_unet, scaled), probe, settings),
                   "seconds": round(time.perf_counter() - started)}
            print(json.dumps(row), flush=True)
            append_row(rows_path, row)
        if stage == "final" and (path.stem, "base") not in done:
            append_row(rows_path, {**run, "stage": "base", "trained_steps": 0, "variant": "base", "energy_kept": 0.0,
                                   **measured(base_unet, probe, settings), "seconds": 0})
    return 0


def markdown(rows: list[dict]) -> str:
    """One line per trained weights: the LoRA's copy rate and held-out loss (noise seed 0), and for each `scale`
    level its copy rate and the share of the LoRA's held-out gain over the base it keeps (`quality kept`, as
    `diffmem bench` reports it); beside it the same share from the mean over the four noise seeds."""
    def mean_loss(row: dict) -> float:
        losses = [row["heldout_loss"], *row["heldout_loss_other_noise"].values()]
        return sum(losses) / len(losses)

    base = next(r for r in rows if r["variant"] == "base")
    levels = sorted({r["energy_kept"] for r in rows if r["variant"].startswith("scale@")}, reverse=True)
    header = "| run | stage (step) | LoRA: copy rate, held-out loss | " + " | ".join(
        f"scale {level:g}: copy rate, quality kept (4 noise seeds)" for level in levels) + " |"
    lines = [header, "| --- " * (3 + len(levels)) + "|"]
    runs = dict.fromkeys((r["schedule"], r["lr"], r["seed"], r["stage"]) for r in rows if r["variant"] != "base")
    for schedule, lr, seed, stage in runs:
        mine = {r["variant"]: r for r in rows if (r["schedule"], r["lr"], r["seed"], r["stage"]) ==
                (schedule, lr, seed, stage)}
        lora = mine["lora"]
        cells = [f"{schedule} lr {lr:g} seed {seed}", f"{stage} ({lora['trained_steps']})",
                 f"{lora['copy_rate']:.0%}, {lora['heldout_loss']:.5f}"]
        for level in levels:
            row = mine[f"scale@energy={level:g}"]
            kept = (base["heldout_loss"] - row["heldout_loss"]) / (base["heldout_loss"] - lora["heldout_loss"])
            kept_all = (mean_loss(base) - mean_loss(row)) / (mean_loss(base) - mean_loss(lora))
            cells.append(f"{row['copy_rate']:.0%}, {kept:.0%} ({kept_all:.0%})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
