"""The tiny pipelines of tests/builders_pipelines.py: each reloads offline, generates, opens as a base of its family,
and the LoRA written for it resolves on it (and, for the UNet families, loads into diffusers and changes images)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from builders_pipelines import FAMILIES, IMAGE_SIZE, build_tiny_pipeline, write_pipeline_lora
from diffmem.formats.base import open_base, resolve_targets
from diffmem.formats.lora import read_lora

torch.set_num_threads(1)
CLIP = ("CLIPTextModel", "CLIPTokenizer")
CLIP_PROJECTION = "CLIPTextModelWithProjection"
EXPECTED_CLASSES = {
    "sd1": ("StableDiffusionPipeline", {"unet": "UNet2DConditionModel", "text_encoder": CLIP[0],
                                        "tokenizer": CLIP[1], "scheduler": "DDIMScheduler"}),
    "sdxl": ("StableDiffusionXLPipeline", {"unet": "UNet2DConditionModel", "text_encoder": CLIP[0],
                                           "tokenizer": CLIP[1], "text_encoder_2": "CLIPTextModelWithProjection",
                                           "tokenizer_2": CLIP[1], "scheduler": "EulerDiscreteScheduler"}),
    "flux": ("FluxPipeline", {"transformer": "FluxTransformer2DModel", "text_encoder": CLIP[0],
                              "tokenizer": CLIP[1], "text_encoder_2": "T5EncoderModel",
                              "scheduler": "FlowMatchEulerDiscreteScheduler"}),
    "sd3": ("StableDiffusion3Pipeline", {"transformer": "SD3Transformer2DModel", "text_encoder": CLIP_PROJECTION,
                                         "tokenizer": CLIP[1], "text_encoder_2": CLIP_PROJECTION,
                                         "tokenizer_2": CLIP[1], "text_encoder_3": "T5EncoderModel",
                                         "scheduler": "FlowMatchEulerDiscreteScheduler"}),
}
EXPECTED_CLASSES["sd2"] = EXPECTED_CLASSES["sd1"]
DENOISER = {"sd1": "unet", "sd2": "unet", "sdxl": "unet", "flux": "transformer", "sd3": "transformer"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Each family's pipeline folder, built once for the module."""
    root = tmp_path_factory.mktemp("pipelines")
    return {family: build_tiny_pipeline(root, family) for family in FAMILIES}


def load(path: Path):
    """The pipeline at `path`, loaded offline, progress bar off."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe) -> torch.Tensor:
    """Two seeded steps at the tiny image size, as a [1, 3, H, W] tensor."""
    return pipe("a red square", num_inference_steps=2, output_type="pt", height=IMAGE_SIZE, width=IMAGE_SIZE,
                generator=torch.Generator().manual_seed(0)).images


def file_hashes(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder`."""
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_reloads_offline_with_the_real_classes_and_generates(built, family):
    from transformers import T5TokenizerFast

    pipe = load(built[family])
    pipeline_class, components = EXPECTED_CLASSES[family]
    assert type(pipe).__name__ == pipeline_class
    assert {name: type(pipe.components[name]).__name__ for name in components} == components
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    if family == "flux":
        assert isinstance(pipe.tokenizer_2, T5TokenizerFast)  # transformers 5 names the class T5Tokenizer
        assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
        assert not pipe.vae.config.use_quant_conv and not pipe.vae.config.use_post_quant_conv
    elif family == "sd3":
        assert isinstance(pipe.tokenizer_3, T5TokenizerFast)
        assert pipe.transformer.config.in_channels == pipe.vae.config.latent_channels  # no packing
        assert not pipe.vae.config.use_quant_conv and not pipe.vae.config.use_post_quant_conv
        assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
        # encode_prompt's shape rules: both CLIPs' states fit T5's width (zero-padded to it), the projections
        # side by side are the pooled embedding.
        clips = (pipe.text_encoder.config, pipe.text_encoder_2.config)
        assert sum(c.hidden_size for c in clips) <= pipe.text_encoder_3.config.d_model == \
            pipe.transformer.config.joint_attention_dim
        assert sum(c.projection_dim for c in clips) == pipe.transformer.config.pooled_projection_dim
        embeds, _, pooled, _ = pipe.encode_prompt("abc", None, None, do_classifier_free_guidance=False)
        assert embeds.shape == (1, pipe.tokenizer.model_max_length + 256, pipe.text_encoder_3.config.d_model)
        assert pooled.shape == (1, pipe.transformer.config.pooled_projection_dim)
    else:
        assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size + (
            pipe.text_encoder_2.config.hidden_size if family == "sdxl" else 0)
    if family == "sd2":
        assert pipe.scheduler.config.prediction_type == "v_prediction"
    image = generate(pipe)
    assert image.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_opens_as_a_base_of_its_family_and_its_lora_resolves(built, family, tmp_path):
    base = open_base(built[family])
    assert (base.family, base.layout) == (family, "diffusers_folder")
    lora = read_lora(write_pipeline_lora(built[family], family, tmp_path / "lora.safetensors"))
    assert lora.format == "kohya" and lora.modules
    lookups = {name: (module.lookup, tuple(module.weight_shape)) for name, module in lora.modules.items()}
    targets = resolve_targets(lookups, base, lora.path, metadata=lora.metadata)
    assert set(targets) == set(lora.modules)
    assert {target.module.split(".", 1)[0] for target in targets.values()} == {DENOISER[family]}
    assert any("attn" in name for name in lora.modules)
    for module in lora.modules.values():
        up, down = module.factors()
        assert module.rank == 2 and up.std() > 0.05 and down.std() > 0.05, module.name


def test_lora_strength_scales_the_update_and_the_seed_changes_it(built, tmp_path):
    path = built["sd1"]
    plain = read_lora(write_pipeline_lora(path, "sd1", tmp_path / "a.safetensors"))
    strong = read_lora(write_pipeline_lora(path, "sd1", tmp_path / "b.safetensors", strength=0.6))
    other = read_lora(write_pipeline_lora(path, "sd1", tmp_path / "c.safetensors", seed=1))
    name = next(iter(plain.modules))
    torch.testing.assert_close(strong.modules[name].delta(), 4 * plain.modules[name].delta())
    assert not torch.allclose(other.modules[name].delta(), plain.modules[name].delta())
    assert plain.metadata["ss_base_model_version"] == "sd_v1"


def test_lora_for_another_family_is_refused(built, tmp_path):
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline"):
        write_pipeline_lora(built["sdxl"], "sd1", tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match="no tiny pipeline"):
        build_tiny_pipeline(tmp_path, "sd4")


# diffusers' kohya Flux converter hardcodes full-size widths (3072), so only the UNet families load this way.
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_lora_loads_into_diffusers_and_changes_the_image(built, family, tmp_path):
    pipe = load(built[family])
    before = generate(pipe)
    pipe.load_lora_weights(str(write_pipeline_lora(built[family], family, tmp_path / "lora.safetensors")))
    after = generate(pipe)
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_the_same_bytes_come_out_every_build(built, family, tmp_path):
    assert file_hashes(build_tiny_pipeline(tmp_path, family)) == file_hashes(built[family])
