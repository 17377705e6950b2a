"""Training the world: the base model from scratch, and fine-tunes (LoRA or full) that memorize on purpose."""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from diffmem.errors import DiffmemError
from diffmem.formats.safetensors_io import load_file, save_file, sha256_file, write_atomic
from diffmem.progress import progress_bar
from diffmem.world.data import FINETUNE_SETS, ImageSet, base_dataset
from diffmem.world.diffusion import training_loss
from diffmem.world.model import (
    BASE_SHA256,
    UNetConfig,
    build_unet,
    config_of,
    count_parameters,
    load_base,
    load_unet_file,
    unet_metadata,
    unet_tensors,
)
from diffmem.world.settings import (  # defined there, without torch
    BaseTrainingConfig,
    FinetuneConfig,
    check_lr_schedule,
)
from diffmem.world.text import encode_prompts


def caption_table(data: ImageSet) -> tuple[list[str], torch.Tensor]:
    """Unique captions (with "" first) and, per image, the index of its caption in that list."""
    unique = ["", *sorted(set(data.captions) - {""})]
    index = {c: i for i, c in enumerate(unique)}
    return unique, torch.tensor([index[c] for c in data.captions])


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def save_checkpoint(
    path: Path, unet: torch.nn.Module, ema: torch.nn.Module, step: int, elapsed: float, config: UNetConfig
) -> None:
    """Full-precision raw and EMA weights plus the step and training seconds so far, so a run can resume."""
    tensors = {f"raw.{k}": v for k, v in unet_tensors(unet, torch.float32).items()}
    tensors.update({f"ema.{k}": v for k, v in unet_tensors(ema, torch.float32).items()})
    save_file(tensors, path, unet_metadata(config, {"step": str(step), "elapsed_s": f"{elapsed:.1f}"}))


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the EMA weights of a `train_base` checkpoint as a world UNet file (fp16), e.g. to look at or
    fine-tune an unfinished run; the step is kept in the metadata."""
    tensors, metadata = load_file(checkpoint)
    ema = {k[len("ema."):]: v.to(torch.float16) for k, v in tensors.items() if k.startswith("ema.")}
    if not ema:
        raise DiffmemError("holds no `ema.` weights: not a checkpoint written by train_base", checkpoint)
    extra = {"diffmem_world": "base-checkpoint", "step": metadata.get("step", "?")}
    config = UNetConfig.from_dict(json.loads(metadata["diffmem_unet_config"]))
    return save_file(ema, out, unet_metadata(config, extra), protect=(checkpoint,))


def train_base(
    out: str | Path,
    config: BaseTrainingConfig | None = None,
    unet_config: UNetConfig | None = None,
    resume: bool = True,
    checkpoint_every: int = 100,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Train the world's base UNet from scratch on `base_dataset()` and save its EMA weights (fp16) to `out`.

    A checkpoint `<out>.ckpt.safetensors` is written every `checkpoint_every` steps and picked up again when
    `resume` is true (weights and step; AdamW restarts its moment estimates). Calling it again with a smaller
    `steps` than a checkpoint has reached is refused; with `steps` equal to it, it only exports. Writes `<out>` and a record `<out minus suffix>.json` (command, seed, steps, wall time,
    parameter count, sha256) and returns that record.
    """
    config = config or BaseTrainingConfig()
    unet_config = unet_config or UNetConfig()
    out = Path(out)
    checkpoint = out.with_suffix(".ckpt.safetensors")
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    data = base_dataset(config.shapes, config.photos_per_source, config.seed)
    captions, caption_index = caption_table(data)
    contexts = encode_prompts(captions)

    unet = build_unet(unet_config).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    start, elapsed_before = 0, 0.0
    if resume and checkpoint.exists():
        tensors, metadata = load_file(checkpoint)
        unet.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("raw.")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        start, elapsed_before = int(metadata["step"]), float(metadata["elapsed_s"])
        if start > config.steps:
            raise DiffmemError(f"checkpoint is at step {start}, past the requested {config.steps} steps", checkpoint)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + start)

    began = time.time()
    bar = progress_bar(range(start, config.steps), initial=start, total=config.steps, disable=not progress,
               desc="train-base", mininterval=20, file=sys.stdout)
    running = None
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup)
        rows = torch.randint(0, len(data), (config.batch_size,), generator=generator)
        keep = torch.rand(config.batch_size, generator=generator) >= config.caption_dropout
        context = contexts[torch.where(keep, caption_index[rows], 0)]
        loss = training_loss(unet, data.images[rows], context, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, unet, min(config.ema_decay, (1 + step) / (10 + step)))
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == config.steps:
            elapsed = elapsed_before + time.time() - began
            save_checkpoint(checkpoint, unet, ema, step + 1, elapsed, unet_config)
            print(f"step {step + 1} loss {running:.4f} elapsed {elapsed:.0f}s", flush=True)

    wall = elapsed_before + time.time() - began
    save_file(unet_tensors(ema), out, unet_metadata(unet_config, {"diffmem_world": "base"}))
    record = {
        "command": command,
        "training": asdict(config),
        "unet": asdict(unet_config),
        "parameters": count_parameters(unet),
        "resumed_from_step": start,
        "wall_time_s": round(wall, 1),
        "final_loss_ema": None if running is None else round(running, 5),
        "images": len(data),
        "sha256": sha256_file(out),
    }
    write_atomic((json.dumps(record, indent=2) + "\n").encode(), out.with_suffix(".json"))
    return record


