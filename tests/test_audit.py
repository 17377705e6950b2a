"""The audit: pure scoring, file handling, the Stable Diffusion path on a tiny random pipeline, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from builders_lora import write_kohya_lora, write_lycoris
from builders_metrics import tiny_sd_pipeline_folder
from builders_pipelines import build_tiny_pipeline, write_pipeline_lora
from diffmem.audit import (
    AuditConfig,
    AuditResult,
    audit_files,
    flag_by_wen,
    load_image_folder,
    load_prompts,
    robust_z_scores,
    run_audit,
    score_prompts,
    wen_scores_of,
    write_audit,
)
from diffmem.backends import Conditioning, open_backend
from diffmem.backends.stable_diffusion import load_pipeline
from diffmem.cli import main
from diffmem.errors import DiffmemError, FileFormatError


def test_robust_z_by_hand():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    # median 3, absolute deviations 2 1 0 1 97 -> MAD 1
    assert robust_z_scores(values).tolist() == pytest.approx([-1.349, -0.6745, 0, 0.6745, 0.6745 * 97])
    assert flag_by_wen(values, AuditConfig()).tolist() == [False, False, False, False, True]
    assert flag_by_wen(values, AuditConfig(wen_threshold=3.5)).tolist() == [False, False, False, True, True]
    assert robust_z_scores(torch.ones(4)).tolist() == [0, 0, 0, 0]


def make_generations():
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(6, 3, 16, 16, generator=gen)
    memorized = (train[4] + 0.01 * torch.randn(4, 3, 16, 16, generator=gen)).clamp(0, 1)
    memorized[3] = torch.rand(3, 16, 16, generator=gen)  # one of four generations is novel
    novel = torch.rand(4, 3, 16, 16, generator=gen)
    return torch.stack([memorized, novel]), train


def test_score_prompts_with_training_images():
    images, train = make_generations()
    names = [f"img{i}.png" for i in range(6)]
    rows = score_prompts(["dup", "held"], images, torch.tensor([5.0, 1.0]), torch.tensor([6.0, 2.0]), AuditConfig(),
                         train, names)
    assert [r.flagged for r in rows] == [True, False]
    assert rows[0].nearest_train == "img4.png" and rows[0].copy_fraction == 0.75
    assert rows[0].largest_group == 3 and rows[1].largest_group == 1
    assert rows[0].extracted and not rows[1].extracted
    assert rows[0].copy_distance < 0.05 < rows[1].copy_distance
    strict = score_prompts(["dup"], images[:1], torch.ones(1), torch.ones(1), AuditConfig(copy_fraction=0.9), train,
                           names)
    assert not strict[0].flagged


def test_write_audit_files(tmp_path):
    images, train = make_generations()
    config = AuditConfig(generations=4)
    rows = score_prompts(["dup", "held"], images, torch.tensor([5.0, 1.0]), torch.tensor([6.0, 2.0]), config, train,
                         ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"])
    result = AuditResult(model="m", rows=rows, images=images, config=config, train_images=train,
                         train_names=["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"])
    paths = write_audit(result, tmp_path / "out")
    summary = json.loads(paths["summary.json"].read_text())
    assert summary["flagged_prompts"] == ["dup"] and summary["copy_rate"] == pytest.approx(0.375)
    assert summary["extracted_prompts"] == 1
    assert paths["table.csv"].read_text().splitlines()[1].startswith("dup,yes,5.0,6.0,3,yes,")
    assert paths["table.csv"].read_text().splitlines()[0].endswith("nearest_train,embedding_cosine")
    page = paths["report.html"].read_text()
    # two generation grids, two nearest training images, the score plot
    assert page.count("data:image/png;base64,") == 5 and "Wen score per prompt" in page
    assert "e.png" in page and "http" not in page.replace("https://", "")  # self-contained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("x\n")
    with pytest.raises(DiffmemError, match="refusing to overwrite the input"):
        write_audit(result, tmp_path, protect=[tmp_path / "table.csv"])


def test_prompt_and_image_loading_errors(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# comment\n a red cat \n\nblue sky\n")
    assert load_prompts(path) == ["a red cat", "blue sky"]
    path.write_text("# only a comment\n")
    with pytest.raises(FileFormatError, match="no prompts"):
        load_prompts(path)
    with pytest.raises(DiffmemError, match="no such"):
        load_prompts(tmp_path / "missing.txt")
    folder = tmp_path / "imgs"
    folder.mkdir()
    with pytest.raises(FileFormatError, match="no images"):
        load_image_folder(folder)
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(folder / "b.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "a.png")  # greyscale, smaller
    with pytest.raises(FileFormatError, match="different sizes"):
        load_image_folder(folder)
    images, names = load_image_folder(folder, size=(8, 8))
    assert names == ["a.png", "b.png"] and images.shape == (2, 3, 8, 8)
    assert images[1].min() == 1.0 and images[0].max() == 0.0
    (folder / "c.png").write_bytes(b"not a png")
    with pytest.raises(FileFormatError, match="not a readable image"):
        load_image_folder(folder, size=(8, 8))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return tiny_sd_pipeline_folder(tmp_path_factory.mktemp("sd"))


@pytest.mark.slow
def test_stable_diffusion_path_on_a_tiny_pipeline(sd_folder):
    model = open_backend(sd_folder)
    assert model.sample_shape == (4, 8, 8) and model.image_size == (16, 16)
    config = AuditConfig(generations=2, num_inference_steps=2, batch_size=3)
    result = run_audit(model, ["a red cat", "blue sky", "cat"], config)
    assert result.images.shape == (3, 2, 3, 16, 16)
    assert result.images.min() >= 0 and result.images.max() <= 1
    again = run_audit(model, ["a red cat", "blue sky", "cat"], config)
    assert [r.wen_score for r in again.rows] == pytest.approx([r.wen_score for r in result.rows])
    assert all(r.wen_score > 0 for r in result.rows)


def test_cli_audit_on_a_tiny_pipeline(sd_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\nblue sky\n")
    train = tmp_path / "train"
    train.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(train / f"{i}.png")
    out = tmp_path / "out"
    code = main(["audit", "--base", str(sd_folder), "--prompts", str(prompts), "--train-images", str(train),
                 "--generations", "2", "--steps", "2", "--out", str(out)])
    assert code == 0
    assert "audited 2 prompts" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["training_images"] == 3 and summary["prompts"] == 2
    assert main(["audit", "--base", str(tmp_path / "nope"), "--prompts", str(prompts)]) == 1


def test_audit_files_refuses_to_write_over_inputs(sd_folder, tmp_path):
    prompts = tmp_path / "table.csv"
    prompts.write_text("a red cat\n")
    with pytest.raises(DiffmemError):
        audit_files(sd_folder, prompts, tmp_path, config=AuditConfig(generations=1, num_inference_steps=1),
                    progress=False)
    assert prompts.read_text() == "a red cat\n"


def test_wen_eval_command_on_a_tiny_pipeline(sd_folder, tmp_path, capsys):
    memorized, held_out = tmp_path / "m.txt", tmp_path / "h.txt"
    memorized.write_text("a red cat\nred\n")
    held_out.write_text("blue sky\nsky\nblue\n")
    out = tmp_path / "wen.json"
    assert main(["wen-eval", "--base", str(sd_folder), "--memorized", str(memorized), "--held-out", str(held_out),
                 "--generations", "1", "--steps", "2", "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["memorized"] == 2 and result["held_out"] == 3
    auc = result["all_steps"]["auc"]
    assert 0 <= auc <= 1 and f"ROC AUC {auc:.3f}" in printed
    # with 3 held-out prompts, FPR <= 1% admits no false positive at all
    assert result["all_steps"]["tpr_at_0.01_fpr"] in (0.0, 0.5, 1.0)


@pytest.mark.slow
def test_world_sampling_matches_world_generate():
    """The audit samples the world through the scheduler interface; it must produce the world's own images."""
    from diffmem.backends.world import WorldDDIMScheduler
    from diffmem.metrics.wen import WenConfig, sample_with_wen_scores
    from diffmem.world.diffusion import generate
    from diffmem.world.model import UNetConfig, build_unet
    from diffmem.world.text import encode_prompts

    torch.manual_seed(0)
    unet = build_unet(UNetConfig(block_out_channels=(16, 32, 32), attention_head_dim=8, norm_num_groups=8)).eval()
    reference = generate(unet, ["a red circle"], seeds=[7], steps=5, guidance=3.0)
    trace = sample_with_wen_scores(
        unet, WorldDDIMScheduler(), encode_prompts(["a red circle"]), encode_prompts([""]),
        WenConfig(num_inference_steps=5, guidance_scale=3.0, generations=1), torch.Generator().manual_seed(7),
    )
    torch.testing.assert_close(((trace.samples[0] + 1) / 2).clamp(0, 1), reference, atol=1e-5, rtol=0)


