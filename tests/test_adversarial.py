"""Adversarial fine-tuning (seed 002): the batch mixing and pairing maths, the loop against Dori on a tiny UNet that
memorized one image, and the `mitigate adversarial` command's files."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from diffmem.attack import DoriConfig, dori_attack
from diffmem.errors import DiffmemError
from diffmem.formats.safetensors_io import save_file
from diffmem.mitigations.adversarial import (
    AdversarialFinetuneConfig,
    adversarial_finetune,
    adversarial_rows,
    paired_training_set,
)
from diffmem.world.data import ImageSet
from diffmem.world.model import build_unet, unet_metadata, unet_tensors
from diffmem.world.text import MAX_TOKENS, TEXT_DIM, encode_prompts
from diffmem.world.train import finetune_loop, table_contexts
from test_world import TINY

CAPTIONS = ["a photo of a cat", "a photo of a dog", "a red car", "a blue house", "a green tree", "a yellow boat"]
QUICK = AdversarialFinetuneConfig(rounds=2, starts=("prompt", "random"), search=DoriConfig(steps=10, batch_size=4),
                                  steps_per_round=30, lr=1e-3, surrogate_steps=2)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data() -> ImageSet:
    """Six smooth images (a tiny UNet can learn them in a few dozen steps) with their captions."""
    coarse = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    images = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear")
    return ImageSet(images, CAPTIONS, [f"t/{i}" for i in range(6)])


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return build_unet(TINY).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def memorizing_unet(data):
    """A tiny world UNet trained on the six images with image 0 repeated 20 times: it memorizes image 0."""
    torch.manual_seed(0)
    unet = build_unet(TINY).train().requires_grad_(True)
    contexts = torch.cat([encode_prompts([""]), encode_prompts(data.captions)])
    rows = torch.cat([torch.zeros(20, dtype=torch.long), torch.arange(1, 6)])
    finetune_loop(unet, list(unet.parameters()), data.images, rows, table_contexts(contexts, torch.arange(1, 7)),
                  steps=150, batch_size=8, lr=2e-3, caption_dropout=0.1, noise_offset=0.0, seed=0, progress=False)
    return unet.eval().requires_grad_(False)


def test_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="starts"):
        AdversarialFinetuneConfig(starts=("nearby",))
    with pytest.raises(ValueError, match="adversarial_share"):
        AdversarialFinetuneConfig(adversarial_share=0.0)
    with pytest.raises(ValueError, match="rounds"):
        AdversarialFinetuneConfig(rounds=0)
    assert AdversarialFinetuneConfig().to_dict()["starts"] == ["prompt", "random", "unrelated"]


@pytest.mark.parametrize(("adversarial", "ordinary", "share"), [(4, 75, 0.5), (16, 75, 0.5), (3, 10, 0.25), (5, 5, 0.8)])
def test_rows_draw_adversarial_pairs_at_the_requested_share(adversarial, ordinary, share):
    rows = adversarial_rows(adversarial, ordinary, share)
    drawn = float((rows < adversarial).float().mean())
    assert abs(drawn - share) < 0.1
    assert set(rows.tolist()) == set(range(adversarial + ordinary))  # every ordinary image stays in


def test_rows_without_ordinary_data_are_all_adversarial():
    assert adversarial_rows(3, 0, 0.5).tolist() == [0, 1, 2]
    assert adversarial_rows(3, 7, 1.0).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="at least one"):
        adversarial_rows(0, 7, 0.5)


def test_paired_set_trains_each_embedding_on_its_surrogate(data):
    embeddings = torch.randn(3, MAX_TOKENS, TEXT_DIM)
    surrogates = data.images[:3].flip(-1)
    ordinary = data.subset([4, 5])
    images, contexts, index = paired_training_set(embeddings, surrogates, ordinary)
    context_of = table_contexts(contexts, index)
    keep = torch.ones(5, dtype=torch.bool)
    picked = torch.arange(5)
    assert torch.equal(images[:3], surrogates) and torch.equal(images[3:], ordinary.images)
    assert torch.equal(context_of(picked, keep, None)[:3], embeddings)
    assert torch.equal(context_of(picked, keep, None)[3:], encode_prompts(ordinary.captions))
    assert torch.equal(context_of(picked, ~keep, None), encode_prompts([""]).expand(5, -1, -1))
    with pytest.raises(ValueError, match="surrogate"):
        paired_training_set(embeddings, surrogates[:2], ordinary)


def pull(unet, data, context: torch.Tensor) -> float:
    """How much `context` lowers the denoising loss of image 0 below the empty prompt's, at fixed noise and
    timesteps: the pull towards the image that the caption, or an attacker's embedding, exerts."""
    from diffmem.metrics.quality import denoising_loss
    from diffmem.world.diffusion import noise_scheduler, to_model_range

    image = to_model_range(data.images[:1])

    def loss(embedding: torch.Tensor) -> float:
        return denoising_loss(unet, noise_scheduler(), image, embedding, timesteps_per_sample=32, seed=5)

    return loss(encode_prompts([""])) - loss(context)


