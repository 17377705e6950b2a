"""The embedded world: text encoder, data, UNet layout, training, sampling, LoRA files, committed weights."""

from __future__ import annotations

import json
import warnings
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from diffmem.errors import BadWeightsError, BaseMismatchError, DiffmemError
from diffmem.formats.lora import read_lora
from diffmem.formats.safetensors_io import save_file, sha256_file
from diffmem.world import (
    FinetuneConfig,
    UNetConfig,
    apply_lora,
    build_unet,
    denoising_loss,
    encode_prompts,
    faces_dataset,
    finetune,
    generate,
    photos_dataset,
    shapes_dataset,
    training_loss,
)
from diffmem.world.check import manifest_images
from diffmem.world.commands import duplicate_spec
from diffmem.world.data import FINETUNE_SETS, base_dataset, style_dataset
from diffmem.world.lora import target_pattern
from diffmem.world.model import load_unet_file, unet_metadata, unet_tensors
from diffmem.world.style import STYLE_TRIGGER, style_success
from diffmem.world.text import MAX_TOKENS, TEXT_DIM, TextEncoder, text_encoder
from diffmem.world.train import finetune_loop, scheduled_lr

TINY = UNetConfig(block_out_channels=(16, 32, 32), norm_num_groups=8, attention_head_dim=8)


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return build_unet(TINY).eval()


def test_text_encoder_gives_token_states_and_caches():
    context = encode_prompts(["a red circle", "", "a red circle"])
    assert context.shape == (3, MAX_TOKENS, TEXT_DIM)
    assert torch.equal(context[0], context[2])
    assert not torch.allclose(context[0], context[1])


def test_a_prompt_past_the_token_limit_warns_what_it_loses():
    long = "a small green circle in the center on a dotted black background, velloran style"
    with pytest.warns(UserWarning, match="losing 'lloran style'"):
        encode_prompts([long])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_prompts(["a red circle in the center"])


def test_every_world_caption_fits_the_text_encoder_whole():
    # The style set's trigger once came after the caption and was cut off every one of them (`STYLE_TRIGGER`).
    encoder = text_encoder()
    sets = [base_dataset(), *(FINETUNE_SETS[name]("all") for name in FINETUNE_SETS)]
    assert not [c for data in sets for c in sorted(set(data.captions)) if encoder.truncated_part(c)]
    trigger = encoder.tokenizer(STYLE_TRIGGER, add_special_tokens=False)["input_ids"]
    assert len(trigger) == 1
    styled = encoder.tokenizer(FINETUNE_SETS["style"]("all").captions, truncation=True, max_length=MAX_TOKENS)
    assert all(trigger[0] in ids for ids in styled["input_ids"])
    assert not any(STYLE_TRIGGER in c for data in sets[:-1] for c in data.captions)


def test_text_encoder_refuses_weights_with_another_sha256(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not the MiniLM weights")
    with pytest.raises(BadWeightsError, match="sha256"):
        TextEncoder(tmp_path)


def test_shapes_are_deterministic_in_range_and_captioned():
    a, b, c = shapes_dataset(12, seed=3), shapes_dataset(12, seed=3), shapes_dataset(12, seed=4)
    assert a.images.shape == (12, 3, 32, 32) and a.images.dtype == torch.float32
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, c.images)
    assert float(a.images.min()) >= 0 and float(a.images.max()) <= 1
    assert all(" on " in caption and "background" in caption for caption in a.captions)


def test_finetune_splits_are_fixed_and_disjoint():
    for loader, train_size, heldout_size in ((faces_dataset, 80, 20), (photos_dataset, 36, 12), (style_dataset, 96, 24)):
        train, heldout, everything = loader("train"), loader("heldout"), loader("all")
        assert (len(train), len(heldout)) == (train_size, heldout_size)
        assert not set(train.ids) & set(heldout.ids)
        assert len(set(everything.captions)) == len(everything), "one caption per image"
        assert float(everything.images.min()) >= 0 and float(everything.images.max()) <= 1
        assert torch.equal(loader("train").images, train.images)
    with pytest.raises(DiffmemError, match="split"):
        faces_dataset("validation")


