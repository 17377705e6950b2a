"""`diffmem locality`: the experiments behind the locality claims of the Finding Dori paper (Kowalczuk et al. 2025) on
a world LoRA, writing their JSON and docs/locality.md (`diffmem.locality`)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from diffmem.attack.settings import START_KINDS, DoriConfig
from diffmem.cli import UsageError, usage_error
from diffmem.errors import DiffmemError, FileFormatError
from diffmem.evaluation.sampling import SamplingSettings as CheckSettings  # the world check's name for it
from diffmem.json_output import add_json_options, json_file, json_mode, json_stdout, stamped
from diffmem.locality.settings import LocalityConfig
from diffmem.mitigations.settings import NeMoConfig

# Parsing needs only the settings above (their defaults; no model library): `diffmem locality --help` must not load
# diffusers. The experiments are imported by the command when it runs.


def parse_starts(text: str) -> tuple[str, ...]:
    """A comma-separated list of Dori starts ("prompt,random,random,unrelated")."""
    starts = tuple(s.strip() for s in text.split(",") if s.strip())
    if not starts or any(s not in START_KINDS for s in starts):
        raise argparse.ArgumentTypeError(f"starts must be a comma-separated list of {', '.join(START_KINDS)}")
    return starts


def add_locality(subparsers: argparse._SubParsersAction) -> None:
    c, d, s, n = LocalityConfig(), DoriConfig(), CheckSettings(), NeMoConfig()
    p = subparsers.add_parser(
        "locality", help="is memorization local? Dori embeddings, activations, NeMo vs Wanda (the Finding Dori paper)",
        description="Run the experiments behind the locality claims of 'Finding Dori: Memorization in Text-to-Image "
                    "Diffusion Models Is Not Local' on a world LoRA with its manifest: where "
                    "Dori's adversarial embeddings lie, how their activations differ from the memorized prompt's, "
                    "and how much NeMo's and Wanda's selections agree. Writes the numbers as JSON and a markdown "
                    "page with the reading (docs/locality.md).")
    p.add_argument("--lora", type=Path, default=None,
                   help="world LoRA whose .json manifest lists the memorized images (default: the committed example)")
    add_json_options(p, "every number")
    p.add_argument("--markdown", type=Path, default=None, help="where to write the page (e.g. docs/locality.md)")
    p.add_argument("--captions", type=int, default=None, help="study the first N memorized captions (default all)")
    p.add_argument("--starts", type=parse_starts, default=c.starts,
                   help=f"Dori starts, comma-separated (default {','.join(c.starts)})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"Dori steps per search (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"Dori batch (default {d.batch_size})")
    p.add_argument("--generations", type=int, default=s.generations,
                   help=f"fresh generations judging each embedding (default {s.generations})")
    p.add_argument("--sample-steps", type=int, default=s.steps, help=f"DDIM steps of those (default {s.steps})")
    p.add_argument("--top-share", type=float, default=c.top_share,
                   help=f"share of a layer's units counted as its top ones (default {c.top_share})")
    p.add_argument("--nemo-generations", type=int, default=n.generations,
                   help=f"noise draws of NeMo's memorization signal (default {n.generations})")
    p.add_argument("--wanda-generations", type=int, default=c.wanda.generations,
                   help=f"sampling trajectories per prompt of Wanda's activation norms (default {c.wanda.generations})")
    p.add_argument("--relocalise", default=c.relocalise_start,
                   help="run NeMo and Wanda again on the embedding from the first search with this start "
                        f"(default {c.relocalise_start}); 'none' skips it")
    p.add_argument("--no-relocalise-nemo", action="store_true",
                   help="re-run only Wanda (cheap) on the adversarial embedding, not NeMo (a search per caption)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="write the results of the captions finished so far here after each caption")
    p.add_argument("--from-json", nargs="?", const=True, default=None, type=Path, metavar="RESULTS_JSON",
                   help="run nothing: read the results of a finished or checkpointed run (RESULTS_JSON, default the "
                        "--json-out file) and write --markdown from them")
    p.add_argument("--add-between-captions", type=Path, default=None, metavar="RESULTS_JSON",
                   help="run only the between-faces scale (NeMo's and Wanda's selections for different memorized "
                        "captions) for a finished run saved without it, and write its results with it as "
                        "--json-out (another file) and --markdown")
    p.add_argument("--no-judge-on-nemo", action="store_true",
                   help="do not judge the adversarial embeddings on the NeMo-pruned model")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.set_defaults(handler=run_locality_command)


def locality_config(args: argparse.Namespace) -> LocalityConfig:
    """The LocalityConfig the flags describe; a value a config refuses is a usage error (exit 2) naming its flag."""
    defaults = LocalityConfig()
    try:
        dori = replace(defaults.dori, steps=args.steps, batch_size=args.batch_size)
        check = CheckSettings(generations=args.generations, steps=args.sample_steps)
    except ValueError as error:
        raise usage_error(error, ("steps", "batch_size")) from None
    try:
        nemo = replace(defaults.nemo, generations=args.nemo_generations)
    except ValueError as error:
        raise usage_error(error, {"generations": "--nemo-generations"}) from None
    try:
        wanda = replace(defaults.wanda, generations=args.wanda_generations)
    except ValueError as error:
        raise usage_error(error, {"generations": "--wanda-generations"}) from None
    if args.generations < 1 or args.sample_steps < 1:
        raise UsageError("--generations and --sample-steps must be at least 1")
    relocalise = None if str(args.relocalise).lower() == "none" else args.relocalise
    try:
        return LocalityConfig(
            captions=args.captions, starts=args.starts, dori=dori, check=check, top_share=args.top_share, nemo=nemo,
            wanda=wanda, relocalise_start=relocalise, relocalise_nemo=not args.no_relocalise_nemo,
            judge_on_nemo=not args.no_judge_on_nemo,
        )
    except ValueError as error:
        raise usage_error(error, {"captions": "--captions", "starts": "--starts", "top_share": "--top-share",
                                  "relocalise_start": "--relocalise"}) from None


def run_locality_command(args: argparse.Namespace) -> int:
    from diffmem.locality.report import rounded, write_results

    command = getattr(args, "command_line", None) or "diffmem locality"  # as typed: `diffmem.cli.main` passes it
    json_path = json_file(args)  # --json-out, or the old spelling --json PATH
    if args.from_json is not None:
        source = json_path if args.from_json is True else args.from_json
        if source is None:
            raise UsageError("--from-json needs the results to read: --from-json RESULTS_JSON")
        return render_from_json(source, args.markdown)
    if json_path is None and not json_stdout(args):
        raise UsageError("give --json-out PATH, where every number is written (or --json to print them on stdout)")
    if args.add_between_captions is not None and json_path is None:
        raise UsageError("--add-between-captions writes its results to --json-out PATH; give one")
    if args.add_between_captions is not None and args.add_between_captions.resolve() == json_path.resolve():
        raise UsageError(f"--json-out must name another file than the results read, {json_path} (inputs are "
                         "never overwritten)")
    config = locality_config(args) if args.add_between_captions is None else None  # usage errors before loading
    with json_mode(args):  # with --json, stdout holds the results alone
        results = run_locality_parts(args, config, command)
        write_results(results, json_path, args.markdown)
        wrote = [str(p) for p in (json_path, args.markdown) if p is not None]
        if wrote:
            print(f"wrote {' and '.join(wrote)}")
    if json_stdout(args):
        print(json.dumps(stamped(rounded(results)), indent=1))
    return 0


def run_locality_parts(args: argparse.Namespace, config: LocalityConfig | None, command: str) -> dict:
    """Load the model and run the experiments (or only the between-faces scale of `--add-between-captions`)."""
    import torch

    from diffmem.locality.experiment import between_captions_of_results, example_lora_inputs, run_locality
    from diffmem.locality.report import write_results
    from diffmem.world.check import load_example_lora
    from diffmem.world.lora import apply_lora
    from diffmem.world.model import load_base

    torch.set_num_threads(args.threads)
    if args.lora is None:
        unet, manifest = load_example_lora()
    else:
        manifest_path = args.lora.with_suffix(".json")
        if not manifest_path.is_file():
            raise DiffmemError("has no manifest (.json) beside it listing the memorized images", args.lora)
        manifest = json.loads(manifest_path.read_text())
        unet = apply_lora(load_base(), args.lora)
    if args.add_between_captions is not None:
        results = read_results(args.add_between_captions)
        return results | {"between_captions": between_captions_of_results(unet, results), "between_command": command}
    model = (f"world LoRA {args.lora} merged into the world base" if args.lora is not None else
             "the committed example LoRA merged into the world base (5 faces duplicated 100 times, docs/world.md)")

    def save_checkpoint(partial: dict) -> None:
        write_results(partial | {"model": model, "command": command}, args.checkpoint, None)

    results = run_locality(unet, example_lora_inputs(manifest), config, progress=lambda m: print(m, flush=True),
                           checkpoint=save_checkpoint if args.checkpoint is not None else None)
    return results | {"model": model, "command": command}


def read_results(json_path: Path) -> dict:
    """The results of a `diffmem locality` run saved as JSON, or a clear error naming the file."""
    if not json_path.is_file():
        raise DiffmemError("no such results file", json_path)
    try:
        results = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FileFormatError(f"is not a locality results file ({error})", json_path) from None
    if not isinstance(results, dict) or not {"config", "captions", "spread", "command"} <= results.keys():
        raise FileFormatError("is not a locality results file written by `diffmem locality`", json_path)
    return results


def render_from_json(json_path: Path, markdown_path: Path | None) -> int:
    """Write the page of a run saved as JSON (finished, or a checkpoint of the captions done so far)."""
    if markdown_path is None:
        raise UsageError("--from-json needs --markdown, the page to write")
    from diffmem.formats.safetensors_io import write_atomic
    from diffmem.locality.report import markdown

    results = read_results(json_path)
    write_atomic(markdown(results).encode(), markdown_path, protect=(json_path,))
    print(f"wrote {markdown_path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `locality` to the diffmem CLI."""
    add_locality(subparsers)