def test_cli_audit_of_a_world_unet_with_a_manifest(tmp_path, capsys):
    """The world path end to end: a (tiny, untrained) world UNet file and a fine-tune manifest."""
    from diffmem.formats.safetensors_io import save_file
    from diffmem.world.data import faces_dataset
    from diffmem.world.model import UNetConfig, build_unet, unet_metadata, unet_tensors

    torch.manual_seed(0)
    config = UNetConfig(block_out_channels=(16, 32, 32), attention_head_dim=8, norm_num_groups=8)
    unet_file = save_file(unet_tensors(build_unet(config)), tmp_path / "tiny_world.safetensors", unet_metadata(config))
    faces = faces_dataset("all")
    record = lambda rows: [{"id": faces.ids[r], "caption": faces.captions[r]} for r in rows]  # noqa: E731
    manifest = tmp_path / "lora.json"
    manifest.write_text(json.dumps({"data": "faces", "duplicated": record([0, 1]), "seen_once": record([2, 3, 4]),
                                    "heldout": record([80, 81, 82])}))
    out = tmp_path / "out"
    assert main(["audit", "--base", str(unet_file), "--manifest", str(manifest), "--generations", "2",
                 "--steps", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts"] == 5 and summary["training_images"] == 5
    assert summary["config"]["guidance_scale"] == 3.0 and summary["config"]["num_inference_steps"] == 2
    known = summary["known_labels"]
    assert known["memorized"] == 2 and known["held_out"] == 3 and 0 <= known["wen_auc"] <= 1
    assert "known labels: flagged" in capsys.readouterr().out
    assert "faces/" in (out / "table.csv").read_text()
    free = tmp_path / "free"
    assert main(["audit", "--base", str(unet_file), "--manifest", str(manifest), "--generations", "2",
                 "--steps", "2", "--data-free", "--wen-statistic", "first_step", "--out", str(free)]) == 0
    summary = json.loads((free / "summary.json").read_text())
    assert summary["mode"].startswith("data-free") and "training_images" not in summary
    assert summary["known_labels"]["memorized"] == 2 and summary["config"]["wen_statistic"] == "first_step"


@pytest.mark.slow
def test_report_renders_with_its_images(tmp_path):
    """Look at the report as a person would: render it with headless Chromium and find the images in the PNG."""
    import shutil

    from diffmem.report import screenshot_html

    if not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")):
        pytest.skip("no headless Chromium installed")
    images, train = make_generations()
    images[0] = images[0] * 0 + torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)  # pure red generations
    config = AuditConfig(generations=4, num_inference_steps=25, guidance_scale=3.0)
    names = [f"{i}.png" for i in range(6)]
    rows = score_prompts(["red prompt", "held"], images, torch.tensor([5.0, 1.0]), torch.tensor([6.0, 2.0]), config,
                         train, names)
    result = AuditResult(model="m", rows=rows, images=images, config=config, train_images=train, train_names=names)
    paths = write_audit(result, tmp_path)
    png = screenshot_html(paths["report.html"], tmp_path / "report.png", width=1000, height=700)
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 50) & (pixels[..., 2] < 50)
    assert red.sum() > 4 * 96 * 96  # four red generation thumbnails, 128 px wide each, fully on screen
    colourful = pixels.std(axis=2) > 40
    assert colourful.sum() > red.sum() + 2000  # the random-noise thumbnails are there too


