"""`diffmem attack ...` sub-commands: the Dori embedding search against a world model (plus optional LoRA)."""

from __future__ import annotations

import argparse
import io
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffmem.attack.settings import START_KINDS, TRAINING_RECIPE, DoriConfig, RobustnessSettings
from diffmem.backends.options import add_backend_options, backend_from, model_inputs
from diffmem.cli import UsageError, usage_error
from diffmem.errors import DiffmemError
from diffmem.evaluation.sampling import SamplingSettings as CheckSettings  # the world check's name for it
from diffmem.json_output import add_json_options, json_file, json_mode, json_stdout, stamped
from diffmem.memcontrol.settings import METHOD_NAMES, MemControlTrainConfig
from diffmem.metrics.copy import CopyConfig
from diffmem.mitigations.registry import TABLE_GROUPS, registered
from diffmem.mitigations.settings import AdversarialFinetuneConfig

# Parsing needs only the settings above (their defaults; no model library): `diffmem attack --help` must not load
# diffusers. The attack, the table and the file readers are imported by the commands when they run.
if TYPE_CHECKING:
    from diffmem.attack.dori import DoriOutcome
    from diffmem.backends import Conditioning


def __getattr__(name: str) -> Any:  # PEP 562: `merged_rows` stays importable from here, loaded on first use
    if name == "merged_rows":
        from diffmem.attack.table import merged_rows

        return merged_rows
    raise AttributeError(f"module 'diffmem.attack.commands' has no attribute {name!r}")


def manifest_reference(model: Path) -> torch.Tensor | None:
    """The training images (duplicated and seen once) of a world fine-tune (a LoRA or a full UNet file), from the
    manifest `.json` beside it (`diffmem world finetune`, `memcontrol train` and `mitigate adversarial` write one);
    None when there is no such manifest."""
    from diffmem.world.check import manifest_images
    from diffmem.world.data import ImageSet

    manifest_path = model.with_suffix(".json")
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if not {"data", "duplicated", "seen_once"} <= set(manifest):
        return None
    return ImageSet.concat([manifest_images(manifest, "duplicated"), manifest_images(manifest, "seen_once")]).images


def outcome_grid(target: torch.Tensor, outcome: DoriOutcome) -> torch.Tensor:
    """Two rows: the target then the generations from the start embedding; the target then those from Dori's."""
    from diffmem.report import image_grid

    before, after = outcome.before.generated, outcome.after.generated
    return image_grid(torch.cat([target, before, target, after]), columns=1 + len(before))


def png_bytes(image: torch.Tensor, scale: int = 3) -> bytes:
    """A [3, H, W] image as PNG file bytes, upscaled (nearest) by `scale`."""
    from PIL import Image

    from diffmem.report import to_pil

    picture = to_pil(image)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def add_dori(subparsers: argparse._SubParsersAction) -> None:
    d, s = DoriConfig(), CheckSettings()
    p = subparsers.add_parser(
        "dori", help="search a text embedding that makes the model replicate a target image (Dori attack)",
        description="Optimise the text conditioning so that the model (base plus optional LoRA, e.g. a mitigated "
                    "one) denoises towards --target, then judge fresh generations from it with the copy test. "
                    "Runs on the embedded world and on Stable Diffusion 1.x/2.x, SDXL, Flux and SD3 pipelines.")
    p.add_argument("--target", type=Path, required=True,
                   help="the (memorized) image to bring back, e.g. a PNG (resized to the model's image size)")
    p.add_argument("--prompt", required=True, help="the prompt the image was trained with (start of the search)")
    add_backend_options(p)
    p.add_argument("--reference", type=Path, default=None,
                   help="folder of the training images (target among them) for Carlini's relative copy test "
                        "(default: the images the manifest beside --lora, or beside --base without a LoRA, lists)")
    p.add_argument("--distance-threshold", type=float, default=None,
                   help="absolute tiled-L2 bound a copy must meet; required when there are no reference images")
    p.add_argument("--start", choices=START_KINDS, default=d.start,
                   help=f"start from the prompt's embedding, random tokens or an unrelated prompt (default {d.start})")
    p.add_argument("--start-noise", type=float, default=d.start_noise,
                   help=f"Gaussian noise added to the start, in units of its std (default {d.start_noise:g})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"Adam steps (default {d.steps})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr:g})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"noisy targets per step (default {d.batch_size})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the start and of the search (default {d.seed})")
    p.add_argument("--generations", type=int, default=s.generations,
                   help=f"fresh generations that judge success (default {s.generations})")
    p.add_argument("--sample-steps", type=int, default=None,
                   help="sampling steps of those (default: the model's own: 25 on the world, 50 on Stable "
                        "Diffusion, 28 on Flux and SD3)")
    p.add_argument("--guidance", type=float, default=None,
                   help="their guidance scale (default: the model's own: 3 on the world, 7.5 on Stable Diffusion, "
                        "7 on SD3, 1 on Flux, whose distilled guidance is inside the model)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder for embedding.safetensors, summary.json, generations.png "
                        "(default runs/dori/<target name>)")
    p.set_defaults(handler=run_dori_command)


