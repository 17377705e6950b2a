"""`diffmem attack ...` sub-commands: the Dori embedding search against a world model (plus optional LoRA)."""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import asdict
from pathlib import Path

import torch

from diffmem.attack.dori import START_KINDS, DoriConfig, DoriOutcome


def read_image(path: Path) -> torch.Tensor:
    """A PNG/JPEG/... file as a [1, 3, H, W] float image in [0, 1], or a `FileFormatError` naming the file."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from diffmem.errors import DiffmemError, FileFormatError

    if not path.is_file():
        raise DiffmemError("no such image file", path)
    try:
        with Image.open(path) as picture:
            array = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as error:
        raise FileFormatError(f"is not a readable image ({error})", path) from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None]


def manifest_reference(lora: Path) -> torch.Tensor | None:
    """The training images (duplicated and seen once) of a world LoRA, from the manifest `.json` beside it written
    by `diffmem world finetune`; None when there is no such manifest."""
    from diffmem.world.check import manifest_images
    from diffmem.world.data import ImageSet

    manifest_path = lora.with_suffix(".json")
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
    from diffmem.world.check import CheckSettings

    d, s = DoriConfig(), CheckSettings()
    p = subparsers.add_parser(
        "dori", help="search a text embedding that makes the model replicate a target image (Dori attack)",
        description="Optimise a text embedding so that the model (base plus optional LoRA, e.g. a mitigated one) "
                    "denoises towards --target, then judge fresh generations from it with the copy test.")
    p.add_argument("--target", type=Path, required=True, help="the (memorized) image to bring back, e.g. a PNG")
    p.add_argument("--prompt", required=True, help="the prompt the image was trained with (start of the search)")
    p.add_argument("--base", type=Path, default=None, help="world UNet file (default: the committed base)")
    p.add_argument("--lora", type=Path, default=None, help="LoRA merged into the base (any format diffmem reads)")
    p.add_argument("--reference", type=Path, default=None,
                   help="folder of the training images (target among them) for Carlini's relative copy test "
                        "(default: the images the manifest beside --lora lists, when there is one)")
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
    p.add_argument("--sample-steps", type=int, default=s.steps, help=f"DDIM steps of those (default {s.steps})")
    p.add_argument("--guidance", type=float, default=s.guidance, help=f"their guidance scale (default {s.guidance:g})")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder for embedding.safetensors, summary.json, generations.png "
                        "(default runs/dori/<target name>)")
    p.set_defaults(handler=run_dori_command)


def run_dori_command(args: argparse.Namespace) -> int:
    from diffmem.attack.dori import run_dori
    from diffmem.audit import load_image_folder
    from diffmem.errors import DiffmemError
    from diffmem.formats.safetensors_io import save_file, write_atomic
    from diffmem.metrics.copy import CopyConfig
    from diffmem.world.check import CheckSettings
    from diffmem.world.lora import apply_lora
    from diffmem.world.model import load_base, load_unet_file

    try:
        config = DoriConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, start=args.start,
                            start_noise=args.start_noise, seed=args.seed)
    except ValueError as error:
        raise DiffmemError(str(error)) from None
    settings = CheckSettings(generations=args.generations, steps=args.sample_steps, guidance=args.guidance)
    target = read_image(args.target)
    if args.reference is not None:
        reference, _ = load_image_folder(args.reference)
    else:
        reference = manifest_reference(args.lora) if args.lora is not None else None
    if reference is None and args.distance_threshold is None:
        raise DiffmemError("no reference images to test copies against: pass --reference (the training images) "
                           "or --distance-threshold")
    unet = load_base() if args.base is None else load_unet_file(args.base)
    if args.lora is not None:
        unet = apply_lora(unet, args.lora)
    outcome = run_dori(unet, target, args.prompt, config, reference, settings,
                       CopyConfig(distance_threshold=args.distance_threshold))

    out = args.out or Path("runs/dori") / args.target.stem
    inputs = tuple(p for p in (args.target, args.base, args.lora) if p is not None)
    summary = {"prompt": args.prompt, "target": str(args.target), "base": str(args.base or "committed world base"),
               "lora": None if args.lora is None else str(args.lora), **outcome.summary(),
               "losses": [round(x, 6) for x in outcome.result.losses],
               "config": asdict(config), "sampling": asdict(settings)}
    metadata = {"prompt": args.prompt, "dori_config": json.dumps(asdict(config), sort_keys=True)}
    save_file({"embedding": outcome.result.embedding, "start": outcome.result.start},
              out / "embedding.safetensors", metadata, protect=inputs)
    write_atomic(png_bytes(outcome_grid(target, outcome)), out / "generations.png", protect=inputs)
    write_atomic((json.dumps(summary, indent=2) + "\n").encode(), out / "summary.json", protect=inputs)
    print(f"copy rate {outcome.before.rate:.0%} from the start embedding, {outcome.after.rate:.0%} after Dori "
          f"({outcome.after.test} test, {len(outcome.after.is_copy)} generations); wrote {out}/")
    return 0


def add_table(subparsers: argparse._SubParsersAction) -> None:
    from diffmem.world.check import CheckSettings

    d, s = DoriConfig(), CheckSettings()
    p = subparsers.add_parser(
        "table", help="copy rates of base, LoRA and BAF-filtered LoRA on the duplicated captions, as prompted and "
                      "under Dori",
        description="For a world LoRA with its manifest: each duplicated caption is prompted, then its image is "
                    "attacked with Dori, on the base alone (control), the LoRA, and the LoRA filtered by BAF "
                    "(default settings). Fresh generations are judged with Carlini's relative copy test against "
                    "the LoRA's training images.")
    p.add_argument("--lora", type=Path, default=None,
                   help="world LoRA with its manifest .json beside it (default: the committed example LoRA)")
    p.add_argument("--base", type=Path, default=None, help="world UNet file (default: the committed base)")
    p.add_argument("--start", choices=START_KINDS, default=d.start, help=f"Dori start (default {d.start})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"Dori Adam steps (default {d.steps})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"Dori seed (default {d.seed})")
    p.add_argument("--generations", type=int, default=s.generations,
                   help=f"fresh generations per caption and model (default {s.generations})")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    p.set_defaults(handler=run_table_command)


def run_table_command(args: argparse.Namespace) -> int:
    from diffmem.attack.table import markdown_rows, robustness_table
    from diffmem.errors import DiffmemError
    from diffmem.filters import BAFConfig
    from diffmem.formats.safetensors_io import write_atomic
    from diffmem.pipeline import filter_lora
    from diffmem.world.check import CheckSettings, example_lora_path, manifest_images
    from diffmem.world.lora import apply_lora
    from diffmem.world.model import BASE_FILE, assets_dir, load_base, load_unet_file

    lora = args.lora or example_lora_path()
    reference = manifest_reference(lora)
    if reference is None:
        raise DiffmemError("no manifest .json beside the LoRA listing its training images (written by "
                           "`diffmem world finetune`)", lora)
    manifest = json.loads(lora.with_suffix(".json").read_text())
    try:
        config = DoriConfig(steps=args.steps, start=args.start, seed=args.seed)
    except ValueError as error:
        raise DiffmemError(str(error)) from None
    base_path = args.base or assets_dir() / BASE_FILE
    base = load_base() if args.base is None else load_unet_file(args.base)
    models = {
        "base (never saw the images)": base,
        "LoRA": apply_lora(base, lora),
        "LoRA + BAF (default)": apply_lora(base, filter_lora(lora, base_path, BAFConfig(), use_cache=False).lora),
    }
    rows = robustness_table(models, manifest_images(manifest, "duplicated"), reference, config,
                            CheckSettings(generations=args.generations), heldout=manifest_images(manifest, "heldout"),
                            progress=True)
    print(markdown_rows(rows))
    if args.json is not None:
        record = {"lora": str(lora), "dori": asdict(config), "generations": args.generations,
                  "rows": [row.to_dict() for row in rows]}
        write_atomic((json.dumps(record, indent=2) + "\n").encode(), args.json, protect=(lora,))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `attack` and its sub-commands to the diffmem CLI."""
    attack = subparsers.add_parser("attack", help="attacks on memorization mitigations (Dori)")
    commands = attack.add_subparsers(dest="attack_command", required=True)
    add_dori(commands)
    add_table(commands)

