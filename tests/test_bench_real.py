"""`diffmem bench-real` end to end on a tiny random Stable Diffusion pipeline built in tmp_path (nothing
downloaded): the probe manifest, the filtered files loading through diffusers, the rows, resuming, the report."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from diffmem.bench.grid import VariantPlan, reference_variants
from diffmem.bench.real import (
    RESULTS_FILE,
    RealBenchSettings,
    file_safe,
    make_embedder,
    read_probe,
    run_real_bench,
)
from diffmem.bench.run import read_rows
from diffmem.cli import main
from diffmem.errors import DiffmemError, FileFormatError

torch.set_num_threads(1)

#: A small plan (BAF's right-side rule, random at 80% of the energy, BAF at its own channel share, PEFT's intruder
#: reduction: a transform, not a channel filter) keeps the file near half a minute; the variant logic is the world
#: benchmark's own (`diffmem.bench.grid`).
PLAN = VariantPlan(rules=("baf-right",), levels=(0.8,), methods=("random",), fraction_methods=("baf",),
                   transforms=("peft-intruder",))
SETTINGS = RealBenchSettings(generations=2, steps=2, embedder="pixels4")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    from diffmem.bench.real_example import write_example

    return write_example(tmp_path_factory.mktemp("tiny-sd"), steps=SETTINGS.steps)


@pytest.fixture(scope="module")
def diffusers_lora(example) -> Path:
    """A second LoRA, in diffusers' own format (`unet.<module>.lora_A.weight`), on the UNet's attention layers."""
    from diffusers import UNet2DConditionModel

    from builders_lora import write_diffusers_lora

    unet = UNet2DConditionModel.from_pretrained(example["base"], subfolder="unet", local_files_only=True)
    modules = {f"unet.{name}": tuple(m.weight.shape) for name, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and "attentions" in name}
    path = example["lora"].parent / "diffusers-lora.safetensors"
    write_diffusers_lora(path, modules, rank=4, seed=1)
    return path


@pytest.fixture(scope="module")
def bench(example, diffusers_lora, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rows = run_real_bench(example["base"], [example["lora"], diffusers_lora], example["probe"], out, SETTINGS,
                          plan=PLAN, progress=False)
    return out, rows


def unet_output(pipe) -> torch.Tensor:
    """The UNet's prediction on fixed inputs (latents, timestep, text embeddings of a fixed caption)."""
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(["a photo of sks person"], torch.device("cpu"), 1, False)
        return pipe.unet(latents, 10, encoder_hidden_states=embeds).sample


def test_rows_exist_for_every_variant_of_every_lora(bench, example, diffusers_lora):
    out, rows = bench
    expected = [v.key for v in reference_variants() + PLAN.variants(default_fraction=0.5)]
    assert set(expected) >= {"lora", "base", "baf", "baf-right", "random@energy=0.8", "baf@fraction=matched",
                             "peft-intruder"}
    for lora in (example["lora"], diffusers_lora):
        keys = [r["variant"] for r in rows if r["lora"] == str(lora)]
        assert sorted(keys) == sorted(expected), lora.name
    bases = [r for r in rows if r["variant"] == "base"]
    assert len(bases) == 2 and bases[0]["numbers"] == bases[1]["numbers"]  # measured once, shared
    numbers = {"copy_rate", "captions_copied", "own_distance", "own_distance_min", "nearest_distance", "extracted",
               "amd", "suspected_loss", "heldout_loss", "fid"}
    for row in rows:
        assert set(row["numbers"]) == numbers, row["variant"]
        assert (out / "images" / ("base.png" if row["variant"] == "base" else
                                  Path(row["lora_label"]) / f"{file_safe(row['variant'])}.png")).is_file()
    by_key = {r["variant"]: r for r in rows if r["lora"] == rows[0]["lora"]}
    assert by_key["lora"]["channels_kept"] == by_key["lora"]["channels_total"]
    assert by_key["baf"]["channels_kept"] < by_key["baf"]["channels_total"]
    assert by_key["baf@fraction=matched"]["channels_kept"] <= by_key["baf@fraction=matched"]["channels_total"]
    assert "channels_kept" not in by_key["base"]
    # A transform keeps no channels as such; its energy kept is the share of the update its output holds.
    assert "channels_kept" not in by_key["peft-intruder"] and 0 < by_key["peft-intruder"]["energy_kept"] < 1


