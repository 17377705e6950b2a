"""MemControl: PEFT methods under a mask, the mask derived from the UNet, mask files."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffmem.errors import DiffmemError, FileFormatError
from diffmem.memcontrol.functional import insert_random_words, spectral_shift_update
from diffmem.memcontrol.mask import check_mask_fits, derive_mask, load_mask, mask_entries, save_mask
from diffmem.memcontrol.methods import METHODS, merge, prepare
from diffmem.world.model import build_unet
from test_world import TINY

torch.set_num_threads(1)
PEFT_METHODS = ("svdiff", "difffit", "attention", "lora")


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return build_unet(TINY).eval()


@pytest.fixture(scope="module")
def sd_shaped_unet():
    """Stable Diffusion 1.x's block layout (module names) with tiny widths."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 8, 8, 8), layers_per_block=2, cross_attention_dim=8,
        attention_head_dim=4, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()


def inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, size = unet.config.in_channels, unet.config.sample_size
    return (torch.randn(2, c, size, size, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 4, unet.config.cross_attention_dim, generator=g))


def test_sd_layout_gives_the_seeds_13_blocks_and_16_layers(sd_shaped_unet):
    blocks = mask_entries(sd_shaped_unet, "blocks")
    layers = mask_entries(sd_shaped_unet, "layers")
    assert len(blocks) == 13 and len(layers) == 16
    names = [e.name for e in blocks]
    assert sum(n.startswith("down_blocks") for n in names) == 6
    assert names[6] == "mid_block.attentions.0"
    assert sum(n.startswith("up_blocks") for n in names) == 6
    # every attention module is under exactly one block entry; the third of an up block joins the second
    covered = [m for e in blocks for m in e.modules]
    assert sorted(covered) == sorted(e.name for e in layers)
    assert dict((e.name, e.modules) for e in blocks)["up_blocks.1.attentions.1"] == (
        "up_blocks.1.attentions.1", "up_blocks.1.attentions.2")