def test_embedding_cosine_column():
    images, train = make_generations()
    names = [f"{i}.png" for i in range(6)]
    from diffmem.metrics.embedder import load_copy_embedder

    rows = score_prompts(["dup", "held"], images, torch.tensor([5.0, 1.0]), torch.tensor([6.0, 2.0]), AuditConfig(),
                         train, names, load_copy_embedder())
    # the near-copies of training image 4 embed almost exactly onto it; the novel noise images less so
    assert rows[0].embedding_cosine > 0.95
    assert rows[0].embedding_cosine > rows[1].embedding_cosine


def test_data_free_flags_follow_the_chosen_wen_statistic():
    images = torch.rand(6, 2, 3, 8, 8)
    all_steps = torch.tensor([1.0, 1.1, 0.9, 1.0, 9.0, 1.05])
    first = torch.tensor([9.0, 1.1, 0.9, 1.0, 1.0, 1.05])
    prompts = [f"p{i}" for i in range(6)]
    rows = score_prompts(prompts, images, all_steps, first, AuditConfig())
    assert [r.flagged for r in rows] == [False, False, False, False, True, False]
    rows = score_prompts(prompts, images, all_steps, first, AuditConfig(wen_statistic="first_step"))
    assert [r.flagged for r in rows] == [True, False, False, False, False, False]
    with pytest.raises(ValueError, match="wen_statistic"):
        AuditConfig(wen_statistic="last")