def test_the_lora_reproduces_its_probe_and_the_base_does_not(bench):
    """The example's suspected images are the LoRA's first generations: the bench must find them again (up to PNG
    rounding) through its own filter -> write -> diffusers load -> sample path, and the base must not."""
    _, rows = bench
    by_key = {r["variant"]: r["numbers"] for r in rows if r["lora"] == rows[0]["lora"]}
    assert by_key["lora"]["own_distance_min"] < 0.01
    assert by_key["lora"]["copy_rate"] > 0
    assert by_key["base"]["own_distance_min"] > 0.05
    assert by_key["base"]["copy_rate"] == 0
    # The probe's held-out images come from the base, the suspected ones from the LoRA.
    assert by_key["lora"]["suspected_loss"] != by_key["base"]["suspected_loss"]


def test_filtered_files_load_through_diffusers_and_change_the_unet(bench, example):
    from diffusers import StableDiffusionPipeline

    out, rows = bench
    pipe = StableDiffusionPipeline.from_pretrained(example["base"], local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    before = unet_output(pipe)
    outputs = {}
    files = sorted((out / "loras").glob("*/*.safetensors"))
    assert {(f.parent.name, f.stem) for f in files} == {
        (r["lora_label"], file_safe(r["variant"])) for r in rows if r["variant"] != "base"}
    for file in files:
        pipe.load_lora_weights(str(file), adapter_name="check")
        outputs[file.parent.name, file.stem] = unet_output(pipe)
        pipe.unload_lora_weights()
        assert not torch.allclose(outputs[file.parent.name, file.stem], before, atol=1e-4), file
    assert torch.equal(unet_output(pipe), before)
    for label in {f.parent.name for f in files}:
        assert not torch.allclose(outputs[label, "baf"], outputs[label, "lora"], atol=1e-4), label
    # The "lora" row measures diffmem's rewrite of the input (no channel dropped); diffusers must read it as the
    # input file itself, alpha and all.
    for row in rows:
        if row["variant"] == "lora":
            pipe.load_lora_weights(row["lora"], adapter_name="input")
            as_given = unet_output(pipe)
            pipe.unload_lora_weights()
            assert torch.allclose(as_given, outputs[row["lora_label"], "lora"], atol=1e-5), row["lora"]
    header = json.loads(file.read_bytes()[8 : 8 + int.from_bytes(file.read_bytes()[:8], "little")])
    assert "diffmem.method" in header["__metadata__"]


def test_a_second_run_measures_nothing_new(bench, example):
    out, rows = bench
    lines = (out / RESULTS_FILE).read_text().splitlines()
    again = run_real_bench(example["base"], [example["lora"]], example["probe"], out, SETTINGS, plan=PLAN,
                           progress=False)
    assert (out / RESULTS_FILE).read_text().splitlines() == lines
    assert len(again) == len(rows)
    report = (out / "report.md").read_text()
    for row in rows:
        assert f"| {row['variant']} |" in report
    assert "`pixels4` feature space" in report


def test_other_settings_are_other_rows(bench):
    out, rows = bench
    assert len({r["settings_id"] for r in rows}) == 1
    changed = [r for r in read_rows(out / RESULTS_FILE) if r["settings"]["steps"] != SETTINGS.steps]
    assert changed == []
    from diffmem.bench.run import settings_id

    assert settings_id(SETTINGS) != settings_id(RealBenchSettings(generations=2, steps=3))


def write_manifest(folder: Path, record) -> Path:
    path = folder / "probe.json"
    path.write_text(record if isinstance(record, str) else json.dumps(record))
    return path


@pytest.mark.parametrize("record, error, words", [
    ({"suspected": [{"image": "missing.png", "caption": "a cat"}]}, DiffmemError, "missing.png"),
    ({"suspected": [{"image": "a.png"}]}, FileFormatError, "no caption"),
    ({"suspected": [{"image": "a.png", "caption": "  "}]}, FileFormatError, "no caption"),
    ({"suspected": []}, FileFormatError, "no suspected"),
    ({"suspected": [{"caption": "a cat"}]}, FileFormatError, "no image"),
    ({"suspected": [{"image": "a.png", "caption": "a cat"}], "reference": []}, FileFormatError, "unknown keys"),
    ({"suspected": [{"image": "a.png", "caption": "a cat"}], "references": ["b.png"]}, DiffmemError, "b.png"),
    ({"suspected": [{"image": "a.png", "caption": "a cat"}], "heldout": [{"image": "a.png"}]}, FileFormatError,
     "'heldout' entry 0 has no caption"),
    ("{not json", FileFormatError, "not a JSON"),
])
def test_bad_manifests_name_the_file_and_the_problem(tmp_path, record, error, words):
    from diffmem.report import save_png

    save_png(torch.zeros(3, 8, 8), tmp_path / "a.png")
    path = write_manifest(tmp_path, record)
    with pytest.raises(error) as caught:
        read_probe(path)
    assert str(path) in str(caught.value) and words in str(caught.value)


def test_a_good_manifest_and_its_hash(example, tmp_path):
    probe = read_probe(example["probe"])
    assert len(probe.suspected_images) == 2 and len(probe.references) == 2
    assert len(probe.heldout_with_images) == 2 and all(p.is_file() for p in probe.suspected_images)
    copy = tmp_path / "probe"
    shutil.copytree(example["probe"].parent, copy)
    assert read_probe(copy / "probe.json").sha256 == probe.sha256
    (copy / "train" / "suspected-0.png").write_bytes((copy / "heldout" / "0.png").read_bytes())
    assert read_probe(copy / "probe.json").sha256 != probe.sha256  # an edited image is another probe


def test_cli_reports_a_bad_probe(example, tmp_path, capsys):
    path = write_manifest(tmp_path, {"suspected": [{"image": "gone.png", "caption": "a cat"}]})
    code = main(["bench-real", "--base", str(example["base"]), "--lora", str(example["lora"]), "--probe", str(path),
                 "--out", str(tmp_path / "out")])
    assert code != 0
    err = capsys.readouterr().err
    assert "gone.png" in err and str(path) in err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_missing_lora_and_an_unknown_device(example, tmp_path, capsys):
    args = ["bench-real", "--base", str(example["base"]), "--probe", str(example["probe"]), "--out", str(tmp_path)]
    assert main([*args, "--lora", str(tmp_path / "none.safetensors")]) != 0
    assert "no such LoRA file" in capsys.readouterr().err
    assert main([*args, "--lora", str(example["lora"]), str(tmp_path)]) != 0
    assert f"{tmp_path}: is a folder" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*args, "--lora", str(example["lora"]), "--device", "cuda"]) != 0
        assert "no CUDA GPU" in capsys.readouterr().err