def attack_pull(unet, data, start: str) -> float:
    """The pull of the embedding Dori finds for image 0 on `unet` (a seed no training round used)."""
    found = dori_attack(unet, data.images[:1], data.captions[0], DoriConfig(steps=20, batch_size=8, start=start,
                                                                           seed=77)).embedding
    return pull(unet, data, found)


@pytest.mark.slow
def test_adversarial_finetuning_weakens_the_pull_of_the_caption_and_of_dori(memorizing_unet, data):
    """Against the same training with image 0 itself as the 'surrogate' (same data, steps and searches: only the
    remapping differs), adversarial fine-tuning removes the caption's pull towards the memorized image and leaves
    a fresh Dori search from the caption or from random tokens a weaker pull (measured: caption 0.0024 -> -0.0012
    against 0.0020; Dori 0.0045 and 0.0047 against 0.0075 and 0.0070).

    What this tiny model does not show: a Dori pull below the memorizing model's own (0.0050 and 0.0044 before);
    on a UNet this small the attack's pull is mostly generic (a once-seen image gets as much), so there is little
    memorization for the fine-tuning to remove. On the example LoRA it is measured in
    `test_adversarial_finetuning_stops_dori_on_the_example_lora` and docs/robustness.md."""
    memorized, ordinary = data.subset([0]), data.subset(range(1, 6))
    mitigated = adversarial_finetune(memorizing_unet, memorized, ordinary, data.images[5:6].flip(-1), QUICK)
    control = adversarial_finetune(memorizing_unet, memorized, ordinary, data.images[:1], QUICK)
    caption = encode_prompts(data.captions[:1])
    before = pull(memorizing_unet, data, caption)
    assert pull(mitigated.unet, data, caption) < 0.25 * before < 0.5 * pull(control.unet, data, caption)
    for start in ("prompt", "random"):
        after, unchanged = attack_pull(mitigated.unet, data, start), attack_pull(control.unet, data, start)
        assert after < 0.75 * unchanged, (start, after, unchanged)


@pytest.mark.slow
def test_adversarial_finetuning_stops_dori_on_the_example_lora():
    """The example LoRA copies face 0 from its caption (7/8), and so does Dori's embedding from the caption (7/8,
    docs/robustness.md). After adversarial fine-tuning against face 0 (the settings of
    docs/robustness.md's row: 2 rounds of searches from the caption and random tokens, 40 full-model steps each) the
    caption and the same attack (15 steps, a seed the fine-tuning never used) give at most 2 copies in 8, and the
    held-out loss does not get worse."""
    from diffmem.attack import run_dori
    from diffmem.mitigations.adversarial import surrogate_images
    from diffmem.world.check import CheckSettings, example_lora_path, manifest_images
    from diffmem.world.diffusion import denoising_loss
    from diffmem.world.lora import apply_lora
    from diffmem.world.model import load_base

    manifest = json.loads(example_lora_path().with_suffix(".json").read_text())
    faces, others = manifest_images(manifest, "duplicated"), manifest_images(manifest, "seen_once")
    heldout = manifest_images(manifest, "heldout")
    base = load_base()
    lora = apply_lora(base, example_lora_path())
    config = AdversarialFinetuneConfig(rounds=2, starts=("prompt", "random"), search=DoriConfig(steps=10))
    face = faces.subset([0])
    result = adversarial_finetune(lora, face, others, surrogate_images(base, face.captions), config)
    reference = ImageSet.concat([faces, others]).images
    outcome = run_dori(result.unet, face.images, face.captions[0], DoriConfig(steps=15, seed=7), reference,
                       CheckSettings(steps=10))
    assert outcome.before.rate <= 0.25 and outcome.after.rate <= 0.25, outcome.summary()
    assert denoising_loss(result.unet, heldout.images, heldout.captions) <= denoising_loss(
        lora, heldout.images, heldout.captions)


