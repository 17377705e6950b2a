"""`diffmem scan --filter` on the committed example LoRA: does a filter remove the memorized images, or only the
prompts' way to them? (issue 17, docs/scan.md)

For each filter (BAF at its defaults, and turning the whole LoRA down to 25% of its update energy, the scale-down
that docs/results.md found removes every near-copy), `diffmem.scan.loop.scan_filter_attack` at the default
`ScanConfig()` and `LoopConfig()`: scan the example LoRA (with the kohya metadata a world fine-tune writes today), filter it,
scan the filtered LoRA on the same candidate prompts, and run Dori (50 steps) on the filtered LoRA towards each of
the first scan's three largest extracted images. No training image is read.

    python benchmarks/scan_filter.py [--threads 1] [--json docs/scan-filter.json] [--out runs/scan-filter]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffmem.filters import BAFConfig, ScaleConfig, Selection
from diffmem.formats.safetensors_io import write_atomic
from diffmem.scan.loop import scan_filter_attack, write_loop
from diffmem.world.check import write_example_lora

FILTERS = {"baf": BAFConfig(), "scale@0.25": ScaleConfig(selection=Selection(rule="uniform", keep_fraction=0.25))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, help="write the numbers to this JSON file")
    parser.add_argument("--out", type=Path, help="write each loop's reports under this folder")
    parser.add_argument("--only", choices=sorted(FILTERS), help="one filter only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    document = {"command": "python benchmarks/scan_filter.py " + shlex.join(sys.argv[1:]), "threads": args.threads,
                "filters": {}}
    with tempfile.TemporaryDirectory() as folder:
        lora = write_example_lora(Path(folder) / "example.safetensors")
        for name, config in FILTERS.items():
            if args.only and name != args.only:
                continue
            started = time.perf_counter()
            result = scan_filter_attack(lora, "world", config, cache_dir=Path(folder) / "cache")
            summary = result.summary()
            for scan in ("before", "after"):  # the per-prompt rows stay in the reports; the evidence is enough here
                summary[scan] = {key: summary[scan][key] for key in ("verdict", "risk", "rule", "evidence")}
            summary["seconds"] = round(time.perf_counter() - started, 1)
            document["filters"][name] = summary
            print(f"{name}: {result.verdict} ({result.before.verdict} -> {result.after.verdict}; attacks "
                  f"{[round(a.attack_copy_share, 2) for a in result.attacks]}) in {summary['seconds']:.0f} s",
                  flush=True)
            if args.out is not None:
                write_loop(result, args.out / name)
    if args.json is not None:
        write_atomic((json.dumps(document, indent=2) + "\n").encode(), args.json)


if __name__ == "__main__":
    main()