def conditioning_tensors(prefix: str, conditioning: Conditioning) -> dict[str, torch.Tensor]:
    """A conditioning as named tensors for a safetensors file: `prefix` for the text states, `prefix.<key>` for
    each added tensor (SDXL's pooled embedding and time ids, Flux's pooled embedding)."""
    # Copies: a tensor the search left untouched (SDXL's time ids) is shared with the start, which safetensors refuses.
    return {prefix: conditioning.context.clone(),
            **{f"{prefix}.{key}": value.clone() for key, value in conditioning.added.items()}}


def run_dori_command(args: argparse.Namespace) -> int:
    from diffmem.attack.dori import run_dori
    from diffmem.evaluation.inputs import load_image_folder, resize_images
    from diffmem.formats.safetensors_io import save_file, write_atomic
    from diffmem.report import load_image

    try:
        config = DoriConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, start=args.start,
                            start_noise=args.start_noise, seed=args.seed)
    except ValueError as error:
        raise usage_error(error, ("steps", "lr", "batch_size", "start", "start_noise")) from None
    if args.generations < 1 or (args.sample_steps is not None and args.sample_steps < 1):
        raise UsageError("--generations and --sample-steps must be at least 1")
    target = load_image(args.target)[None]
    model = backend_from(args)
    settings = CheckSettings(generations=args.generations, steps=args.sample_steps or model.default_steps,
                             guidance=model.default_guidance if args.guidance is None else args.guidance)
    original_size = tuple(target.shape[-2:])
    if original_size != model.image_size:
        target = resize_images(target, model.image_size)
    if args.reference is not None:
        reference, _ = load_image_folder(args.reference, size=model.image_size)
    else:
        tuned = args.lora if args.lora is not None else None if args.base == "world" else Path(args.base)
        reference = manifest_reference(tuned) if tuned is not None else None
    if reference is None and args.distance_threshold is None:
        raise UsageError("no reference images to test copies against: pass --reference (the training images) "
                         "or --distance-threshold")
    outcome = run_dori(model, target, args.prompt, config, reference, settings,
                       CopyConfig(distance_threshold=args.distance_threshold))

    out = args.out or Path("runs/dori") / args.target.stem
    inputs = (args.target, *model_inputs(args))
    summary = {"prompt": args.prompt, "target": str(args.target),
               "base": "committed world base" if args.base == "world" else str(args.base),
               "lora": None if args.lora is None else str(args.lora), "model": model.name, "family": model.family,
               "target_resized_from": list(original_size) if original_size != model.image_size else None,
               **outcome.summary(), "losses": [round(x, 6) for x in outcome.result.losses],
               "config": asdict(config), "sampling": asdict(settings)}
    metadata = {"prompt": args.prompt, "dori_config": json.dumps(asdict(config), sort_keys=True)}
    tensors = {**conditioning_tensors("embedding", outcome.result.conditioning),
               **conditioning_tensors("start", outcome.result.start_conditioning)}
    save_file(tensors, out / "embedding.safetensors", metadata, protect=inputs)
    write_atomic(png_bytes(outcome_grid(target, outcome)), out / "generations.png", protect=inputs)
    write_atomic((json.dumps(summary, indent=2) + "\n").encode(), out / "summary.json", protect=inputs)
    print(f"copy rate {outcome.before.rate:.0%} from the start embedding, {outcome.after.rate:.0%} after Dori "
          f"({outcome.after.test} test, {len(outcome.after.is_copy)} generations); wrote {out}/")
    return 0


