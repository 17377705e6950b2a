"""`diffmem bench ...`: run the benchmark grid, the channel ablations, and regenerate docs/results.md;
`diffmem bench-real`: the same variants on a user's own Stable Diffusion checkpoint and LoRAs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Parsing needs only the settings (their defaults; no model library): `diffmem bench --help` must not load diffusers.
# The benchmark itself is imported by the commands when they run.
from diffmem.bench.settings import PLANS, BenchSettings, RealBenchSettings
from diffmem.cli import UsageError

QUICK_WORK = Path("runs/bench-quick")
FULL_WORK = Path("runs/bench")
EVIDENCE_WORK = Path("runs/bench-evidence")
#: Seeds per setting when --seeds is not given: the full grid's central setting, and the evidence grid's settings.
DEFAULT_SEEDS = {"full": 3, "evidence": 5}
CHANNELS_FILE = "channels.json"


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """Options of `BenchSettings` (changing any of them starts a separate set of rows)."""
    d = BenchSettings()
    parser.add_argument("--generations", type=int, default=d.generations,
                        help=f"generations per duplicated caption (default {d.generations})")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"DDIM steps (default {d.steps})")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def run_bench_command(args: argparse.Namespace) -> int:
    """Train/measure what is missing, run the channel ablations, write the report."""
    seeds = args.seeds if args.seeds is not None else DEFAULT_SEEDS[args.grid]
    if min(args.generations, args.steps, seeds, args.variation_seeds) < 1:
        raise UsageError("--generations, --steps, --seeds and --variation-seeds must be at least 1")
    if args.quick and args.grid != "full":
        raise UsageError("--quick runs the example LoRA alone; it takes no --grid")
    if (args.first_seed or args.only) and args.grid != "evidence":
        raise UsageError("--first-seed and --only choose cells of --grid evidence")
    if args.first_seed < 0:
        raise UsageError("--first-seed must be at least 0")
    import torch

    from diffmem.bench.channels import ChannelTruthConfig, ablate_channels, write_truth
    from diffmem.bench.evaluate import MEASUREMENTS
    from diffmem.bench.grid import CORE, evidence_grid, full_grid, quick_grid
    from diffmem.bench.report import load_channels, write_results
    from diffmem.bench.run import current_rows, ensure_finetune, run_bench

    unknown = sorted(set(args.fill_missing) - set(MEASUREMENTS))
    if unknown:
        raise UsageError(f"--fill-missing: not a measurement of the bench: {', '.join(unknown)} "
                         f"(it measures {', '.join(MEASUREMENTS)})")
    work = args.work or (QUICK_WORK if args.quick else EVIDENCE_WORK if args.grid == "evidence" else FULL_WORK)
    out = args.out or work / "results.md"  # the repository's docs/results.md is written by `make bench`
    settings = BenchSettings(generations=args.generations, steps=args.steps)
    torch.set_num_threads(args.threads)
    if not args.report_only:
        try:
            cells = (quick_grid() if args.quick else evidence_grid(seeds, args.first_seed, args.only)
                     if args.grid == "evidence" else full_grid(seeds, args.variation_seeds))
        except ValueError as error:  # a setting name the grid does not have
            raise UsageError(f"--only: {error}") from None
        run_bench(work, cells, settings, threads=args.threads, train_missing=not args.no_train,
                  fill_missing=args.fill_missing)
        channels_path = work / CHANNELS_FILE
        if not args.no_channels and args.grid == "full" and not channels_path.exists():
            config = ChannelTruthConfig(max_channels=16 if args.quick else None)
            lora = ensure_finetune(CORE, work)
            write_truth(ablate_channels(lora, json.loads(lora.with_suffix(".json").read_text()), config),
                        channels_path)
    rows = current_rows(work / "results.jsonl", settings)
    path = write_results(rows, work, out, load_channels(work / CHANNELS_FILE))
    print(f"wrote {path} ({len(rows)} measurements)")
    return 0


def run_bench_real_command(args: argparse.Namespace) -> int:
    """Filter each LoRA with every variant, load it with diffusers, measure it against the probe, write the report."""
    if min(args.generations, args.heldout_generations, args.steps) < 1:
        raise UsageError("--generations, --heldout-generations and --steps must be at least 1")
    import torch

    from diffmem.backends import DTYPES
    from diffmem.bench.real import REPORT_FILE, run_real_bench

    torch.set_num_threads(args.threads)
    settings = RealBenchSettings(generations=args.generations, heldout_generations=args.heldout_generations,
                                 steps=args.steps, guidance=args.guidance, seed=args.seed,
                                 copy_distance=args.copy_distance)
    rows = run_real_bench(args.base, args.lora, args.probe, args.out, settings, plan=PLANS[args.plan],
                          device=args.device, dtype=DTYPES[args.dtype], embedder=args.embedder,
                          batch_size=args.batch_size, config=args.config)
    print(f"wrote {args.out / REPORT_FILE} ({len(rows)} measurements in {args.out / 'results.jsonl'})")
    return 0


def register_real(subparsers: argparse._SubParsersAction) -> None:
    """Add `diffmem bench-real` (its own command: none of the world grid's options apply to it, and it needs a
    base, LoRAs and a probe)."""
    from diffmem.backends import DTYPES

    d = RealBenchSettings()
    p = subparsers.add_parser(
        "bench-real", help="the benchmark's filter variants on your own Stable Diffusion checkpoint and LoRAs",
        description="Filter each LoRA with BAF variants and baselines (the variants of `diffmem bench`), load every "
                    "filtered file into the base pipeline with diffusers' load_lora_weights, generate from the "
                    "captions of the training images you suspect are memorized, and measure copies, nearest "
                    "distances, AMD, denoising losses and FID. Resumable: rows already measured are kept. "
                    "See docs/bench.md, 'On your own checkpoints'.")
    p.add_argument("--base", type=Path, required=True,
                   help="the base: a diffusers folder or a single-file checkpoint of Stable Diffusion 1.x/2.x, SDXL, "
                        "Flux or SD3 (the LoRAs are loaded with diffusers' own load_lora_weights)")
    p.add_argument("--config", type=Path, default=None,
                   help="for a single-file --base: a local diffusers folder of the same architecture whose "
                        "configs (layer sizes, tokenizer, scheduler) describe it (default: diffusers' local cache)")
    p.add_argument("--lora", type=Path, nargs="+", required=True, help="one or more LoRA files trained on the base")
    p.add_argument("--probe", type=Path, required=True,
                   help="probe manifest (JSON): suspected training images with captions, optional references and "
                        "held-out captions/images")
    p.add_argument("--out", type=Path, default=Path("runs/bench-real"),
                   help="folder of rows, filtered LoRAs, image grids and report.md (default runs/bench-real)")
    p.add_argument("--plan", choices=sorted(PLANS), default="quick",
                   help="which variants besides the LoRA, the base and BAF's default rule: quick (BAF's right-side "
                        "score; BAF, random, magnitude and scale at 80%% of each module's update energy; BAF, random "
                        "and magnitude at the channel share BAF's rule kept; default), variation, or full (every "
                        "variant of the world benchmark's central setting)")
    p.add_argument("--generations", type=int, default=d.generations,
                   help=f"generations per suspected caption (default {d.generations})")
    p.add_argument("--heldout-generations", type=int, default=d.heldout_generations,
                   help=f"generations per held-out caption, for FID (default {d.heldout_generations})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"DDIM steps (default {d.steps})")
    p.add_argument("--guidance", type=float, default=d.guidance,
                   help="guidance scale (default: the model's own: 7.5 for Stable Diffusion, 7 for SD3, 1 for Flux)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"generation g of each caption starts from the noise of seed SEED + g (default {d.seed})")
    p.add_argument("--copy-distance", type=float, default=None,
                   help="also require a copy's tiled-L2 distance to be at most this (default: relative test only)")
    p.add_argument("--embedder", default=None,
                   help="feature space of AMD and FID: pixels, pixelsN, safety-checker (the CLIP image encoder in "
                        "the base folder's safety_checker/), or a TorchScript / torch.export file or Hugging Face "
                        f"folder (default {d.embedder})")
    p.add_argument("--device", default="cpu", help="torch device of filtering and generation, e.g. cuda (default cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="pipeline weights' dtype (float16 halves GPU memory; default float32)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default 8)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.set_defaults(handler=run_bench_real_command)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `diffmem bench` and `diffmem bench-real`."""
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
    p.add_argument("--out", type=Path, default=None, help="report to write (default WORK/results.md)")
    p.add_argument("--grid", choices=sorted(DEFAULT_SEEDS), default="full",
                   help="full: the central setting and the settings varied around it, each trained for the recipe's "
                        "steps (docs/results.md); evidence: LoRAs stopped at their best held-out step, the same "
                        "trained three times as long, and a style LoRA (docs/bench.md, 'The evidence grid'; work "
                        "folder runs/bench-evidence)")
    p.add_argument("--seeds", type=int, default=None,
                   help="how many fine-tunes (seeds 0, 1, ...) of the central setting, or with --grid evidence of "
                        "each of its settings (default 3, or 5 with --grid evidence)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="with --grid evidence: the first seed (seeds FIRST to FIRST + SEEDS - 1), so that two "
                        "processes can share the work folder with different seeds (default 0)")
    p.add_argument("--only", action="append", default=[], metavar="SETTING",
                   help="with --grid evidence: only this setting (repeatable), e.g. "
                        "faces-r32-conv-d5x100-cos-tuned")
    p.add_argument("--variation-seeds", type=int, default=1,
                   help="how many fine-tunes (seeds 0, 1, ...) of each varied setting (default 1)")
    p.add_argument("--no-channels", action="store_true", help="skip the single-channel ablations")
    p.add_argument("--no-train", action="store_true",
                   help="skip grid cells whose fine-tune is not in the work folder yet instead of training it")
    p.add_argument("--report-only", action="store_true", help="only regenerate the report from measured rows")
    p.add_argument("--fill-missing", action="append", default=[], metavar="FIELD",
                   help="measure again the cells whose rows lack this measurement (one added to the bench after they "
                        "were measured, e.g. any_copy_rate; repeatable); the new row replaces the old, and a "
                        "fine-tune trained again must reproduce its earlier rows")
    add_sampling_options(p)
    p.set_defaults(handler=run_bench_command)
    register_real(subparsers)