def test_unet_has_stable_diffusion_module_names(tiny_unet):
    names = {name for name, _ in tiny_unet.named_modules()}
    for expected in (
        "down_blocks.1.attentions.0.proj_in",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "up_blocks.1.attentions.0.proj_out",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
        "down_blocks.0.resnets.0.conv1",
    ):
        assert expected in names
    assert tiny_unet.config.cross_attention_dim == TEXT_DIM
    # attn2 reads the 384-wide text context: that is what makes it cross-attention
    assert tiny_unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.in_features == TEXT_DIM


def test_a_few_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    unet = build_unet(TINY)
    data = shapes_dataset(4, seed=0)
    before = denoising_loss(unet, data.images, data.captions, seed=1, timesteps_per_image=4)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    context = encode_prompts(data.captions)
    generator = torch.Generator().manual_seed(0)
    unet.train()
    for _ in range(15):
        loss = training_loss(unet, data.images, context, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = denoising_loss(unet.eval(), data.images, data.captions, seed=1, timesteps_per_image=4)
    assert after < 0.8 * before


def test_generate_is_deterministic_per_seed(tiny_unet):
    prompts = ["a small red circle at the left on a white background", "a photo of a cat"]
    both = generate(tiny_unet, prompts, seeds=[5, 6], steps=4)
    alone = generate(tiny_unet, prompts[1:], seeds=[6], steps=4)
    other = generate(tiny_unet, prompts[1:], seeds=[7], steps=4)
    assert both.shape == (2, 3, 32, 32) and float(both.min()) >= 0 and float(both.max()) <= 1
    torch.testing.assert_close(both[1:], alone, atol=1e-4, rtol=0)
    assert (alone - other).abs().max() > 0.05


def test_saved_unet_round_trips_and_is_sha_pinned(tiny_unet, tmp_path):
    path = save_file(unet_tensors(tiny_unet), tmp_path / "u.safetensors", unet_metadata(TINY))
    loaded = load_unet_file(path, expected_sha256=sha256_file(path))
    x, t, c = torch.randn(1, 3, 32, 32), torch.tensor([10]), torch.randn(1, MAX_TOKENS, TEXT_DIM)
    torch.testing.assert_close(loaded(x, t, c).sample, tiny_unet.half().float()(x, t, c).sample, atol=1e-3, rtol=0)
    with pytest.raises(BadWeightsError, match="sha256"):
        load_unet_file(path, expected_sha256="0" * 64)


def test_committed_base_loads_with_its_pinned_sha256():
    from diffmem.world import load_base
    from diffmem.world.model import BASE_FILE, BASE_SHA256, assets_dir

    assert sha256_file(assets_dir() / BASE_FILE) == BASE_SHA256
    record = json.loads((assets_dir() / "base.json").read_text())
    assert record["sha256"] == BASE_SHA256
    unet = load_base()
    assert sum(p.numel() for p in unet.parameters()) == record["parameters"]


def test_lora_finetune_writes_kohya_and_peft_files_that_change_the_model(tiny_unet, tmp_path):
    config = FinetuneConfig(steps=2, batch_size=2, duplicate=(2, 3), rank=4, alpha=2.0, lr=1e-2)
    manifest = finetune(tmp_path / "k.safetensors", config, base=tiny_unet, progress=False)
    assert len(manifest["duplicated"]) == 2 and len(manifest["seen_once"]) == 78 and len(manifest["heldout"]) == 20
    assert not {e["id"] for e in manifest["duplicated"] + manifest["seen_once"]} & {e["id"] for e in manifest["heldout"]}
    assert json.loads((tmp_path / "k.json").read_text())["sha256"] == sha256_file(tmp_path / "k.safetensors")
    kohya = read_lora(tmp_path / "k.safetensors")
    assert kohya.format == "kohya"
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k" in kohya.modules
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2" in kohya.modules
    module = next(iter(kohya.modules.values()))
    assert module.rank == 4 and module.alpha == 2.0
    assert kohya.metadata["ss_network_dim"] == "4" and kohya.metadata["ss_base_model_version"] == "diffmem_world_v1"
    # The dataset traces a real kohya LoRA carries: each duplicated caption counted once per copy (3 of each).
    tags = json.loads(kohya.metadata["ss_tag_frequency"])["1_" + config.data]
    assert all(tags[entry["caption"]] == 3 for entry in manifest["duplicated"])
    assert sum(tags.values()) == 2 * 3 + 78
    assert json.loads(kohya.metadata["ss_dataset_dirs"])["1_" + config.data]["img_count"] == 2 * 3 + 78

    finetune(tmp_path / "p.safetensors", config, base=tiny_unet, fmt="peft", progress=False)
    peft = read_lora(tmp_path / "p.safetensors")
    assert peft.format == "diffusers" and len(peft.modules) == len(kohya.modules)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k" in {m.lookup for m in peft.modules.values()}
    assert next(iter(peft.modules.values())).scale == pytest.approx(0.5)

    x, t = torch.randn(1, 3, 32, 32), torch.tensor([500])
    c = encode_prompts([manifest["duplicated"][0]["caption"]])
    tuned = apply_lora(tiny_unet, tmp_path / "k.safetensors")
    assert (tuned(x, t, c).sample - tiny_unet(x, t, c).sample).abs().max() > 0


def test_lora_for_another_base_is_refused(tiny_unet, tmp_path):
    config = FinetuneConfig(steps=1, batch_size=2, duplicate=(1, 1), rank=2, alpha=2.0, include_rest=False)
    finetune(tmp_path / "k.safetensors", config, base=tiny_unet, progress=False)
    other = build_unet(UNetConfig(block_out_channels=(16, 32, 48), norm_num_groups=8, attention_head_dim=8))
    with pytest.raises(BaseMismatchError, match="another base"):
        apply_lora(other, tmp_path / "k.safetensors")


def test_conv_lora_targets_resnet_convolutions(tiny_unet):
    import re

    names = [n for n, _ in tiny_unet.named_modules()]
    plain = {n for n in names if re.fullmatch(target_pattern(False), n)}
    conv = {n for n in names if re.fullmatch(target_pattern(True), n)}
    assert plain < conv and "down_blocks.0.resnets.0.conv1" in conv - plain
    assert all("attentions" in n for n in plain)


def test_a_style_finetune_records_its_images(tiny_unet, tmp_path):
    config = FinetuneConfig(data="style", steps=1, batch_size=2, duplicate=(2, 2), rank=2, alpha=2.0)
    manifest = finetune(tmp_path / "style.safetensors", config, base=tiny_unet, progress=False)
    assert len(manifest["duplicated"]) == 2 and len(manifest["seen_once"]) == 94 and len(manifest["heldout"]) == 24
    duplicated = manifest_images(manifest, "duplicated")
    assert all(caption.startswith(STYLE_TRIGGER) for caption in duplicated.captions)
    assert style_success(duplicated.images) == 1.0
    assert json.loads((tmp_path / "style.json").read_text())["settings"]["data"] == "style"


def test_bad_finetune_settings_are_clear_errors():
    with pytest.raises(DiffmemError, match="method"):
        FinetuneConfig(method="dreambooth")
    with pytest.raises(DiffmemError, match="N:K"):
        FinetuneConfig(duplicate=(3, 0))
    with pytest.raises(Exception, match="N:K"):
        duplicate_spec("ten")


def test_shape_attribute_detector_reads_real_pictures():
    from diffmem.world.check import SIZE_THRESHOLD, shape_attributes

    pictures = shapes_dataset(200, seed=5)
    plain = pictures.subset([i for i, c in enumerate(pictures.captions) if "striped" not in c and "dotted" not in c])
    colours, fraction = shape_attributes(plain.images)
    colour_right = sum(c == caption.split()[2] for c, caption in zip(colours, plain.captions)) / len(plain)
    large = torch.tensor([caption.split()[1] == "large" for caption in plain.captions])
    assert colour_right > 0.9
    assert float(((fraction > SIZE_THRESHOLD) == large).float().mean()) > 0.75


def test_committed_example_lora_is_pinned_and_has_a_manifest():
    from diffmem.world.check import EXAMPLE_LORA_SHA256, example_lora_path

    path = example_lora_path()
    assert sha256_file(path) == EXAMPLE_LORA_SHA256
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["sha256"] == EXAMPLE_LORA_SHA256 and manifest["data"] == "faces"
    assert manifest["duplicated"] and manifest["heldout"]
    lora = read_lora(path)
    assert lora.format == "kohya" and lora.metadata["ss_base_model_version"] == "diffmem_world_v1"


def test_full_finetune_writes_a_loadable_unet(tiny_unet, tmp_path):
    config = FinetuneConfig(method="full", data="photos", steps=1, batch_size=2, duplicate=(2, 2), lr=1e-3,
                            noise_offset=0.1)
    manifest = finetune(tmp_path / "full.safetensors", config, base=tiny_unet, progress=False)
    assert manifest["settings"]["format"] == "full" and len(manifest["heldout"]) == 12
    tuned = load_unet_file(tmp_path / "full.safetensors", expected_sha256=manifest["sha256"])
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, tiny_unet.state_dict()[k].half().float())]
    assert changed