def add_table(subparsers: argparse._SubParsersAction) -> None:
    r, a, t = RobustnessSettings(), AdversarialFinetuneConfig(), TRAINING_RECIPE
    posthoc = ", ".join(m.label for m in registered(kind="post-hoc"))
    training = ", ".join(m.label for m in registered(kind="training"))
    p = subparsers.add_parser(
        "table", help="every mitigation of the toolkit under the Dori attack, with quality: docs/robustness.md",
        description=f"For a world LoRA with its manifest (default: the committed example LoRA): the LoRA as trained, "
                    f"{posthoc} applied to it, and the training-time mitigations ({training}) with their "
                    "unmitigated control, each prompted with the duplicated captions and attacked with Dori; fresh "
                    "generations are judged with Carlini's relative copy test. Writes the robustness page (--out) "
                    "and the rows (--json-out; --json prints them). The mitigations are those of "
                    "diffmem.mitigations.registry.")
    p.add_argument("--lora", type=Path, default=None,
                   help="world LoRA with its manifest .json beside it (default: the committed example LoRA)")
    p.add_argument("--base", type=Path, default=None, help="world UNet file (default: the committed base)")
    p.add_argument("--out", type=Path, default=None, help="markdown page to write, e.g. docs/robustness.md "
                                                          "(its notes block is kept)")
    add_json_options(p, "the rows and settings")
    p.add_argument("--work", type=Path, default=Path("runs/robustness"),
                   help="folder for models trained on the way (default runs/robustness)")
    p.add_argument("--faces", type=int, default=None, help="attack only the first N duplicated faces (default all)")
    p.add_argument("--starts", default=",".join(r.starts),
                   help=f"Dori starts, comma-separated, of {', '.join(START_KINDS)} (default {','.join(r.starts)})")
    p.add_argument("--dori-steps", type=int, default=r.dori.steps, help=f"Dori Adam steps (default {r.dori.steps})")
    p.add_argument("--seed", type=int, default=r.dori.seed,
                   help=f"seed of every Dori search: its random start and its noise (default {r.dori.seed})")
    p.add_argument("--generations", type=int, default=r.sampling.generations,
                   help=f"fresh generations per caption and embedding (default {r.sampling.generations})")
    p.add_argument("--sample-steps", type=int, default=r.sampling.steps,
                   help=f"DDIM steps of those (default {r.sampling.steps})")
    p.add_argument("--no-fid", action="store_true", help="skip FID (the held-out denoising loss stays)")
    for group in TABLE_GROUPS:  # each registered mitigation's file option, in the table's order
        if group == "training":
            p.add_argument("--control", type=Path, default=None,
                           help="world UNet file of the same-recipe fine-tune without mitigation, manifest beside "
                                "it; default: train it with --train-*")
        for mitigation in registered(table_group=group):
            if mitigation.file_option:
                p.add_argument(f"--{mitigation.file_option}", type=Path, default=None, help=mitigation.file_help)
        if group == "adversarial":
            p.add_argument("--adv-rounds", type=int, default=a.rounds, help=f"its rounds (default {a.rounds})")
            p.add_argument("--adv-steps", type=int, default=a.steps_per_round,
                           help=f"its fine-tuning steps per round (default {a.steps_per_round})")
            p.add_argument("--adv-search-steps", type=int, default=a.search.steps,
                           help=f"its Dori steps per search (default {a.search.steps})")
            p.add_argument("--adv-starts", default=",".join(a.starts),
                           help=f"its Dori starts (default {','.join(a.starts)})")
    p.add_argument("--memcontrol-mask", type=Path, default=None,
                   help="mask for the MemControl model trained here (default: all attention blocks)")
    p.add_argument("--train-method", choices=METHOD_NAMES, default=t.method, help=f"method of the training-time rows' fine-tunes "
                                                            f"(default {t.method}; MemControl always trains SV-DIFF)")
    p.add_argument("--train-steps", type=int, default=t.steps, help=f"their optimizer steps (default {t.steps})")
    p.add_argument("--train-batch-size", type=int, default=t.batch_size,
                   help=f"their batch size (default {t.batch_size})")
    p.add_argument("--train-lr", type=float, default=t.lr, help="their learning rate (default: the method's)")
    p.add_argument("--no-train", action="store_true",
                   help="measure only the training-time models given as files; do not train the missing ones")
    p.add_argument("--no-training-time", action="store_true",
                   help="leave out the training-time mitigations (the page says so)")
    p.add_argument("--groups", default=",".join(TABLE_GROUPS),
                   help=f"which models to measure: posthoc (the LoRA, "
                        f"{', '.join(m.label for m in registered(table_group='posthoc'))}), adversarial, training "
                        f"(the training-time mitigations and their control); default {','.join(TABLE_GROUPS)}")
    p.add_argument("--merge", type=Path, nargs="+", default=[],
                   help="--json-out files of earlier runs with the same settings: their rows join the page and their "
                        "models are not measured again (to split the table over several processes)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.set_defaults(handler=run_table_command)


def split_starts(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def run_table_command(args: argparse.Namespace) -> int:
    """`diffmem attack table`: the options as `run_robustness_table`'s arguments, then the table printed."""
    from diffmem.attack.table import run_robustness_table

    # Each config on its own, so that a refused value is named by its own flag (usage errors: exit 2).
    try:
        dori, search = DoriConfig(steps=args.dori_steps, seed=args.seed), DoriConfig(steps=args.adv_search_steps)
    except ValueError as error:
        steps = "--dori-steps" if args.dori_steps < 1 else "--adv-search-steps"
        raise usage_error(error, {"steps": steps}) from None
    if args.generations < 1 or args.sample_steps < 1:
        raise UsageError("--generations and --sample-steps must be at least 1")
    try:
        settings = RobustnessSettings(
            dori=dori, starts=split_starts(args.starts),
            sampling=CheckSettings(generations=args.generations, steps=args.sample_steps), copy=CopyConfig(),
            fid=not args.no_fid, progress=True)
    except ValueError as error:
        raise usage_error(error, ("starts",)) from None
    try:
        adversarial = AdversarialFinetuneConfig(
            rounds=args.adv_rounds, steps_per_round=args.adv_steps, starts=split_starts(args.adv_starts),
            search=search)
    except ValueError as error:
        raise usage_error(error, {"rounds": "--adv-rounds", "steps_per_round": "--adv-steps",
                                  "starts": "--adv-starts"}) from None
    try:
        recipe = MemControlTrainConfig(method=args.train_method, steps=args.train_steps,
                                       batch_size=args.train_batch_size, lr=args.train_lr)
    except DiffmemError as error:
        raise usage_error(error, ()) from None
    if min(args.train_steps, args.train_batch_size) < 1:
        raise UsageError("--train-steps and --train-batch-size must be at least 1")
    groups = set(split_starts(args.groups))
    if not groups <= set(TABLE_GROUPS):
        raise UsageError(f"--groups takes {', '.join(TABLE_GROUPS)}, got {args.groups}")
    torch.set_num_threads(args.threads)
    if args.no_training_time:
        groups.discard("training")
    files = {m.name: getattr(args, m.file_option.replace("-", "_")) for m in registered() if m.file_option}
    began = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - began:6.0f}s] {message}", flush=True)

    with json_mode(args):  # with --json, the log and the table go to stderr: stdout holds the JSON alone
        run = run_robustness_table(
            settings, args.lora, args.base, groups=groups, faces=args.faces, files={**files, "control": args.control},
            configs={"adversarial": adversarial}, recipe=recipe, memcontrol_mask=args.memcontrol_mask,
            train_missing=not args.no_train, merge=args.merge, out=args.out, json_out=json_file(args),
            work=args.work,
            # The command line as typed (cli.main passes it); without it, as when the handler is called directly:
            command=getattr(args, "command_line", None) or "diffmem attack table", log=log)
        print(run.markdown())
    if json_stdout(args):
        print(json.dumps(stamped(run.record), indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `attack` and its sub-commands to the diffmem CLI."""
    attack = subparsers.add_parser("attack", help="attacks on memorization mitigations (Dori)")
    commands = attack.add_subparsers(dest="attack_command", required=True)
    add_dori(commands)
    add_table(commands)