def test_embedder_choices():
    assert make_embedder().name == "pixels16"
    assert make_embedder("pixels8")(torch.rand(2, 3, 16, 16)).shape == (2, 3 * 8 * 8)
    assert make_embedder("pixels").name == "pixels"
    with pytest.raises(DiffmemError, match="unknown embedder"):
        make_embedder("pixelsx")


def vae_key_to_original(key: str, up_blocks: int) -> str:
    """A diffusers `AutoencoderKL` key in the original (LDM `first_stage_model.`) naming of single files."""
    for old, new in (("conv_norm_out", "norm_out"), ("conv_shortcut", "nin_shortcut"),
                     ("mid_block.attentions.0.group_norm", "mid.attn_1.norm"),
                     ("mid_block.attentions.0.to_q", "mid.attn_1.q"), ("mid_block.attentions.0.to_k", "mid.attn_1.k"),
                     ("mid_block.attentions.0.to_v", "mid.attn_1.v"),
                     ("mid_block.attentions.0.to_out.0", "mid.attn_1.proj_out")):
        key = key.replace(old, new)
    key = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", key)
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    # The original decoder numbers its up blocks from the lowest resolution's end.
    key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{up_blocks - 1 - int(m[1])}.block.", key)
    return re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{up_blocks - 1 - int(m[1])}.upsample.", key)


def write_single_file(pipe, path: Path) -> Path:
    """The pipeline's UNet, VAE and text encoder as one original-layout SD 1.x checkpoint (what A1111 and ComfyUI
    users have), through diffmem's UNet name map and the VAE renames above."""
    from builders_base import classic_key, to_original
    from diffmem.formats.safetensors_io import save_file

    state = {f"model.diffusion_model.{k}": v for k, v in to_original(pipe.unet.state_dict(), "unet").items()}
    up_blocks = len(pipe.vae.config.up_block_types)
    for key, value in pipe.vae.state_dict().items():
        key = vae_key_to_original(key, up_blocks)
        state[f"first_stage_model.{key}"] = value[:, :, None, None] if ".attn_1." in key and value.ndim == 2 else value
    for key, value in pipe.text_encoder.state_dict().items():
        if not key.endswith("position_ids"):
            state[f"cond_stage_model.transformer.{classic_key('text_encoder', key)}"] = value
    return save_file({k: v.contiguous() for k, v in state.items()}, path)