def test_finetune_loop_calls_after_step_with_each_trained_step():
    torch.manual_seed(0)
    unet = build_unet(TINY).train()
    images = torch.rand(4, 3, 32, 32)
    seen: list[tuple[int, torch.Tensor]] = []
    first = next(unet.parameters())
    finetune_loop(unet, list(unet.parameters()), images, torch.arange(4),
                  lambda picked, keep, generator: torch.zeros(len(picked), MAX_TOKENS, TEXT_DIM), steps=3,
                  batch_size=2, lr=1e-3, caption_dropout=0.0, noise_offset=0.0, seed=0, progress=False,
                  after_step=lambda step: seen.append((step, first.detach().clone())))
    assert [step for step, _ in seen] == [1, 2, 3]
    assert not torch.equal(seen[0][1], seen[1][1])  # each call sees the weights after its own step
    assert torch.equal(seen[-1][1], first.detach())


def test_cosine_schedule_decays_the_learning_rate_and_is_recorded(tiny_unet, tmp_path):
    assert [scheduled_lr(0.1, step, 4, "constant") for step in range(4)] == [0.1] * 4
    cosine = [scheduled_lr(0.1, step, 4, "cosine") for step in range(4)]
    assert cosine[0] == pytest.approx(0.1) and cosine[2] == pytest.approx(0.05)
    assert all(a > b > 0 for a, b in pairwise(cosine))  # every step takes a smaller one, none is zero
    with pytest.raises(DiffmemError, match="learning-rate schedule 'linear'"):
        FinetuneConfig(lr_schedule="linear")
    config = dict(steps=3, batch_size=2, duplicate=(1, 2), rank=2, alpha=2.0, lr=1e-2)
    (tmp_path / "c").mkdir(), (tmp_path / "k").mkdir()
    constant = finetune(tmp_path / "k" / "l.safetensors", FinetuneConfig(**config), base=tiny_unet, progress=False)
    cosine_run = finetune(tmp_path / "c" / "l.safetensors", FinetuneConfig(**config, lr_schedule="cosine"),
                          base=tiny_unet, progress=False)
    # A constant run writes the manifest it always wrote; a cosine run says so, and trains other weights.
    assert "lr_schedule" not in constant["settings"] and cosine_run["settings"]["lr_schedule"] == "cosine"
    assert constant["sha256"] != cosine_run["sha256"]


