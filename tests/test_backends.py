"""Backends: every model family behind one interface, checked against the model's own diffusers pipeline, and the
Dori attack end to end on tiny SD1, SD2, SDXL, Flux and SD3 pipelines (the audit and wen-eval too on SD3, whose
other families' runs are in tests/test_audit.py)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from builders_pipelines import build_tiny_pipeline, write_pipeline_lora
from diffmem.attack import DoriConfig, dori_attack, dori_search
from diffmem.attack.commands import register
from diffmem.backends import Conditioning, as_backend, open_backend, parse_dtype
from diffmem.backends.stable_diffusion import PIPELINE_CLASSES
from diffmem.backends.world import WorldBackend
from diffmem.cli import main
from diffmem.errors import DiffmemError
from diffmem.formats.safetensors_io import load_file
from diffmem.report import save_png
from diffmem.world.diffusion import generate
from diffmem.world.model import load_base

FAMILIES = ("sd1", "sd2", "sdxl", "flux", "sd3")
#: What each family adds to the text states (`Conditioning.added`), all of it searched by Dori but the time ids.
ADDED = {"sdxl": {"text_embeds", "time_ids"}, "flux": {"pooled_projections"}, "sd3": {"pooled_projections"}}
DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module", params=FAMILIES)
def pipeline(request, tmp_path_factory):
    """(family, pipeline folder, a LoRA for it) for each family, built once per module."""
    folder = tmp_path_factory.mktemp(request.param)
    path = build_tiny_pipeline(folder, request.param)
    return request.param, path, write_pipeline_lora(path, request.param, folder / "lora.safetensors")


def test_every_family_samples_trains_and_names_its_layers(pipeline):
    family, path, lora = pipeline
    backend = open_backend(path, lora)
    assert backend.family == family and backend.name.endswith("+ lora.safetensors")
    conditioning = backend.encode(["abc", "xyz"])
    assert len(conditioning) == 2 and conditioning.context.ndim == 3
    assert set(conditioning.added) == ADDED.get(family, set())
    images = backend.generate(conditioning, [3, 4], steps=2)
    assert images.shape == (2, 3, *backend.image_size) and 0 <= images.min() <= images.max() <= 1
    # Each image depends on its own seed only, not on the batch it was drawn in.
    torch.testing.assert_close(backend.generate(conditioning.rows(1, 2), [4], steps=2), images[1:])
    x0 = backend.encode_images(images)
    assert x0.shape == (2, *backend.sample_shape)
    losses = backend.denoising_loss(x0, conditioning, torch.Generator().manual_seed(0), reduce=False)
    assert losses.shape == (2,) and torch.isfinite(losses).all() and (losses > 0).all()
    again = backend.denoising_loss(x0, conditioning, torch.Generator().manual_seed(0), reduce=False)
    assert torch.equal(losses, again)
    assert backend.value_layers() and backend.feed_forward_layers()
    marker = "attn.add_v_proj" if family in ("flux", "sd3") else "attn2.to_v"
    assert all(name.endswith(marker) for name in backend.value_layers())
    if family == "sd3":
        # Every joint block's text values, the last (context_pre_only) block's included; not SD3.5's image-only
        # attn2; the image stream's feed-forward, not the text stream's ff_context.
        blocks = backend.denoiser.transformer.transformer_blocks
        assert blocks[-1].context_pre_only and blocks[0].attn2 is not None
        assert len(backend.value_layers()) == len(blocks) == len(backend.feed_forward_layers())
        assert not any("ff_context" in name for name in backend.feed_forward_layers())


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_generation_equals_the_diffusers_pipeline(tmp_path, family):
    """Same noise, same prompt: the backend's images are the pipeline's own, unconditional branch included. SD1 and
    SDXL with DDIM at guidance 7.5 (an encoded empty prompt for SD1, zeros for SDXL); SD3 with the pipeline's own
    flow-matching Euler scheduler at its defaults' guidance 7.0 (an encoded empty prompt, the unscaled timestep,
    no packing)."""
    path = build_tiny_pipeline(tmp_path, family)
    backend = open_backend(path)
    guidance = 7.0 if family == "sd3" else 7.5
    if family == "sd3":
        assert (backend.default_steps, backend.default_guidance) == (28, 7.0)
    ours = backend.generate(backend.encode(["abc"]), [5], steps=3, guidance=guidance)
    pipe = PIPELINE_CLASSES[family].from_pretrained(path, local_files_only=True)
    if family != "sd3":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    size = backend.image_size[0]
    theirs = pipe("abc", num_inference_steps=3, guidance_scale=guidance, height=size, width=size,
                  latents=backend.initial_noise([5]), output_type="pt").images
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=1e-4)


def test_sd3_trains_on_the_statically_shifted_flow(tmp_path):
    """SD3's loss: x_t = (1 - s) x_0 + s noise against the velocity noise - x_0, with s uniform and then shifted by
    the scheduler's static shift (3.0) as its sampling sigmas are, and the timestep s * 1000."""
    backend = open_backend(build_tiny_pipeline(tmp_path, "sd3"))
    shift = backend.scheduler.scheduler.config.shift
    assert shift == 3.0 and backend.scheduler.mu is None
    x0 = torch.randn(2, *backend.sample_shape, generator=torch.Generator().manual_seed(1))
    conditioning = backend.encode(["abc", "xyz"])
    loss = backend.denoising_loss(x0, conditioning, torch.Generator().manual_seed(2), reduce=False)
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(x0.shape, generator=generator)
    u = torch.rand((2,), generator=generator).clamp(1e-4, 1 - 1e-4)
    sigma = (shift * u / (1 + (shift - 1) * u)).view(-1, 1, 1, 1)
    prediction = backend.predict((1 - sigma) * x0 + sigma * noise, sigma.flatten() * 1000, conditioning)
    torch.testing.assert_close(loss, ((prediction - (noise - x0)) ** 2).flatten(1).mean(1))
    # The same shift as sampling's: the scheduler's sigmas are its evenly spaced grid (1 down to its sigma_min)
    # shifted by the same function.
    sampler = backend.sampler()
    sampler.set_timesteps(4)
    grid = torch.linspace(1, sampler.scheduler.sigma_min, 4, dtype=torch.float64)
    torch.testing.assert_close(sampler.scheduler.sigmas[:-1], backend.scheduler.shift(grid).float())


