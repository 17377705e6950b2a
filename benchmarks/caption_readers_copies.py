"""Does dropping the caption readers remove the memorized images, or only unbind them from their captions? (issue 18,
section 5.) The bench's copy rate counts a generation as a copy only when its nearest training image is its own
caption's; a LoRA without its caption readers can still draw a memorized face for every caption. For each LoRA:
the LoRA, the caption-readers filter and `scale` at 35% of the energy, measured as `diffmem bench` measures a variant,
with the share of duplicated-caption generations that are near-copies of any training image (the same relative
tiled-L2 test, any nearest image; the bench's `any_copy_rate`) and how many different training images those copies
are (`images_copied`).

    python benchmarks/caption_readers_copies.py --json docs/caption-readers-copies.json \
        runs/bench-evidence/finetunes/faces-r32-conv-d5x100-cos-tuned-s5.safetensors ...

About 35 s a model on one core (100 s for a style LoRA).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from diffmem.bench.evaluate import Probe, measure
from diffmem.bench.settings import BenchSettings
from diffmem.filters import CaptionReadersConfig, ScaleConfig, Selection
from diffmem.formats.safetensors_io import write_atomic
from diffmem.pipeline import filter_lora
from diffmem.world.lora import apply_lora
from diffmem.world.model import BASE_FILE, assets_dir, load_base

MODELS = {"lora": None, "caption-readers": CaptionReadersConfig(),
          "scale@energy=0.35": ScaleConfig(selection=Selection(rule="uniform", keep_fraction=0.35))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("loras", type=Path, nargs="+", help="world LoRAs with their manifests (.json) beside them")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base_unet, settings, rows = load_base(), BenchSettings(), []
    for path in args.loras:
        probe = Probe.from_manifest(json.loads(path.with_suffix(".json").read_text()))
        for model, config in MODELS.items():
            lora = path if config is None else filter_lora(path, assets_dir() / BASE_FILE, config).lora
            numbers, _ = measure(apply_lora(base_unet, lora), probe, settings)
            row = {"lora": path.stem, "model": model} | {key: numbers[key] for key in (
                "copy_rate", "any_copy_rate", "images_copied", "heldout_loss", "amd", "fid")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    record = {"command": "python benchmarks/caption_readers_copies.py " + " ".join(sys.argv[1:] if argv is None
                                                                                   else argv), "rows": rows}
    write_atomic((json.dumps(record, indent=2) + "\n").encode(), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
