"""The Dori attack: search mechanics and inputs on a tiny UNet, success judged on fresh generations, the command,
and (slow) the attack bringing a memorized face back on the committed example LoRA."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from diffmem.attack import DoriConfig, attack_success, dori_search, run_dori, start_embedding
from diffmem.attack.commands import register
from diffmem.attack.dori import reference_row
from diffmem.errors import DiffmemError
from diffmem.formats.safetensors_io import load_file, save_file
from diffmem.metrics.copy import CopyConfig, luminance_tiled_l2
from diffmem.report import load_image, save_png
from diffmem.world.check import CheckSettings
from diffmem.world.model import build_unet, unet_metadata, unet_tensors
from diffmem.world.text import MAX_TOKENS, TEXT_DIM, encode_prompts
from test_world import TINY

FAST = DoriConfig(steps=3, batch_size=2)
FEW = CheckSettings(generations=2, steps=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return build_unet(TINY).eval()


@pytest.fixture(scope="module")
def target():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_config_rejects_unknown_start_and_bad_numbers():
    with pytest.raises(ValueError, match="start must be one of"):
        DoriConfig(start="nearby")
    with pytest.raises(ValueError, match="steps"):
        DoriConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        DoriConfig(lr=0.0)
    with pytest.raises(ValueError, match="start_noise"):
        DoriConfig(start_noise=-1.0)


def test_start_embeddings_follow_the_config():
    prompt = "a black and white photo of Bruno Bellamy"
    own = encode_prompts([prompt])
    assert torch.equal(start_embedding(prompt), own)
    assert torch.equal(start_embedding(prompt, DoriConfig(start="unrelated")), encode_prompts(["a photo of a brick wall"]))
    random = start_embedding(prompt, DoriConfig(start="random", seed=1))
    assert random.shape == own.shape
    assert torch.equal(random, start_embedding(prompt, DoriConfig(start="random", seed=1)))
    assert not torch.equal(random, start_embedding(prompt, DoriConfig(start="random", seed=2)))
    assert abs(float(random.std() / own.std()) - 1) < 0.05
    noisy = start_embedding(prompt, DoriConfig(start_noise=0.5))
    assert abs(float((noisy - own).std() / own.std()) - 0.5) < 0.05


def test_search_returns_an_embedding_and_a_loss_per_step_and_leaves_the_unet_alone(tiny_unet, target):
    tiny_unet.requires_grad_(True)  # a UNet being trained elsewhere: the search must not touch its gradients
    tiny_unet.train()
    before = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    start = encode_prompts(["a photo of a cat"])
    result = dori_search(tiny_unet, target, start, FAST)
    assert result.embedding.shape == (1, MAX_TOKENS, TEXT_DIM)
    assert len(result.losses) == FAST.steps and all(loss > 0 for loss in result.losses)
    assert torch.equal(result.start, start)
    assert not torch.equal(result.embedding, start)
    assert not result.embedding.requires_grad
    assert all(p.grad is None for p in tiny_unet.parameters())
    assert all(torch.equal(v, before[k]) for k, v in tiny_unet.state_dict().items())
    assert tiny_unet.training
    tiny_unet.requires_grad_(False).eval()


def test_search_is_deterministic_per_seed(tiny_unet, target):
    start = encode_prompts(["a photo of a cat"])
    first = dori_search(tiny_unet, target[0], start, FAST)
    again = dori_search(tiny_unet, target[0], start, FAST)
    other = dori_search(tiny_unet, target[0], start, DoriConfig(steps=3, batch_size=2, seed=5))
    assert torch.equal(first.embedding, again.embedding) and first.losses == again.losses
    assert not torch.equal(first.embedding, other.embedding)


def test_search_refuses_targets_and_embeddings_the_model_cannot_take(tiny_unet, target):
    start = encode_prompts(["a photo of a cat"])
    with pytest.raises(DiffmemError, match="resize the target"):
        dori_search(tiny_unet, torch.rand(1, 3, 64, 64), start, FAST)
    with pytest.raises(DiffmemError, match="values in"):
        dori_search(tiny_unet, target * 2, start, FAST)
    with pytest.raises(DiffmemError, match="cross-attention takes"):
        dori_search(tiny_unet, target, torch.zeros(1, MAX_TOKENS, 77), FAST)
    with pytest.raises(DiffmemError, match="finite"):
        dori_search(tiny_unet, target, torch.full_like(start, float("nan")), FAST)


def test_success_counts_fresh_generations_under_an_absolute_threshold(tiny_unet, target):
    embedding = encode_prompts(["a photo of a cat"])
    everything = attack_success(tiny_unet, embedding, target, settings=FEW, copy=CopyConfig(distance_threshold=1.0))
    nothing = attack_success(tiny_unet, embedding, target, settings=FEW, copy=CopyConfig(distance_threshold=0.0))
    assert everything.generated.shape == (2, 3, 32, 32) and everything.test == "absolute tiled L2"
    assert everything.rate == 1.0 and nothing.rate == 0.0
    assert torch.equal(everything.distance, nothing.distance)
    # The colour-blind test is measured on the same generations against the same target.
    assert torch.allclose(everything.luminance_distance,
                          luminance_tiled_l2(everything.generated.clamp(0, 1), target)[:, 0])
    assert everything.luminance_rate(threshold=float("inf")) == 1.0
    assert everything.luminance_rate(threshold=-1.0) == 0.0
    with pytest.raises(DiffmemError, match="distance threshold"):
        attack_success(tiny_unet, embedding, target, settings=FEW)


def test_success_with_reference_needs_the_target_among_them(tiny_unet, target):
    embedding = encode_prompts(["a photo of a cat"])
    others = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with pytest.raises(DiffmemError, match="not among the reference images"):
        attack_success(tiny_unet, embedding, target, reference=others, settings=FEW)
    result = attack_success(tiny_unet, embedding, target, reference=torch.cat([others, target]), settings=FEW)
    assert result.test == "Carlini relative" and result.is_copy.shape == (2,)


def test_reference_row_survives_a_png_round_trip(tmp_path, target):
    others = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    reference = torch.cat([others, target])
    save_png(target[0], tmp_path / "t.png")
    assert reference_row(load_image(tmp_path / "t.png"), reference) == 3
    assert reference_row(load_image(tmp_path / "t.png"), others) is None


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["attack", "dori", *argv])
    return args.handler(args)


@pytest.fixture()
def tiny_files(tmp_path, tiny_unet, target):
    base = save_file(unet_tensors(tiny_unet), tmp_path / "tiny.safetensors", unet_metadata(TINY))
    reference = tmp_path / "train"
    for i, image in enumerate(torch.cat([torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4)), target])):
        save_png(image, reference / f"{i}.png")
    return base, reference / "3.png", reference


def test_command_writes_embedding_summary_and_grid(tmp_path, tiny_files):
    base, target_png, reference = tiny_files
    out = tmp_path / "out"
    code = run_cli("--base", str(base), "--target", str(target_png), "--prompt", "a photo of a cat",
                   "--reference", str(reference), "--steps", "2", "--batch-size", "2", "--generations", "2",
                   "--sample-steps", "2", "--out", str(out))
    assert code == 0
    tensors, metadata = load_file(out / "embedding.safetensors")
    assert tensors["embedding"].shape == tensors["start"].shape == (1, MAX_TOKENS, TEXT_DIM)
    assert metadata["prompt"] == "a photo of a cat"
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["losses"]) == 2 and summary["copy_test"] == "Carlini relative"
    assert 0 <= summary["copy_rate_after"] <= 1
    grid = load_image(out / "generations.png")
    assert grid.shape[-2:] == (3 * (2 * 34 + 2), 3 * (3 * 34 + 2))


def test_command_without_a_copy_test_fails_before_writing(tmp_path, tiny_files):
    base, target_png, _ = tiny_files
    with pytest.raises(DiffmemError, match="--reference"):
        run_cli("--base", str(base), "--target", str(target_png), "--prompt", "a cat", "--out", str(tmp_path / "o"))
    with pytest.raises(DiffmemError, match="no such image"):
        run_cli("--base", str(base), "--target", str(tmp_path / "missing.png"), "--prompt", "a cat",
                "--distance-threshold", "0.1")
    with pytest.raises(DiffmemError, match="--steps and --batch-size must be >= 1"):
        run_cli("--base", str(base), "--target", str(target_png), "--prompt", "a cat", "--steps", "0",
                "--distance-threshold", "0.1")
    assert not (tmp_path / "o").exists()


def example_lora_world():
    """(base with the example LoRA merged, duplicated images, held-out faces, the LoRA's training images)."""
    from diffmem.world.check import example_lora_path, manifest_images
    from diffmem.world.data import ImageSet
    from diffmem.world.lora import apply_lora
    from diffmem.world.model import load_base

    manifest = json.loads(example_lora_path().with_suffix(".json").read_text())
    duplicated = manifest_images(manifest, "duplicated")
    reference = ImageSet.concat([duplicated, manifest_images(manifest, "seen_once")]).images
    return apply_lora(load_base(), example_lora_path()), duplicated, manifest_images(manifest, "heldout"), reference


@pytest.mark.slow
def test_dori_brings_a_memorized_face_back_from_an_unrelated_prompt():
    """The example LoRA memorized five faces; the embedding of "a photo of a brick wall" never draws one. Dori from
    that start finds an embedding whose fresh generations copy the face (measured: 0/8 -> 8/8, docs/attack.md)."""
    unet, duplicated, _, reference = example_lora_world()
    outcome = run_dori(unet, duplicated.images[:1], duplicated.captions[0], DoriConfig(start="unrelated"), reference)
    assert outcome.before.rate == 0.0
    assert outcome.after.rate >= 0.75
    assert outcome.after.distance.median() < outcome.before.distance.median() / 2


@pytest.mark.slow
def test_dori_does_not_conjure_a_face_the_lora_never_saw():
    """Control: the same search for a held-out face (never trained on) gives no copies, so the attack's success
    above is memorization coming back, not the search painting any image it is given (measured: 0/8 -> 0/8)."""
    unet, _, heldout, reference = example_lora_world()
    face = heldout.images[:1]
    outcome = run_dori(unet, face, heldout.captions[0], DoriConfig(), torch.cat([reference, face]))
    assert outcome.after.rate == 0.0


def flat_embedder(images: torch.Tensor) -> torch.Tensor:
    """A stand-in for the copy embedder: the first 32 pixel values (enough for FID's maths on a tiny probe)."""
    return images.flatten(1)[:, :32]


def tiny_probe(target):
    from diffmem.bench.evaluate import Probe
    from diffmem.world.data import ImageSet

    others = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    duplicated = ImageSet(images=torch.cat([target, others[:1]]), captions=["a photo of a cat", "a photo of a dog"],
                          ids=["t/0", "t/1"])
    heldout = ImageSet(images=others[4:], captions=[f"a photo of thing {i}" for i in range(36)],
                       ids=[f"h/{i}" for i in range(36)])
    return Probe(duplicated, torch.cat([duplicated.images, others[1:4]]), heldout, flat_embedder)


def test_robustness_rows_cover_every_model_caption_and_start(tiny_unet, target):
    from diffmem.attack.table import RobustnessSettings, markdown_rows, robustness_table

    settings = RobustnessSettings(dori=FAST, starts=("prompt", "random"), sampling=FEW)
    rows = robustness_table({"tiny": tiny_unet, "tiny again": tiny_unet}, tiny_probe(target), settings)
    assert [r.model for r in rows] == ["tiny", "tiny again"]
    # Same seeds and search settings for every model: the same weights give the same numbers.
    same = ("seconds", "model")
    assert {k: v for k, v in rows[0].to_dict().items() if k not in same} == {
        k: v for k, v in rows[1].to_dict().items() if k not in same}
    assert rows[0].captions == 2 and set(rows[0].per_caption_dori) == {"prompt", "random"}
    assert all(len(rates) == 2 for rates in rows[0].per_caption_dori.values())
    assert 0 <= rows[0].copy_rate_prompt <= 1 and all(0 <= r <= 1 for r in rows[0].copy_rate_dori.values())
    assert rows[0].heldout_loss > 0 and rows[0].fid is not None and rows[0].fid >= 0
    assert all(loss > 0 for loss in rows[0].dori_loss.values())
    # Both copy tests, over the same captions and starts.
    assert set(rows[0].copy_rate_dori_luminance) == {"prompt", "random"}
    assert len(rows[0].per_caption_prompt_luminance) == 2
    assert all(0 <= r <= 1 for r in [rows[0].copy_rate_prompt_luminance, *rows[0].copy_rate_dori_luminance.values()])
    table = markdown_rows(rows, {"skipped model": "no file"})
    assert table.count("\n") == 4 and "not measured: no file" in table


def test_robustness_settings_refuse_unknown_starts():
    from diffmem.attack.table import RobustnessSettings

    with pytest.raises(ValueError, match="starts must be"):
        RobustnessSettings(starts=("nearby",))
    with pytest.raises(ValueError, match="starts must be"):
        RobustnessSettings(starts=())


def row(name, prompt, dori, luminance=None):
    """A table row with RGB rates `prompt` (captions) and `dori` (from the caption; 0 from random tokens), and
    luminance-test rates `luminance` = (captions, Dori from the caption) when given."""
    from diffmem.attack.table import RobustnessRow

    measured = {} if luminance is None else {
        "copy_rate_prompt_luminance": luminance[0], "copy_rate_dori_luminance": {"prompt": luminance[1], "random": 0.0},
        "per_caption_prompt_luminance": [luminance[0]], "per_caption_dori_luminance": {"prompt": [luminance[1]],
                                                                                       "random": [0.0]}}
    return RobustnessRow(model=name, captions=5, copy_rate_prompt=prompt, copy_rate_dori={"prompt": dori, "random": 0.0},
                         captions_copied_prompt=0, captions_copied_dori={"prompt": 0, "random": 0},
                         per_caption_prompt=[], per_caption_dori={"prompt": [], "random": []},
                         dori_loss={"prompt": 0.1, "random": 0.1}, heldout_loss=0.05, fid=None, seconds=1.0,
                         **measured)


def test_verdicts_say_plainly_when_dori_brings_copies_back():
    from diffmem.attack.table import verdict

    reference = row("none", 0.8, 1.0)
    assert verdict(reference, reference).startswith("no mitigation")
    assert verdict(row("pruned", 0.1, 0.9), reference).startswith("does not survive Dori")
    assert verdict(row("robust", 0.0, 0.1), reference).startswith("survives Dori")
    assert verdict(row("partial", 0.4, 0.9), reference).startswith("does not survive Dori: copies from the captions "
                                                                  "fall to 40%")
    assert verdict(row("weak", 0.8, 0.9), reference).startswith("does not lower the copies")
    assert verdict(row("odd", 0.8, 0.0), reference).startswith("copies stay low under Dori")
    assert "nothing to mitigate" in verdict(row("x", 0.0, 0.0), row("control", 0.0, 0.0))


def test_verdicts_name_copies_only_the_luminance_test_counts():
    from diffmem.attack.table import markdown_rows, verdict

    reference = row("none", 0.8, 1.0, luminance=(0.8, 1.0))
    # RGB calls Dori's copies removed; the colour-blind test finds 6 of 8 under a colour cast.
    cast = row("adversarial", 0.0, 0.0, luminance=(0.0, 0.75))
    assert verdict(cast, reference) == ("survives Dori at this budget, as the copy test counts: copies stay low from "
                                        "the captions and under every start; but the luminance test counts 75% "
                                        "copies under Dori from the caption (the image returns under a colour cast "
                                        "that RGB tiled L2 misses)")
    # Both tests agree: no caveat; rows measured before the luminance test have none either.
    assert "luminance" not in verdict(row("robust", 0.0, 0.0, luminance=(0.0, 0.1)), reference)
    assert "luminance" not in verdict(row("old", 0.0, 0.0), reference)
    table = markdown_rows([reference, cast, row("old", 0.0, 0.0)])
    assert "| 0.0% / 75.0% / 0.0% |" in table and "luminance test (captions / Dori prompt / Dori random)" in table


def test_page_keeps_its_notes_block_and_names_unmeasured_models(tiny_unet, target):
    from diffmem.attack.table import (
        NOTES_END,
        NOTES_START,
        RobustnessSettings,
        ToolkitModels,
        robustness_page,
    )

    toolkit = ToolkitModels()
    toolkit.add("none", tiny_unet, "none", "tiny")
    toolkit.add("pruned", tiny_unet, "none", "tiny pruned")
    toolkit.notes["MemControl"] = "no model file"
    rows = [row("none", 0.8, 1.0), row("pruned", 0.1, 0.9)]
    previous = f"old text\n{NOTES_START}\nhand-written reading\n{NOTES_END}\nold tail"
    page = robustness_page(rows, toolkit, RobustnessSettings(starts=("prompt", "random")), ["diffmem attack table"], "tiny", previous)
    assert "hand-written reading" in page and "old text" not in page and "old tail" not in page
    assert "| MemControl | not measured: no model file" in page
    assert "does not survive Dori" in page and "tiny pruned" in page


def test_merged_rows_come_back_and_other_settings_are_refused(tmp_path):
    from diffmem.attack.commands import merged_rows
    from diffmem.attack.table import RobustnessSettings
    from diffmem.errors import FileFormatError

    settings = RobustnessSettings().to_dict()
    measured = row("NeMo (default)", 0.1, 0.9)
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"settings": settings, "rows": [measured.to_dict()], "command": "diffmem attack table",
                                "sources": {"NeMo (default)": "nemo", "other": "x"},
                                "reference_of": {"NeMo (default)": "none"}}))
    rows, sources, reference_of, commands = merged_rows([path], settings)
    assert rows == [measured] and sources == {"NeMo (default)": "nemo"} and commands == ["diffmem attack table"]
    assert reference_of == {"NeMo (default)": "none"}
    with pytest.raises(DiffmemError, match="other settings"):
        merged_rows([path], RobustnessSettings(starts=("prompt",)).to_dict())
    (tmp_path / "b.json").write_text("{}")
    with pytest.raises(FileFormatError, match="not a JSON file written by"):
        merged_rows([tmp_path / "b.json"], settings)
    with pytest.raises(DiffmemError, match="no such table"):
        merged_rows([tmp_path / "c.json"], settings)
