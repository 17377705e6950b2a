"""Timings of `audit` and `attack dori` on SDXL and Flux, on a GPU and on the CPU (docs/backends.md, "Speed").

Two tiers, each stage timed on its own, results as JSON (one object per stage):

- tiny: the test suite's tiny random SDXL and Flux pipelines (`tests/builders_pipelines.py`) with a LoRA, run
  through the command line exactly as a user runs it (`diffmem audit`, `diffmem attack dori`), with `--device
  cuda` and `--device cpu`. This checks that the commands run on a GPU; at these sizes the times are start-up and
  kernel-launch overhead, not model cost.
- full: SDXL and FLUX.1-dev at their released sizes and native 1024 x 1024 resolution (configs from
  `benchmarks/real_shapes.py`; text encoders CLIP-L, OpenCLIP-G and T5-XXL at their sizes), random weights in
  bfloat16 built on the GPU, driven through the same backends the commands use. Timing depends on shapes, not
  values. Settings are smaller than the defaults so the run fits a short GPU lease; they are written beside each
  time.

Usage (needs a CUDA GPU for the GPU rows; `--tiers tiny` alone also runs on a CPU):

    PYTHONPATH=src:tests python benchmarks/backends_gpu.py --out backends_gpu.json [--tiers tiny,full]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from real_shapes import FLUX_TRANSFORMER, SDXL_UNET

from builders_pipelines import (
    build_tiny_pipeline,
    clip_tokenizer,
    t5_tokenizer,
    write_pipeline_lora,
)
from diffmem.attack import DoriConfig, run_dori
from diffmem.audit import AuditConfig, run_audit
from diffmem.cli import main
from diffmem.metrics.copy import CopyConfig
from diffmem.report import save_png
from diffmem.world.check import CheckSettings

CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768}
CLIP_G = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
          "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280}
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32, "is_gated_act": True}
VAE = {"in_channels": 3, "out_channels": 3, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
       "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
       "sample_size": 1024}


def timed(rows: list[dict], stage: str, function, **settings) -> object:
    """Run `function`, append {stage, seconds, settings} (or the error) to `rows`, print it, return the result."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    row: dict = {"stage": stage, **settings}
    result = None
    try:
        result = function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        row["seconds"] = round(time.perf_counter() - began, 3)
        if isinstance(result, int) and result != 0:  # a command's exit status
            row["error"] = f"exit status {result}"
        if torch.cuda.is_available():
            row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    except Exception as error:  # a stage that fails (e.g. out of memory) is a result too
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    rows.append(row)
    print(json.dumps(row), flush=True)
    return result


def tiny_tier(rows: list[dict], devices: list[str]) -> None:
    """The CLI on tiny SDXL and Flux pipelines with a LoRA, per device."""
    work = Path(tempfile.mkdtemp())
    prompts = work / "prompts.txt"
    prompts.write_text("abc\nxyz\n")
    target = work / "target.png"
    save_png(torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)), target)
    for family in ("sdxl", "flux"):
        folder = build_tiny_pipeline(work, family)
        lora = write_pipeline_lora(folder, family, work / f"{family}.safetensors")
        for device in devices:
            common = ["--base", str(folder), "--lora", str(lora), "--device", device]
            audit = ["audit", *common, "--prompts", str(prompts), "--generations", "2", "--out",
                     str(work / f"audit-{family}-{device}")]
            timed(rows, f"tiny {family} audit", partial(main, audit), device=device, family=family, prompts=2,
                  generations=2, steps="model default")
            dori = ["attack", "dori", *common, "--target", str(target), "--prompt", "abc", "--distance-threshold",
                    "0.1", "--out", str(work / f"dori-{family}-{device}")]
            timed(rows, f"tiny {family} attack dori", partial(main, dori), device=device, family=family,
                  dori_steps=50, batch_size=8, generations=8, sample_steps="model default")


def on_device(device: str, dtype: torch.dtype, build):
    """`build()` with new tensors created on `device` in `dtype` (no CPU copy of billions of weights first)."""
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return build()
    finally:
        torch.set_default_dtype(torch.float32)


