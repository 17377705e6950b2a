"""Tiny, randomly initialised but complete diffusers pipelines of every family, built offline, for tests.

`build_tiny_base` (tests/builders_base.py) writes only the weights diffmem reads; code that runs a model end to end
(the real-image benchmark, loading a LoRA into diffusers, generating images) needs a whole pipeline folder that
`DiffusionPipeline.from_pretrained(path, local_files_only=True)` loads. The pipelines here have the real component
classes and key names, toy widths and random weights, so a 2-step generation takes a fraction of a second on a CPU:

    sd1   StableDiffusionPipeline: UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDIM
    sd2   the same with the OpenCLIP-like (gelu) text encoder and a v-prediction DDIM scheduler
    sdxl  StableDiffusionXLPipeline: + CLIPTextModelWithProjection / tokenizer_2, EulerDiscreteScheduler
    flux  FluxPipeline: FluxTransformer2DModel, AutoencoderKL (no quant convs, shift and scale like Flux's),
          CLIPTextModel, T5EncoderModel, CLIPTokenizer, T5TokenizerFast, FlowMatchEulerDiscreteScheduler
    sd3   StableDiffusion3Pipeline: SD3Transformer2DModel, AutoencoderKL (no quant convs, SD3's shift and scale),
          two CLIPTextModelWithProjection (CLIP-L, CLIP-G), T5EncoderModel, two CLIPTokenizer, T5TokenizerFast,
          FlowMatchEulerDiscreteScheduler (static shift 3.0, as SD3's)

The UNets, the Flux and SD3 transformers and the CLIP encoders of SD1/SD2/SDXL are `builders_base.tiny_models(family)`
(same configs, same seed), so `builders_base.lora_lookups(family, "kohya")` names LoRAs that fit these pipelines;
`write_pipeline_lora` writes one. The components only a pipeline needs (VAE, Flux's text encoders, tokenizers,
schedulers) are sized to those models: Flux packs 2 x 2 latent patches, so its VAE has in_channels / 4 = 1 latent
channel, its T5's d_model is the transformer's joint_attention_dim and its CLIP width the pooled_projection_dim.
SD3 does not pack (its transformer patchifies inside), so its VAE has the transformer's in_channels; its prompt
states are both CLIPs' penultimate states side by side, zero-padded to T5's width and followed by T5's states, so
the two CLIP widths sum to at most T5's d_model = joint_attention_dim (here 2 + 4 < 8: the padding is exercised),
and its pooled embedding is both CLIP projections side by side, so they sum to pooled_projection_dim.
Tokenizers are built from letters-only vocabularies (no downloads). Everything is seeded: the same bytes each run.

    path = build_tiny_pipeline(tmp_path, "sdxl")      # tmp_path / "tiny-sdxl-pipeline"
    lora = write_pipeline_lora(path, "sdxl", tmp_path / "lora.safetensors")
"""

from __future__ import annotations

import copy
import json
import string
import tempfile
from pathlib import Path
from typing import Any

import torch

from builders_base import CLIP_L, FLUX_CONFIG, PIPELINES, SD3_CONFIG, lora_lookups, tiny_models
from builders_lora import write_kohya_lora
from diffmem.bench.real_example import tiny_tokenizer

FAMILIES = ("sd1", "sd2", "sdxl", "flux", "sd3")
IMAGE_SIZE = 16  # pixels; the VAEs downsample by 2, so latents are 8 x 8
SEED = 0
VAE_COMMON = {"in_channels": 3, "out_channels": 3, "block_out_channels": (8, 8), "layers_per_block": 1,
              "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
              "norm_num_groups": 4, "sample_size": IMAGE_SIZE}