def cli_audit_summary(tmp_path, base, lora, prompts: str, steps: int = 2, generations: int = 1) -> dict:
    """Run `diffmem audit --base BASE --lora LORA` on `prompts` (one per line) and return its summary.json."""
    path = tmp_path / "prompts.txt"
    path.write_text(prompts)
    out = tmp_path / "out"
    assert main(["audit", "--base", str(base), "--lora", str(lora), "--prompts", str(path), "--generations",
                 str(generations), "--steps", str(steps), "--out", str(out)]) == 0
    return json.loads((out / "summary.json").read_text())


def attention_lookups(unet: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """kohya names of the attention Linears of a diffusers UNet -> weight shapes."""
    from diffmem.formats.names import kohya_name

    return {kohya_name("lora_unet", path): tuple(module.weight.shape) for path, module in unet.named_modules()
            if isinstance(module, torch.nn.Linear) and ".attn" in path}


def test_audit_merges_a_lycoris_loha_that_diffusers_refuses(sd_folder, tmp_path, capsys):
    """A LoHa is merged by diffmem's own reader (diffusers' load_lora_weights has no LoHa support); a LoRA for
    another model is one line naming the file, exit 1."""
    base = open_backend(sd_folder)
    loha = tmp_path / "style-loha.safetensors"
    write_lycoris(loha, attention_lookups(base.denoiser), algo="loha", rank=2)
    tuned = open_backend(sd_folder, loha)
    assert tuned.name.endswith("+ style-loha.safetensors")
    gaps = [float((a - b).abs().max()) for a, b in zip(base.denoiser.state_dict().values(),
                                                         tuned.denoiser.state_dict().values())]
    assert max(gaps) > 0
    assert cli_audit_summary(tmp_path, sd_folder, loha, "a red cat\n", steps=1)["model"].endswith("loha.safetensors")
    prompts = tmp_path / "prompts.txt"
    capsys.readouterr()
    wrong = tmp_path / "wrong.safetensors"
    write_kohya_lora(wrong, {"lora_unet_input_blocks_4_1_proj_in": (640, 640)}, rank=2)
    assert main(["audit", "--base", str(sd_folder), "--lora", str(wrong), "--prompts", str(prompts),
                 "--out", str(tmp_path / "out2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wrong.safetensors" in err[0]
    assert not (tmp_path / "out2").exists()


def test_audit_on_a_tiny_sdxl_pipeline(tmp_path, capsys):
    """SDXL's added conditioning (pooled text_encoder_2 embedding and time ids) is wired: the audit runs end to end
    with a LoRA, and the pooled embedding really reaches the UNet (changing it changes Wen's score)."""
    folder = build_tiny_pipeline(tmp_path, "sdxl")
    lora = write_pipeline_lora(folder, "sdxl", tmp_path / "xl.safetensors")
    model = open_backend(folder, lora)
    assert model.family == "sdxl" and model.sample_shape == (4, 8, 8)
    added = model.encode(["a red cat", ""]).added
    assert added["text_embeds"].shape == (2, 24) and added["time_ids"].shape == (2, 6)
    assert added["text_embeds"][1].abs().max() == 0  # force_zeros_for_empty_prompt, as SDXL samples
    config = AuditConfig(generations=2, num_inference_steps=2)
    scores = [r.wen_score for r in run_audit(model, ["a red cat", "blue sky"], config).rows]
    original = model.encode

    def stronger_pooled(prompts):
        encoded = original(prompts)
        return Conditioning(encoded.context, {**encoded.added, "text_embeds": encoded.added["text_embeds"] * 3})

    model.encode = stronger_pooled
    changed = [r.wen_score for r in run_audit(model, ["a red cat", "blue sky"], config).rows]
    assert changed != pytest.approx(scores)
    summary = cli_audit_summary(tmp_path, folder, lora, "a red cat\nblue sky\n", generations=2)
    assert summary["prompts"] == 2 and summary["model"].endswith("xl.safetensors")


def test_audit_on_a_tiny_flux_pipeline(tmp_path, capsys):
    """Flux through the UNet-style adapter: the images equal FluxPipeline's own for the same latents (guidance
    mix at 1.0, distilled guidance inside the model), Wen's velocity difference is positive, the CLI runs with a
    kohya LoRA, and an SD-only loader refuses the folder in one line."""
    folder = build_tiny_pipeline(tmp_path, "flux")
    model = open_backend(folder)
    assert model.default_guidance == 1.0 and "pooled_projections" in model.encode(["abc"]).added
    channels, height, width = model.sample_shape
    config = AuditConfig(generations=1, num_inference_steps=3)
    result = run_audit(model, ["abc"], config)
    assert all(r.wen_score > 0 for r in result.rows)
    noise = torch.randn((1, channels, height, width), generator=torch.Generator().manual_seed(0))
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    packed = FluxPipeline._pack_latents(noise, 1, channels, height, width)
    size = height * pipe.vae_scale_factor
    theirs = pipe("abc", num_inference_steps=3, height=size, width=size, latents=packed, output_type="pt").images
    trace = wen_scores_of(model, ["abc"], AuditConfig(generations=1, num_inference_steps=3),
                          torch.Generator().manual_seed(0))
    ours = model.decode(trace.samples.flatten(0, 1))
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=1e-4)
    lora = write_pipeline_lora(folder, "flux", tmp_path / "flux.safetensors")
    assert cli_audit_summary(tmp_path, folder, lora, "abc\nxyz\n")["model"].endswith("flux.safetensors")
    with pytest.raises(FileFormatError, match=r"flux model; this command supports Stable Diffusion 1\.x"):
        load_pipeline(folder, families=("sd1", "sd2"))


def test_a_flagged_held_out_prompt_that_shares_a_name_is_explained(tmp_path):
    from diffmem.audit import shared_names

    assert shared_names("a photo of Jonas Smith", ["a black and white photo of Jonas Castell"]) == ["Jonas"]
    assert shared_names("A portrait of Anna", ["a photo of Jonas"]) == []
    images, train = make_generations()
    images[1] = images[0]  # the held-out prompt returns the memorized image too
    names = [f"{i}.png" for i in range(6)]
    prompts = ["a photo of Jonas Castell", "a photo of Jonas Smith"]
    rows = score_prompts(prompts, images, torch.tensor([5.0, 4.0]), torch.tensor([6.0, 5.0]), AuditConfig(), train,
                         names)
    assert all(r.flagged for r in rows)
    result = AuditResult(model="m", rows=rows, images=images, config=AuditConfig(), train_images=train,
                         train_names=names, known_memorized=[True, False])
    page = write_audit(result, tmp_path)["report.html"].read_text()
    assert page.count("shares Jonas with a memorized prompt") == 1
