"""Tiny randomly initialised models for the metrics and audit tests (built in tmp_path, nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_clip_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over single letters (no merges, 16 tokens), saved into `folder`."""
    from diffmem.bench.real_example import tiny_tokenizer

    tokenizer = tiny_tokenizer(folder, model_max_length=16)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_clip_text_config(vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def tiny_clip_folder(folder: Path):
    """A tiny CLIP model + tokenizer + preprocessor config (16 x 16 images) saved into `folder`."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = tiny_clip_tokenizer(folder)
    torch.manual_seed(0)
    vision = dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2)
    config = CLIPConfig(text_config=tiny_clip_text_config(len(tokenizer)), vision_config=vision, projection_dim=8)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 16, "width": 16}, "do_center_crop": True, "size": {"shortest_edge": 16},
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    return model


def tiny_sd_pipeline_folder(folder: Path) -> Path:
    """A randomly initialised Stable-Diffusion-shaped pipeline (16 x 16 images, 8 x 8 latents) saved as a
    diffusers folder: the one `diffmem bench-real`'s runnable example writes."""
    from diffmem.bench.real_example import tiny_pipeline

    tiny_pipeline(folder / "pipeline")
    return folder / "pipeline"