def duplicated_rows(train_size: int, count: int, seed: int) -> list[int]:
    """Which rows of the training split are duplicated: `count` distinct rows drawn with `seed`, sorted."""
    if count > train_size:
        raise DiffmemError(f"cannot duplicate {count} images: the training split has only {train_size}")
    return sorted(np.random.default_rng(seed).choice(train_size, size=count, replace=False).tolist())


def training_rows(train_size: int, duplicated: list[int], repeats: int, include_rest: bool) -> torch.Tensor:
    """The multiset of rows one epoch sees: duplicated rows `repeats` times, the others once (if included)."""
    rest = [r for r in range(train_size) if r not in set(duplicated)] if include_rest else []
    rows = [r for r in duplicated for _ in range(repeats)] + rest
    if not rows:
        raise DiffmemError("nothing to train on: no duplicated images and include_rest is off")
    return torch.tensor(rows)


def image_records(data: ImageSet, rows: list[int]) -> list[dict]:
    """Manifest entries (id, caption) for rows of an image set."""
    return [{"id": data.ids[r], "caption": data.captions[r]} for r in rows]


#: Context of a batch: (picked training rows [B], keep-caption flags [B], generator) -> [B, tokens, dim].
ContextFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def kohya_dataset_metadata(data: ImageSet, rows: torch.Tensor, name: str) -> dict[str, str]:
    """The dataset fields kohya's sd-scripts writes into a LoRA (`ss_tag_frequency`: per dataset folder, each
    comma-separated caption piece with the number of training images whose caption holds it; `ss_dataset_dirs`:
    the folder's repeats and image count), for the training rows of a world fine-tune. A duplicated image counts
    once per copy, as copies of a file in a real training folder do, so a platform's data-free scan
    (`diffmem.scan.prompts`) sees the same traces it sees in a real LoRA."""
    folder = f"1_{name}"
    counts: dict[str, int] = {}
    for row in rows.tolist():
        for tag in (piece.strip() for piece in data.captions[row].split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return {"ss_tag_frequency": json.dumps({folder: counts}),
            "ss_dataset_dirs": json.dumps({folder: {"n_repeats": 1, "img_count": len(rows)}})}


def table_contexts(contexts: torch.Tensor, caption_index: torch.Tensor) -> ContextFn:
    """Contexts looked up from a `caption_table` encoding; a dropped caption gets the empty prompt (row 0)."""

    def context_of(picked: torch.Tensor, keep: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return contexts[torch.where(keep, caption_index[picked], 0)]

    return context_of


def scheduled_lr(lr: float, step: int, steps: int, schedule: str) -> float:
    """The learning rate of optimizer step `step` (0-based) of `steps`: `lr` throughout ("constant"), or `lr`
    decayed along a half cosine ("cosine", Loshchilov & Hutter 2017, without restarts; kohya's
    `--lr_scheduler cosine`), so the last step takes a small one and the run ends where its noise has settled."""
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def finetune_loop(
    unet: torch.nn.Module,
    trainable: list[torch.nn.Parameter],
    images: torch.Tensor,
    rows: torch.Tensor,
    context_of: ContextFn,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    caption_dropout: float,
    noise_offset: float,
    seed: int,
    loss_fn: Callable[..., torch.Tensor] = training_loss,
    progress: bool = True,
    desc: str = "finetune",
    after_step: Callable[[int], None] | None = None,
    lr_schedule: str = "constant",
) -> float | None:
    """The fine-tuning loop of `finetune`, for any choice of `trainable` parameters: AdamW (no weight decay) on
    batches drawn uniformly from `rows` (a multiset, see `training_rows`), caption dropout, gradient clipping at
    1. `loss_fn(unet, images, context, generator, noise_offset=...)` defaults to the DDPM loss; `after_step(n)`
    runs after the n-th optimizer step (to measure a run part-way); `lr_schedule` is "constant" or "cosine"
    (`scheduled_lr`). Returns the exponential moving average of the loss (None for 0 steps)."""
    check_lr_schedule(lr_schedule)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 1)
    running = None
    bar = progress_bar(range(steps), disable=not progress, desc=desc, mininterval=10, file=sys.stdout)
    for step in bar:
        picked = rows[torch.randint(0, len(rows), (batch_size,), generator=generator)]
        keep = torch.rand(batch_size, generator=generator) >= caption_dropout
        context = context_of(picked, keep, generator)
        loss = loss_fn(unet, images[picked], context, generator, noise_offset=noise_offset)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = scheduled_lr(lr, step, steps, lr_schedule)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        if after_step is not None:
            after_step(step + 1)
    return running


#: Noise seed and timesteps per image of the held-out loss tracked during a fine-tune: `diffmem world check`'s
#: measure (`denoising_loss`, 8 stratified timesteps) under its own noise seed. The step is picked as the lowest of
#: many noisy points, so that point is low partly by chance; measured again with the report's noise (seed 0, as
#: `diffmem bench` and `world check` do) the picked weights are judged on draws that did not pick them.
HELDOUT_SEED, HELDOUT_TIMESTEPS = 1, 8


class HeldoutTrack:
    """The held-out denoising loss of a model in training, for `finetune_loop(after_step=...)`: measured at step 0
    (`start()`, the model before training), every `every` steps and at step `steps`, with fixed noise and
    timesteps (`denoising_loss`), so every point sees the same noisy inputs. At each new lowest loss (over the
    trained steps, step 0 excluded: the untrained model is no fine-tune) the `trainable` tensors are copied in
    memory, so `restore_best()` puts the weights of the best step back without training again.

    The model is measured in eval mode and put back in the mode it was in; the global torch random state is
    restored after each measurement, and the training draws from its own generator, so tracking changes no
    trained weight."""

    def __init__(self, unet: torch.nn.Module, trainable: list[torch.nn.Parameter], heldout: ImageSet, every: int,
                 steps: int, seed: int = HELDOUT_SEED, timesteps_per_image: int = HELDOUT_TIMESTEPS) -> None:
        if every < 1:
            raise DiffmemError(f"heldout_every must be at least 1 to track the held-out loss, got {every}")
        if len(heldout) == 0:
            raise DiffmemError("the held-out split is empty: there is no held-out loss to track")
        self.unet, self.trainable, self.heldout = unet, trainable, heldout
        self.every, self.steps, self.seed, self.timesteps_per_image = every, steps, seed, timesteps_per_image
        self.curve: list[tuple[int, float]] = []
        self.best_step: int | None = None
        self.best_loss: float | None = None
        self.best: list[torch.Tensor] | None = None

    def measure(self) -> float:
        """The held-out loss of the model as it is now (eval mode, global random state untouched)."""
        from diffmem.world.diffusion import denoising_loss

        was_training = self.unet.training
        self.unet.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                return denoising_loss(self.unet, self.heldout.images, self.heldout.captions, seed=self.seed,
                                      timesteps_per_image=self.timesteps_per_image)
        finally:
            self.unet.train(was_training)

    def start(self) -> None:
        """Measure the model before its first step (step 0)."""
        self.curve.append((0, self.measure()))

    def __call__(self, step: int) -> None:
        if step % self.every and step != self.steps:
            return
        loss = self.measure()
        self.curve.append((step, loss))
        if self.best_loss is None or loss < self.best_loss:  # ties keep the earlier step
            self.best_step, self.best_loss = step, loss
            self.best = [p.detach().clone() for p in self.trainable]

    def restore_best(self) -> None:
        """Put the weights of the best step back into `trainable`."""
        if self.best is None:
            raise DiffmemError("no trained step was measured: there is no best step to restore")
        with torch.no_grad():
            for parameter, saved in zip(self.trainable, self.best):
                parameter.copy_(saved)

    def record(self) -> dict:
        """The manifest entry: how it was measured, the curve [[step, loss], ...] and the best step."""
        return {"every": self.every, "seed": self.seed, "timesteps_per_image": self.timesteps_per_image,
                "images": len(self.heldout), "curve": [[step, loss] for step, loss in self.curve],
                "best_step": self.best_step, "best_loss": self.best_loss}


def distinct_outputs(paths: list[Path]) -> None:
    """Refuse outputs of which two are the same file (a LoRA path equal to another's manifest, say), or any that
    cannot be written (a folder, a device, under a file), before an hour of training is spent."""
    from diffmem.formats.safetensors_io import check_output_path

    seen: dict[Path, Path] = {}
    for path in paths:
        real = path.resolve()
        if real in seen:
            raise DiffmemError(f"is written twice (also as {seen[real]}); choose distinct output paths", path)
        seen[real] = path
        check_output_path(path)  # a folder, a device, or a path under a file


def finetune(
    out: str | Path,
    config: FinetuneConfig | None = None,
    base: UNet2DConditionModel | str | Path | None = None,
    fmt: str = "kohya",
    progress: bool = True,
    command: str | None = None,
    best_out: str | Path | None = None,
) -> dict:
    """Fine-tune the world base (a UNet, a world UNet file, or by default the committed base) and write the LoRA (`fmt` "kohya" or "peft") or the
    full UNet (fp16) to `out`, plus the manifest `<out minus suffix>.json`: duplicated, once-seen and held-out
    images with captions, the settings, seed, wall time and sha256s. Returns the manifest.

    With `config.heldout_every` = N >= 1 the held-out loss is measured every N steps (`HeldoutTrack`) and the
    manifest gains `heldout_loss` (the curve and its best step) and `trained_steps`. `best_out` (which needs N >= 1)
    also writes the weights as they were at the step of lowest held-out loss, in the same format and metadata, with
    its own manifest `<best_out minus suffix>.json` (the same entries, `trained_steps` = that step, its sha256, and
    `final_loss_ema` null: the training loss's average is known only at the end of the run). Nothing is written
    unless every output is; a failure removes what this call had written."""
    from diffmem.world.lora import save_lora, target_pattern

    config = config or FinetuneConfig()
    out = Path(out)
    best_out = None if best_out is None else Path(best_out)
    if best_out is not None and not config.heldout_every:
        raise DiffmemError("a best-step output needs heldout_every >= 1 (the held-out loss picks the step)", best_out)
    if best_out is not None and config.steps < 1:
        raise DiffmemError("a best-step output needs at least one training step", best_out)
    outputs = [out, out.with_suffix(".json")]
    if best_out is not None:
        outputs += [best_out, best_out.with_suffix(".json")]
    distinct_outputs(outputs)
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    base_sha = None
    if base is None:
        base = load_base()
        base_sha = BASE_SHA256
    elif isinstance(base, (str, Path)):
        base_sha = sha256_file(base)
        base = load_unet_file(base)
    train_set, heldout = FINETUNE_SETS[config.data]("train"), FINETUNE_SETS[config.data]("heldout")
    count, repeats = config.duplicate
    duplicated = duplicated_rows(len(train_set), count, config.seed)
    rows = training_rows(len(train_set), duplicated, repeats, config.include_rest)
    captions, caption_index = caption_table(train_set)
    contexts = encode_prompts(captions)

    unet = copy.deepcopy(base).train()
    if config.method == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        unet.requires_grad_(False)
        lora_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=target_pattern(config.conv),
                                 init_lora_weights=True, lora_dropout=0.0)
        unet = inject_adapter_in_model(lora_config, unet)
        trainable = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p in trainable:
            p.requires_grad_(True)
    else:
        unet.requires_grad_(True)
        trainable = list(unet.parameters())
    began = time.time()
    context_of = table_contexts(contexts, caption_index)
    track = None
    if config.heldout_every:
        track = HeldoutTrack(unet, trainable, heldout, config.heldout_every, config.steps)
        track.start()
    running = finetune_loop(unet, trainable, train_set.images, rows, context_of, steps=config.steps,
                            batch_size=config.batch_size, lr=config.lr, caption_dropout=config.caption_dropout,
                            noise_offset=config.noise_offset, seed=config.seed, progress=progress,
                            desc=f"finetune {config.method}", after_step=track, lr_schedule=config.lr_schedule)
    wall = time.time() - began

    def save(path: Path) -> None:
        if config.method == "lora":
            from diffmem.world.lora import lora_factors

            save_lora(lora_factors(unet), path, config.rank, config.alpha, fmt, config.conv,
                      {"diffmem_world": "finetune", "diffmem_data": config.data,
                       **kohya_dataset_metadata(train_set, rows, config.data)})
        else:
            save_file(unet_tensors(unet), path, unet_metadata(config_of(base), {"diffmem_world": "finetune"}))

    settings = {**asdict(config), "duplicate": list(config.duplicate), "format": fmt if config.method == "lora" else "full"}
    if not config.heldout_every:
        del settings["heldout_every"]  # a run without tracking writes the manifest it always wrote
    if config.lr_schedule == "constant":
        del settings["lr_schedule"]  # likewise a run at a constant learning rate
    duplicated_set = set(duplicated)
    manifest = {
        "command": command,
        "settings": settings,
        "base_sha256": base_sha,
        "data": config.data,
        "duplicated": image_records(train_set, duplicated),
        "seen_once": image_records(train_set, [r for r in range(len(train_set)) if r not in duplicated_set])
        if config.include_rest else [],
        "heldout": image_records(heldout, list(range(len(heldout)))),
        "samples_per_epoch": len(rows),
        "final_loss_ema": None if running is None else round(running, 5),
        "wall_time_s": round(wall, 1),
    }
    if track is not None:
        manifest |= {"trained_steps": config.steps, "heldout_loss": track.record()}
    written: list[Path] = []  # each write is atomic; a later failure removes the earlier ones
    try:
        save(out)
        written.append(out)
        manifest["sha256"] = sha256_file(out)
        written.append(write_atomic((json.dumps(manifest, indent=2) + "\n").encode(), out.with_suffix(".json")))
        if best_out is not None:
            track.restore_best()  # the final weights are saved: the model may now go back to the best step
            save(best_out)
            written.append(best_out)
            best = {**manifest, "trained_steps": track.best_step, "final_loss_ema": None,
                    "sha256": sha256_file(best_out)}
            written.append(write_atomic((json.dumps(best, indent=2) + "\n").encode(), best_out.with_suffix(".json")))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return manifest
