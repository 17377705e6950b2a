"""Tiny base checkpoints with the real key names of every family and layout, for tests.

Each base starts from a tiny diffusers/transformers model built from a small config (no downloads, seeded so
the bytes are the same on every run) and is written in the layout asked for: original single-file naming is
produced with diffmem's own name maps (`diffmem.formats.names`), which tests check against diffusers'
converters. `lora_lookups` lists the module names real LoRA files use for each tiny base.

    path = build_tiny_base(tmp_path, "sdxl", "single_file")
    lookups = lora_lookups("sdxl", "kohya")   # {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (16, 16), ...}
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch

from diffmem.formats.names import fusions_for, kohya_name, module_of, unet_diffusers_to_ldm
from diffmem.formats.safetensors_io import save_file

CLIP_L = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "vocab_size": 64, "max_position_embeddings": 8, "projection_dim": 16, "hidden_act": "quick_gelu"}
OPEN_CLIP = {**CLIP_L, "hidden_size": 24, "intermediate_size": 48, "projection_dim": 24, "hidden_act": "gelu"}
UNET_COMMON = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (8, 16, 16),
               "layers_per_block": 2, "attention_head_dim": 2, "norm_num_groups": 4}
UNET_CONFIGS = {
    # SD1: three cross-attention down blocks and a plain one in the real model; here two and one.
    "sd1": {**UNET_COMMON, "cross_attention_dim": 16,
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")},
    "sd2": {**UNET_COMMON, "cross_attention_dim": 24, "use_linear_projection": True,
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")},
    # SDXL: plain first block, deeper transformers later, text_time added embedding of pooled te2 + sizes.
    "sdxl": {**UNET_COMMON, "cross_attention_dim": 40, "use_linear_projection": True,
             "transformer_layers_per_block": (1, 1, 2), "addition_embed_type": "text_time",
             "addition_time_embed_dim": 4, "projection_class_embeddings_input_dim": 24 + 6 * 4,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")},
    # A world-sized UNet with one resnet per block, so layer indices differ from SD's.
    "unet": {**UNET_COMMON, "block_out_channels": (8, 16), "layers_per_block": 1, "cross_attention_dim": 8,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")},
}
FLUX_CONFIG = {"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 8,
               "num_attention_heads": 2, "joint_attention_dim": 8, "pooled_projection_dim": 8,
               "guidance_embeds": True, "axes_dims_rope": (2, 2, 4)}
SD3_CONFIG = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 8,
              "num_attention_heads": 2, "joint_attention_dim": 8, "caption_projection_dim": 16,
              "pooled_projection_dim": 8, "out_channels": 4, "pos_embed_max_size": 8,
              "dual_attention_layers": (0,), "qk_norm": "rms_norm"}
TEXT_ENCODERS = {"sd1": [("text_encoder", CLIP_L, False)], "sd2": [("text_encoder", OPEN_CLIP, False)],
                 "sdxl": [("text_encoder", CLIP_L, False), ("text_encoder_2", OPEN_CLIP, True)]}
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
             "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}
LAYOUTS = {"sd1": ("single_file", "diffusers_folder", "ckpt"), "sd2": ("single_file", "diffusers_folder"),
           "sdxl": ("single_file", "diffusers_folder"), "flux": ("single_file", "bare", "diffusers_folder"),
           "sd3": ("single_file", "diffusers_folder"), "unet": ("bare",)}


@cache
def tiny_models(family: str) -> dict[str, torch.nn.Module]:
    """The tiny diffusers/transformers models of a family, by pipeline component name (seeded)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    if family == "flux":
        return {"transformer": FluxTransformer2DModel(**FLUX_CONFIG).eval()}
    if family == "sd3":
        return {"transformer": SD3Transformer2DModel(**SD3_CONFIG).eval()}
    models: dict[str, torch.nn.Module] = {"unet": UNet2DConditionModel(**UNET_CONFIGS[family]).eval()}
    for name, config, projection in TEXT_ENCODERS.get(family, []):
        cls = CLIPTextModelWithProjection if projection else CLIPTextModel
        models[name] = cls(CLIPTextConfig(**config, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    return models


def classic_key(component: str, key: str) -> str:
    """A text-encoder key in the `text_model.`-prefixed form real SD files and LoRAs use.

    transformers 5 drops that level from `CLIPTextModel` (not from `CLIPTextModelWithProjection`).
    """
    if component.startswith("text_encoder") and key.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
        return f"text_model.{key}"
    return key


def diffusers_state(family: str) -> dict[str, dict[str, torch.Tensor]]:
    """Component name -> diffusers state dict of the tiny models (persistent tensors, classic key names)."""
    return {name: {classic_key(name, k): v.detach().clone() for k, v in model.state_dict().items()
                   if not k.endswith("position_ids")}
            for name, model in tiny_models(family).items()}


def to_original(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """A diffusers state dict in original naming, through diffmem's name map for `kind`."""
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    original = {}
    for fusion in fusions_for(kind, shapes, "diffusers"):
        original[fusion.original] = torch.cat([state[name][start:end] for name, start, end in fusion.pieces])
    return original


def to_openclip(state: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """A Hugging Face CLIP text-model state dict in OpenCLIP naming (fused in_proj, transposed projection)."""
    result = {"positional_embedding": state["text_model.embeddings.position_embedding.weight"],
              "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
              "ln_final.weight": state["text_model.final_layer_norm.weight"],
              "ln_final.bias": state["text_model.final_layer_norm.bias"],
              # OpenCLIP multiplies by text_projection on the right; diffusers' Linear stores its transpose.
              "text_projection": state["text_projection.weight"].T.contiguous() if "text_projection.weight" in state
              else torch.eye(hidden)}
    layers = {int(key.split(".")[3]) for key in state if key.startswith("text_model.encoder.layers.")}
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
               "self_attn.out_proj": "attn.out_proj"}
    for i in sorted(layers):
        ours, theirs = f"text_model.encoder.layers.{i}", f"transformer.resblocks.{i}"
        for param in ("weight", "bias"):
            result[f"{theirs}.attn.in_proj_{param}"] = torch.cat(
                [state[f"{ours}.self_attn.{p}_proj.{param}"] for p in "qkv"]
            )
            for hf, oc in renames.items():
                result[f"{theirs}.{oc}.{param}"] = state[f"{ours}.{hf}.{param}"]
    return result


def original_state(family: str, flux_prefix: str = "") -> dict[str, torch.Tensor]:
    """The single-file (original naming) state dict of the tiny models of `family`."""
    state = diffusers_state(family)
    if family in ("flux", "sd3"):
        prefix = "model.diffusion_model." if family == "sd3" else flux_prefix
        return {prefix + k: v for k, v in to_original(state["transformer"], family).items()}
    result = {f"model.diffusion_model.{k}": v for k, v in to_original(state["unet"], "unet").items()}
    # A few VAE keys, as every real single file has them; nothing may mistake them for the UNet.
    result["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
    result["first_stage_model.encoder.conv_out.weight"] = torch.zeros(8, 4, 3, 3)
    slots = {"sd1": [("cond_stage_model.transformer.", "text_encoder", False)],
             "sd2": [("cond_stage_model.model.", "text_encoder", True)],
             "sdxl": [("conditioner.embedders.0.transformer.", "text_encoder", False),
                      ("conditioner.embedders.1.model.", "text_encoder_2", True)]}.get(family, [])
    for prefix, name, openclip in slots:
        encoder = to_openclip(state[name], OPEN_CLIP["hidden_size"]) if openclip else state[name]
        result.update({prefix + k: v for k, v in encoder.items()})
    return result


def write_component(folder: Path, name: str, model: torch.nn.Module, shards: int = 1) -> None:
    """One diffusers component folder: config.json and weights (optionally sharded with an index)."""
    sub = folder / name
    sub.mkdir(parents=True)
    if hasattr(model, "save_config"):
        model.save_config(sub)
        stem = "diffusion_pytorch_model"
    else:
        model.config.to_json_file(sub / "config.json")
        stem = "model"
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    if shards == 1:
        save_file(state, sub / f"{stem}.safetensors")
        return
    keys = sorted(state)
    weight_map = {}
    for index in range(shards):
        file = f"{stem}-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[index::shards]
        save_file({k: state[k] for k in part}, sub / file)
        weight_map.update(dict.fromkeys(part, file))
    index_json = {"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}
    (sub / f"{stem}.safetensors.index.json").write_text(json.dumps(index_json, indent=1))


def build_tiny_base(tmp_path: Path, family: str, layout: str, *, flux_prefix: str = "") -> Path:
    """Write a tiny `family` base in `layout` under `tmp_path` and return its path.

    family: sd1 | sd2 | sdxl | flux | sd3 | unet. layout: single_file (original naming), diffusers_folder,
    ckpt (SD1 as a torch.save'd {"state_dict": ...}), bare (a diffusers UNet or transformer file).
    `flux_prefix` puts the Flux keys under e.g. "model.diffusion_model." as ComfyUI-saved files do.
    """
    if layout not in LAYOUTS[family]:
        raise ValueError(f"no tiny {family} base in layout {layout}; have {LAYOUTS[family]}")
    tmp_path = Path(tmp_path)
    if layout == "single_file":
        path = tmp_path / f"tiny-{family}.safetensors"
        save_file(original_state(family, flux_prefix), path, {"format": "pt"})
    elif layout == "ckpt":
        path = tmp_path / f"tiny-{family}.ckpt"
        torch.save({"state_dict": original_state(family), "global_step": 1}, path)
    elif layout == "bare":
        (name,) = ["unet"] if family == "unet" else ["transformer"]
        path = tmp_path / f"tiny-{family}-{name}.safetensors"
        save_file(diffusers_state(family)[name], path)
    else:
        path = tmp_path / f"tiny-{family}"
        path.mkdir()
        models = tiny_models(family)
        for name, model in models.items():
            write_component(path, name, model, shards=2 if family == "flux" else 1)
        index = {"_class_name": PIPELINES[family], "_diffusers_version": "0.42.1"}
        index.update({name: ["diffusers" if name in ("unet", "transformer") else "transformers",
                             type(model).__name__] for name, model in models.items()})
        (path / "model_index.json").write_text(json.dumps(index, indent=1))
    return path


def lora_lookups(family: str, style: str, *, convs: bool = False) -> dict[str, tuple[int, ...]]:
    """LoRA module names a real LoRA file of `style` uses for the tiny `family` base -> updated weight shape.

    style "kohya": `lora_unet_`/`lora_te_` names as sd-scripts writes them (SD1/SD2 UNet in diffusers naming,
    SDXL UNet in SGM naming with `lora_te1_`/`lora_te2_`, Flux/SD3 in their original fused naming);
    style "diffusers": dotted `unet.`/`text_encoder.`/`text_encoder_2.`/`transformer.` names. By default the
    modules a plain LoRA trains (attention and feed-forward Linears, 1x1 proj_in/out, text-encoder layers);
    `convs=True` adds everything a LoCon trains (resnet convs, samplers, embeddings' Linears).
    """
    lookups = {}
    for component, model in tiny_models(family).items():
        layers = {name: module for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)}
        state = {k + ".weight": tuple(m.weight.shape) for k, m in layers.items()}
        if style == "kohya" and family in ("flux", "sd3"):
            for fusion in fusions_for(family, state, "diffusers"):
                rows = sum(end - start for _, start, end in fusion.pieces)
                tail = state[fusion.pieces[0][0]][1:]
                original = module_of(fusion.original)
                if convs or "blocks" in original:
                    lookups[kohya_name("lora_unet", original)] = (rows, *tail)
            continue
        for name, module in layers.items():
            name = classic_key(component, name)
            if name.endswith("text_projection"):
                continue  # OpenCLIP stores it transposed; LoRA trainers leave it alone
            plain = "attentions" in name or "encoder.layers" in name or "transformer_blocks" in name
            if not (convs or plain):
                continue
            shape = tuple(module.weight.shape)
            if style == "diffusers":
                lookups[f"{component}.{name}"] = shape
            elif component == "unet" and family == "sdxl":
                with_attention = {0, 1}
                lookups[kohya_name("lora_unet", module_of(unet_diffusers_to_ldm(name + ".weight", 2, with_attention)))] = shape
            else:
                prefix = {"unet": "lora_unet", "text_encoder": "lora_te1" if family == "sdxl" else "lora_te",
                          "text_encoder_2": "lora_te2"}[component]
                lookups[kohya_name(prefix, name)] = shape
    return lookups
