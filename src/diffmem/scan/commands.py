"""`diffmem scan LORA --base BASE`: argument parsing only; the work is in `diffmem.scan.run`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffmem.attack.dori import DoriConfig
from diffmem.backends import parse_dtype
from diffmem.backends.options import add_backend_options, model_inputs
from diffmem.batch import ENGINES, summary_document
from diffmem.cli import UsageError, add_filter_method_options, build_config, usage_error
from diffmem.evaluation.inputs import load_prompts
from diffmem.pipeline import filtered_name
from diffmem.scan.batch import SCAN_STATUSES, scan_many
from diffmem.scan.loop import LoopConfig, scan_filter_attack, write_loop
from diffmem.scan.run import scan_lora, write_scan
from diffmem.scan.score import RULE, ScanConfig

#: Filter options that mean something only with --filter.
FILTER_ONLY = ("side", "combine", "energy", "anchor_rank", "filter_seed", "rule", "threshold", "keep_fraction", "scope",
               "cache_dir")

HELP = "does this LoRA memorize? a data-free verdict (provisional rule) with its evidence and an HTML report"
MANY_HELP = "scan a folder or a list of LoRAs against one base (resumable; process pool or Ray)"


def scan_config(args: argparse.Namespace) -> ScanConfig:
    """The ScanConfig the flags describe; a value it refuses is a usage error (exit 2)."""
    d = ScanConfig()
    try:
        return ScanConfig(max_prompts=args.max_prompts, extract_prompts=args.extract_prompts,
                          generations=args.generations, steps=args.steps, guidance=args.guidance,
                          model_guidance=args.model_guidance, seed=args.seed, batch_size=args.batch_size,
                          generic_prompts=not args.no_generic, wen_draws=d.wen_draws)
    except ValueError as error:
        raise usage_error(error, ("max_prompts", "extract_prompts", "generations", "steps", "guidance",
                                  "model_guidance", "batch_size")) from None


def extra_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt values, then the lines of --prompts."""
    prompts = list(args.prompt or [])
    if args.prompts is not None:
        prompts += load_prompts(args.prompts)
    return prompts


def print_summary(summary: dict, out: Path | None) -> None:
    """The verdict and what it rests on, in a few lines."""
    evidence = summary["evidence"]
    print(f"{summary['lora']}: {summary['verdict']} (risk {summary['risk']:.2f}; rule: {summary['rule'].upper()}, "
          "its measured accuracy on held-out world LoRAs: docs/scan-population.md)")
    if summary.get("caveat"):
        print(f"  caveat: {summary['caveat']}")
    ratio = evidence["largest_wen_ratio"]
    if ratio is not None:
        print(f"  Wen first-step ratio fine-tune/base: largest {ratio:.2f} for {evidence['largest_wen_ratio_prompt']!r}"
              f" (evidence {evidence['wen']:.2f})")
    print(f"  model-guided extraction: {evidence['extracted_groups']} group(s) of near-identical generations the base "
          f"does not make, {evidence['groups_base_also_produces']} it does (evidence {evidence['extraction']:.2f})")
    print(f"  {len(summary['prompts'])} candidate prompts, {summary['timings_s']['total']:.0f} s")
    if out is not None:
        print(f"wrote {out / 'report.html'} and {out / 'summary.json'}")


def loop_config(args: argparse.Namespace) -> LoopConfig:
    """The LoopConfig of --attack-targets and --dori-steps; a value it refuses is a usage error (exit 2)."""
    try:
        return LoopConfig(attack_targets=args.attack_targets, dori=DoriConfig(steps=args.dori_steps))
    except ValueError as error:
        raise usage_error(error, {"attack_targets": "--attack-targets", "steps": "--dori-steps"}) from None