def test_v_prediction_trains_towards_the_velocity(tmp_path):
    """SD 2.x's 768-v models predict v: the loss is the error against the scheduler's velocity, not the noise."""
    backend = open_backend(build_tiny_pipeline(tmp_path, "sd2"))
    schedule = backend.training_schedule
    assert schedule.config.prediction_type == "v_prediction"
    x0 = torch.randn(2, *backend.sample_shape, generator=torch.Generator().manual_seed(1))
    conditioning = backend.encode(["abc", "xyz"])
    loss = backend.denoising_loss(x0, conditioning, torch.Generator().manual_seed(2), reduce=False)
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(x0.shape, generator=generator)
    steps = schedule.config.num_train_timesteps
    timesteps = (torch.rand((2,), generator=generator) * steps).long()
    prediction = backend.predict(schedule.add_noise(x0, noise, timesteps), timesteps, conditioning)
    velocity = schedule.get_velocity(x0, noise, timesteps)
    torch.testing.assert_close(loss, ((prediction - velocity) ** 2).flatten(1).mean(1))
    assert not torch.allclose(loss, ((prediction - noise) ** 2).flatten(1).mean(1))


@pytest.mark.parametrize("family", ["sd1", "flux"])
def test_heldout_loss_compares_models_on_the_same_noisy_inputs(tmp_path, family):
    """Fixed noise and stratified levels: the same number twice and whatever the batch, a changed denoiser
    changes it, and it is the mean of the per-sample losses at those inputs."""
    backend = open_backend(build_tiny_pipeline(tmp_path, family))
    x0 = torch.randn(3, *backend.sample_shape, generator=torch.Generator().manual_seed(1))
    conditioning = backend.encode(["abc", "xyz", "abc"])
    loss = backend.heldout_loss(x0, conditioning, levels_per_sample=4, seed=7)
    assert loss == pytest.approx(backend.heldout_loss(x0, conditioning, levels_per_sample=4, seed=7, batch_size=5))
    assert loss != pytest.approx(backend.heldout_loss(x0, conditioning, levels_per_sample=4, seed=8))
    with torch.no_grad():
        next(backend.denoiser.parameters()).mul_(1.5)
    assert loss != pytest.approx(backend.heldout_loss(x0, conditioning, levels_per_sample=4, seed=7))
    with pytest.raises(ValueError, match="one conditioning row per sample"):
        backend.heldout_loss(x0, conditioning.rows(0, 2))


def test_the_world_backend_is_the_world():
    """The world backend samples with the world's own functions: identical images to `diffmem.world.generate`."""
    unet = load_base()
    backend = as_backend(unet)
    assert isinstance(backend, WorldBackend) and as_backend(backend) is backend
    prompts = ["a photo of a cat", "a red circle"]
    ours = backend.generate(backend.encode(prompts), [0, 1], steps=3)
    assert torch.equal(ours, generate(unet, prompts, [0, 1], steps=3))
    assert open_backend("world").family == "world"


