"""Tiny randomly initialised models for the metrics and audit tests (built in tmp_path, nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_clip_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over single letters (no merges), saved into `folder`."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
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
    diffusers folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer(folder / "_tokenizer")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_clip_text_config(len(tokenizer))))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipeline")
    return folder / "pipeline"
