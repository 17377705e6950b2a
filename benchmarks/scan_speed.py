"""How long one `diffmem scan` of a world LoRA takes at the default settings (issue 17's goal: <= 3 minutes on 2 CPU
cores), and what it finds on the committed example LoRA and two controls.

It measures `diffmem.scan.scan_lora` wall-clock, stage by stage (opening the fine-tune and the base, Wen's
first-step statistic on every candidate prompt, model-guided extraction), at `ScanConfig()` on the CPU with
`--threads` torch threads; writing the report is not included. The LoRA scanned is the committed example with the
kohya dataset metadata a world fine-tune writes today (`diffmem.world.train.kohya_dataset_metadata`, rebuilt from
its manifest; the committed file predates that metadata), so the candidate prompts come from its header as they
would for an uploaded LoRA.

`--controls` also scans the same LoRA with its update scaled to 10% and to 0 (the world base alone): the two
controls the PROVISIONAL rule was set by (docs/scan.md). `--json` writes every number to a file (docs/scan.json).

    python benchmarks/scan_speed.py [--threads 2] [--controls] [--json docs/scan.json] [--out runs/scan-speed]

Run it alone on a quiet machine: the timing is only meaningful without other jobs on the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from diffmem.formats.safetensors_io import write_atomic
from diffmem.scan import ScanConfig, scan_lora, write_scan
from diffmem.world.check import write_example_lora

VARIANTS = {"example": 1.0, "example_scaled_10pct": 0.1, "example_scaled_0 (base alone)": 0.0}




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, issue 17's 2 cores)")
    parser.add_argument("--controls", action="store_true", help="also scan the 10%% and 0%% copies")
    parser.add_argument("--json", type=Path, help="write the numbers to this JSON file")
    parser.add_argument("--out", type=Path, help="write each scan's summary.json and report.html under this folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    names = list(VARIANTS) if args.controls else ["example"]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for index, name in enumerate(names):
            lora = write_example_lora(Path(folder) / f"lora{index}.safetensors", VARIANTS[name])
            started = time.perf_counter()
            result = scan_lora(lora, "world", ScanConfig(), progress=sys.stderr.isatty())
            wall = time.perf_counter() - started
            summary = result.summary()
            summary["lora"] = name
            if args.out is not None:
                write_scan(result, args.out / name.split(" ")[0])
            results[name] = {"wall_s": round(wall, 1), **{k: summary[k] for k in
                                                          ("verdict", "risk", "evidence", "timings_s", "prompts",
                                                           "groups")}}
            evidence = summary["evidence"]
            print(f"{name}: {summary['verdict']} (risk {summary['risk']:.2f}, provisional rule); largest Wen ratio "
                  f"{evidence['largest_wen_ratio']:.2f}, {evidence['extracted_groups']} extracted group(s), "
                  f"{evidence['groups_base_also_produces']} the base also makes; {wall:.1f} s "
                  f"(load {summary['timings_s']['load']:.1f}, Wen {summary['timings_s']['wen']:.1f}, extraction "
                  f"{summary['timings_s']['extraction']:.1f})", flush=True)
    record = {
        "command": shlex.join(["python", "benchmarks/scan_speed.py", *sys.argv[1:]]),
        "measures": "scan_lora wall-clock at ScanConfig() on the CPU, report writing excluded",
        "threads": args.threads, "cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
        "torch": torch.__version__, "python": platform.python_version(),
        "config": asdict(ScanConfig()), "scans": results,
    }
    if args.json is not None:
        write_atomic((json.dumps(record, indent=2) + "\n").encode(), args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