def test_bad_dtype_and_missing_base_are_one_line_errors(tmp_path):
    with pytest.raises(DiffmemError, match="--dtype must be one of"):
        parse_dtype("float64")
    with pytest.raises(DiffmemError, match="no such model file or folder"):
        open_backend(tmp_path / "missing")


def run_dori_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["attack", "dori", *argv])
    return args.handler(args)


def test_dori_searches_each_pipelines_whole_conditioning(pipeline, tmp_path):
    """`diffmem attack dori --base PIPELINE --lora L` end to end: the target is resized to the model's size, the
    text states and (SDXL, Flux, SD3) the pooled embedding move, SDXL's time ids stay, and the files are written."""
    family, path, lora = pipeline
    target = tmp_path / "target.png"
    save_png(torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(0)), target)
    out = tmp_path / "dori"
    code = run_dori_cli("--base", str(path), "--lora", str(lora), "--target", str(target), "--prompt", "abc",
                        "--distance-threshold", "0.2", "--steps", "3", "--batch-size", "2", "--generations", "2",
                        "--sample-steps", "2", "--out", str(out))
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["family"] == family and summary["target_resized_from"] == [24, 24]
    assert len(summary["losses"]) == 3 and summary["embedding_shift"] > 0
    tensors, _ = load_file(out / "embedding.safetensors")
    searched = sorted(ADDED.get(family, set()) - {"time_ids"})
    for key in ["", *(f".{name}" for name in searched)]:
        assert not torch.equal(tensors[f"embedding{key}"], tensors[f"start{key}"]), key
    if family == "sdxl":
        assert torch.equal(tensors["embedding.time_ids"], tensors["start.time_ids"])
    assert (out / "generations.png").is_file()


def test_audit_and_wen_eval_cli_on_a_tiny_sd3_pipeline(tmp_path, capsys):
    """`diffmem audit` and `diffmem wen-eval` with `--base SD3 --lora L` end to end: the LoRA is merged, every
    prompt gets a positive Wen score (the conditional minus unconditional velocity), the files are written."""
    path = build_tiny_pipeline(tmp_path, "sd3")
    lora = write_pipeline_lora(path, "sd3", tmp_path / "sd3.safetensors")
    prompts, held_out = tmp_path / "prompts.txt", tmp_path / "held.txt"
    prompts.write_text("abc\nxyz\n")
    held_out.write_text("red\nsky\n")
    out = tmp_path / "audit"
    assert main(["audit", "--base", str(path), "--lora", str(lora), "--prompts", str(prompts), "--generations", "1",
                 "--steps", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "tiny-sd3-pipeline + sd3.safetensors" and summary["prompts"] == 2
    assert summary["mean_wen_score"] > 0 and (out / "report.html").is_file()
    scores = tmp_path / "wen.json"
    assert main(["wen-eval", "--base", str(path), "--lora", str(lora), "--memorized", str(prompts), "--held-out",
                 str(held_out), "--generations", "1", "--steps", "2", "--json-out", str(scores)]) == 0
    result = json.loads(scores.read_text())
    assert (result["memorized"], result["held_out"]) == (2, 2) and 0 <= result["all_steps"]["auc"] <= 1


def test_dori_refuses_a_conditioning_of_another_model(tmp_path):
    backend = open_backend(build_tiny_pipeline(tmp_path, "sdxl"))
    target = torch.rand(1, 3, *backend.image_size)
    wrong = Conditioning(backend.encode(["abc"]).context)  # no pooled embedding
    with pytest.raises(DiffmemError, match="lacks text_embeds, time_ids"):
        dori_search(backend, target, wrong, DoriConfig(steps=1, batch_size=1))
    result = dori_attack(backend, target, "abc", DoriConfig(steps=2, batch_size=1, start="random"))
    assert len(result.losses) == 2 and set(result.conditioning.added) == {"text_embeds", "time_ids"}


def test_backends_page_example(tmp_path, monkeypatch, capsys):
    """The Python example of docs/backends.md runs as written on a tiny Flux pipeline of the name it uses."""
    monkeypatch.chdir(tmp_path)
    build_tiny_pipeline(tmp_path, "flux").rename(tmp_path / "flux-pipeline")
    (block,) = re.findall(r"```python\n(.*?)```", DOCS.joinpath("backends.md").read_text(), flags=re.S)
    exec(compile(block, "docs/backends.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "flux (1, 3, 16, 16) 3 Dori steps"


def test_a_device_this_torch_lacks_is_one_line(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("abc\n")
    with pytest.raises(DiffmemError, match="is not a torch device"):
        open_backend("world", device="gpu0")
    if not torch.cuda.is_available():
        assert main(["audit", "--base", "world", "--prompts", str(prompts), "--device", "cuda",
                     "--out", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no usable CUDA device" in err[0] and not (tmp_path / "out").exists()
