"""`diffmem memcontrol ...`: derive a mask, fine-tune the world under a mask, search masks, the run of the MemControl
paper's Table 1."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from diffmem.cli import UsageError, flag, usage_error
from diffmem.errors import DiffmemError

# Only the settings (names and defaults, in a module without torch) are imported here, so `diffmem memcontrol --help`
# loads no model; each command imports its work when it runs.
from diffmem.memcontrol.settings import (
    BASELINES,
    GRANULARITIES,
    MASKED_METHODS,
    MEMCONTROL_DATA,
    METHOD_NAMES,
    MITIGATIONS,
    TABLE_MITIGATIONS,
    MemControlTrainConfig,
    SearchConfig,
)


def add_training_options(p: argparse.ArgumentParser, steps: int | None, batch_size: int | None) -> None:
    """Options of the inner fine-tune shared by `train`, `search` and `table` (None: the command's default)."""
    from diffmem.world.commands import duplicate_spec

    p.add_argument("--data", choices=MEMCONTROL_DATA, default="faces", help="fine-tuning data (default faces)")
    p.add_argument("--duplicate", type=duplicate_spec, metavar="N:K", help="repeat N training images K times")
    p.add_argument("--rest-share", type=float, help="share of the other training images seen once")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default: the method's)")
    unset = "the command's; the quick budget's with --quick"
    p.add_argument("--steps", type=int, default=steps,
                   help=f"optimizer steps (default {steps if steps is not None else unset})")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"images per step (default {batch_size if batch_size is not None else unset})")
    p.add_argument("--threshold", type=float, help="Wen threshold for --mitigation threshold (default 5.0)")
    p.add_argument("--rwa-probability", type=float, help="random word addition probability (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="picks the duplicated images, seeds training (default 0)")


#: The flags of the configs' fields that their checks name (a refused value is a usage error naming the flag;
#: --data, --method and --mitigation take only choices the configs accept).
FLAGS = {"population_size": "--population", **{
    name: flag(name) for name in ("duplicate", "rest_share", "threshold", "rwa_probability", "trials", "lr_scale")}}


def training_config(args: argparse.Namespace, start):
    """`start` (a MemControlTrainConfig) with the options given on the command line; a value it refuses is a usage
    error (exit 2) naming the flag."""
    changes = {k: getattr(args, k) for k in ("data", "duplicate", "rest_share", "lr", "steps", "batch_size", "seed")
               if getattr(args, k, None) is not None}
    if min(changes.get("steps", 1), changes.get("batch_size", 1)) < 1:
        raise UsageError("--steps and --batch-size must be at least 1")
    mitigation = start.mitigation
    with configs_as_usage_errors():
        if getattr(args, "mitigation", None) is not None:
            mitigation = replace(mitigation, kind=args.mitigation)
        if args.threshold is not None:
            mitigation = replace(mitigation, threshold=args.threshold)
        if args.rwa_probability is not None:
            mitigation = replace(mitigation, rwa_probability=args.rwa_probability)
        return replace(start, **changes, mitigation=mitigation)


@contextlib.contextmanager
def configs_as_usage_errors() -> Iterator[None]:
    """A config's refusal of a value (DiffmemError or ValueError from its checks) as a usage error naming the flag."""
    try:
        yield
    except (DiffmemError, ValueError) as error:
        raise usage_error(error, FLAGS) from None


def add_mask(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("mask", help="write a mask over the world base's attention blocks or layers")
    p.add_argument("--out", type=Path, required=True, help="mask file (.json) to write")
    p.add_argument("--granularity", choices=GRANULARITIES, default="blocks",
                   help="blocks (13 on SD, 5 on the world) or layers (16 on SD, 7 on the world); default blocks")
    p.add_argument("--bits", help="switches as 0/1 in entry order (down, mid, up); default all on")
    p.set_defaults(handler=run_mask)


def run_mask(args: argparse.Namespace) -> int:
    from diffmem.memcontrol.mask import derive_mask, mask_to_dict, save_mask
    from diffmem.world.model import load_base

    mask = derive_mask(load_base(), args.granularity, args.bits)
    save_mask(mask, args.out)
    print(json.dumps(mask_to_dict(mask), indent=2))
    return 0


def add_train(subparsers: argparse._SubParsersAction) -> None:
    d = MemControlTrainConfig  # the defaults, read off the class
    p = subparsers.add_parser("train", help="fine-tune the world base with a PEFT method under a mask")
    p.add_argument("--out", type=Path, required=True, help="merged UNet (.safetensors, float32); manifest .json beside")
    p.add_argument("--method", choices=sorted(METHOD_NAMES), default=d.method, help=f"what to train (default {d.method})")
    p.add_argument("--mask", type=Path, help="mask file (from `memcontrol mask` or `memcontrol search`); "
                                             "default: every attention module (the method as published)")
    p.add_argument("--mitigation", choices=MITIGATIONS, default="none", help="training-time mitigation (default none)")
    p.add_argument("--base", type=Path, help="world UNet file to fine-tune (default: the committed base)")
    add_training_options(p, d.steps, d.batch_size)
    p.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from diffmem.memcontrol.mask import load_mask
    from diffmem.memcontrol.train import train_masked

    config = training_config(args, MemControlTrainConfig(method=args.method))  # --method: choices, so valid
    mask = None if args.mask is None else load_mask(args.mask)
    manifest = train_masked(args.out, config, mask, args.base, command=getattr(args, "command_line", None))
    print(json.dumps({k: manifest[k] for k in ("settings", "trainable_parameters", "final_loss_ema", "wall_time_s",
                                               "sha256")}, indent=2))
    return 0


def add_search(subparsers: argparse._SubParsersAction) -> None:
    d = SearchConfig  # the defaults, read off the class
    p = subparsers.add_parser("search", help="MemControl's mask search (NSGA-II; Wen score and FID)")
    p.add_argument("--out", type=Path, required=True, help="folder for the study, Pareto table and plot, mask.json")
    p.add_argument("--method", choices=MASKED_METHODS, default=d.method,
                   help=f"search space (default {d.method})")
    p.add_argument("--granularity", choices=GRANULARITIES, help="default: layers for attention, blocks otherwise")
    p.add_argument("--trials", type=int, default=d.trials, help=f"trials of the study in all (default {d.trials})")
    p.add_argument("--population", type=int, default=d.population_size,
                   help=f"NSGA-II population size (default {d.population_size})")
    p.add_argument("--storage", help="Optuna RDB URL (default: SQLite in --out); share one to run several workers")
    p.add_argument("--study-name", help="default memcontrol-<method>-<granularity>")
    p.add_argument("--quick", action="store_true",
                   help="proxy fine-tune at `memcontrol table --quick`'s budget (see docs/memcontrol.md)")
    p.add_argument("--lr-scale", type=float,
                   help="multiply the method's own learning rate (default 1, or the quick budget's with --quick; "
                        "ignored with --lr)")
    add_training_options(p, None, None)
    p.set_defaults(handler=run_search)


def run_search(args: argparse.Namespace) -> int:
    from diffmem.memcontrol.search import search

    start = SearchConfig.quick(args.method) if args.quick else SearchConfig(method=args.method)
    train = training_config(args, start.train)
    with configs_as_usage_errors():
        config = replace(start, granularity=args.granularity, trials=args.trials, population_size=args.population,
                         train=train, seed=args.seed,
                         lr_scale=args.lr_scale if args.lr_scale is not None else start.lr_scale)
    summary = search(args.out, config, args.storage, args.study_name)
    print((args.out / "pareto.md").read_text())
    print(f"chosen mask {summary['chosen']['bits']} -> {args.out / 'mask.json'}")
    return 0


def add_table(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("table", help="Table 1 of the MemControl paper (Dutt et al. 2025) on the world: every "
                                            "fine-tuning method x mitigation, measured")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for rows.json and table.md; run again into it, a stopped table trains only the rows "
                        "it had not finished")
    p.add_argument("--mask", type=Path, help="mask from `memcontrol search` for the MemControl rows")
    p.add_argument("--quick", action="store_true",
                   help="the quick budget: 2 faces x 300, 200 steps of 8 images per row at 10x each method's "
                        "learning rate (see docs/memcontrol.md)")
    p.add_argument("--mitigations", default=",".join(TABLE_MITIGATIONS),
                   help="comma-separated mitigations crossed with full, svdiff, difffit and attention (default %(default)s)")
    p.add_argument("--methods", default=",".join(BASELINES),
                   help="comma-separated baseline methods (default %(default)s)")
    p.add_argument("--lr-scale", type=float,
                   help="multiply every method's own learning rate (default 1, or the quick budget's with --quick; "
                        "ignored with --lr)")
    p.add_argument("--doc", type=Path, help="also write the table into this markdown file, between its "
                                            "`<!-- memcontrol table <name> start/end -->` lines")
    p.add_argument("--name", help="which marked table --doc replaces (default: the --data set's name)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="rows trained side by side, one process and one torch thread each "
                        "(default: one per CPU core, %(default)s here)")
    add_training_options(p, None, None)
    p.set_defaults(handler=run_table_command)


def split_names(text: str) -> tuple[str, ...]:
    """`a,b` -> ("a", "b")."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def run_table_command(args: argparse.Namespace) -> int:
    from diffmem.memcontrol.table import TableConfig, markdown_table, run_table, updated_doc, write_table_into

    for option, names, known in (("--mitigations", args.mitigations, MITIGATIONS), ("--methods", args.methods,
                                                                                   METHOD_NAMES)):
        unknown = [name for name in split_names(names) if name not in known]
        if unknown:
            raise UsageError(f"{option} takes {', '.join(known)}; got {', '.join(unknown)}")
    start = TableConfig.quick() if args.quick else TableConfig()
    train = training_config(args, start.train)
    with configs_as_usage_errors():
        config = replace(start, train=train, mitigations=split_names(args.mitigations),
                         methods=split_names(args.methods),
                         lr_scale=args.lr_scale if args.lr_scale is not None else start.lr_scale)
    name = args.name or config.train.data
    if args.doc is not None:  # a document without the markers fails now, not after the table's hour
        updated_doc(args.doc, name, "")
    rows = run_table(args.out, config, args.mask, workers=args.workers)
    if args.doc is not None:
        write_table_into(args.doc, name, markdown_table(rows))
    print((args.out / "table.md").read_text())
    return 0


def add_collect(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("collect", help="merge the rows.json of table runs split over processes into one "
                                              "table, in the MemControl paper's order, and write it into a document")
    p.add_argument("rows", nargs="+", type=Path, help="rows.json files written by `memcontrol table`")
    p.add_argument("--doc", type=Path, required=True,
                   help="markdown file with `<!-- memcontrol table <name> start/end -->` lines")
    p.add_argument("--name", default="faces", help="which marked table to replace (default faces)")
    p.set_defaults(handler=run_collect)


def run_collect(args: argparse.Namespace) -> int:
    from diffmem.memcontrol.table import collect_rows, markdown_table, write_table_into

    rows = collect_rows(args.rows)
    write_table_into(args.doc, args.name, markdown_table(rows))
    print(markdown_table(rows))
    return 0


def add_spread(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("spread", help="mean, lowest and highest of each row's numbers over table runs that "
                                             "differ only in --seed, written into a document")
    p.add_argument("rows", nargs="+", type=Path, help="rows.json files of `memcontrol table`, one per seed")
    p.add_argument("--doc", type=Path, help="markdown file with `<!-- memcontrol table <name> start/end -->` lines")
    p.add_argument("--name", default="faces-seeds", help="which marked table to replace (default faces-seeds)")
    p.set_defaults(handler=run_spread)


def run_spread(args: argparse.Namespace) -> int:
    from diffmem.memcontrol.table import seed_spread, spread_table, write_table_into

    table = spread_table(seed_spread(args.rows))
    if args.doc is not None:
        write_table_into(args.doc, args.name, table)
    print(table)
    return 0


def add_norms(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("norms", help="the norms Wen's threshold mitigation compares, on the training faces "
                                            "(to choose --threshold)")
    p.add_argument("--model", default="base",
                   help="base, example-lora (the committed memorizing LoRA) or a world UNet file (default base)")
    p.add_argument("--draws", type=int, default=4, help="noisy copies per image at uniform timesteps (default 4)")
    p.add_argument("--timesteps", default="50,300,600,900",
                   help="also report the norms at these fixed timesteps (default %(default)s)")
    p.set_defaults(handler=run_norms)


def run_norms(args: argparse.Namespace) -> int:
    import torch

    from diffmem.memcontrol.mitigation import training_norms
    from diffmem.world.check import load_example_lora
    from diffmem.world.data import faces_dataset
    from diffmem.world.model import load_base, load_unet_file

    torch.set_num_threads(1)
    duplicated_ids: set[str] = set()
    if args.model == "base":
        unet = load_base()
    elif args.model == "example-lora":
        unet, manifest = load_example_lora()
        duplicated_ids = {e["id"] for e in manifest["duplicated"]}
    else:
        unet = load_unet_file(args.model)
    faces = faces_dataset("train")
    norms, _ = training_norms(unet, faces.images, faces.captions, args.draws)
    duplicated = torch.tensor([i in duplicated_ids for i in faces.ids]).repeat(args.draws)
    quantiles = torch.quantile(norms, torch.tensor([0.5, 0.75, 0.9, 0.95]))
    report = {"model": args.model, "quantiles_50_75_90_95": [round(q, 3) for q in quantiles.tolist()],
              "dropped_at": {str(t): {"duplicated": round(float((norms[duplicated] >= t).float().mean()), 3)
                                      if duplicated.any() else None,
                                      "others": round(float((norms[~duplicated] >= t).float().mean()), 3)}
                             for t in (3.0, 4.0, 5.0, 6.0)},
              "at_timestep": {}}
    for t in split_names(args.timesteps):
        fixed, _ = training_norms(unet, faces.images, faces.captions, 1, timestep=int(t))
        once = duplicated[: len(faces)]
        report["at_timestep"][t] = {
            "duplicated_range": [round(float(fixed[once].min()), 2), round(float(fixed[once].max()), 2)]
            if once.any() else None,
            "others_median_max": [round(float(fixed[~once].median()), 2), round(float(fixed[~once].max()), 2)]}
    print(json.dumps(report, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `memcontrol` and its sub-commands to the diffmem CLI."""
    memcontrol = subparsers.add_parser("memcontrol", help="MemControl: choose which parameters a fine-tune trains")
    commands = memcontrol.add_subparsers(dest="memcontrol_command", required=True)
    add_mask(commands)
    add_train(commands)
    add_search(commands)
    add_table(commands)
    add_collect(commands)
    add_spread(commands)
    add_norms(commands)

