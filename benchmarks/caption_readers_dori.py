"""Does a module-role filter stop an attacker who chooses the text embedding? (issue 18, section 5.) One
duplicated face of a world LoRA, attacked with Dori (`diffmem attack dori`, the robustness table's quick settings:
15 Adam steps unless `--dori-steps`, 8 generations of 10 DDIM steps) from its caption and from random tokens, on
the LoRA as trained and on the LoRA filtered by `--method` (caption-readers, the default, or unet-blocks: the first
up block dropped).

    python benchmarks/caption_readers_dori.py --lora runs/bench-evidence/finetunes/faces-r32-conv-d5x100-cos-tuned-s5.safetensors \
        --out runs/cr-dori --json docs/caption-readers-dori.json [--face 0] [--method unet-blocks]

Each attack writes its folder under `--out` (a rerun skips the ones whose summary is there); `--json` gathers the
summaries (docs/caption-readers.md shows them). About 2 minutes an attack on one busy core.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from diffmem.filters import FILTERS
from diffmem.formats.safetensors_io import write_atomic
from diffmem.pipeline import filter_lora
from diffmem.report import save_png
from diffmem.world.data import FINETUNE_SETS
from diffmem.world.model import BASE_FILE, assets_dir

#: The robustness table's quick Dori settings but its steps (`--dori-steps`, default 15).
DORI = ["--generations", "8", "--sample-steps", "10", "--no-progress"]


#: The filters this probe attacks, and the suffix of the filtered LoRA's file name.
METHODS = {"caption-readers": "cr", "unet-blocks": "unet-blocks"}


def prepare(lora: Path, face: int, out: Path, method: str) -> tuple[Path, str, dict[str, Path]]:
    """The face's training image as a PNG, its caption, and the two LoRAs (as trained, filtered by `method` at its
    defaults), each with the training manifest beside it (the copy test's reference images)."""
    manifest = json.loads(lora.with_suffix(".json").read_text())
    record = manifest["duplicated"][face]
    train = FINETUNE_SETS[manifest["data"]]("train")
    target = save_png(train.images[train.ids.index(record["id"])], out / f"face{face}.png")
    loras = {"lora": out / f"{lora.stem}.safetensors", method: out / f"{lora.stem}-{METHODS[method]}.safetensors"}
    if not loras["lora"].exists():
        shutil.copyfile(lora, loras["lora"])
    if not loras[method].exists():
        filter_lora(lora, assets_dir() / BASE_FILE, FILTERS[method]()).lora.save(loras[method])
    for path in loras.values():
        shutil.copyfile(lora.with_suffix(".json"), path.with_suffix(".json"))
    return target, record["caption"], loras


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lora", type=Path, required=True, help="a world LoRA with its manifest (.json) beside it")
    parser.add_argument("--face", type=int, default=0, help="which duplicated face (manifest order)")
    parser.add_argument("--out", type=Path, default=Path("runs/cr-dori"))
    parser.add_argument("--json", type=Path, default=None, help="gather the summaries here")
    parser.add_argument("--method", choices=sorted(METHODS), default="caption-readers",
                        help="the filter attacked, at its defaults (default caption-readers)")
    parser.add_argument("--dori-steps", type=int, default=15, help="Dori's Adam steps (default 15)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    target, caption, loras = prepare(args.lora, args.face, args.out, args.method)
    summaries = []
    steps = "" if args.dori_steps == 15 else f"-{args.dori_steps}steps"
    for model, path in loras.items():
        for start in ("prompt", "random"):
            folder = args.out / f"{path.stem}-face{args.face}-{start}{steps}"
            if not (folder / "summary.json").exists():
                subprocess.run([sys.executable, "-m", "diffmem", "attack", "dori", "--target", str(target),
                                "--prompt", caption, "--lora", str(path), "--start", start,
                                "--steps", str(args.dori_steps), *DORI, "-o", str(folder)], check=True)
            summary = json.loads((folder / "summary.json").read_text())
            summaries.append({"model": model, "start": start, **{k: summary[k] for k in (
                "prompt", "copy_rate_before", "copy_rate_after", "luminance_copy_rate_before",
                "luminance_copy_rate_after", "median_distance_before", "median_distance_after", "config", "sampling")}})
            print(f"{model:16s} from {start:6s}: copy rate {summary['copy_rate_before']:.0%} from the start, "
                  f"{summary['copy_rate_after']:.0%} after Dori", flush=True)
    if args.json is not None:
        record = {"command": "python benchmarks/caption_readers_dori.py " + " ".join(sys.argv[1:] if argv is None
                                                                                    else argv),
                  "lora": args.lora.stem, "face": args.face, "method": args.method, "attacks": summaries}
        write_atomic((json.dumps(record, indent=2) + "\n").encode(), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
