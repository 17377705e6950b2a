"""Which recipe makes the world's style LoRA a style LoRA? (issue 18, section 1.) A style fine-tune of the evidence
grid's recipe (rank 32, LoCon, cosine learning rate, held-out loss tracked every 25 steps) with a given duplication
and length, its weights at the best tracked step ("tuned") and at the last ("final"), each measured as `diffmem
bench` measures a variant (`diffmem.bench.evaluate.measure`): copy rate of the duplicated captions, held-out loss,
and the style's success on 4 generations of each of the 24 held-out captions, beside the base's.

A style LoRA is shared for its look: one that draws it on a sixth of held-out prompts is not the LoRA-sharing case
the evidence grid's style setting stands for, and "style kept" cannot be measured on it.

    python benchmarks/style_recipe_probe.py --duplicate 5:20 --out runs/style-probe [--steps 500] [--threads 1]
    python benchmarks/style_recipe_probe.py --collect runs/style-probe --json docs/style-recipe.json

Each run appends its rows to `--out`/rows.jsonl (a rerun skips what is there and does not train again);
`--collect` writes every row with the commands and each run's tracked held-out curve into one JSON file and
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

from diffmem.bench.evaluate import STYLE_GENERATIONS, Probe, measure
from diffmem.bench.run import add_probe_arguments, append_row, collect_probe
from diffmem.bench.settings import BenchSettings
from diffmem.formats.lora import read_lora
from diffmem.world.commands import duplicate_spec
from diffmem.world.lora import apply_lora
from diffmem.world.model import load_base
from diffmem.world.settings import FinetuneConfig
from diffmem.world.train import finetune


def trained(duplicate: tuple[int, int], steps: int, seed: int, out: Path, threads: int) -> dict[str, Path]:
    """The tracked run and its best step, trained once into `out`."""
    stem = f"style-d{duplicate[0]}x{duplicate[1]}-{steps}-cos-s{seed}"
    final, tuned = out / f"{stem}-final.safetensors", out / f"{stem}-tuned.safetensors"
    if not (final.exists() and tuned.exists()):
        config = FinetuneConfig(data="style", duplicate=duplicate, steps=steps, seed=seed, lr_schedule="cosine",
                                heldout_every=25, threads=threads)
        finetune(final, config, best_out=tuned, progress=False)
    return {"tuned": tuned, "final": final}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duplicate", type=duplicate_spec, default=(5, 100), metavar="N:K")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    add_probe_arguments(parser, "runs/style-probe")
    args = parser.parse_args(argv)
    if args.collect is not None:
        print(markdown(collect_probe(args.collect, args.json, {"style_generations_per_caption": STYLE_GENERATIONS})))
        return 0
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "rows.jsonl"
    done = {r["lora"] for r in map(json.loads, rows_path.read_text().splitlines())} if rows_path.exists() else set()
    command = shlex.join(["python", "benchmarks/style_recipe_probe.py", *(sys.argv[1:] if argv is None else argv)])
    paths = trained(args.duplicate, args.steps, args.seed, args.out, args.threads)
    base_unet, settings = load_base(), BenchSettings()
    run = {"duplicate": list(args.duplicate), "steps": args.steps, "seed": args.seed, "command": command}
    for stage, path in paths.items():
        if path.stem in done:
            continue
        manifest = json.loads(path.with_suffix(".json").read_text())
        probe = Probe.from_manifest(manifest)
        started = time.perf_counter()
        row = {"lora": path.stem, **run, "stage": stage, "trained_steps": manifest["trained_steps"],
               **measure(apply_lora(base_unet, read_lora(path)), probe, settings)[0],
               "seconds": round(time.perf_counter() - started)}
        print(json.dumps(row), flush=True)
        append_row(rows_path, row)
    if "base" not in done:  # every recipe's held-out captions are the same 24: one base row serves them all
        probe = Probe.from_manifest(json.loads(paths["final"].with_suffix(".json").read_text()))
        append_row(rows_path, {"lora": "base", **run, "stage": "base", "trained_steps": 0,
                               **measure(base_unet, probe, settings)[0], "seconds": 0})
    return 0


def markdown(rows: list[dict]) -> str:
    """One line per trained weights: its recipe, step, copy rate, captions copied, style success and held-out loss,
    and the base's style success and held-out loss on the same held-out captions in the last line."""
    lines = ["| recipe | stage (step) | copy rate | captions copied (of 5) | style success | held-out loss |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in sorted((r for r in rows if r["stage"] != "base"), key=lambda r: (r["duplicate"], r["steps"],
                                                                              r["seed"], r["stage"])):
        count, repeats = row["duplicate"]
        lines.append(f"| {count} images x {repeats}, {row['steps']} steps, seed {row['seed']} | {row['stage']} "
                     f"({row['trained_steps']}) | {row['copy_rate']:.0%} | {row['captions_copied']} | "
                     f"{row['style_success']:.0%} | {row['heldout_loss']:.4f} |")
    base = next((r for r in rows if r["stage"] == "base"), None)
    if base is not None:
        lines.append(f"| base (no LoRA) | - | {base['copy_rate']:.0%} | {base['captions_copied']} | "
                     f"{base['style_success']:.0%} | {base['heldout_loss']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
