"""`diffmem bench ...`: run the benchmark grid, the channel ablations, and regenerate docs/results.md."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

QUICK_WORK = Path("runs/bench-quick")
FULL_WORK = Path("runs/bench")
CHANNELS_FILE = "channels.json"


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """Options of `BenchSettings` (changing any of them starts a separate set of rows)."""
    from diffmem.bench.evaluate import BenchSettings

    d = BenchSettings()
    parser.add_argument("--generations", type=int, default=d.generations,
                        help=f"generations per duplicated caption (default {d.generations})")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"DDIM steps (default {d.steps})")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def run_bench_command(args: argparse.Namespace) -> int:
    """Train/measure what is missing, run the channel ablations, write the report."""
    import torch

    from diffmem.bench.channels import ChannelTruthConfig, ablate_channels, write_truth
    from diffmem.bench.evaluate import BenchSettings
    from diffmem.bench.grid import CORE, full_grid, quick_grid
    from diffmem.bench.report import load_channels, write_results
    from diffmem.bench.run import ensure_finetune, read_rows, run_bench, settings_id

    work = args.work or (QUICK_WORK if args.quick else FULL_WORK)
    out = args.out or (work / "results.md" if args.quick else Path("docs/results.md"))
    settings = BenchSettings(generations=args.generations, steps=args.steps)
    torch.set_num_threads(args.threads)
    if not args.report_only:
        cells = quick_grid() if args.quick else full_grid(args.seeds, args.variation_seeds)
        run_bench(work, cells, settings, threads=args.threads, train_missing=not args.no_train)
        channels_path = work / CHANNELS_FILE
        if not args.no_channels and not channels_path.exists():
            config = ChannelTruthConfig(max_channels=16 if args.quick else None)
            lora = ensure_finetune(CORE, work)
            write_truth(ablate_channels(lora, json.loads(lora.with_suffix(".json").read_text()), config),
                        channels_path)
    rows = [r for r in read_rows(work / "results.jsonl") if r.get("settings_id") == settings_id(settings)]
    path = write_results(rows, work, out, load_channels(work / CHANNELS_FILE))
    print(f"wrote {path} ({len(rows)} measurements)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `diffmem bench`."""
    p = subparsers.add_parser(
        "bench", help="does BAF remove memorization better than its baselines? (world fine-tunes, docs/results.md)",
        description="Fine-tune the embedded world so that it memorizes, filter every fine-tune with BAF variants "
                    "and baselines at matched budgets, measure memorization and quality, ablate single channels, "
                    "and write the report. Resumable: rows already measured are kept.")
    p.add_argument("--quick", action="store_true",
                   help="only the committed example LoRA and four methods at one budget (under 20 minutes); "
                        "writes runs/bench-quick/results.md")
    p.add_argument("--work", type=Path, default=None,
                   help="folder of fine-tunes, rows and images (default runs/bench, or runs/bench-quick)")
    p.add_argument("--out", type=Path, default=None, help="report to write (default docs/results.md)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the central setting (default 3)")
    p.add_argument("--variation-seeds", type=int, default=1, help="seeds of each varied setting (default 1)")
    p.add_argument("--no-channels", action="store_true", help="skip the single-channel ablations")
    p.add_argument("--no-train", action="store_true",
                   help="skip grid cells whose fine-tune is not in the work folder yet instead of training it")
    p.add_argument("--report-only", action="store_true", help="only regenerate the report from measured rows")
    add_sampling_options(p)
    p.set_defaults(handler=run_bench_command)