VAE_CONFIGS = {
    "sd1": {**VAE_COMMON, "latent_channels": 4, "scaling_factor": 0.18215},
    "sd2": {**VAE_COMMON, "latent_channels": 4, "scaling_factor": 0.18215},
    "sdxl": {**VAE_COMMON, "latent_channels": 4, "scaling_factor": 0.13025},
    # Flux's VAE: no quant convs, a shift as well as a scale; one latent channel, packed 2 x 2 into in_channels.
    "flux": {**VAE_COMMON, "latent_channels": FLUX_CONFIG["in_channels"] // 4, "scaling_factor": 0.3611,
             "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False},
    # SD3's VAE: no quant convs, SD3's scale and shift; as many latent channels as the transformer takes.
    "sd3": {**VAE_COMMON, "latent_channels": SD3_CONFIG["in_channels"], "scaling_factor": 1.5305,
            "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False},
}
# Flux's CLIP-L at the width of the transformer's pooled projection (pipeline-only: builders_base has no Flux CLIP).
FLUX_CLIP = {**CLIP_L, "hidden_size": FLUX_CONFIG["pooled_projection_dim"], "intermediate_size": 16,
             "projection_dim": FLUX_CONFIG["pooled_projection_dim"]}
# SD3's CLIP-L and CLIP-G (OpenCLIP-like gelu), with projections: their hidden widths side by side, zero-padded, must
# fit T5's d_model (2 + 4 <= 8) and their projections side by side are the pooled embedding (4 + 4 = 8).
SD3_CLIP_L = {**CLIP_L, "hidden_size": 2, "intermediate_size": 8, "num_attention_heads": 1, "projection_dim": 4}
SD3_CLIP_G = {**CLIP_L, "hidden_size": 4, "intermediate_size": 8, "projection_dim": 4, "hidden_act": "gelu"}
assert SD3_CLIP_L["hidden_size"] + SD3_CLIP_G["hidden_size"] <= SD3_CONFIG["joint_attention_dim"]
assert SD3_CLIP_L["projection_dim"] + SD3_CLIP_G["projection_dim"] == SD3_CONFIG["pooled_projection_dim"]
# Flux's (and SD3's) T5 v1.1 encoder (gated GELU) at the width of the transformer's joint attention.
FLUX_T5 = {"d_model": FLUX_CONFIG["joint_attention_dim"], "d_kv": 4, "d_ff": 16, "num_layers": 1,
           "num_heads": 2, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
           "feed_forward_proj": "gated-gelu", "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
T5_MAX_LENGTH = 512  # as T5 v1.1 tokenizers; FluxPipeline pads its prompts to max_sequence_length (512)
# SD's noise schedule, as the real schedulers' configs have it.
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
KOHYA_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2_768_v", "sdxl": "sdxl_base_v1-0", "flux": "flux1",
                  "sd3": "sd3"}


def check_family(family: str) -> None:
    """A ValueError unless `family` is one the pipelines here cover."""
    if family not in FAMILIES:
        raise ValueError(f"no tiny pipeline for family {family!r}; have {FAMILIES}")


def clip_tokenizer(max_length: int = CLIP_L["max_position_embeddings"]):
    """`real_example.tiny_tokenizer` (letters-only CLIP BPE) padding to the tiny CLIPs' position count."""
    with tempfile.TemporaryDirectory() as scratch:  # the tokenizer keeps its vocabulary in memory
        return tiny_tokenizer(Path(scratch), model_max_length=max_length)


def t5_tokenizer(max_length: int = T5_MAX_LENGTH):
    """A T5TokenizerFast (Unigram: `<pad>`, `</s>`, `<unk>`, `▁`, letters and `▁`-letters) built in memory."""
    from transformers import T5TokenizerFast

    pieces = [(piece, -1.0) for piece in string.ascii_lowercase]
    pieces += [(f"▁{piece}", -2.0) for piece in string.ascii_lowercase]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0), *pieces]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def clip_text_model(config: dict[str, Any], projection: bool = False) -> torch.nn.Module:
    """A CLIPTextModel (`projection`: CLIPTextModelWithProjection, as SD3's encoders) with builders_base's
    special-token ids (bos 0, eos = pad 1)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(CLIPTextConfig(**config, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()


def t5_encoder(vocab_size: int, d_model: int = FLUX_T5["d_model"]) -> torch.nn.Module:
    """A T5EncoderModel at FLUX_T5's sizes, `d_model` wide (the transformer's joint_attention_dim)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, **{**FLUX_T5, "d_model": d_model})).eval()