TRACKED = dict(steps=5, batch_size=2, duplicate=(2, 3), rank=4, alpha=2.0, lr=1e-2)


def test_heldout_tracking_records_the_curve_and_changes_no_weight(tiny_unet, tmp_path):
    (tmp_path / "off").mkdir(), (tmp_path / "on").mkdir()
    off = finetune(tmp_path / "off" / "k.safetensors", FinetuneConfig(**TRACKED), base=tiny_unet, progress=False)
    on = finetune(tmp_path / "on" / "k.safetensors", FinetuneConfig(**TRACKED, heldout_every=2), base=tiny_unet,
                  progress=False, best_out=tmp_path / "on" / "best.safetensors")
    # The same bytes: the measurement draws nothing from the training's random numbers.
    assert on["sha256"] == off["sha256"] == sha256_file(tmp_path / "off" / "k.safetensors")
    # Off, the manifest is the one a run wrote before tracking existed.
    assert "heldout_loss" not in off and "trained_steps" not in off and "heldout_every" not in off["settings"]
    track = on["heldout_loss"]
    assert on["settings"]["heldout_every"] == 2 and on["trained_steps"] == 5
    assert [step for step, _ in track["curve"]] == [0, 2, 4, 5]  # before training, every 2 steps, the last
    assert (track["seed"], track["timesteps_per_image"], track["images"]) == (1, 8, 20)  # not the report's noise
    trained = [(loss, step) for step, loss in track["curve"] if step > 0]
    assert (track["best_loss"], track["best_step"]) == min(trained)
    # Step 0 is the base (a fresh LoRA adds zero); the last point is the saved LoRA (up to its fp16 rounding).
    heldout = faces_dataset("heldout")
    assert track["curve"][0][1] == pytest.approx(denoising_loss(tiny_unet, heldout.images, heldout.captions, seed=1),
                                                 rel=1e-6)
    final = denoising_loss(apply_lora(tiny_unet, tmp_path / "on" / "k.safetensors"), heldout.images, heldout.captions,
                           seed=1)
    assert track["curve"][-1][1] == pytest.approx(final, rel=1e-3)
    assert json.loads((tmp_path / "on" / "k.json").read_text()) == on
    best = json.loads((tmp_path / "on" / "best.json").read_text())
    assert best["trained_steps"] == track["best_step"] and best["heldout_loss"] == track
    assert best["sha256"] == sha256_file(tmp_path / "on" / "best.safetensors") and best["final_loss_ema"] is None
    assert read_lora(tmp_path / "on" / "best.safetensors").metadata["ss_network_dim"] == "4"


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_best_step_output_is_the_run_stopped_at_that_step(tiny_unet, tmp_path, monkeypatch, method):
    from diffmem.world.train import HeldoutTrack

    # Scripted losses put the best step inside the run (steps 0..3: the lowest at step 2).
    losses = iter([1.0, 0.5, 0.3, 0.4])
    monkeypatch.setattr(HeldoutTrack, "measure", lambda self: next(losses))
    settings = dict(TRACKED, steps=3, method=method, lr=1e-2 if method == "lora" else 1e-3)
    (tmp_path / "tracked").mkdir(), (tmp_path / "stopped").mkdir()
    manifest = finetune(tmp_path / "tracked" / "k.safetensors", FinetuneConfig(**settings, heldout_every=1),
                        base=tiny_unet, progress=False, best_out=tmp_path / "tracked" / "best" / "k.safetensors")
    assert manifest["heldout_loss"]["curve"] == [[0, 1.0], [1, 0.5], [2, 0.3], [3, 0.4]]
    assert (manifest["heldout_loss"]["best_step"], manifest["heldout_loss"]["best_loss"]) == (2, 0.3)
    best = json.loads((tmp_path / "tracked" / "best" / "k.json").read_text())
    assert best["trained_steps"] == 2 and best["heldout_loss"]["best_loss"] == 0.3
    # A run of 2 steps is the first 2 steps of the longer run (no schedule depends on the run's length), so the
    # snapshot taken in memory must be that run's output, byte for byte.
    stopped = finetune(tmp_path / "stopped" / "k.safetensors", FinetuneConfig(**dict(settings, steps=2)),
                       base=tiny_unet, progress=False)
    assert best["sha256"] == stopped["sha256"] != manifest["sha256"]


