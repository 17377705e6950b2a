"""Sub-commands of the measurement layer: `diffmem audit` (argument parsing only; the work is in diffmem.audit)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffmem.backends.options import add_backend_options, backend_from, model_inputs
from diffmem.cli import UsageError
from diffmem.json_output import add_json_options, emit_json, json_mode


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by the commands that sample a model while scoring it."""
    add_backend_options(parser, base_required=True)
    parser.add_argument("--generations", type=int, default=4, help="images per prompt (default 4, Wen et al.)")
    parser.add_argument("--steps", type=int,
                        help="DDIM steps (default: 50 for Stable Diffusion as in Wen et al., 25 for the world)")
    parser.add_argument("--guidance", type=float,
                        help="classifier-free guidance scale (default: 7.5 for Stable Diffusion, 3.0 for the world)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per UNet call (default 32)")


def audit_config(args: argparse.Namespace):
    """The AuditConfig the options describe."""
    from diffmem.audit import AuditConfig

    if args.generations < 1 or (args.steps is not None and args.steps < 1):
        raise UsageError("--generations and --steps must be at least 1")
    return AuditConfig(generations=args.generations, num_inference_steps=args.steps, guidance_scale=args.guidance,
                       seed=args.seed, batch_size=args.batch_size,
                       wen_threshold=getattr(args, "wen_threshold", None),
                       wen_statistic=getattr(args, "wen_statistic", "all_steps"))


def run_audit_command(args: argparse.Namespace) -> int:
    from diffmem.audit import audit_files
    from diffmem.backends import parse_dtype

    with json_mode(args):
        summary = audit_files(
            base=args.base, lora=args.lora, prompts=args.prompts, train_images=args.train_images, out_dir=args.out,
            config=audit_config(args), device=args.device, screenshot=args.screenshot, manifest=args.manifest,
            dtype=parse_dtype(args.dtype), model_config=args.config, data_free=args.data_free,
            progress=sys.stderr.isatty(),  # no bars in logs or pipes
        )
        print(f"audited {summary['prompts']} prompts of {summary['model']} ({summary['mode']})")
        print(f"flagged {summary['flagged']}: " + "; ".join(summary["flagged_prompts"][:10]))
        if "known_labels" in summary:
            known = summary["known_labels"]
            print(f"known labels: flagged {known['flagged_memorized']}/{known['memorized']} memorized, "
                  f"{known['flagged_held_out']}/{known['held_out']} held out"
                  + (f"; Wen ROC AUC {known['wen_auc']:.3f} (first step {known['wen_first_step_auc']:.3f})"
                     if "wen_auc" in known else ""))
        print(f"wrote {args.out / 'report.html'}, table.csv, table.md, summary.json")
        emit_json(args, summary, protect=model_inputs(args))
    return 0


def run_wen_eval_command(args: argparse.Namespace) -> int:
    from diffmem.audit import evaluate_wen_detector, world_manifest_inputs
    from diffmem.evaluation.inputs import load_prompts

    if args.manifest is not None:
        _, _, prompts, known = world_manifest_inputs(args.manifest)
        memorized = [p for p, k in zip(prompts, known) if k]
        held_out = [p for p, k in zip(prompts, known) if not k]
    elif args.memorized is not None and args.held_out is not None:
        memorized, held_out = load_prompts(args.memorized), load_prompts(args.held_out)
    else:
        raise UsageError("give --memorized and --held-out prompt files, or a world --manifest")
    with json_mode(args):
        model = backend_from(args)
        result = evaluate_wen_detector(model, memorized, held_out, audit_config(args), max_fpr=args.max_fpr)
        for key in ("all_steps", "first_step"):
            numbers = result[key]
            tpr = numbers[f"tpr_at_{args.max_fpr:g}_fpr"]
            print(f"Wen score ({key.replace('_', ' ')}): ROC AUC {numbers['auc']:.3f}, TPR at {args.max_fpr:.0%} "
                  f"FPR {tpr:.3f} (mean {numbers['mean_memorized']:.3f} memorized vs {numbers['mean_held_out']:.3f} "
                  "held out)")
        print(f"{len(memorized)} memorized and {len(held_out)} held-out prompts, {result['generations']} generations "
              f"each, {result['steps']} DDIM steps, guidance {result['guidance']}")
        protect = [*model_inputs(args), *(p for p in (args.memorized, args.held_out, args.manifest) if p is not None)]
        emit_json(args, result, protect=protect)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `audit` and `wen-eval` to the diffmem command line."""
    parser = subparsers.add_parser(
        "audit",
        help="generate from a model (+ LoRA), find memorized prompts, write a report",
        description="Generate images for each prompt, score them for memorization (copy test against training "
                    "images when given, Wen et al.'s data-free score always) and write table.csv, table.md, "
                    "summary.json and a self-contained report.html.",
    )
    add_sampling_options(parser)
    parser.add_argument("--prompts", type=Path, help="text file, one prompt per line")
    parser.add_argument("--train-images", type=Path,
                        help="folder of training images; without it the audit is data-free (Wen et al.'s score)")
    parser.add_argument("--manifest", type=Path,
                        help="world fine-tune manifest (.json beside a world LoRA): its training images are the "
                             "reference, and without --prompts its duplicated and held-out captions are audited")
    parser.add_argument("--data-free", action="store_true",
                        help="with --manifest: use its captions and labels but not its training images")
    parser.add_argument("--wen-threshold", type=float,
                        help="data-free mode: flag prompts whose Wen score exceeds this (default: robust outliers)")
    parser.add_argument("--wen-statistic", choices=["all_steps", "first_step"], default="all_steps",
                        help="data-free mode: rank and flag by Wen's score over all steps (default, Wen et al.) or "
                             "at the first step")
    parser.add_argument("--out", type=Path, default=Path("audit-out"), help="output folder (default audit-out)")
    parser.add_argument("--screenshot", action="store_true", help="also render report.html to report.png (Chromium)")
    add_json_options(parser, "the summary")
    parser.set_defaults(handler=run_audit_command)

    parser = subparsers.add_parser(
        "wen-eval",
        help="ROC AUC and TPR at 1%% FPR of Wen et al.'s detector on known memorized vs held-out prompts",
        description="Score prompts known to be memorized and held-out prompts with Wen et al.'s data-free detector "
                    "and print how well the score separates them (ROC AUC, TPR at a fixed FPR).",
    )
    add_sampling_options(parser)
    parser.add_argument("--memorized", type=Path, help="text file of memorized prompts")
    parser.add_argument("--held-out", type=Path, help="text file of held-out prompts")
    parser.add_argument("--manifest", type=Path,
                        help="world fine-tune manifest: its duplicated captions are the memorized prompts, its "
                             "held-out captions the others")
    parser.add_argument("--max-fpr", type=float, default=0.01, help="false-positive rate for the TPR (default 0.01)")
    add_json_options(parser, "the numbers")
    parser.set_defaults(handler=run_wen_eval_command)
