"""`diffmem attack ...` sub-commands: the Dori embedding search against a world model (plus optional LoRA)."""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import asdict
from pathlib import Path

import torch

from diffmem.attack.dori import START_KINDS, DoriConfig, DoriOutcome


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
    from diffmem.report import load_image
    from diffmem.world.check import CheckSettings
    from diffmem.world.lora import apply_lora
    from diffmem.world.model import load_base, load_unet_file

    try:
        config = DoriConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, start=args.start,
                            start_noise=args.start_noise, seed=args.seed)
    except ValueError as error:
        raise DiffmemError(str(error)) from None
    settings = CheckSettings(generations=args.generations, steps=args.sample_steps, guidance=args.guidance)
    target = load_image(args.target)[None]
    if args.reference is not None:
        reference, _ = load_image_folder(args.reference)
    else:
        tuned = args.lora if args.lora is not None else args.base
        reference = manifest_reference(tuned) if tuned is not None else None
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
    from diffmem.attack.table import RobustnessSettings
    from diffmem.mitigations.adversarial import AdversarialFinetuneConfig

    r, a = RobustnessSettings(), AdversarialFinetuneConfig()
    p = subparsers.add_parser(
        "table", help="every mitigation of the toolkit under the Dori attack, with quality: docs/robustness.md",
        description="For a world LoRA with its manifest (default: the committed example LoRA): the LoRA as trained, "
                    "NeMo, Wanda, BAF and adversarial fine-tuning applied to it, and the training-time mitigations "
                    "(MemControl, random word addition, threshold) with their unmitigated control, each prompted "
                    "with the duplicated captions and attacked with Dori; fresh generations are judged with "
                    "Carlini's relative copy test. Writes the robustness page (--out) and the rows (--json).")
    p.add_argument("--lora", type=Path, default=None,
                   help="world LoRA with its manifest .json beside it (default: the committed example LoRA)")
    p.add_argument("--base", type=Path, default=None, help="world UNet file (default: the committed base)")
    p.add_argument("--out", type=Path, default=None, help="markdown page to write, e.g. docs/robustness.md "
                                                          "(its notes block is kept)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows and settings to this JSON file")
    p.add_argument("--work", type=Path, default=Path("runs/robustness"),
                   help="folder for models trained on the way (default runs/robustness)")
    p.add_argument("--faces", type=int, default=None, help="attack only the first N duplicated faces (default all)")
    p.add_argument("--starts", default=",".join(r.starts),
                   help=f"Dori starts, comma-separated, of {', '.join(START_KINDS)} (default {','.join(r.starts)})")
    p.add_argument("--dori-steps", type=int, default=r.dori.steps, help=f"Dori Adam steps (default {r.dori.steps})")
    p.add_argument("--seed", type=int, default=r.dori.seed, help=f"Dori seed (default {r.dori.seed})")
    p.add_argument("--generations", type=int, default=r.sampling.generations,
                   help=f"fresh generations per caption and embedding (default {r.sampling.generations})")
    p.add_argument("--sample-steps", type=int, default=r.sampling.steps,
                   help=f"DDIM steps of those (default {r.sampling.steps})")
    p.add_argument("--no-fid", action="store_true", help="skip FID (the held-out denoising loss stays)")
    p.add_argument("--nemo-masks", type=Path, default=None,
                   help="NeMo mask file for this LoRA (`diffmem mitigate nemo --out`) instead of running NeMo's search")
    p.add_argument("--wanda-masks", type=Path, default=None,
                   help="Wanda mask file for this LoRA (`diffmem mitigate wanda --out`) instead of running Wanda")
    p.add_argument("--adversarial", type=Path, default=None,
                   help="an adversarially fine-tuned model (`diffmem mitigate adversarial --out`); default: train "
                        "one now with the --adv-* settings")
    p.add_argument("--adv-rounds", type=int, default=a.rounds, help=f"its rounds (default {a.rounds})")
    p.add_argument("--adv-steps", type=int, default=a.steps_per_round,
                   help=f"its fine-tuning steps per round (default {a.steps_per_round})")
    p.add_argument("--adv-search-steps", type=int, default=a.search.steps,
                   help=f"its Dori steps per search (default {a.search.steps})")
    p.add_argument("--adv-starts", default=",".join(a.starts), help=f"its Dori starts (default {','.join(a.starts)})")
    for key, what in (("control", "the same-recipe fine-tune without mitigation"),
                      ("memcontrol", "a MemControl-trained model (`diffmem memcontrol train --mask`)"),
                      ("rwa", "a fine-tune with random word addition (`memcontrol train --mitigation rwa`)"),
                      ("threshold", "a fine-tune with Wen's threshold (`memcontrol train --mitigation threshold`)")):
        p.add_argument(f"--{key}", type=Path, default=None,
                       help=f"world UNet file of {what}, manifest beside it; default: train it with --train-*")
    p.add_argument("--memcontrol-mask", type=Path, default=None,
                   help="mask for the MemControl model trained here (default: all attention blocks)")
    p.add_argument("--train-method", default="full", help="method of the training-time rows' fine-tunes "
                                                          "(default full; MemControl always trains SV-DIFF)")
    p.add_argument("--train-steps", type=int, default=100, help="their optimizer steps (default 100)")
    p.add_argument("--train-batch-size", type=int, default=8, help="their batch size (default 8)")
    p.add_argument("--train-lr", type=float, default=None, help="their learning rate (default: the method's)")
    p.add_argument("--no-train", action="store_true",
                   help="measure only the training-time models given as files; do not train the missing ones")
    p.add_argument("--no-training-time", action="store_true",
                   help="leave out the training-time mitigations (the page says so)")
    p.add_argument("--groups", default=",".join(TABLE_GROUPS),
                   help="which models to measure: posthoc (the LoRA, NeMo, Wanda, BAF), adversarial, training "
                        f"(the training-time mitigations and their control); default {','.join(TABLE_GROUPS)}")
    p.add_argument("--merge", type=Path, nargs="+", default=[],
                   help="--json files of earlier runs with the same settings: their rows join the page and their "
                        "models are not measured again (to split the table over several processes)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.set_defaults(handler=run_table_command)


TABLE_GROUPS = ("posthoc", "adversarial", "training")


def split_starts(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def merged_rows(paths: list[Path], settings: dict):
    """(rows, sources, reference_of, commands) of earlier `attack table --json` files, which must have been
    measured with `settings`; anything else is a clear error naming the file."""
    from diffmem.attack.table import RobustnessRow
    from diffmem.errors import DiffmemError, FileFormatError

    rows, sources, reference_of, commands = [], {}, {}, []
    for path in paths:
        if not path.is_file():
            raise DiffmemError("no such table JSON file", path)
        try:
            record = json.loads(path.read_text())
            found = [RobustnessRow(**row) for row in record["rows"]]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise FileFormatError(f"is not a JSON file written by `diffmem attack table --json` ({error})",
                                  path) from None
        if record.get("settings") != settings:
            raise DiffmemError("was measured with other settings than this run (faces, starts, steps, sampling); "
                               "merge only runs of the same settings", path)
        rows += found
        sources.update({k: v for k, v in record.get("sources", {}).items() if k in {r.model for r in found}})
        reference_of.update({k: v for k, v in record.get("reference_of", {}).items()
                             if k in {r.model for r in found}})
        commands.append(record.get("command", str(path)))
    return rows, sources, reference_of, commands


def run_table_command(args: argparse.Namespace) -> int:
    import shlex
    import sys
    import time
    from dataclasses import replace

    from diffmem.attack.table import (
        ADVERSARIAL,
        POSTHOC,
        TRAINING_CONTROL,
        TRAINING_TIME,
        RobustnessSettings,
        ToolkitModels,
        add_adversarial,
        posthoc_models,
        robustness_page,
        robustness_row,
        training_time_models,
    )
    from diffmem.bench.evaluate import Probe
    from diffmem.errors import DiffmemError
    from diffmem.formats.safetensors_io import write_atomic
    from diffmem.memcontrol.train import MemControlTrainConfig
    from diffmem.metrics.copy import CopyConfig
    from diffmem.mitigations.adversarial import AdversarialFinetuneConfig
    from diffmem.world.check import CheckSettings, example_lora_path

    torch.set_num_threads(args.threads)
    lora = args.lora or example_lora_path()
    manifest_path = lora.with_suffix(".json")
    if manifest_reference(lora) is None:
        raise DiffmemError("no manifest .json beside the LoRA listing its training images (written by "
                           "`diffmem world finetune`)", lora)
    manifest = json.loads(manifest_path.read_text())
    try:
        settings = RobustnessSettings(
            dori=DoriConfig(steps=args.dori_steps, seed=args.seed), starts=split_starts(args.starts),
            sampling=CheckSettings(generations=args.generations, steps=args.sample_steps), copy=CopyConfig(),
            fid=not args.no_fid, progress=True)
        adversarial = AdversarialFinetuneConfig(
            rounds=args.adv_rounds, steps_per_round=args.adv_steps, starts=split_starts(args.adv_starts),
            search=DoriConfig(steps=args.adv_search_steps))
        recipe = MemControlTrainConfig(method=args.train_method, steps=args.train_steps,
                                       batch_size=args.train_batch_size, lr=args.train_lr)
    except ValueError as error:
        raise DiffmemError(str(error)) from None
    inputs = [p for p in (lora, manifest_path, args.base, args.adversarial, args.control, args.memcontrol, args.rwa,
                          args.threshold, args.memcontrol_mask, args.nemo_masks, args.wanda_masks, *args.merge)
              if p is not None]
    previous = args.out.read_text() if args.out is not None and args.out.is_file() else None
    began = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - began:6.0f}s] {message}", flush=True)

    probe = Probe.from_manifest(manifest)
    if args.faces is not None:
        probe = replace(probe, duplicated=probe.duplicated.subset(range(min(args.faces, len(probe.duplicated)))))
    command = "diffmem attack table " + " ".join(shlex.quote(a) for a in sys.argv[3:]) if sys.argv[1:3] == [
        "attack", "table"] else "diffmem attack table"
    budget = (f"{len(probe.duplicated)} of the LoRA's {len(manifest['duplicated'])} duplicated faces attacked "
              f"(manifest order); {args.threads} torch thread(s); seconds per row in the per-caption table")
    rows = []

    def write_outputs(toolkit: ToolkitModels, planned: list[str]) -> None:
        """The JSON and the page of the rows so far; models not measured yet are named as such."""
        done = {row.model for row in rows}
        pending = {n: "not measured yet (the run stopped before it)" for n in [*toolkit.models, *planned]
                   if n not in done}
        notes = {**{n: why for n, why in toolkit.notes.items() if n not in done}, **pending}
        if args.json is not None:
            record = {"lora": str(lora), "command": command, "settings": settings.to_dict(),
                      "adversarial": adversarial.to_dict(),
                      "training_recipe": {**asdict(recipe), "duplicate": list(recipe.duplicate)},
                      "reference_of": toolkit.reference_of, "sources": toolkit.sources, "notes": notes,
                      "rows": [row.to_dict() for row in rows], "seconds": round(time.time() - began)}
            write_atomic((json.dumps(record, indent=2) + "\n").encode(), args.json, protect=tuple(inputs))
        if args.out is not None:
            shown = ToolkitModels(toolkit.models, toolkit.reference_of, notes, toolkit.sources)
            page = robustness_page(rows, shown, settings, [command, *merged_commands], budget, previous)
            write_atomic(page.encode(), args.out, protect=tuple(inputs))

    def measure_new(toolkit: ToolkitModels, planned: list[str]) -> None:
        """Measure the models not measured yet, writing the outputs after each (a stopped run keeps its rows)."""
        for name, unet in toolkit.models.items():
            if name in {row.model for row in rows}:
                continue
            log(f"measuring {name} ...")
            rows.append(robustness_row(name, unet, probe, settings))
            log(json.dumps(rows[-1].to_dict()))
            write_outputs(toolkit, planned)

    groups = set(split_starts(args.groups))
    if not groups <= set(TABLE_GROUPS):
        raise DiffmemError(f"--groups takes {', '.join(TABLE_GROUPS)}, got {args.groups}")
    merged, merged_sources, merged_reference_of, merged_commands = merged_rows(args.merge, settings.to_dict())
    rows.extend(merged)
    done = {row.model for row in rows}
    training_names = [TRAINING_CONTROL, *TRAINING_TIME.values()]
    wanted = {"posthoc": [n for n in POSTHOC if n not in done], "adversarial": [ADVERSARIAL] if ADVERSARIAL not in
              done else [], "training": [n for n in training_names if n not in done]}
    if args.no_training_time:
        groups.discard("training")
    wanted = {group: names for group, names in wanted.items() if group in groups}
    planned = [name for names in wanted.values() for name in names]
    toolkit = ToolkitModels(sources=dict(merged_sources), reference_of=dict(merged_reference_of))
    if wanted.get("posthoc"):
        built = posthoc_models(lora, args.base, manifest, args.nemo_masks, args.wanda_masks, log)
        for name in wanted["posthoc"]:
            toolkit.add(name, built.models[name], built.reference_of[name], built.sources[name])
    if args.no_training_time or "training" not in groups:
        toolkit.notes.update({name: "left out of this run" for name in training_names if name not in done})
    if "adversarial" not in groups and ADVERSARIAL not in done:
        toolkit.notes[ADVERSARIAL] = "left out of this run"
    measure_new(toolkit, planned)
    if wanted.get("adversarial"):
        add_adversarial(toolkit, lora, args.base, args.adversarial, adversarial, args.work, log)
        measure_new(toolkit, planned)
    if wanted.get("training") and not args.no_training_time:
        files = {"control": args.control, "memcontrol": args.memcontrol, "rwa": args.rwa, "threshold": args.threshold}
        training_time_models(toolkit, manifest, recipe, files, args.memcontrol_mask, args.work, log,
                             train_missing=not args.no_train)
        measure_new(toolkit, planned)
    write_outputs(toolkit, planned)
    from diffmem.attack.table import markdown_rows

    print(markdown_rows(rows, toolkit.notes))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `attack` and its sub-commands to the diffmem CLI."""
    attack = subparsers.add_parser("attack", help="attacks on memorization mitigations (Dori)")
    commands = attack.add_subparsers(dest="attack_command", required=True)
    add_dori(commands)
    add_table(commands)