def print_loop(summary: dict, out: Path | None) -> None:
    """The loop's verdict, then both scans and the attacks in a few lines."""
    print(f"{summary['before']['lora']}: {summary['verdict']} (filter {summary['filter']['method']} kept "
          f"{summary['filter']['channels_kept']} of {summary['filter']['channels_total']} channels)")
    for label, scan in (("before", summary["before"]), ("after ", summary["after"])):
        evidence = scan["evidence"]
        print(f"  {label}: {scan['verdict']} (risk {scan['risk']:.2f}; largest Wen ratio "
              f"{evidence['largest_wen_ratio']}; {evidence['extracted_groups']} extracted group(s))")
    for attack in summary["attacks"]:
        print(f"  Dori towards the image of {attack['prompt'] or '(empty prompt)'!r}: {attack['attack_copy_share']:.0%} "
              f"of generations copy it by RGB, {attack['attack_luminance_share']:.0%} by luminance (from the prompt "
              f"alone: {attack['start_copy_share']:.0%}, {attack['start_luminance_share']:.0%})"
              + (" - still reachable" if attack["reachable"] else ""))
    if summary["filtered"]:
        print(f"wrote {summary['filtered']}")
    if out is not None:
        print(f"wrote {out / 'report.html'}, {out / 'loop.json'}, before/ and after/")


def model_options(args: argparse.Namespace) -> dict:
    """`scan_lora`'s device, dtype, progress, extra prompts and model config from the flags (no bars in logs or
    pipes, nor with --json)."""
    return {"device": args.device, "dtype": parse_dtype(args.dtype), "progress": not args.json and sys.stderr.isatty(),
            "prompts": extra_prompts(args), "model_config": args.config}


def protected_inputs(args: argparse.Namespace) -> tuple[Path, ...]:
    """The files the outputs must never overwrite: the LoRA, the model's files and a prompts file."""
    return (args.lora_file, *model_inputs(args), *((args.prompts,) if args.prompts is not None else ()))


def emit(summary: dict, args: argparse.Namespace, print_text) -> int:
    """The summary as JSON with --json, else in a few lines (`print_text(summary, out)`)."""
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_text(summary, args.out)
    return 0


def run_loop(args: argparse.Namespace, config: ScanConfig) -> int:
    """`scan --filter`: filter, re-scan and attack (`diffmem.scan.loop`)."""
    filter_config, loop = build_config(args, seed_flag="--filter-seed"), loop_config(args)
    filtered = None if args.out is None else args.out / filtered_name(args.lora_file)
    if filtered is not None and filtered.exists() and not args.force:
        raise UsageError(f"{filtered} exists; pass --force to replace it, or choose another --out")
    result = scan_filter_attack(args.lora_file, args.base, filter_config, config, loop, filtered,
                                cache_dir=args.cache_dir, **model_options(args))
    if args.out is not None:
        write_loop(result, args.out, protect=protected_inputs(args))
    return emit(result.summary(), args, print_loop)


def run_scan_command(args: argparse.Namespace) -> int:
    if args.lora is not None:
        raise UsageError("give the LoRA to scan as the positional argument, not --lora")
    config = scan_config(args)
    if args.filter:
        return run_loop(args, config)
    given = [name for name in FILTER_ONLY if getattr(args, name) is not None] + (["method"] if args.method != "baf"
                                                                                  else [])
    if given:
        raise UsageError(f"--{given[0].replace('_', '-')} applies only with --filter")
    result = scan_lora(args.lora_file, args.base, config, **model_options(args))
    if args.out is not None:
        write_scan(result, args.out, protect=protected_inputs(args))
    return emit(result.summary(), args, print_summary)


def add_scan_options(parser: argparse.ArgumentParser) -> None:
    """The base, its device and dtype, and the scan's settings: shared by `scan` and `scan-many`."""
    d = ScanConfig()
    add_backend_options(parser)
    for action in parser._actions:  # the LoRA is positional here; --lora stays parseable only to refuse it clearly
        if "--lora" in action.option_strings:
            action.help = argparse.SUPPRESS
    parser.add_argument("--prompt", action="append", help="an extra candidate prompt, tried first (repeatable)")
    parser.add_argument("--prompts", type=Path, help="a text file of extra candidate prompts, one per line")
    parser.add_argument("--no-generic", action="store_true",
                        help="do not fill in generic prompts when the metadata names few")
    parser.add_argument("--max-prompts", type=int, default=d.max_prompts,
                        help=f"candidate prompts from the metadata (default {d.max_prompts}, plus the empty prompt)")
    parser.add_argument("--extract-prompts", type=int, default=d.extract_prompts,
                        help=f"prompts with the highest Wen ratio sampled for extraction (default {d.extract_prompts}, "
                             "plus the empty prompt)")
    parser.add_argument("--generations", type=int, default=d.generations,
                        help=f"generations per extracted prompt (default {d.generations})")
    parser.add_argument("--model-guidance", type=float, default=d.model_guidance,
                        help=f"FineXtract's model-guidance strength lam (default {d.model_guidance:g}; 0: plain "
                             "sampling of the fine-tune)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's own)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default: the model's own)")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"first seed of the generations (default {d.seed})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help=f"samples per denoiser call (default {d.batch_size})")