def test_world_layout_follows_the_model(tiny_unet):
    layers = [e.name for e in mask_entries(tiny_unet, "layers")]
    assert layers == ["down_blocks.1.attentions.0", "down_blocks.2.attentions.0", "mid_block.attentions.0",
                      "up_blocks.0.attentions.0", "up_blocks.0.attentions.1",
                      "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]
    assert len(mask_entries(tiny_unet, "blocks")) == 5
    with pytest.raises(DiffmemError, match="granularity"):
        mask_entries(tiny_unet, "heads")


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_fresh_injection_equals_base_and_gradients_reach_only_masked_in_modules(tiny_unet, method):
    mask = derive_mask(tiny_unet, "blocks", "10101")
    unet = copy.deepcopy(tiny_unet)
    trainable = prepare(unet, method, mask)
    assert trainable
    x, t, c = inputs(unet)
    with torch.no_grad():
        assert torch.equal(unet(x, t, c).sample, tiny_unet(x, t, c).sample)
    unet(x, t, c).sample.square().mean().backward()
    allowed = tuple(f"{m}." for m in mask.modules)
    with_grad = [n for n, p in unet.named_parameters() if p.grad is not None]
    assert with_grad and all(n.startswith(allowed) for n in with_grad), with_grad
    assert any(p.grad.abs().sum() > 0 for p in trainable)
    assert {id(p) for p in trainable} == {id(p) for p in unet.parameters() if p.requires_grad}


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_merge_keeps_the_trained_function_with_base_parameter_names(tiny_unet, method):
    unet = copy.deepcopy(tiny_unet)
    trainable = prepare(unet, method, derive_mask(tiny_unet, "layers"))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainable:
            p.add_(0.05 * torch.randn_like(p))
    x, t, c = inputs(unet, seed=2)
    with torch.no_grad():
        trained = unet(x, t, c).sample
        merge(unet)
        merged = unet(x, t, c).sample
    assert set(unet.state_dict()) == set(tiny_unet.state_dict())
    torch.testing.assert_close(merged, trained, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(merged, tiny_unet(x, t, c).sample, atol=1e-4)


def test_sd_layout_methods_respect_the_mask(sd_shaped_unet):
    mask = derive_mask(sd_shaped_unet, "blocks", "1" * 6 + "0" + "0" * 6)
    for method in PEFT_METHODS:
        unet = copy.deepcopy(sd_shaped_unet)
        prepare(unet, method, mask)
        trained = {n for n, p in unet.named_parameters() if p.requires_grad}
        assert trained and all(n.startswith("down_blocks.") for n in trained), method


def test_full_and_none(tiny_unet):
    unet = copy.deepcopy(tiny_unet)
    assert len(prepare(unet, "full")) == len(list(tiny_unet.parameters()))
    assert prepare(copy.deepcopy(tiny_unet), "none") == []
    with pytest.raises(DiffmemError, match="unknown fine-tuning method"):
        prepare(unet, "bitfit")
    assert set(METHODS) >= set(PEFT_METHODS)


def test_all_off_mask_trains_nothing(tiny_unet):
    for method in PEFT_METHODS:
        unet = copy.deepcopy(tiny_unet)
        assert prepare(unet, method, derive_mask(tiny_unet, "blocks", "00000")) == []


def test_spectral_shift_is_exactly_zero_at_zero_and_shifts_singular_values():
    w = torch.randn(6, 4)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    assert torch.equal(spectral_shift_update(u, s, vh, torch.zeros(4)), torch.zeros(6, 4))
    delta = torch.tensor([0.5, 0.0, -10.0, 0.0])
    shifted = w + spectral_shift_update(u, s, vh, delta)
    expected = torch.relu(s + delta)
    torch.testing.assert_close(torch.linalg.svdvals(shifted), expected.sort(descending=True).values, atol=1e-5, rtol=0)


def test_mask_file_round_trip_and_errors(tiny_unet, tmp_path, sd_shaped_unet):
    mask = derive_mask(tiny_unet, "layers", "1010011")
    path = save_mask(mask, tmp_path / "mask.json", {"chosen_by": "test"})
    loaded = load_mask(path)
    assert loaded == mask and loaded.bits == "1010011"
    check_mask_fits(loaded, tiny_unet)
    with pytest.raises(DiffmemError, match="do not match"):
        check_mask_fits(loaded, sd_shaped_unet, path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FileFormatError, match=r"bad\.json"):
        load_mask(tmp_path / "bad.json")
    record = json.loads(path.read_text())
    record["format"] = "something-else"
    (tmp_path / "other.json").write_text(json.dumps(record))
    with pytest.raises(FileFormatError, match="not a MemControl mask"):
        load_mask(tmp_path / "other.json")
    with pytest.raises(DiffmemError, match="switches"):
        derive_mask(tiny_unet, "layers", "101")


def test_random_word_addition_inserts_words_at_the_given_rate():
    g = torch.Generator().manual_seed(0)
    caption = "a black and white photo of Ada Albrecht"
    assert insert_random_words(caption, ["zebra"], 0.0, g) == caption
    assert insert_random_words(caption, ["zebra"], 1.0, g).split().count("zebra") == 9
    counts = [insert_random_words(caption, ["zebra"], 0.1, g).split().count("zebra") for _ in range(400)]
    assert 0.6 < sum(counts) / 400 < 1.2  # 9 slots x 0.1


def changed_keys(unet, base):
    after, before = unet.state_dict(), base.state_dict()
    return {k for k in before if not torch.equal(after[k], before[k])}


def test_masked_finetune_changes_only_masked_in_modules_and_writes_a_manifest(tiny_unet, tmp_path):
    from diffmem.memcontrol.train import MemControlTrainConfig, finetune_with_mask, manifest_of

    mask = derive_mask(tiny_unet, "blocks", "10000")
    config = MemControlTrainConfig(method="svdiff", duplicate=(2, 3), rest_share=0.05, steps=2, batch_size=2)
    result = finetune_with_mask(tiny_unet, config, mask, progress=False)
    changed = changed_keys(result.unet, tiny_unet)
    assert changed and all(k.startswith("down_blocks.1.attentions.0.") for k in changed)
    assert len(result.duplicated) == 2 and len(result.seen_once) == 4  # 5% of the 78 other faces
    manifest = manifest_of(result, config, mask)
    assert manifest["mask"]["bits"] == "10000" and manifest["settings"]["lr"] == 1e-3
    assert {e["id"] for e in manifest["duplicated"]}.isdisjoint(e["id"] for e in manifest["seen_once"])


def test_mitigations_run_through_the_same_loop(tiny_unet):
    from diffmem.memcontrol.mitigation import MitigationConfig
    from diffmem.memcontrol.train import MemControlTrainConfig, finetune_with_mask

    base = dict(method="difffit", duplicate=(2, 3), rest_share=0.0, steps=2, batch_size=2, caption_dropout=0.0)
    rwa = finetune_with_mask(tiny_unet, MemControlTrainConfig(**base, mitigation=MitigationConfig("rwa")),
                             progress=False)
    assert changed_keys(rwa.unet, tiny_unet)
    # every sample's norm exceeds a tiny threshold: all are dropped, nothing trains
    strict = MemControlTrainConfig(**base, mitigation=MitigationConfig("threshold", threshold=1e-6))
    assert not changed_keys(finetune_with_mask(tiny_unet, strict, progress=False).unet, tiny_unet)
    loose = MemControlTrainConfig(**base, mitigation=MitigationConfig("threshold", threshold=1e6))
    assert changed_keys(finetune_with_mask(tiny_unet, loose, progress=False).unet, tiny_unet)
    with pytest.raises(DiffmemError, match="unknown mitigation"):
        MitigationConfig("dedup")
    with pytest.raises(DiffmemError, match="takes no mask"):
        finetune_with_mask(tiny_unet, MemControlTrainConfig(method="full", steps=1),
                           derive_mask(tiny_unet, "blocks"), progress=False)


def test_cli_mask_then_train_writes_a_loadable_unet_and_manifest(tmp_path, capsys):
    from diffmem.cli import main as cli_main
    from diffmem.world.model import load_base, load_unet_file

    def main(argv: list[str]) -> int:
        return cli_main(["memcontrol", *argv])

    assert main(["mask", "--out", str(tmp_path / "mask.json"), "--bits", "00100"]) == 0
    assert load_mask(tmp_path / "mask.json").bits == "00100"
    out = tmp_path / "tuned.safetensors"
    assert main(["train", "--out", str(out), "--method", "difffit", "--mask", str(tmp_path / "mask.json"),
                 "--steps", "1", "--batch-size", "2", "--duplicate", "2:2", "--rest-share", "0"]) == 0
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["mask"]["bits"] == "00100" and manifest["settings"]["method"] == "difffit"
    changed = changed_keys(load_unet_file(out), load_base())
    assert changed and all(k.startswith("mid_block.attentions.0.") for k in changed)
    capsys.readouterr()
    assert main(["mask", "--out", str(tmp_path / "short.json"), "--bits", "01"]) == 1
    assert "switches" in capsys.readouterr().err
    assert not (tmp_path / "short.json").exists()
    # a table whose --doc lacks the --name markers fails before it trains anything
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- memcontrol table faces start -->\n<!-- memcontrol table faces end -->\n")
    assert main(["table", "--quick", "--out", str(tmp_path / "t"), "--doc", str(doc), "--name", "seed-1"]) == 1
    assert "memcontrol table seed-1 start" in capsys.readouterr().err and not (tmp_path / "t").exists()


def test_table_rows_follow_the_seeds_table_1(tiny_unet):
    from diffmem.memcontrol.table import TableConfig, markdown_table, row_label, table_rows

    mask = derive_mask(tiny_unet, "blocks")
    rows = table_rows(mask, "svdiff", ("none", "rwa", "threshold"))
    # freeze 1, full/SV-DIFF/DiffFit/attention x 3 mitigations, LoRA (not in the seed) plain only, MemControl x 3
    assert len(rows) == 17 and rows[0] == ("none", "none", False)
    assert ("lora", "none", False) in rows and ("lora", "rwa", False) not in rows
    assert ("none", "rwa", False) not in rows
    assert rows[-3:] == [("svdiff", "none", True), ("svdiff", "rwa", True), ("svdiff", "threshold", True)]
    assert len(table_rows(None, None, ("none",))) == 6
    assert table_rows(mask, "difffit", ("none",), ()) == [("difffit", "none", True)]
    assert row_label("svdiff", "rwa", True) == "MemControl (SV-DIFF mask) + RWA"
    line = {"label": "Full FT", "fid": 1.5, "amd": 0.61, "extracted": 2, "copy_rate": 0.25, "wen": 3.1,
            "heldout_loss": 0.05, "trainable_parameters": 10, "lr": 1e-3, "own_distance": 0.3}
    assert "| Full FT | 1.50 | 0.610 | 2 | 0.250 | 0.300 | 3.100 | 0.0500 | 10 | 0.001 |" in markdown_table([line])
    frozen = {**line, "label": "Freeze", "trainable_parameters": 0}
    assert markdown_table([frozen]).rstrip().endswith("| 0 | - |")
    repeated = {**line, "label": "MemControl (SV-DIFF mask)", "same_as": "SV-DIFF"}
    assert "| MemControl (SV-DIFF mask) (the SV-DIFF run: same modules) |" in markdown_table([repeated])
    with pytest.raises(DiffmemError, match="unknown mitigation"):
        TableConfig(mitigations=("dedup",))
    with pytest.raises(DiffmemError, match="lr_scale"):
        TableConfig(lr_scale=0.0)


def test_a_table_with_no_rows_is_refused_before_any_work(tmp_path):
    from diffmem.memcontrol.table import TableConfig, run_table

    with pytest.raises(DiffmemError, match="no row to measure"):
        run_table(tmp_path / "t", TableConfig(methods=()), progress=False)
    assert not (tmp_path / "t").exists()


def test_an_all_on_mask_trains_what_the_unmasked_method_trains(tiny_unet):
    from diffmem.memcontrol.table import trained_modules

    everything = trained_modules(tiny_unet, "svdiff", None)
    assert everything and trained_modules(tiny_unet, "svdiff", derive_mask(tiny_unet, "blocks")) == everything
    partial = trained_modules(tiny_unet, "svdiff", derive_mask(tiny_unet, "blocks", "10000"))
    assert partial != everything and set(partial) < set(everything)
    assert trained_modules(tiny_unet, "full", None) is None


def test_table_goes_between_its_markers_and_nowhere_else(tmp_path):
    from diffmem.memcontrol.table import markdown_table, table_markers, updated_doc, write_table_into

    start, end = table_markers("faces")
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{start}\nold table\n{end}\nafter\n")
    row = {"label": "Full FT", "fid": 1.5, "amd": 0.61, "extracted": 2, "copy_rate": 0.25, "wen": 3.1,
           "heldout_loss": 0.05, "trainable_parameters": 10, "lr": 1e-4, "own_distance": 0.3}
    write_table_into(doc, "faces", markdown_table([row]))
    text = doc.read_text()
    assert text.startswith(f"intro\n{start}\n| FT method") and text.endswith(f"{end}\nafter\n")
    assert "old table" not in text and "| Full FT | 1.50 |" in text
    with pytest.raises(DiffmemError, match="memcontrol table photos start"):
        updated_doc(doc, "photos", "")
    with pytest.raises(DiffmemError, match="cannot read"):
        updated_doc(tmp_path / "missing.md", "faces", "")


def test_training_norms_are_per_sample_and_fixed_timesteps_are_honoured(tiny_unet):
    from diffmem.memcontrol.mitigation import training_norms
    from diffmem.world.data import faces_dataset

    faces = faces_dataset("train").subset([0, 1, 2])
    norms, timesteps = training_norms(tiny_unet, faces.images, faces.captions, draws=2)
    assert norms.shape == (6,) and (norms > 0).all() and timesteps.unique().numel() > 1
    fixed, at = training_norms(tiny_unet, faces.images, faces.captions, draws=1, timestep=900)
    assert (at == 900).all() and fixed.shape == (3,)


def test_rows_of_a_split_table_are_collected_in_the_seeds_order(tmp_path):
    from diffmem.memcontrol.table import collect_rows

    def row(label, method, mitigation, mask=None):
        return {"label": label, "method": method, "mitigation": mitigation, "mask": mask}

    def write(name, rows, steps=200):
        path = tmp_path / name
        path.write_text(json.dumps({"settings": {"train": {"steps": steps}, "methods": ["x"], "mitigations": ["y"]},
                                    "rows": rows}))
        return path

    first = write("a.json", [row("MemControl (SV-DIFF mask)", "svdiff", "none", "11111"),
                             row("Full FT + RWA", "full", "rwa")])
    second = write("b.json", [row("SV-DIFF", "svdiff", "none"), row("Full FT", "full", "none"),
                              row("Freeze (no fine-tuning)", "none", "none")])
    labels = [r["label"] for r in collect_rows([first, second])]
    assert labels == ["Freeze (no fine-tuning)", "Full FT", "Full FT + RWA", "SV-DIFF", "MemControl (SV-DIFF mask)"]
    with pytest.raises(DiffmemError, match="more than once: Full FT \\+ RWA"):
        collect_rows([first, first])
    with pytest.raises(DiffmemError, match="other settings"):
        collect_rows([first, write("c.json", [row("DiffFit", "difffit", "none")], steps=100)])


def test_spread_over_seeds_gives_each_rows_mean_and_range_and_refuses_other_settings(tmp_path):
    from diffmem.memcontrol.table import SPREAD_COLUMNS, seed_spread, spread_table

    def write(name, seed, copy_rates, steps=200):
        rows = [{"label": label, **{key: 0.5 for key, _, _ in SPREAD_COLUMNS}, "copy_rate": rate}
                for label, rate in copy_rates.items()]
        path = tmp_path / name
        path.write_text(json.dumps({"settings": {"train": {"steps": steps, "seed": seed}, "methods": ["full"]},
                                    "rows": rows}))
        return path

    seed0 = write("0.json", 0, {"Full FT": 0.25, "SV-DIFF": 0.0})
    seed1 = write("1.json", 1, {"SV-DIFF": 0.0, "Full FT": 0.75})
    seed2 = write("2.json", 2, {"Full FT": 0.5, "SV-DIFF": 0.25})
    spread = seed_spread([seed0, seed1, seed2])
    assert [r["label"] for r in spread] == ["Full FT", "SV-DIFF"] and spread[0]["seeds"] == [0, 1, 2]
    assert spread[0]["copy_rate"] == {"mean": pytest.approx(0.5), "min": 0.25, "max": 0.75}
    assert "| Full FT | 0.50 (0.25 to 0.75) | 0.500 (0.500 to 0.500) |" in spread_table(spread)
    with pytest.raises(DiffmemError, match="other settings"):
        seed_spread([seed0, write("steps.json", 3, {"Full FT": 0.0, "SV-DIFF": 0.0}, steps=100)])
    with pytest.raises(DiffmemError, match="seed 0 is given twice"):
        seed_spread([seed0, write("again.json", 0, {"Full FT": 0.0, "SV-DIFF": 0.0})])
    with pytest.raises(DiffmemError, match="not the first file's rows"):
        seed_spread([seed0, write("fewer.json", 4, {"Full FT": 0.0})])
    with pytest.raises(DiffmemError, match="at least two seeds"):
        seed_spread([seed0])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DiffmemError, match=r"bad\.json"):
        seed_spread([seed0, tmp_path / "bad.json"])


@pytest.mark.slow
def test_table_run_measures_each_row_and_reuses_a_repeated_training(tmp_path):
    from diffmem.memcontrol.methods import default_lr
    from diffmem.memcontrol.table import TableConfig, run_table
    from diffmem.memcontrol.train import MemControlTrainConfig
    from diffmem.world.model import load_base

    save_mask(derive_mask(load_base(), "blocks"), tmp_path / "mask.json", {"search": {"method": "svdiff"}})
    config = TableConfig(train=MemControlTrainConfig(steps=1, batch_size=2, duplicate=(2, 2), rest_share=0.05),
                         wen_steps=2, wen_generations=1, methods=("none", "svdiff"), mitigations=("none",),
                         lr_scale=3.0)
    rows = run_table(tmp_path / "t", config, tmp_path / "mask.json", progress=False)
    assert [r["label"] for r in rows] == ["Freeze (no fine-tuning)", "SV-DIFF", "MemControl (SV-DIFF mask)"]
    assert rows[1]["lr"] == pytest.approx(3.0 * default_lr("svdiff")) and rows[1]["trainable_parameters"] > 0
    assert rows[2]["same_as"] == "SV-DIFF" and rows[2]["mask"] == "11111"
    assert rows[2]["fid"] == rows[1]["fid"] and rows[2]["train_s"] == 0 and rows[2]["cpu_s"] == 0
    assert rows[1]["cpu_s"] >= rows[1]["train_cpu_s"] >= 0 and rows[1]["cpu_s"] > 0
    assert rows[0]["trainable_parameters"] == 0 and rows[0]["lr"] is None and rows[0]["wen"] > 0
    record = json.loads((tmp_path / "t" / "rows.json").read_text())
    assert [r["label"] for r in record["rows"]] == [r["label"] for r in rows]
    assert "(the SV-DIFF run: same modules)" in (tmp_path / "t" / "table.md").read_text()

    # side by side in two processes: the same rows, in the same order, to the digit (only the timings differ)
    timings = ("train_s", "total_s", "train_cpu_s", "cpu_s")
    parallel = run_table(tmp_path / "t2", config, tmp_path / "mask.json", progress=False, workers=2)
    assert [{k: v for k, v in r.items() if k not in timings} for r in parallel] == \
        [{k: v for k, v in r.items() if k not in timings} for r in rows]
    assert json.loads((tmp_path / "t2" / "rows.json").read_text())["rows"] == parallel
    with pytest.raises(DiffmemError, match="workers"):
        run_table(tmp_path / "t3", config, tmp_path / "mask.json", progress=False, workers=0)


def test_a_stopped_table_resumes_with_only_the_rows_it_had_not_finished(tmp_path, monkeypatch):
    from diffmem.memcontrol import table
    from diffmem.memcontrol.train import MemControlTrainConfig
    from diffmem.world.model import load_base

    trained = []

    def fake_row(config, method, mitigation, mask):
        trained.append((method, mitigation, None if mask is None else mask.bits))
        return {"method": method, "mitigation": mitigation, "mask": None if mask is None else mask.bits, "lr": None,
                "fid": float(len(trained)), "amd": 0.5, "extracted": 0, "copy_rate": 0.0, "own_distance": 0.5,
                "wen": 1.0, "heldout_loss": 0.06, "trainable_parameters": 0}

    monkeypatch.setattr(table, "train_and_measure", fake_row)
    save_mask(derive_mask(load_base(), "blocks", "10101"), tmp_path / "mask.json",
              {"search": {"method": "svdiff"}})
    config = table.TableConfig(train=MemControlTrainConfig(steps=1, batch_size=2, duplicate=(2, 2)),
                               methods=("none", "svdiff"), mitigations=("none",))
    first = table.run_table(tmp_path / "t", config, tmp_path / "mask.json", progress=False)
    assert len(trained) == 3 and [r["label"] for r in first][1] == "SV-DIFF"

    # everything finished: nothing trains again, the same rows come back
    assert table.run_table(tmp_path / "t", config, tmp_path / "mask.json", progress=False) == first
    assert len(trained) == 3

    # a run stopped before its SV-DIFF row: only that row trains, the others keep their numbers
    rows_file = tmp_path / "t" / "rows.json"
    record = json.loads(rows_file.read_text())
    record["rows"] = [r for r in record["rows"] if r["label"] != "SV-DIFF"]
    rows_file.write_text(json.dumps(record))
    resumed = table.run_table(tmp_path / "t", config, tmp_path / "mask.json", progress=False)
    assert trained[3:] == [("svdiff", "none", None)]
    assert [r["label"] for r in resumed] == [r["label"] for r in first]
    assert resumed[0] == first[0] and resumed[2] == first[2] and resumed[1]["fid"] == 4.0

    # another budget, another mask or a broken file in the folder is refused, not mixed in
    with pytest.raises(DiffmemError, match=r"rows\.json.*other settings"):
        table.run_table(tmp_path / "t", replace(config, wen_steps=3), tmp_path / "mask.json", progress=False)
    save_mask(derive_mask(load_base(), "blocks", "11100"), tmp_path / "other.json",
              {"search": {"method": "svdiff"}})
    with pytest.raises(DiffmemError, match="mask 10101, not 11100"):
        table.run_table(tmp_path / "t", config, tmp_path / "other.json", progress=False)
    rows_file.write_text("[1, 2]")
    with pytest.raises(DiffmemError, match="cannot read a table"):
        table.run_table(tmp_path / "t", config, tmp_path / "mask.json", progress=False)
    assert len(trained) == 4