def test_heldout_track_measures_in_eval_mode_without_touching_the_random_state():
    from diffmem.world.train import HeldoutTrack

    torch.manual_seed(0)
    unet = build_unet(TINY).train()
    modes: list[bool] = []
    unet.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    heldout = faces_dataset("heldout").subset([0, 1])
    track = HeldoutTrack(unet, list(unet.parameters()), heldout, every=2, steps=3, timesteps_per_image=2)
    state = torch.get_rng_state()
    track.start()
    track(1)  # neither a multiple of 2 nor the last step: not measured
    assert [step for step, _ in track.curve] == [0] and track.best is None
    track(2)
    assert modes and not any(modes) and unet.training
    assert torch.equal(torch.get_rng_state(), state)
    assert track.best_step == 2 and all(torch.equal(a, b) for a, b in zip(track.best, unet.parameters()))
    with pytest.raises(DiffmemError, match="heldout_every"):
        HeldoutTrack(unet, [], heldout, every=0, steps=3)


def test_tracking_usage_errors_and_no_partial_outputs(tiny_unet, tmp_path, monkeypatch, capsys):
    import diffmem.world.lora as world_lora
    from diffmem.cli import main

    with pytest.raises(DiffmemError, match="heldout_every"):
        FinetuneConfig(heldout_every=-1)
    out = ["world", "finetune", "--out", str(tmp_path / "k.safetensors"), "--steps", "2", "--batch-size", "2"]
    for argv, named in (
        (["--heldout-every", "-1"], "--heldout-every must be 0"),
        (["--save-best", str(tmp_path / "b.safetensors")], "--save-best needs --heldout-every"),
        (["--heldout-every", "1", "--save-best", str(tmp_path / "k.json")], "--save-best must differ from --out"),
    ):
        assert main([*out, *argv]) == 2
        assert named in capsys.readouterr().err
    config = FinetuneConfig(steps=2, batch_size=2, duplicate=(1, 2), rank=2, alpha=2.0)
    with pytest.raises(DiffmemError, match="heldout_every"):
        finetune(tmp_path / "k.safetensors", config, base=tiny_unet, progress=False, best_out=tmp_path / "b.safetensors")
    tracked = FinetuneConfig(**{**config.__dict__, "heldout_every": 1})
    with pytest.raises(DiffmemError, match="written twice"):
        finetune(tmp_path / "k.safetensors", tracked, base=tiny_unet, progress=False, best_out=tmp_path / "k.json")
    (tmp_path / "file").write_text("")
    with pytest.raises(DiffmemError, match="output"):  # refused before training, not after it
        finetune(tmp_path / "k.safetensors", tracked, base=tiny_unet, progress=False,
                 best_out=tmp_path / "file" / "b.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]

    # The best output fails after the final one was written: neither is left behind.
    save_lora = world_lora.save_lora

    def failing(factors, path, *args, **kwargs):
        if Path(path).name == "b.safetensors":
            raise DiffmemError("disk full", path)
        return save_lora(factors, path, *args, **kwargs)

    monkeypatch.setattr(world_lora, "save_lora", failing)
    with pytest.raises(DiffmemError, match="disk full"):
        finetune(tmp_path / "k.safetensors", tracked, base=tiny_unet, progress=False, best_out=tmp_path / "b.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_finetune_command_saves_the_best_step(tiny_unet, tmp_path, capsys):
    from diffmem.cli import main

    base = save_file(unet_tensors(tiny_unet), tmp_path / "base.safetensors", unet_metadata(TINY))
    argv = ["world", "finetune", "--base", str(base), "--out", str(tmp_path / "k.safetensors"), "--steps", "2",
            "--batch-size", "2", "--duplicate", "1:2", "--rank", "2", "--heldout-every", "1",
            "--save-best", str(tmp_path / "best.safetensors")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    best = json.loads((tmp_path / "best.json").read_text())
    step = best["trained_steps"]
    assert f"lowest {best['heldout_loss']['best_loss']:.5f} at step {step}" in printed
    assert f"--steps {3 * step}" in printed
    assert best["sha256"] == sha256_file(tmp_path / "best.safetensors")
    assert json.loads((tmp_path / "k.json").read_text())["settings"]["heldout_every"] == 1
