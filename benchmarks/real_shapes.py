"""Full-size base checkpoints and LoRAs with the exact key names and shapes of SD1.5, SDXL and Flux.

Values are random (timing depends on shapes, not values). Models are instantiated on PyTorch's meta device, so
no weights are allocated; the base is streamed to disk one tensor at a time as a diffusers folder
(``model_index.json`` + ``unet/`` or ``transformer/``), and LoRAs are written in kohya naming as the base's alias
map generates it (diffusers-style names for SD1.5, SGM names for SDXL, fused original names for Flux).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Public configs of the released models (diffusers' unet/config.json and transformer/config.json).
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "cross_attention_dim": 2048, "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10), "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}
FLUX_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
}
FAMILIES = {"sd15": ("unet", SD15_UNET), "sdxl": ("unet", SDXL_UNET), "flux": ("transformer", FLUX_TRANSFORMER)}

# The modules kohya's sd-scripts trains by default (attention, feed-forward, transformer projections) and, with
# conv LoRA, the resnet and sampler convolutions. Matched against the diffusers module path.
LINEAR_PARTS = (".to_q", ".to_k", ".to_v", ".to_out.0", ".ff.net.0.proj", ".ff.net.2", ".proj_in", ".proj_out",
                ".add_q_proj", ".add_k_proj", ".add_v_proj", ".to_add_out", ".proj_mlp", ".ff_context.net.0.proj",
                ".ff_context.net.2")
CONV_PARTS = (".conv1", ".conv2", ".conv_shortcut", ".downsamplers.0.conv", ".upsamplers.0.conv")


def model_shapes(family: str) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of the family's denoiser in diffusers naming, from a meta-device instance."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    component, config = FAMILIES[family]
    cls = FluxTransformer2DModel if component == "transformer" else UNet2DConditionModel
    with torch.device("meta"):
        model = cls(**config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def write_base(family: str, folder: Path, seed: int = 0) -> Path:
    """A diffusers folder with random fp16 weights of the family's real shapes (skipped if already there)."""
    from diffmem.formats.safetensors_io import save_file_streaming

    component, config = FAMILIES[family]
    weights = folder / component / "diffusion_pytorch_model.safetensors"
    if weights.exists():
        return folder
    shapes = model_shapes(family)
    generator = torch.Generator().manual_seed(seed)

    def make(name: str) -> torch.Tensor:
        shape = shapes[name]
        fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
        return torch.randn(shape, generator=generator) / fan_in**0.5

    save_file_streaming(shapes, make, weights, dtype=torch.float16)
    (folder / component / "config.json").write_text(json.dumps({k: v for k, v in config.items()}, indent=1))
    pipeline = "FluxPipeline" if component == "transformer" else (
        "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline, component: ["diffusers", "x"]}))
    return folder


def trained_modules(shapes: dict[str, tuple[int, ...]], conv: bool) -> dict[str, tuple[int, ...]]:
    """Diffusers module paths (no ``.weight``) kohya would train, with their weight shapes."""
    modules = {}
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) not in (2, 4):
            continue
        module = key[: -len(".weight")]
        if (len(shape) == 2 and any(module.endswith(part) for part in LINEAR_PARTS)) or (conv and len(shape) == 4 and shape[2] > 1 and any(module.endswith(part) for part in CONV_PARTS)):
            modules[module] = shape
    return modules