def vae(family: str) -> torch.nn.Module:
    """The tiny AutoencoderKL of `family`."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIGS[family]).eval()


def scheduler(family: str):
    """The family's usual scheduler: DDIM for SD1 (epsilon) and SD2 (v-prediction), Euler for SDXL, flow
    matching with resolution-dependent shift for Flux and with SD3's static shift 3.0 for SD3."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    if family == "sd3":
        return FlowMatchEulerDiscreteScheduler(shift=3.0)
    if family == "flux":
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)
    if family == "sdxl":
        return EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading")
    prediction = "v_prediction" if family == "sd2" else "epsilon"
    return DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, prediction_type=prediction)


def shared_models(family: str) -> dict[str, torch.nn.Module]:
    """Copies of builders_base's tiny models of `family` (the cached originals stay untouched)."""
    return {name: copy.deepcopy(model) for name, model in tiny_models(family).items()}


def tiny_pipeline(family: str):
    """The tiny, seeded diffusers pipeline of `family`, in memory."""
    import diffusers

    check_family(family)
    models = shared_models(family)
    torch.manual_seed(SEED)
    parts: dict[str, Any] = {"vae": vae(family), "scheduler": scheduler(family), "tokenizer": clip_tokenizer()}
    if family == "flux":
        parts["tokenizer_2"] = t5_tokenizer()
        parts["text_encoder"] = clip_text_model(FLUX_CLIP)
        parts["text_encoder_2"] = t5_encoder(len(parts["tokenizer_2"]))
    elif family == "sd3":
        parts["tokenizer_2"], parts["tokenizer_3"] = clip_tokenizer(), t5_tokenizer()
        parts["text_encoder"] = clip_text_model(SD3_CLIP_L, projection=True)
        parts["text_encoder_2"] = clip_text_model(SD3_CLIP_G, projection=True)
        parts["text_encoder_3"] = t5_encoder(len(parts["tokenizer_3"]), SD3_CONFIG["joint_attention_dim"])
    elif family == "sdxl":
        parts["tokenizer_2"] = clip_tokenizer()
        parts["add_watermarker"] = False
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return getattr(diffusers, PIPELINES[family])(**models, **parts)


def build_tiny_pipeline(folder: Path, family: str) -> Path:
    """Save the tiny `family` pipeline (sd1 | sd2 | sdxl | flux | sd3) into `folder`/tiny-<family>-pipeline and return
    that folder; `DiffusionPipeline.from_pretrained(path, local_files_only=True)` loads it."""
    path = Path(folder) / f"tiny-{family}-pipeline"
    tiny_pipeline(family).save_pretrained(path)
    return path


def denoiser_modules(family: str) -> dict[str, tuple[int, ...]]:
    """kohya names -> weight shapes of the denoiser layers a plain LoRA trains (attention, feed-forward, and for
    Flux and SD3 every Linear of their transformer blocks, in original fused naming)."""
    return {name: shape for name, shape in lora_lookups(family, "kohya").items() if name.startswith("lora_unet_")}


def write_pipeline_lora(pipeline: Path, family: str, out: Path, rank: int = 2, seed: int = 0,
                        strength: float = 0.3) -> Path:
    """A kohya LoRA (safetensors) on the denoiser of the tiny `family` pipeline at `pipeline`, written to `out`.

    The factors are seeded random normals (builders_lora draws them with standard deviation 0.3); the stored
    alpha, rank * (strength / 0.3) ** 2, makes the update the one factors of standard deviation `strength` give at
    alpha = rank. The header has sd-scripts' metadata with the family's `ss_base_model_version`.
    """
    check_family(family)
    index = json.loads((Path(pipeline) / "model_index.json").read_text())
    if index.get("_class_name") != PIPELINES[family]:
        raise ValueError(f"{pipeline} holds a {index.get('_class_name')}, not a {PIPELINES[family]}")
    alpha = rank * (strength / 0.3) ** 2
    write_kohya_lora(out, denoiser_modules(family), rank=rank, alpha=alpha, seed=seed,
                     metadata={"ss_base_model_version": KOHYA_VERSIONS[family]})
    return Path(out)