def test_a_single_file_base_loads_with_config_and_filters_alike(example, tmp_path):
    from diffmem.bench.real import load_bench_model
    from diffmem.formats.base import open_base
    from diffmem.pipeline import filter_lora

    folder_pipe = load_bench_model(example["base"], torch.device("cpu")).pipe
    single = write_single_file(folder_pipe, tmp_path / "tiny-sd1.safetensors")
    single_pipe = load_bench_model(single, torch.device("cpu"), config=example["base"]).pipe
    # The same weights through two loaders: equal up to float rounding (diffusers 0.42's single-file path differs
    # from its folder path in the last bits).
    torch.testing.assert_close(unet_output(single_pipe), unet_output(folder_pipe), rtol=0, atol=1e-5)
    assert open_base(single).layout != open_base(example["base"]).layout
    from_folder = filter_lora(example["lora"], example["base"]).report
    from_single = filter_lora(example["lora"], single).report
    assert [m.kept for m in from_single.modules] == [m.kept for m in from_folder.modules]


def test_a_single_file_base_without_configs_says_to_pass_config(tmp_path, example):
    from builders_base import build_tiny_base
    from diffmem.bench.real import load_bench_model

    single = build_tiny_base(tmp_path, "sd1", "single_file")
    with pytest.raises(FileFormatError, match="pass --config") as caught:
        load_bench_model(single, torch.device("cpu"))
    assert str(single) in str(caught.value)
    with pytest.raises(DiffmemError, match=r"model_index\.json"):
        load_bench_model(single, torch.device("cpu"), config=tmp_path)


def test_batching_does_not_change_the_images(example):
    """Each image has its own seeded generator, so --batch-size (not part of the rows' key) cannot change a row."""
    from diffmem.bench.real import generate_images, load_bench_model

    model = load_bench_model(example["base"], torch.device("cpu"))
    captions, seeds = ["a photo of sks person", "a dog", "a red house"], [0, 1, 0]
    one_by_one = generate_images(model, captions, seeds, SETTINGS, batch_size=1)
    together = generate_images(model, captions, seeds, SETTINGS, batch_size=3)
    assert torch.allclose(one_by_one, together, atol=1e-5)
    assert not torch.allclose(one_by_one[0], one_by_one[2], atol=1e-3)  # the caption matters


def test_docs_commands_use_real_options():
    """Every `diffmem bench-real` command in docs/bench.md parses, and `python -m diffmem.bench.real_example` names
    the module the tests build their pipeline with."""
    import shlex

    from diffmem.cli import build_parser

    doc = (Path(__file__).resolve().parents[1] / "docs" / "bench.md").read_text()
    commands = [" ".join(c.split()) for c in re.findall(r"^diffmem bench-real (?:.*\\\n)*.*$", doc, re.M)]
    assert len(commands) >= 2
    for command in commands:
        args = build_parser().parse_args(shlex.split(command.replace("\\", ""))[1:])
        assert args.handler.__name__ == "run_bench_real_command"
    assert "python -m diffmem.bench.real_example runs/tiny-sd" in doc