def test_adversarial_finetuning_leaves_its_input_alone_and_reports_each_round(tiny_unet, data):
    weights = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    config = AdversarialFinetuneConfig(rounds=2, starts=("prompt", "unrelated"), search=DoriConfig(steps=2, batch_size=2),
                                       steps_per_round=2, batch_size=2)
    result = adversarial_finetune(tiny_unet, data.subset([0, 1]), data.subset([]), data.images[4:6], config)
    assert all(torch.equal(v, weights[k]) for k, v in tiny_unet.state_dict().items())
    assert not tiny_unet.training
    # The two captions, then 2 rounds x 2 images x 2 starts.
    assert result.embeddings.shape == (2 + 8, MAX_TOKENS, TEXT_DIM)
    assert result.embedding_image == [0, 1] + [0, 0, 1, 1] * 2
    assert [sorted(r.search_loss) for r in result.rounds] == [["prompt", "unrelated"]] * 2
    assert all(len(losses) == 2 for r in result.rounds for losses in r.search_loss.values())
    assert not any(torch.equal(v, weights[k]) for k, v in result.unet.state_dict().items() if v.is_floating_point()
                   and "weight" in k and v.numel() > 64)
    with pytest.raises(DiffmemError, match="one surrogate image per memorized image"):
        adversarial_finetune(tiny_unet, data.subset([0, 1]), data.subset([]), data.images[:1], config)


def run_cli(*argv: str) -> int:
    from diffmem.mitigations.commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["mitigate", "adversarial", *argv])
    return args.handler(args)


@pytest.fixture()
def tiny_world(tmp_path, tiny_unet):
    """A tiny world UNet file with a fine-tune manifest beside it: 1 duplicated face, 2 seen once, 2 held out."""
    from diffmem.world.data import faces_dataset

    train, heldout = faces_dataset("train"), faces_dataset("heldout")
    base = save_file(unet_tensors(tiny_unet, torch.float32), tmp_path / "tuned.safetensors", unet_metadata(TINY))
    entries = [{"id": i, "caption": c} for i, c in zip(train.ids, train.captions)]
    manifest = {"data": "faces", "duplicated": entries[:1], "seen_once": entries[1:3],
                "heldout": [{"id": i, "caption": c} for i, c in zip(heldout.ids[:2], heldout.captions[:2])]}
    (tmp_path / "tuned.json").write_text(json.dumps(manifest))
    return base


def test_command_writes_a_world_unet_and_manifest_that_the_attack_reads(tmp_path, tiny_world):
    from diffmem.attack.commands import manifest_reference
    from diffmem.world.model import load_unet_file

    out = tmp_path / "adv" / "robust.safetensors"
    code = run_cli("--base", str(tiny_world), "--surrogate-base", str(tiny_world), "--out", str(out), "--rounds", "1",
                   "--starts", "prompt", "--search-steps", "2", "--steps-per-round", "2", "--batch-size", "2")
    assert code == 0
    unet = load_unet_file(out)
    assert unet.config.block_out_channels == TINY.block_out_channels
    manifest = json.loads(out.with_suffix(".json").read_text())
    source = json.loads(tiny_world.with_suffix(".json").read_text())
    assert manifest["duplicated"] == source["duplicated"] and manifest["heldout"] == source["heldout"]
    assert manifest["adversarial"]["config"]["rounds"] == 1 and len(manifest["adversarial"]["rounds"]) == 1
    assert manifest_reference(out).shape == (3, 3, 32, 32)


def test_command_never_overwrites_its_input_and_refuses_bad_settings(tmp_path, tiny_world):
    before = tiny_world.read_bytes()
    with pytest.raises(DiffmemError, match="overwrite an input"):
        run_cli("--base", str(tiny_world), "--out", str(tiny_world), "--rounds", "1", "--steps-per-round", "1")
    assert tiny_world.read_bytes() == before
    with pytest.raises(DiffmemError, match="starts"):
        run_cli("--base", str(tiny_world), "--out", str(tmp_path / "x.safetensors"), "--starts", "nearby")
    with pytest.raises(DiffmemError, match="no such manifest"):
        run_cli("--base", str(tmp_path / "nothing.safetensors"), "--out", str(tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.json").exists()
