"""Our `intruder` channel filter against PEFT's `reduce_intruder_dimension` on the world's example LoRA: the numbers
docs/filter.md quotes ("The intruder test and PEFT's"), written to docs/intruder-peft.json.

    python benchmarks/intruder_vs_peft.py --out docs/intruder-peft.json

For each rule: the share of the LoRA's update energy the result keeps (sum over modules of ||dW'||^2 over the same
sum of the input, as `LoraFile.update_energy`), the modules it changed, and how far it moved the update
(||dW' - dW|| over ||dW||, over all modules together). A second of CPU or so; one thread.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from diffmem.filters import IntruderConfig
from diffmem.filters.peft_intruder import PeftIntruderConfig, peft_intruder_lora
from diffmem.formats.base import open_base
from diffmem.formats.lora import LoraFile, read_lora
from diffmem.pipeline import filter_lora
from diffmem.world.check import example_lora_path
from diffmem.world.settings import BASE_FILE, assets_dir


def compare(before: LoraFile, after: LoraFile) -> dict:
    """Energy kept, modules changed and relative change of the update from `before` to `after`."""
    energy = kept = moved = 0.0
    changed = 0
    for name, module in before.modules.items():
        old, new = module.delta().double(), after.modules[name].delta().double()
        energy += float(old.square().sum())
        kept += float(new.square().sum())
        moved += float((new - old).square().sum())
        changed += not torch.allclose(old, new, rtol=1e-5, atol=1e-9)
    return {"energy_kept": round(kept / energy, 4), "modules_changed": changed, "modules": len(before.modules),
            "relative_change": round((moved / energy) ** 0.5, 4)}


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/intruder-peft.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    lora_path, base_path = example_lora_path(), assets_dir() / BASE_FILE
    lora, base = read_lora(lora_path), open_base(base_path)
    ours = filter_lora(lora, base, IntruderConfig())
    rows = {"intruder": {"channels_kept": ours.report.channels_kept, "channels_total": ours.report.channels_total,
                         **compare(lora, ours.lora)}}
    for name, config in (("peft default", PeftIntruderConfig()),
                         ("peft mitigation_lambda=0", PeftIntruderConfig(mitigation_lambda=0.0))):
        rows[name] = {"config": asdict(config), **compare(lora, peft_intruder_lora(lora, base, config))}
    record = {"command": f"python benchmarks/intruder_vs_peft.py --out {args.out}",
              "lora": lora_path.name, "base": base_path.name, "rows": rows}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
