"""A tiny random Stable Diffusion pipeline, a kohya LoRA for it and a probe manifest, written with nothing
downloaded, so that `diffmem bench-real` can be tried end to end in about a minute on a CPU:

    python -m diffmem.bench.real_example runs/tiny-sd
    diffmem bench-real --base runs/tiny-sd/pipeline --lora runs/tiny-sd/lora.safetensors \\
        --probe runs/tiny-sd/probe/probe.json --out runs/tiny-sd/bench --steps 2

The pipeline has the Stable Diffusion 1.x architecture (cross-attention UNet, KL autoencoder, CLIP text encoder
and BPE tokenizer) at toy widths (16 x 16 images), with random weights: its images are noise patterns, and the
numbers it gives check the machinery, not BAF. Its suspected images are the LoRA's own first generations at the
benchmark's first seed, so the LoRA as given reproduces them exactly and the base does not.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from diffmem.errors import DiffmemError
from diffmem.formats.lora import lora_from_factors, write_lora
from diffmem.formats.names import kohya_name
from diffmem.report import save_png

SUSPECTED_CAPTIONS = ("a photo of sks person", "a painting of a red house")
HELDOUT_CAPTIONS = ("a photo of a dog", "a photo of a blue car")
#: sd-scripts' header keys a front-end reads to tell which base the LoRA is for.
KOHYA_METADATA = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1",
                  "ss_output_name": "tiny-example"}


def tiny_tokenizer(folder: Path, model_max_length: int = 32):
    """A CLIP BPE tokenizer whose vocabulary is the single letters (no merges), its files written into `folder`."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length)


def tiny_pipeline(folder: Path, seed: int = 0):
    """A randomly initialised `StableDiffusionPipeline` with SD 1.x block types at toy widths (8 x 8 latents,
    16 x 16 images), saved into `folder` with `save_pretrained` and returned."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory() as scratch:  # save_pretrained below copies it into the pipeline
        tokenizer = tiny_tokenizer(Path(scratch))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return pipe


def tiny_kohya_lora(pipe, rank: int = 4, seed: int = 0, strength: float = 0.3):
    """A kohya LoRA (`lora_unet_…` / `lora_te_…`, alpha = rank) on every attention Linear of the UNet and every
    Linear of the text encoder's layers, with seeded random factors of standard deviation `strength`."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for prefix, model, part in (("lora_unet", pipe.unet, "attentions"), ("lora_te", pipe.text_encoder, "layers")):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and part in name:
                out_features, in_features = module.weight.shape
                factors[kohya_name(prefix, name)] = (
                    torch.randn(out_features, rank, generator=generator) * strength,
                    torch.randn(rank, in_features, generator=generator) * strength,
                )
    return lora_from_factors(factors, "kohya", alpha=float(rank), metadata=KOHYA_METADATA)


def write_example(folder: str | Path, steps: int = 2, guidance: float = 7.5, seed: int = 0) -> dict[str, Path]:
    """Write ``pipeline/``, ``lora.safetensors`` and ``probe/`` (probe.json and its images) into `folder`.

    The suspected images are the LoRA's generations of their captions at `seed` with `steps` DDIM steps and
    `guidance` (the benchmark's first generation of each caption with the same settings); the references and the
    held-out images are the base's generations at other seeds. Returns the three paths."""
    from diffmem.bench.real import RealBenchSettings, generate_images, load_bench_model, load_lora_weights

    folder = Path(folder)
    pipe_folder, lora_path, probe = folder / "pipeline", folder / "lora.safetensors", folder / "probe"
    for path in (pipe_folder, lora_path, probe):
        if path.exists():
            raise DiffmemError("exists already; choose an empty folder for the example", path)
    tiny_pipeline(pipe_folder, seed)
    model = load_bench_model(pipe_folder, torch.device("cpu"))
    write_lora(tiny_kohya_lora(model.pipe, seed=seed), lora_path)
    settings = RealBenchSettings(steps=steps, guidance=guidance, seed=seed)
    base_images = generate_images(model, [*SUSPECTED_CAPTIONS, *HELDOUT_CAPTIONS],
                                  [seed + 100 + i for i in range(4)], settings)
    load_lora_weights(model.pipe, lora_path, "example")
    suspected = generate_images(model, SUSPECTED_CAPTIONS, [seed] * len(SUSPECTED_CAPTIONS), settings)
    manifest: dict[str, list] = {"suspected": [], "references": [], "heldout": []}
    for index, (caption, image) in enumerate(zip(SUSPECTED_CAPTIONS, suspected)):
        name = f"train/suspected-{index}.png"
        save_png(image, probe / name)
        manifest["suspected"].append({"image": name, "caption": caption})
    for index, image in enumerate(base_images[:2]):
        save_png(image, probe / f"train/reference-{index}.png")
        manifest["references"].append(f"train/reference-{index}.png")
    for index, (caption, image) in enumerate(zip(HELDOUT_CAPTIONS, base_images[2:])):
        save_png(image, probe / f"heldout/{index}.png")
        manifest["heldout"].append({"image": f"heldout/{index}.png", "caption": caption})
    (probe / "probe.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return {"base": pipe_folder, "lora": lora_path, "probe": probe / "probe.json"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where to write pipeline/, lora.safetensors and probe/")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps of the suspected images (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        paths = write_example(args.folder, steps=args.steps)
    except DiffmemError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