def test_safety_checker_embedder_is_the_checkers_clip_projection(example, tmp_path):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    base = tmp_path / "pipeline"
    shutil.copytree(example["base"], base)
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=tower, vision_config={**tower, "image_size": 16,
                                                                                         "patch_size": 8},
                                                      projection_dim=8)).eval()
    checker.save_pretrained(base / "safety_checker")
    (base / "feature_extractor").mkdir()
    mean, std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
    (base / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": 16, "do_center_crop": True, "do_normalize": True, "image_mean": mean, "image_std": std}))
    embedder = make_embedder("safety-checker", base=base)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    features = embedder(images)
    assert embedder.name == "safety-checker-clip" and embedder.image_size == (16, 16)
    assert torch.allclose(embedder.mean.flatten(), torch.tensor(mean))
    with torch.no_grad():
        expected = checker.visual_projection(checker.vision_model(embedder.preprocess(images))[1])
    assert features.shape == (3, 8) and torch.allclose(features, expected, atol=1e-5)
    assert not torch.allclose(features[0], features[1], atol=1e-3)
    with pytest.raises(DiffmemError, match="safety_checker"):
        make_embedder("safety-checker", base=example["base"])


def test_the_example_refuses_a_used_folder(example, capsys):
    from diffmem.bench.real_example import main

    assert main([str(example["base"].parent)]) == 1
    assert "exists already" in capsys.readouterr().err
    assert (example["base"] / "model_index.json").is_file()


def test_cli_passes_its_options_to_the_library(monkeypatch, tmp_path, capsys):
    import diffmem.bench.real as real

    seen = {}

    def fake_run(base, loras, probe, out, settings, **options):
        seen.update(base=base, loras=loras, probe=probe, out=out, settings=settings, **options)
        return [{}, {}]

    monkeypatch.setattr(real, "run_real_bench", fake_run)
    code = main(["bench-real", "--base", "b", "--config", "c", "--lora", "x.safetensors", "y.safetensors",
                 "--probe", "p.json", "--out", str(tmp_path), "--plan", "full", "--generations", "3", "--steps", "7",
                 "--guidance", "5", "--seed", "11", "--heldout-generations", "2", "--copy-distance", "0.1",
                 "--embedder", "safety-checker", "--device", "cpu", "--dtype", "bfloat16", "--batch-size", "2"])
    assert code == 0 and "2 measurements" in capsys.readouterr().out
    assert seen["loras"] == [Path("x.safetensors"), Path("y.safetensors")] and seen["config"] == Path("c")
    assert seen["settings"] == RealBenchSettings(generations=3, heldout_generations=2, steps=7, guidance=5.0,
                                                 seed=11, copy_distance=0.1)
    assert seen["plan"] == real.FULL_PLAN and seen["dtype"] == torch.bfloat16 and seen["batch_size"] == 2
    assert seen["embedder"] == "safety-checker" and seen["device"] == "cpu"


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_bench_real_runs_on_other_families(tmp_path, family):
    """bench-real drives the base through its backend, so an SDXL pipeline runs end to end (diffusers' own loader
    loads each filtered kohya file): one row per variant, finite numbers, and a filtered variant that differs from
    the LoRA as given. diffusers reads no kohya SD3 file (it only warns): that is one clear error naming the file,
    not rows that measure the base as if it were the LoRA."""
    from builders_pipelines import build_tiny_pipeline, write_pipeline_lora
    from diffmem.backends import open_backend
    from diffmem.report import save_png

    base = build_tiny_pipeline(tmp_path, family)
    lora = write_pipeline_lora(base, family, tmp_path / "lora.safetensors", strength=0.5)
    tuned = open_backend(base, lora)
    captions = ["abc", "xyz", "bca"]
    images = tuned.generate(tuned.encode(captions), [0, 1, 2], steps=2)
    probe = tmp_path / "probe"
    record = {"suspected": [], "heldout": []}
    for index, (caption, image) in enumerate(zip(captions, images)):
        key = "suspected" if index < 2 else "heldout"
        save_png(image, probe / f"{key}-{index}.png")
        record[key].append({"image": f"{key}-{index}.png", "caption": caption})
    (probe / "probe.json").write_text(json.dumps(record))
    if family == "sd3":
        with pytest.raises(FileFormatError, match="loaded none of its weights") as caught:
            run_real_bench(base, [lora], probe / "probe.json", tmp_path / "out", SETTINGS, plan=PLAN, progress=False)
        assert ".safetensors" in str(caught.value)
        return
    rows = run_real_bench(base, [lora], probe / "probe.json", tmp_path / "out", SETTINGS, plan=PLAN, progress=False)
    assert {row["variant"] for row in rows} >= {"base", "lora"} and len(rows) >= 3
    for row in rows:
        assert all(value is None or value == value for value in row["numbers"].values())  # no NaN
    by_variant = {row["variant"]: row["numbers"] for row in rows}
    filtered = [key for key in by_variant if key not in ("base", "lora")]
    assert any(by_variant[key]["suspected_loss"] != by_variant["lora"]["suspected_loss"] for key in filtered)
    assert by_variant["lora"]["suspected_loss"] != by_variant["base"]["suspected_loss"]
