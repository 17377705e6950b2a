"""`diffmem mitigate ...` sub-commands: NeMo and Wanda-style pruning of any model diffmem loads (the world, SD
1.x/2.x, SDXL, Flux pipelines), applying a mask file to a world model, and adversarial fine-tuning."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from diffmem.attack.settings import START_KINDS, DoriConfig
from diffmem.backends.naming import is_world_base
from diffmem.backends.options import add_backend_options, backend_from, model_inputs
from diffmem.cli import UsageError, usage_error
from diffmem.errors import DiffmemError
from diffmem.json_output import add_json_options, emit_json, json_mode
from diffmem.mitigations.settings import AdversarialFinetuneConfig, NeMoConfig, WandaConfig

# Parsing needs only the settings above (their defaults; no model library): `diffmem mitigate --help` must not load
# diffusers. Each method is imported by its command when it runs.
if TYPE_CHECKING:
    from diffmem.backends import Backend

#: Options that need a world model: a world UNet file out, and the world benchmark's measurement.
WORLD_ONLY = (("unet_out", "--unet-out"), ("measure", "--measure"))


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Model, prompts and outputs shared by `mitigate nemo` and `mitigate wanda`."""
    add_backend_options(parser)
    parser.add_argument("--manifest", type=Path,
                        help="world fine-tune manifest: memorized = duplicated captions, ordinary = held-out and "
                             "seen-once captions, calibration = held-out captions")
    parser.add_argument("--prompts", type=Path, help="text file of memorized prompts (instead of --manifest)")
    parser.add_argument("--out", type=Path, required=True,
                        help="mask file to write (.safetensors, uint8 1 = zeroed weight; the report in its metadata)")
    parser.add_argument("--unet-out", type=Path,
                        help="also write the pruned UNet (float32 world UNet file; world models only)")
    add_json_options(parser, "the report (and --measure numbers)")
    parser.add_argument("--measure", action="store_true",
                        help="with --manifest: copy rate, held-out loss and FID before and after (about a minute; "
                             "world models only)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def read_prompts(args: argparse.Namespace):
    """The `Prompts` the options name: from a manifest, or from prompt files."""
    from diffmem.evaluation.inputs import load_prompts
    from diffmem.mitigations.run import Prompts, manifest_prompts, read_manifest

    prompts = manifest_prompts(read_manifest(args.manifest)) if args.manifest is not None else Prompts([])
    if args.prompts is not None:
        prompts.memorized = load_prompts(args.prompts)
    if not prompts.memorized:
        raise UsageError("give the memorized prompts: --manifest (a world fine-tune's) or --prompts FILE")
    for option in ("ordinary", "calibration"):
        if getattr(args, option, None) is not None:
            setattr(prompts, option, load_prompts(getattr(args, option)))
    return prompts


def is_pipeline(base: Path | None) -> bool:
    """True when `--base` names a pipeline (folder or single file), not the world (default, "world", a world
    UNet file)."""
    return not is_world_base(base)


def open_model(args: argparse.Namespace) -> Backend:
    """The backend `--base`, `--lora`, `--config`, `--device`, `--dtype` name; world-only options on a pipeline
    are refused in one line before anything is loaded."""
    if args.base is not None and str(args.base) != "world" and not Path(args.base).exists():
        raise DiffmemError("no such model file or folder", args.base)
    if is_pipeline(args.base):
        given = [flag for option, flag in WORLD_ONLY if getattr(args, option)]
        if given:
            raise UsageError(f"{' and '.join(given)} work on world models only; on a pipeline (--base {args.base}) "
                             f"`mitigate {args.mitigate_command}` writes the mask file (and --json, --json-out)")
    if args.measure and args.manifest is None:
        raise UsageError("--measure needs --manifest (the images to test copies against)")
    return backend_from(args)


def finish(args: argparse.Namespace, model: Backend, pruned: Backend | None, masks, method: str,
           report: dict) -> int:
    """Write the outputs, measure when asked (world models), print the summary."""
    from diffmem.mitigations.run import measure_before_after, read_manifest, write_outputs

    report = {**report, "model": model.name, "family": model.family}
    if args.measure:
        report = {**report, "measure": measure_before_after(model.denoiser, pruned.denoiser,
                                                            read_manifest(args.manifest))}
    protect = [*model_inputs(args), *(p for p in (args.manifest, args.prompts) if p is not None)]
    unet = model.denoiser if model.family == "world" else None
    report = write_outputs(unet, masks, method, report, args.out, args.unet_out, None, protect, model.family)
    print(f"{method}: zeroed {report['pruned_weights']} weights; mask written to {args.out}")
    if "measure" in report:
        for when in ("before", "after"):
            print(f"{when}: {json.dumps(report['measure'][when])}")
    emit_json(args, report, protect=[*protect, args.out])
    return 0


def run_nemo(args: argparse.Namespace) -> int:
    import torch

    from diffmem.mitigations.nemo import describe, nemo_mitigate

    try:
        config = NeMoConfig(blocks=tuple(args.blocks.split(",")) if args.blocks else None,
                            generations=args.generations, threshold_stds=args.threshold_stds,
                            refine=not args.no_refine)
    except ValueError as error:
        raise usage_error(error, ("generations", "threshold_stds", "blocks")) from None
    torch.set_num_threads(args.threads)
    prompts = read_prompts(args)
    if not prompts.ordinary:
        raise UsageError("NeMo needs ordinary prompts for its activation statistics: --manifest or --ordinary FILE")
    with json_mode(args):
        model = open_model(args)
        # The pruned copy only where --measure needs it (the world); --unet-out applies the masks itself.
        pruned, result, masks = nemo_mitigate(
            model, prompts.memorized, prompts.ordinary, prompts.calibration or None, config=config,
            threshold=args.threshold, apply=args.measure,
            progress=lambda p: print(f"  {p.prompt!r}: {p.count} neurons, signal {p.signal_before:.3f} -> "
                                     f"{p.signal_after:.3f}", flush=True))
        print(describe(result))
        return finish(args, model, pruned, masks, "nemo", result.report())


def run_wanda(args: argparse.Namespace) -> int:
    import torch

    from diffmem.mitigations.wanda import wanda_mitigate

    try:
        config = WandaConfig(fraction=args.fraction, generations=args.generations, steps=args.steps,
                             guidance=args.guidance)
    except ValueError as error:
        raise usage_error(error, ("fraction", "generations", "steps", "guidance")) from None
    torch.set_num_threads(args.threads)
    prompts = read_prompts(args)
    with json_mode(args):
        model = open_model(args)
        pruned, result, masks = wanda_mitigate(model, prompts.memorized, config=config, apply=args.measure)
        for path, numbers in result.report()["layers"].items():
            print(f"  {path}: {numbers['pruned']} of {numbers['candidates']} top-{config.fraction:.0%} weights "
                  "pruned")
        return finish(args, model, pruned, masks, "wanda", result.report())


def run_apply(args: argparse.Namespace) -> int:
    from diffmem.mitigations.run import apply_mask_file

    if args.out is None and args.manifest is None:
        raise UsageError("give --out (write the pruned UNet) and/or --manifest (measure before and after)")
    result = apply_mask_file(args.masks, args.base, args.lora, args.out, args.random_control, args.manifest)
    where = f"; pruned UNet written to {args.out}" if args.out is not None else ""
    print(f"{result['method']}: zeroed {result['pruned_weights']} weights{where}")
    for when, numbers in result.get("measure", {}).items():
        print(f"{when}: {json.dumps(numbers)}")
    return 0


def run_adversarial(args: argparse.Namespace) -> int:
    import torch

    from diffmem.mitigations.adversarial import adversarial_finetune_files

    torch.set_num_threads(args.threads)
    try:
        search = DoriConfig(steps=args.search_steps)
    except ValueError as error:
        raise usage_error(error, {"steps": "--search-steps"}) from None
    try:
        config = AdversarialFinetuneConfig(
            rounds=args.rounds, starts=tuple(s.strip() for s in args.starts.split(",") if s.strip()),
            search=search, steps_per_round=args.steps_per_round,
            batch_size=args.batch_size, adversarial_share=args.adversarial_share, lr=args.lr, seed=args.seed)
    except ValueError as error:
        raise usage_error(error, ("rounds", "starts", "steps_per_round", "batch_size", "adversarial_share",
                                  "lr")) from None
    manifest = adversarial_finetune_files(args.out, args.lora, args.base, args.manifest, args.surrogate_base, config,
                                          command=getattr(args, "command_line", None))
    for index, done in enumerate(manifest["adversarial"]["rounds"], 1):
        losses = ", ".join(f"{start} {sum(v) / len(v):.4f}" for start, v in done["search_loss"].items())
        print(f"round {index}: Dori loss reached before the update ({losses}); fine-tuning loss "
              f"{done['finetune_loss']}")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')} "
          f"({manifest['adversarial']['wall_time_s']:.0f} s)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `mitigate` and its sub-commands to the diffmem CLI."""
    mitigate = subparsers.add_parser(
        "mitigate", help="remove memorization from a model (NeMo, Wanda; adversarial fine-tuning of world models)")
    commands = mitigate.add_subparsers(dest="mitigate_command", required=True)

    n = NeMoConfig()
    nemo = commands.add_parser("nemo", help="deactivate memorization neurons of the cross-attention value layers "
                                            "(Hintersdorf et al. 2024)",
                               description="Find the value neurons memorized prompts need and write them as a mask "
                                           "file. Runs on the world and on SD 1.x/2.x, SDXL, Flux and SD3 pipelines "
                                           "(Flux: the text stream's values of joint attention, add_v_proj).")
    add_model_options(nemo)
    nemo.add_argument("--ordinary", type=Path, help="text file of ordinary prompts for the activation statistics")
    nemo.add_argument("--calibration", type=Path,
                      help="text file of non-memorized prompts that set the memorization threshold")
    nemo.add_argument("--threshold", type=float, help="memorization threshold of the first-step Wen score "
                                                      f"(default: calibration mean + {n.threshold_stds:g} std)")
    nemo.add_argument("--threshold-stds", type=float, default=n.threshold_stds,
                      help=f"standard deviations above the calibration mean (default {n.threshold_stds:g})")
    nemo.add_argument("--blocks", default=None,
                      help="comma-separated top-level blocks whose value layers are searched (default: all: "
                           "down_blocks,mid_block,up_blocks of a UNet, transformer_blocks of Flux)")
    nemo.add_argument("--generations", type=int, default=n.generations,
                      help=f"noise draws of the first-step signal (default {n.generations})")
    nemo.add_argument("--no-refine", action="store_true", help="keep the initial selection, skip the refinement")
    nemo.set_defaults(handler=run_nemo)

    w = WandaConfig()
    wanda = commands.add_parser("wanda", help="prune feed-forward weights that memorized prompts use more than the "
                                              "empty prompt (Chavhan et al. 2024)",
                                description="Score the feed-forward output weights (ff.net.2) along sampled "
                                            "trajectories of the memorized prompts and write the ones to prune as a "
                                            "mask file. Runs on the world and on SD 1.x/2.x, SDXL, Flux and SD3 pipelines.")
    add_model_options(wanda)
    wanda.add_argument("--fraction", type=float, default=w.fraction,
                       help=f"share of each row considered, by score (default {w.fraction:g})")
    wanda.add_argument("--generations", type=int, default=w.generations,
                       help=f"sampling trajectories per prompt (default {w.generations})")
    wanda.add_argument("--steps", type=int, default=w.steps,
                       help=f"sampling steps per trajectory, the model's own sampler (default {w.steps})")
    wanda.add_argument("--guidance", type=float, default=None,
                       help="guidance scale of the trajectories (default: the model's own: 3 on the world, 7.5 on "
                            "Stable Diffusion, 1 on Flux)")
    wanda.set_defaults(handler=run_wanda)

    apply = commands.add_parser("apply", help="apply a mask file to a world model and write the pruned UNet")
    apply.add_argument("--masks", type=Path, required=True, help="mask file from `mitigate nemo` or `mitigate wanda`")
    apply.add_argument("--base", type=Path, help="world UNet file (default: the committed world base)")
    apply.add_argument("--lora", type=Path, help="LoRA merged into the base first")
    apply.add_argument("--out", type=Path, help="pruned UNet file to write")
    apply.add_argument("--manifest", type=Path,
                       help="world fine-tune manifest: measure copy rate, held-out loss and FID before and after")
    apply.add_argument("--random-control", type=int, metavar="SEED",
                       help="zero as many random neurons per layer (NeMo masks) or random weights per row (Wanda "
                            "masks) instead: does the method's choice matter, or only how much it zeroes?")
    apply.set_defaults(handler=run_apply)

    a = AdversarialFinetuneConfig()
    adversarial = commands.add_parser(
        "adversarial", help="fine-tune every weight so that Dori's adversarial embeddings no longer bring the "
                            "memorized images back (Kowalczuk et al. 2025)",
        description="Alternate Dori searches for each memorized image (the manifest's duplicated images) with "
                    "full-model updates that map the embeddings found, and the memorized captions, to surrogate "
                    "images (generations of a model that never saw the images), plus the ordinary loss on the "
                    "once-seen images. Writes a world UNet file (read it with --base) and a manifest beside it.")
    adversarial.add_argument("--lora", type=Path, help="LoRA merged into the base first (its manifest .json beside "
                                                       "it names the memorized images)")
    adversarial.add_argument("--base", type=Path, help="world UNet file (default: the committed world base)")
    adversarial.add_argument("--manifest", type=Path,
                             help="world fine-tune manifest (default: the .json beside --lora, else beside --base)")
    adversarial.add_argument("--surrogate-base", type=Path,
                             help="world UNet that draws the surrogate images (default: --base with a LoRA, else "
                                  "the committed world base)")
    adversarial.add_argument("--out", type=Path, required=True, help="world UNet file to write (float32)")
    adversarial.add_argument("--rounds", type=int, default=a.rounds, help=f"search/update rounds (default {a.rounds})")
    adversarial.add_argument("--starts", default=",".join(a.starts),
                             help=f"Dori starts per image and round, of {', '.join(START_KINDS)} "
                                  f"(default {','.join(a.starts)})")
    adversarial.add_argument("--search-steps", type=int, default=a.search.steps,
                             help=f"Adam steps per Dori search (default {a.search.steps})")
    adversarial.add_argument("--steps-per-round", type=int, default=a.steps_per_round,
                             help=f"fine-tuning steps per round (default {a.steps_per_round})")
    adversarial.add_argument("--batch-size", type=int, default=a.batch_size,
                             help=f"images per fine-tuning step (default {a.batch_size})")
    adversarial.add_argument("--adversarial-share", type=float, default=a.adversarial_share,
                             help=f"share of each batch from the adversarial pairs (default {a.adversarial_share:g})")
    adversarial.add_argument("--lr", type=float, default=a.lr, help=f"AdamW learning rate (default {a.lr:g})")
    adversarial.add_argument("--seed", type=int, default=a.seed,
                             help=f"seeds the surrogate images, the Dori searches and the fine-tuning (default {a.seed})")
    adversarial.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    adversarial.set_defaults(handler=run_adversarial)
