"""The embedded world: a tiny pixel-space text-to-image diffusion model that really memorizes.

A diffusers `UNet2DConditionModel` with Stable Diffusion's block layout (32 x 32 RGB, about 3 M parameters),
conditioned on a frozen pretrained all-MiniLM-L6-v2 text encoder, trained offline on procedural shapes and
bundled photos; fine-tunes (LoRA in kohya or PEFT naming, or full) memorize real LFW faces or bundled photos on
purpose. See docs/world.md.

    from diffmem.world import load_base, generate
    unet = load_base()
    images = generate(unet, ["a large red circle at the left on a white background"], seeds=[0])
"""

from diffmem.lazy import lazy_names

# The names below come from the world's modules, each imported when a name of it is first used: the model and the
# data pull in diffusers and scikit-image, and importing one light module (`diffmem.world.text`, say) runs this file
# first, so an eager import here would make every `diffmem.world.*` import cost all of them.
MODULE_OF = {
    "CheckSettings": "check", "example_lora_path": "check", "load_example_lora": "check",
    "memorization_check": "check",
    "ImageSet": "data", "base_dataset": "data", "base_photos_dataset": "data", "faces_dataset": "data",
    "photos_dataset": "data", "shapes_dataset": "data", "style_dataset": "data",
    "style_share": "style", "style_success": "style",
    "denoising_loss": "diffusion", "generate": "diffusion", "generate_from_context": "diffusion",
    "noise_scheduler": "diffusion", "training_loss": "diffusion",
    "apply_lora": "lora", "save_lora": "lora", "target_pattern": "lora",
    "build_unet": "model", "load_base": "model", "load_unet_file": "model",
    "BaseTrainingConfig": "settings", "FinetuneConfig": "settings", "UNetConfig": "settings",
    "TextEncoder": "text", "encode_prompts": "text",
    "finetune": "train", "train_base": "train",
}


__getattr__, __dir__ = lazy_names(__name__, MODULE_OF, globals())


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
    "style_dataset",
    "style_share",
    "style_success",
    "target_pattern",
    "train_base",
    "training_loss",
]
