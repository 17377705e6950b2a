"""`diffmem scan LORA --base BASE`: argument parsing only; the work is in `diffmem.scan.run`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffmem.backends import parse_dtype
from diffmem.backends.options import add_backend_options, model_inputs
from diffmem.cli import UsageError
from diffmem.evaluation.inputs import load_prompts
from diffmem.scan.run import scan_lora, write_scan
from diffmem.scan.score import ScanConfig

HELP = "does this LoRA memorize? a data-free verdict (provisional rule) with its evidence and an HTML report"


def scan_config(args: argparse.Namespace) -> ScanConfig:
    """The ScanConfig the flags describe; a value it refuses is a usage error (exit 2)."""
    d = ScanConfig()
    try:
        return ScanConfig(max_prompts=args.max_prompts, extract_prompts=args.extract_prompts,
                          generations=args.generations, steps=args.steps, guidance=args.guidance,
                          model_guidance=args.model_guidance, seed=args.seed, batch_size=args.batch_size,
                          generic_prompts=not args.no_generic, wen_draws=d.wen_draws)
    except ValueError as error:
        raise UsageError(str(error)) from None


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
          "not yet calibrated on a population of LoRAs)")
    ratio = evidence["largest_wen_ratio"]
    if ratio is not None:
        print(f"  Wen first-step ratio fine-tune/base: largest {ratio:.2f} for {evidence['largest_wen_ratio_prompt']!r}"
              f" (evidence {evidence['wen']:.2f})")
    print(f"  model-guided extraction: {evidence['extracted_groups']} group(s) of near-identical generations the base "
          f"does not make, {evidence['groups_base_also_produces']} it does (evidence {evidence['extraction']:.2f})")
    print(f"  {len(summary['prompts'])} candidate prompts, {summary['timings_s']['total']:.0f} s")
    if out is not None:
        print(f"wrote {out / 'report.html'} and {out / 'summary.json'}")


def run_scan_command(args: argparse.Namespace) -> int:
    if args.lora is not None:
        raise UsageError("give the LoRA to scan as the positional argument, not --lora")
    config = scan_config(args)
    result = scan_lora(args.lora_file, args.base, config, device=args.device, dtype=parse_dtype(args.dtype),
                       progress=not args.json and sys.stderr.isatty(),  # no bars in logs or pipes
                       prompts=extra_prompts(args), model_config=args.config)
    if args.out is not None:
        protect = (args.lora_file, *model_inputs(args), *((args.prompts,) if args.prompts is not None else ()))
        write_scan(result, args.out, protect=protect)
    summary = result.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary, args.out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `scan` to the diffmem command line."""
    d = ScanConfig()
    parser = subparsers.add_parser(
        "scan", help=HELP,
        description="Scan a LoRA against its base without any training data: candidate prompts from the LoRA's own "
                    "metadata, Wen et al.'s first-step statistic on the fine-tune and the base, model-guided "
                    "extraction (FineXtract) of images the fine-tune repeats and the base does not, and a risk in "
                    "[0, 1] with a verdict. The rule is PROVISIONAL (docs/scan.md): read the evidence in the report.")
    parser.add_argument("lora_file", type=Path, metavar="LORA", help="the LoRA to scan (any format diffmem reads)")
    add_backend_options(parser)
    for action in parser._actions:  # the LoRA is positional here; --lora stays parseable only to refuse it clearly
        if "--lora" in action.option_strings:
            action.help = argparse.SUPPRESS
    parser.add_argument("--out", type=Path, default=None,
                        help="write summary.json and report.html into this folder (default: write nothing)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
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
    parser.add_argument("--seed", type=int, default=d.seed, help=f"first seed (default {d.seed})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help=f"samples per denoiser call (default {d.batch_size})")
    parser.set_defaults(handler=run_scan_command)