def full_sdxl(device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """StableDiffusionXLPipeline at SDXL's released sizes, random weights on `device`."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text(config, cls):
        return cls(CLIPTextConfig(**config, bos_token_id=0, eos_token_id=1, pad_token_id=1))

    models = on_device(device, dtype, lambda: {
        "vae": AutoencoderKL(**VAE, latent_channels=4, scaling_factor=0.13025),
        "text_encoder": text(CLIP_L, CLIPTextModel), "text_encoder_2": text(CLIP_G, CLIPTextModelWithProjection),
        "unet": UNet2DConditionModel(**SDXL_UNET)})
    return StableDiffusionXLPipeline(
        **models, tokenizer=clip_tokenizer(77), tokenizer_2=clip_tokenizer(77), add_watermarker=False,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))


def full_flux(device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """FluxPipeline at FLUX.1-dev's released sizes, random weights on `device`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    models = on_device(device, dtype, lambda: {
        "vae": AutoencoderKL(**VAE, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                             use_quant_conv=False, use_post_quant_conv=False),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L, bos_token_id=0, eos_token_id=1, pad_token_id=1)),
        "text_encoder_2": T5EncoderModel(T5Config(**T5_XXL)),
        "transformer": FluxTransformer2DModel(**FLUX_TRANSFORMER)})
    return FluxPipeline(
        **models, tokenizer=clip_tokenizer(77), tokenizer_2=t5_tokenizer(512),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096))


#: Settings of the full-size runs, smaller than the commands' defaults so both fit a short GPU lease.
FULL_SETTINGS = {"sdxl": {"generations": 2, "steps": 30, "dori_steps": 10, "dori_batch": 4, "judge": 2},
                 "flux": {"generations": 1, "steps": 28, "dori_steps": 5, "dori_batch": 2, "judge": 1}}


def full_family(rows: list[dict], family: str) -> None:
    """Build one full-size pipeline, then time an audit of one prompt and a Dori attack on its first image."""
    from diffmem.backends.flux import FluxBackend
    from diffmem.backends.stable_diffusion import StableDiffusionBackend

    s = FULL_SETTINGS[family]
    pipe = timed(rows, f"full {family} build (random weights)", full_sdxl if family == "sdxl" else full_flux,
                 family=family, dtype="bfloat16")
    if pipe is None:
        return
    pipe.set_progress_bar_config(disable=True)
    backend = (StableDiffusionBackend(pipe, "SDXL (random weights)", "sdxl") if family == "sdxl"
               else FluxBackend(pipe, "FLUX.1-dev (random weights)"))
    config = AuditConfig(generations=s["generations"], num_inference_steps=s["steps"], batch_size=4,
                         embedding_test=False)
    audit = timed(rows, f"full {family} audit", partial(run_audit, backend, ["abc"], config), family=family,
                  resolution=backend.image_size[0], prompts=1, generations=s["generations"], steps=s["steps"])
    if audit is None:
        return
    dori = DoriConfig(steps=s["dori_steps"], batch_size=s["dori_batch"])
    judge = CheckSettings(generations=s["judge"], steps=s["steps"], guidance=backend.default_guidance)
    timed(rows, f"full {family} attack dori",
          partial(run_dori, backend, audit.images[0, :1], "abc", dori, None, judge, CopyConfig(distance_threshold=0.1)),
          family=family, resolution=backend.image_size[0], dori_steps=s["dori_steps"], batch_size=s["dori_batch"],
          judge_generations=s["judge"], judge_steps=s["steps"], note="judge runs twice: start and result")


def full_tier(rows: list[dict], families: list[str]) -> None:
    """Audit and Dori through the backends on full-size SDXL and Flux at 1024 x 1024 (random bf16 weights)."""
    for family in families:
        full_family(rows, family)
        torch.cuda.empty_cache()  # the family's pipeline is gone with full_family's frame


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file of the timings")
    parser.add_argument("--tiers", default="tiny,full", help="tiny, full or both (default both)")
    parser.add_argument("--full-families", default="sdxl,flux", help="full-size families (default sdxl,flux)")
    args = parser.parse_args()
    rows: list[dict] = []
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    tiers = args.tiers.split(",")
    if "tiny" in tiers:
        tiny_tier(rows, devices)
    if "full" in tiers and torch.cuda.is_available():
        full_tier(rows, args.full_families.split(","))
    machine = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "cpu_threads": torch.get_num_threads()}
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
