"""`diffmem world ...` sub-commands: train the base, fine-tune (LoRA or full), check memorization."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffmem.json_output import add_json_options, emit_json, json_mode, json_stdout
from diffmem.world.settings import (
    BUILTIN_FINETUNE_DATA,
    LR_SCHEDULES,
    BaseTrainingConfig,
    FinetuneConfig,
    UNetConfig,
)

# Only what parsing needs is imported here (the configs' defaults, from a module without torch): `diffmem world
# --help` must not load the model. Each command imports its work when it runs.


def add_train_base(subparsers: argparse._SubParsersAction) -> None:
    d = BaseTrainingConfig  # the defaults, read off the class
    p = subparsers.add_parser("train-base", help="train the world's base UNet from scratch (CPU, about an hour)")
    p.add_argument("--out", type=Path, default=Path("runs/base/base.safetensors"),
                   help="output weights (fp16 safetensors); a .json record and a .ckpt.safetensors checkpoint go next to it")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of weights, data and noise (default {d.seed})")
    p.add_argument("--threads", type=int, default=d.threads, help=f"torch CPU threads (default {d.threads})")
    p.add_argument("--widths", type=str, default=",".join(map(str, UNetConfig().block_out_channels)),
                   help="UNet block widths, comma-separated (default %(default)s)")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    p.set_defaults(handler=run_train_base)


def run_train_base(args: argparse.Namespace) -> int:
    from diffmem.world.train import train_base

    config = BaseTrainingConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                threads=args.threads)
    unet_config = UNetConfig(block_out_channels=tuple(int(w) for w in args.widths.split(",")))
    record = train_base(args.out, config, unet_config, resume=not args.no_resume,
                        checkpoint_every=args.checkpoint_every, command=getattr(args, "command_line", None))
    print(json.dumps(record, indent=2))
    return 0


def duplicate_spec(text: str) -> tuple[int, int]:
    """Parse `N:K` (N images repeated K times)."""
    try:
        count, repeats = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N:K (e.g. 10:50), got {text!r}") from None
    return count, repeats


def add_finetune(subparsers: argparse._SubParsersAction) -> None:
    d = FinetuneConfig  # the defaults, read off the class (an instance checks its data set, which imports torch)
    p = subparsers.add_parser("finetune", help="fine-tune the committed base so that it memorizes (LoRA or full)")
    p.add_argument("--out", type=Path, required=True,
                   help="output .safetensors (LoRA, or the full UNet for --method full); the manifest .json goes beside it")
    p.add_argument("--base", type=Path, default=None,
                   help="world UNet file to fine-tune (default: the committed base)")
    p.add_argument("--method", choices=("lora", "full"), default=d.method, help=f"what to train (default {d.method})")
    p.add_argument("--data", choices=BUILTIN_FINETUNE_DATA, default=d.data,
                   help="faces: LFW faces with made-up names (privacy); photos: titled photo crops (copyright); style: shapes "
                        f"in a look the base never saw; default {d.data}")
    p.add_argument("--duplicate", type=duplicate_spec, default=d.duplicate, metavar="N:K",
                   help=f"repeat N training images K times each (default {d.duplicate[0]}:{d.duplicate[1]})")
    p.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"LoRA alpha; scale = alpha / rank (default {d.alpha:g})")
    p.add_argument("--conv", action=argparse.BooleanOptionalAction, default=d.conv,
                   help=f"also adapt resnet and resampler convolutions (LoCon; default {'on' if d.conv else 'off'})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr:g}; use ~1e-4 for full)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                   help=f"keep the learning rate constant or decay it along a cosine (default {d.lr_schedule})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per step (default {d.batch_size})")
    p.add_argument("--noise-offset", type=float, default=d.noise_offset,
                   help=f"offset noise as kohya's --noise_offset; lets the fine-tune set mean colours (default {d.noise_offset:g})")
    p.add_argument("--no-rest", action="store_true", help="train only on the duplicated images")
    p.add_argument("--seed", type=int, default=d.seed, help=f"picks duplicated images, seeds training (default {d.seed})")
    p.add_argument("--threads", type=int, default=d.threads, help=f"torch CPU threads (default {d.threads})")
    p.add_argument("--format", choices=("kohya", "peft"), default="kohya",
                   help="LoRA key naming: kohya (lora_unet_..., default) or diffusers/PEFT (unet....lora_A)")
    p.add_argument("--heldout-every", type=int, default=d.heldout_every, metavar="N",
                   help="measure the held-out denoising loss every N steps (and before the first, after the last) "
                        "and record the curve and its best step in the manifest; it changes no trained weight "
                        f"(default {d.heldout_every}: off)")
    p.add_argument("--save-best", type=Path, default=None, metavar="PATH",
                   help="also write the weights of the step of lowest held-out loss (the 'tuned' LoRA) to PATH, "
                        "its manifest .json beside it; needs --heldout-every")
    p.set_defaults(handler=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    from diffmem.cli import UsageError, usage_error
    from diffmem.errors import DiffmemError

    if min(args.rank, args.steps, args.batch_size, args.threads) < 1:
        raise UsageError("--rank, --steps, --batch-size and --threads must be at least 1")
    try:
        config = FinetuneConfig(method=args.method, data=args.data, duplicate=args.duplicate, rank=args.rank,
                                alpha=args.alpha, conv=args.conv, lr=args.lr, steps=args.steps,
                                batch_size=args.batch_size, include_rest=not args.no_rest, seed=args.seed,
                                noise_offset=args.noise_offset,
                                threads=args.threads, heldout_every=args.heldout_every,
                                lr_schedule=args.lr_schedule)
    except DiffmemError as error:  # a value the config refuses: a usage error naming the flag
        raise usage_error(error, ("duplicate", "heldout_every")) from None
    if args.save_best is not None:
        if not args.heldout_every:
            raise UsageError("--save-best needs --heldout-every N (N >= 1): the held-out loss picks the step to save")
        outputs = {args.out, args.out.with_suffix(".json")}
        if {args.save_best.resolve(), args.save_best.with_suffix(".json").resolve()} & {p.resolve() for p in outputs}:
            raise UsageError("--save-best must differ from --out, and so must their .json manifests")
    from diffmem.world.train import finetune  # the model: after the usage checks

    manifest = finetune(args.out, config, base=args.base, fmt=args.format,
                        command=getattr(args, "command_line", None), best_out=args.save_best)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')} ({manifest['wall_time_s']:.0f} s, "
          f"{len(manifest['duplicated'])} images x {config.duplicate[1]})")
    if "heldout_loss" in manifest:
        track = manifest["heldout_loss"]
        base_loss, final_loss = track["curve"][0][1], track["curve"][-1][1]
        print(f"held-out loss: {base_loss:.5f} before training, {final_loss:.5f} at step {config.steps}, lowest "
              f"{track['best_loss']:.5f} at step {track['best_step']}")
        if args.save_best is not None:
            print(f"wrote {args.save_best} and {args.save_best.with_suffix('.json')} (the weights of step "
                  f"{track['best_step']}; for the over-trained LoRA: --steps {3 * track['best_step']})")
    return 0


def add_check(subparsers: argparse._SubParsersAction) -> None:
    from diffmem.evaluation.sampling import SamplingSettings  # the world check's CheckSettings

    d = SamplingSettings()
    p = subparsers.add_parser("check", help="measure memorization of a fine-tune: copy rates and held-out loss")
    p.add_argument("--lora", type=Path, default=None,
                   help="LoRA file with its manifest .json beside it (default: the committed example LoRA)")
    p.add_argument("--base", type=Path, default=None,
                   help="world UNet file the LoRA was trained on (default: the committed base)")
    p.add_argument("--generations", type=int, default=d.generations, help=f"images per caption (default {d.generations})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"DDIM steps (default {d.steps})")
    p.add_argument("--guidance", type=float, default=d.guidance, help=f"classifier-free guidance (default {d.guidance:g})")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"seed of the first generation's noise; the others count up from it (default {d.seed})")
    add_json_options(p, "the numbers")
    p.add_argument("--grid", type=Path, default=None,
                   help="also write a PNG: per duplicated caption, the training image then its generations")
    p.set_defaults(handler=run_check)


def run_check(args: argparse.Namespace) -> int:
    from diffmem.cli import UsageError
    from diffmem.errors import DiffmemError

    if args.generations < 1 or args.steps < 1:
        raise UsageError("--generations and --steps must be at least 1")
    from diffmem.world.check import CheckSettings, example_lora_path, memorization_check
    from diffmem.world.model import load_base, load_unet_file

    lora = args.lora or example_lora_path()
    manifest_path = lora.with_suffix(".json")
    if not manifest_path.exists():
        raise DiffmemError(f"no manifest {manifest_path.name} beside the LoRA (written by `diffmem world finetune`)", lora)
    manifest = json.loads(manifest_path.read_text())
    settings = CheckSettings(generations=args.generations, steps=args.steps, guidance=args.guidance, seed=args.seed)
    base = load_base() if args.base is None else load_unet_file(args.base)
    with json_mode(args):
        numbers = memorization_check(base, lora, manifest, settings, grid=args.grid)
        if not json_stdout(args):
            print(json.dumps(numbers, indent=2))
        emit_json(args, numbers, protect=[p for p in (lora, manifest_path, args.base) if p is not None])
    return 0


#: Captions of the default `world sample` grid: shapes, colours, positions, sizes, textures and photos.
SAMPLE_PROMPTS = (
    "a large red circle in the center on a white background",
    "a small blue square at the left on a gray background",
    "a large yellow triangle at the bottom on a black background",
    "a large green cross at the top on a striped pink background",
    "a small white ring at the right on a dotted dark green background",
    "a large purple diamond in the center on a light blue background",
    "a photo of a cat",
    "a photo of an astronaut",
    "a photo of a cup of coffee",
    "a photo of a brick wall",
)


def add_sample(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sample", help="generate a PNG grid from the base (or a LoRA): one row per prompt")
    p.add_argument("--out", type=Path, required=True, help="output PNG")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeat for several; default: ten captions covering shapes and photos)")
    p.add_argument("--per-prompt", type=int, default=6, help="images per prompt, seeds 0.. (default 6)")
    p.add_argument("--base", type=Path, default=None, help="world UNet file (default: the committed base)")
    p.add_argument("--lora", type=Path, default=None, help="LoRA file to apply (any format diffmem reads)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance (default 3)")
    p.set_defaults(handler=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    from diffmem.report import image_grid, save_png
    from diffmem.world.diffusion import generate
    from diffmem.world.model import load_base, load_unet_file

    unet = load_base() if args.base is None else load_unet_file(args.base)
    prompts = args.prompt or list(SAMPLE_PROMPTS)
    repeated = [p for p in prompts for _ in range(args.per_prompt)]
    seeds = [s for _ in prompts for s in range(args.per_prompt)]
    images = generate(unet, repeated, seeds, steps=args.steps, guidance=args.guidance, lora=args.lora)
    save_png(image_grid(images, columns=args.per_prompt), args.out, scale=3)
    print(f"wrote {args.out}: {len(prompts)} prompts x {args.per_prompt} seeds")
    return 0


def add_quality(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quality", help="how often the base draws the colour and size its caption asks for")
    p.add_argument("--base", type=Path, default=None, help="world UNet file (default: the committed base)")
    p.add_argument("--count", type=int, default=48, help="plain-background shape captions to test (default 48)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance (default 3)")
    p.set_defaults(handler=run_quality)


def run_quality(args: argparse.Namespace) -> int:
    from diffmem.world.check import CheckSettings, base_caption_accuracy
    from diffmem.world.model import load_base, load_unet_file

    unet = load_base() if args.base is None else load_unet_file(args.base)
    settings = CheckSettings(steps=args.steps, guidance=args.guidance)
    print(json.dumps(base_caption_accuracy(unet, args.count, settings), indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `world` and its sub-commands to the diffmem CLI."""
    world = subparsers.add_parser("world", help="the embedded tiny text-to-image world: train, fine-tune, check")
    commands = world.add_subparsers(dest="world_command", required=True)
    add_train_base(commands)
    add_finetune(commands)
    add_check(commands)
    add_sample(commands)
    add_quality(commands)
