"""Train the populations of world LoRAs that `diffmem scan`'s verdict is tuned on and judged on (issue 17).

Two populations, disjoint in seeds (so in the images each LoRA duplicates):

- `tune` (8 LoRAs): the scan's thresholds may be chosen on these;
- `eval` (24 LoRAs): kept out of the tuning; docs/scan.md reports the verdict's ROC AUC and TPR at 5% FPR on them.

Each population is half recipes meant to memorize (duplicated training images at several ranks, step counts,
duplication levels, on faces and on photos) and half recipes meant not to (no duplicated image, fewer steps).
A recipe's intent is not its label: the label of a LoRA is measured afterwards, by the copy test against its
own training images (which the scan never reads). A style-only fine-tune (issue 17) needs a style data set the
world does not have yet (issue 18); it is not in these populations.

Each LoRA is written with its manifest to `--out/<population>/<name>.safetensors` (+ `.json`), skipped when it
exists, so the script resumes. One LoRA takes about 11 CPU-minutes at 500 steps on one thread (docs/world.md);
the 32 take about 5 hours on one core. Run it in the background at low priority:

    nice -n 19 python benchmarks/scan_population.py --out runs/scan-population [--only eval] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from diffmem.world.train import FinetuneConfig, finetune


@dataclass(frozen=True)
class Recipe:
    """One LoRA of a population: its fine-tune and whether the recipe is meant to memorize."""

    name: str
    memorizing_recipe: bool
    config: FinetuneConfig


def recipes(population: str) -> list[Recipe]:
    """The LoRAs of `population` ("tune" or "eval"); seeds 100+ for tune, 200+ for eval, one per LoRA."""
    first_seed = {"tune": 100, "eval": 200}[population]
    memorizing = [  # (data, rank, steps, duplicate N x K)
        ("faces", 32, 500, (5, 100)), ("photos", 32, 500, (5, 100)), ("faces", 8, 500, (5, 100)),
        ("photos", 8, 400, (5, 100)), ("faces", 32, 300, (3, 150)), ("photos", 16, 500, (8, 60)),
        ("faces", 16, 400, (8, 60)), ("photos", 32, 300, (3, 150)), ("faces", 4, 500, (5, 100)),
        ("photos", 4, 500, (3, 150)), ("faces", 32, 500, (10, 50)), ("photos", 16, 400, (5, 100)),
    ]
    ordinary = [  # no duplicated image: (data, rank, steps)
        ("faces", 32, 500), ("photos", 32, 500), ("faces", 8, 300), ("photos", 8, 300), ("faces", 16, 150),
        ("photos", 16, 150), ("faces", 32, 300), ("photos", 4, 500), ("faces", 4, 300), ("photos", 32, 150),
        ("faces", 16, 500), ("photos", 16, 300),
    ]
    count = {"tune": 4, "eval": 12}[population]
    out = []
    for i, (data, rank, steps, duplicate) in enumerate(memorizing[:count]):
        config = FinetuneConfig(data=data, rank=rank, alpha=float(rank), steps=steps, duplicate=duplicate,
                                seed=first_seed + i)
        out.append(Recipe(f"mem-{data}-r{rank}-s{steps}-d{duplicate[0]}x{duplicate[1]}-{config.seed}", True, config))
    for i, (data, rank, steps) in enumerate(ordinary[:count]):
        config = FinetuneConfig(data=data, rank=rank, alpha=float(rank), steps=steps, duplicate=(0, 1),
                                seed=first_seed + 50 + i)
        out.append(Recipe(f"ord-{data}-r{rank}-s{steps}-{config.seed}", False, config))
    return out


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/scan-population"))
    parser.add_argument("--only", choices=("tune", "eval"), default=None, help="train one population only")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per fine-tune (default 1)")
    args = parser.parse_args()
    for population in [args.only] if args.only else ["tune", "eval"]:
        folder = args.out / population
        folder.mkdir(parents=True, exist_ok=True)
        for recipe in recipes(population):
            path = folder / f"{recipe.name}.safetensors"
            if path.is_file() and path.with_suffix(".json").is_file():
                continue
            began = time.time()
            config = FinetuneConfig(**{**asdict(recipe.config), "duplicate": recipe.config.duplicate,
                                       "threads": args.threads})
            manifest = finetune(path, config, progress=False,
                                command=f"python benchmarks/scan_population.py --out {args.out} ({population})")
            manifest["population"] = {"name": population, "memorizing_recipe": recipe.memorizing_recipe}
            path.with_suffix(".json").write_text(json.dumps(manifest, indent=2) + "\n")
            print(f"{population}/{recipe.name}: {time.time() - began:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
