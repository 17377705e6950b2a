"""The embedded world: a tiny pixel-space text-to-image diffusion model that really memorizes.

A diffusers `UNet2DConditionModel` with Stable Diffusion's block layout (32 x 32 RGB, about 3 M parameters),
conditioned on a frozen pretrained all-MiniLM-L6-v2 text encoder, trained offline on procedural shapes and
bundled photos; fine-tunes (LoRA in kohya or PEFT naming, or full) memorize real LFW faces or bundled photos on
purpose. See docs/world.md.

    from diffmem.world import load_base, generate
    unet = load_base()
    images = generate(unet, ["a large red circle at the left on a white background"], seeds=[0])
"""

from diffmem.world.check import CheckSettings, example_lora_path, load_example_lora, memorization_check
from diffmem.world.data import (
    ImageSet,
    base_dataset,
    base_photos_dataset,
    faces_dataset,
    photos_dataset,
    shapes_dataset,
)
from diffmem.world.diffusion import (
    denoising_loss,
    generate,
    generate_from_context,
    noise_scheduler,
    training_loss,
)
from diffmem.world.lora import apply_lora, save_lora, target_pattern
from diffmem.world.model import UNetConfig, build_unet, load_base, load_unet_file
from diffmem.world.text import TextEncoder, encode_prompts
from diffmem.world.train import BaseTrainingConfig, FinetuneConfig, finetune, train_base

__all__ = [
    "BaseTrainingConfig",
    "CheckSettings",
    "FinetuneConfig",
    "ImageSet",
    "TextEncoder",
    "UNetConfig",
    "apply_lora",
    "base_dataset",
    "base_photos_dataset",
    "build_unet",
    "denoising_loss",
    "encode_prompts",
    "example_lora_path",
    "faces_dataset",
    "finetune",
    "generate",
    "generate_from_context",
    "load_base",
    "load_example_lora",
    "load_unet_file",
    "memorization_check",
    "noise_scheduler",
    "photos_dataset",
    "save_lora",
    "shapes_dataset",
    "target_pattern",
    "train_base",
    "training_loss",
]