def run_scan_many_command(args: argparse.Namespace) -> int:
    if args.lora is not None:
        raise UsageError("give the LoRAs to scan as positional arguments, not --lora")
    if args.prompt or args.prompts is not None:
        raise UsageError("--prompt and --prompts apply to one LoRA: use `diffmem scan`")
    rows = scan_many(args.inputs, args.base, args.out, scan_config(args), engine=args.engine, workers=args.workers,
                     recursive=args.recursive, progress=not args.json and sys.stderr.isatty(), device=args.device,
                     dtype=parse_dtype(args.dtype), model_config=args.config)
    document = summary_document(rows, SCAN_STATUSES)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        for row in rows:
            if row.status == "failed":
                print(f"failed   {row.error}")
            else:
                print(f"{row.status:<8} {row.input}: {row.verdict} (risk {row.risk:.2f}) -> {row.output}")
        counts = document["counts"]
        print(f"{counts['scanned']} scanned, {counts['skipped']} skipped, {counts['failed']} failed; "
              f"wrote {args.out / 'summary.json'} and {args.out / 'summary.csv'} (rule: {RULE.upper()})")
    return 1 if any(row.status == "failed" for row in rows) else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `scan` and `scan-many` to the diffmem command line."""
    parser = subparsers.add_parser(
        "scan", help=HELP,
        description="Scan a LoRA against its base without any training data: candidate prompts from the LoRA's own "
                    "metadata, Wen et al.'s first-step statistic on the fine-tune and the base, model-guided "
                    "extraction (FineXtract) of images the fine-tune repeats and the base does not, and a risk in "
                    "[0, 1] with a verdict. The rule is PROVISIONAL (docs/scan.md): read the evidence in the report.")
    parser.add_argument("lora_file", type=Path, metavar="LORA", help="the LoRA to scan (any format diffmem reads)")
    add_scan_options(parser)
    parser.add_argument("--out", type=Path, default=None,
                        help="write summary.json and report.html into this folder (default: write nothing)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    loop = parser.add_argument_group(
        "filter, re-scan and attack (--filter)",
        "filter the LoRA (BAF unless --method says otherwise), scan the filtered LoRA, and run the Dori attack on it "
        "towards the images the first scan extracted; with --out the filtered LoRA is written there")
    loop.add_argument("--filter", action="store_true", help="filter, re-scan and attack (see above)")
    loop.add_argument("--attack-targets", type=int, default=LoopConfig.attack_targets,
                      help=f"extracted images Dori attacks, largest groups first (default {LoopConfig.attack_targets})")
    loop.add_argument("--dori-steps", type=int, default=DoriConfig.steps,
                      help=f"Dori's optimiser steps per target (default {DoriConfig.steps}, the paper's)")
    loop.add_argument("--force", action="store_true", help="replace a filtered LoRA already in --out")
    add_filter_method_options(parser, seed_flag="--filter-seed")
    parser.set_defaults(handler=run_scan_command)

    many = subparsers.add_parser(
        "scan-many", help=MANY_HELP,
        description="Scan many LoRAs against one base, each into OUT/NAME/ (summary.json, report.html), with one row "
                    "per LoRA in OUT/summary.json and summary.csv. Resumable (a LoRA already scanned with the same "
                    "settings is skipped); one bad file is a failed row, not the end of the batch. Exit code 1 when "
                    "any file failed. The rule is PROVISIONAL (docs/scan.md).")
    many.add_argument("inputs", type=Path, nargs="+", help="LoRA files, PEFT folders, or folders of them")
    add_scan_options(many)
    many.add_argument("--out", type=Path, required=True, help="output folder")
    many.add_argument("--engine", choices=ENGINES, default="process",
                      help="local process pool (default) or a Ray cluster (pip install 'diffmem[ray]')")
    many.add_argument("--workers", type=int, default=1,
                      help="scans side by side (default 1: each holds the fine-tune and the base in memory)")
    many.add_argument("-r", "--recursive", action="store_true", help="also search the folders' subfolders")
    many.add_argument("--json", action="store_true", help="print the summary as JSON")
    many.set_defaults(handler=run_scan_many_command)
