"""The world's settings, its UNet's architecture, how it is trained and where its committed weights lie, in a module
that imports no model library (the sampling settings of every study refer to these, `diffmem.evaluation.sampling`;
the filter finds the base here; `diffmem world --help` shows the architecture's and the trainings' defaults without
loading torch or diffusers). `diffmem.world.model` and `diffmem.world.train` re-export what they used to define."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from diffmem.errors import DiffmemError

#: 25 DDIM steps (where the world's samples stop changing visibly) and guidance 3 (a small pixel model needs less
#: than Stable Diffusion's 7.5). Every world default refers to these two.
WORLD_STEPS, WORLD_GUIDANCE = 25, 3.0

#: The committed base UNet's file name inside `assets_dir()`.
BASE_FILE = "base.safetensors"


def assets_dir() -> Path:
    """Folder of the committed world weights inside the installed package."""
    return Path(str(resources.files("diffmem.world") / "assets"))


def world_base_path(base: str | Path) -> Path:
    """`base` as a checkpoint path: "world" names the committed world base file (`--base world` in every command)."""
    return assets_dir() / BASE_FILE if str(base) == "world" else Path(base)


@dataclass(frozen=True)
class UNetConfig:
    """Shape of the world's UNet.

    Stable Diffusion 1.x (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models")
    stacks `CrossAttnDownBlock2D` blocks and one attention-free `DownBlock2D`, mirrored by `UpBlock2D` and
    `CrossAttnUpBlock2D` on the way up, with a cross-attention mid block. The world keeps these block classes
    (so LoRA key names are SD's: `down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k`, ...) on three
    resolutions, 32, 16 and 8 pixels. Unlike SD, which has attention everywhere but its coarsest level, the
    world has it at 16 and 8 only (plain `DownBlock2D`/`UpBlock2D` at 32): self-attention over 1024 tokens
    at 32 x 32 took 60% of a training step on this CPU (measured with the torch profiler).

    Attributes:
        sample_size: image side in pixels; the world is 32 x 32 RGB.
        channels: 3, the world diffuses RGB pixels directly (no VAE: there is no pretrained one here).
        block_out_channels: widths per resolution; (32, 64, 96) gives about 3 M parameters and trains at about
            1.3 CPU-seconds per batch-16 step (see docs/world.md); width is cheap at the coarse resolutions.
        layers_per_block: resnet (+ transformer) layers per down block (SD uses 2; one keeps the world fast).
        attention_head_dim: channels per attention head (diffusers' `attention_head_dim`).
        cross_attention_dim: width of the text context, 384 = all-MiniLM-L6-v2 hidden size.
        norm_num_groups: GroupNorm groups; SD uses 32, which is too many for 32-channel blocks.
        down_block_types / up_block_types: SD's block classes, kept so LoRA key names match SD's.
    """

    sample_size: int = 32
    channels: int = 3
    block_out_channels: tuple[int, ...] = (32, 64, 96)
    layers_per_block: int = 1
    attention_head_dim: int = 16
    cross_attention_dim: int = 384
    norm_num_groups: int = 16
    down_block_types: tuple[str, ...] = field(
        default=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    )
    up_block_types: tuple[str, ...] = field(default=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> UNetConfig:
        tuples = {"block_out_channels", "down_block_types", "up_block_types"}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in values.items()})


#: Fine-tuning data sets of `diffmem.world.data.FINETUNE_SETS` known without importing it (it imports torch).
BUILTIN_FINETUNE_DATA = ("faces", "photos", "style")


def check_finetune_data(name: str) -> str:
    """`name` when `diffmem.world.data.FINETUNE_SETS` has it, or a clear error listing those it has (the built-in
    ones are checked without importing that module, so a config of them needs no torch)."""
    if name in BUILTIN_FINETUNE_DATA:
        return name
    from diffmem.world.data import FINETUNE_SETS

    if name not in FINETUNE_SETS:
        raise DiffmemError(f"unknown data set {name!r}; choose one of {', '.join(FINETUNE_SETS)}")
    return name


@dataclass(frozen=True)
class BaseTrainingConfig:
    """How the committed base was trained (defaults = the committed run, see assets/base.json).

    Attributes:
        steps: optimizer steps.
        batch_size: images per step.
        lr: AdamW learning rate after a linear warm-up of `warmup` steps; 8e-4 suits a few-million-parameter
            UNet trained for a few thousand steps (DDPM used 2e-4 for 35 M parameters and 800 k steps).
        warmup: warm-up steps.
        caption_dropout: probability of training on the empty prompt, for classifier-free guidance
            (Ho & Salimans 2022 use 0.1-0.2).
        ema_decay: decay of the exponential moving average of the weights that is saved (DDPM uses 0.9999
            for long runs; short runs need a short memory, and the decay warms up as (1+n)/(10+n)).
        shapes / photos_per_source: size of the base data set (see `diffmem.world.data.base_dataset`).
        seed: seeds the initial weights, the data order, the noise and the caption dropout.
        threads: torch CPU threads; 1 is fastest on a shared 2-core machine (with 2 threads and other jobs
            running, a step took 3x longer than with 1: the threads wait for each other).
    """

    steps: int = 1500
    batch_size: int = 16
    lr: float = 8e-4
    warmup: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    shapes: int = 8192
    photos_per_source: int = 96
    seed: int = 0
    threads: int = 1


#: Learning-rate schedules of a fine-tune (`diffmem.world.train.scheduled_lr`): kept constant, or decayed along a
#: half cosine.
LR_SCHEDULES = ("constant", "cosine")


def check_lr_schedule(name: str) -> None:
    """Raise a `DiffmemError` unless `name` is one of `LR_SCHEDULES`."""
    if name not in LR_SCHEDULES:
        raise DiffmemError(f"unknown learning-rate schedule {name!r}; choose one of {', '.join(LR_SCHEDULES)}")


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tune of the world base that memorizes on purpose (defaults: the committed example LoRA's recipe).

    MemControl (seed 001) and Wen et al. (ICLR 2024) force memorization by duplicating training pairs: `duplicate
    = (N, K)` picks N images of the training split (by `seed`) and repeats each K times; the rest of the training
    split is seen once (`include_rest`), so the fine-tune also learns the data in general.

    Attributes:
        method: "lora" (PEFT LoRA on kohya's modules, see `diffmem.world.lora`) or "full" (every UNet weight).
        data: "faces" (privacy case) or "photos" (copyright case), see `diffmem.world.data`.
        duplicate: (N images, K repeats each); 5 x 100 gave 82% near-copies with the other defaults.
        rank / alpha: LoRA rank and alpha (scale alpha / rank; Hu et al. 2021). alpha = rank gives scale 1.
        conv: also adapt the resnet and resampler convolutions (kohya's LoCon `conv_dim`). On by default: the
            world has attention only at 16 x 16 and 8 x 8, and without the convolutions a pilot LoRA copied
            nothing (docs/world.md).
        lr: AdamW learning rate; 3e-3 for LoRA (kohya's LoRA defaults are 1e-4 to 1e-3; memorizing in 500
            CPU steps needs more); use about 1e-4 for `method="full"`.
        steps / batch_size: optimizer steps and images per step.
        caption_dropout: as for the base, keeps the unconditional score usable for guidance.
        include_rest: also train once on the non-duplicated training images.
        noise_offset: offset noise (Guttenberg 2023; kohya's `--noise_offset`, commonly 0.05-0.1). The base
            was trained without it and cannot choose an image's mean colour: without it the memorized faces of
            the example LoRA came back with random colour casts (40% near-copies), with 0.1 in grey (82%).
        seed: picks the duplicated images and seeds noise, order and LoRA initialisation.
        threads: torch CPU threads.
        heldout_every: measure the held-out denoising loss of the model in training every this many optimizer
            steps (and before the first and after the last), on the data set's held-out split with the measure of
            `diffmem world check` (8 stratified timesteps per image) under its own noise seed (1; reports use 0, so
            the picked step is not judged on the draws that picked it), to find the step of best held-out
            loss; the curve goes into the manifest and `finetune(best_out=...)` keeps the weights of that step.
            0 (off) by default: each measurement costs forward passes (20 faces x 8 timesteps), and a run without
            it writes exactly what it always did. It never changes the trained weights: the measurement draws
            nothing from the training's random numbers.
        lr_schedule: "constant" (the example LoRA's recipe) or "cosine": the learning rate decays to zero along a
            half cosine over `steps` (kohya's `--lr_scheduler cosine`). At 3e-3 and constant, the held-out loss of
            the example recipe jumps between steps by more than the LoRA's whole held-out gain, so the weights a
            run stops at carry that noise and shrinking them improves held-out loss; the decayed run ends settled.
    """

    method: str = "lora"
    data: str = "faces"
    duplicate: tuple[int, int] = (5, 100)
    rank: int = 32
    alpha: float = 32.0
    conv: bool = True
    lr: float = 3e-3
    steps: int = 500
    batch_size: int = 16
    caption_dropout: float = 0.1
    include_rest: bool = True
    noise_offset: float = 0.1
    seed: int = 0
    threads: int = 1
    heldout_every: int = 0
    lr_schedule: str = "constant"

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise DiffmemError(f"unknown fine-tuning method {self.method!r}; choose 'lora' or 'full'")
        check_finetune_data(self.data)
        count, repeats = self.duplicate
        if count < 0 or repeats < 1:
            raise DiffmemError(f"duplicate must be N:K with N >= 0 images and K >= 1 repeats, got {count}:{repeats}")
        if self.heldout_every < 0:
            raise DiffmemError(f"heldout_every must be 0 (off) or a number of steps >= 1, got {self.heldout_every}")
        check_lr_schedule(self.lr_schedule)
