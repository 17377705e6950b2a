"""diffmem.bench: the grid, the statistics, the resumable runner, the report and the channel ablations."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
from PIL import Image

from diffmem.bench import grid
from diffmem.bench.channels import ChannelTruthConfig, ablate_channels, memorizing_labels, separation, share
from diffmem.bench.evaluate import MEASUREMENTS, BenchSettings, retained
from diffmem.bench.grid import (
    CORE,
    EVIDENCE_PLAN,
    EVIDENCE_SETTINGS,
    FULL_PLAN,
    HELDOUT_EVERY,
    OVERTRAIN_FACTOR,
    QUICK_PLAN,
    TRANSFORMS,
    VARIATION_PLAN,
    FinetuneSpec,
    GridCell,
    VariantPlan,
    budget_variant,
    evidence_grid,
    full_grid,
    quick_grid,
    reference_variants,
    scaled_after,
)
from diffmem.bench.report import (
    HAND_WRITTEN,
    METHOD_COLOURS,
    by_finetune_table,
    comparison_table,
    copying_finetunes,
    equal_quality_table,
    goal_table,
    image_panel,
    meets_goal,
    setting_table,
    with_retention,
    write_results,
)
from diffmem.bench.run import (
    append_row,
    current_rows,
    ensure_finetune,
    read_rows,
    run_bench,
    settings_id,
    variant_lora,
)
from diffmem.bench.stats import copy_rate_at_quality, format_interval, mean_interval
from diffmem.errors import DiffmemError
from diffmem.filters import BAFConfig
from diffmem.report import png_description, save_png
from diffmem.world.train import FinetuneConfig

# --- grid -----------------------------------------------------------------------------------------------------


def test_core_is_the_committed_example_recipe():
    assert CORE.finetune_config() == FinetuneConfig()
    assert CORE.name == "faces-r32-conv-d5x100-s0" and CORE.setting == "faces-r32-conv-d5x100"


def test_full_grid_puts_core_seeds_first_and_names_are_unique():
    cells = full_grid(seeds=3, variation_seeds=2)
    names = [c.spec.name for c in cells]
    assert len(set(names)) == len(names) == 3 + 2 * 5
    assert [c.spec.seed for c in cells[:3]] == [0, 1, 2] and all(c.spec.setting == CORE.setting for c in cells[:3])
    assert {c.spec.data for c in cells} == {"faces", "photos"}
    assert {c.spec.rank for c in cells} == {4, 32, 64} and {c.spec.conv for c in cells} == {True, False}
    for cell in cells:
        assert cell.spec.finetune_config().alpha == cell.spec.rank


def test_a_recipe_length_other_than_the_default_is_in_the_name_and_the_config():
    long = replace(CORE, data="style", steps=1500, lr_schedule="cosine", stage="tuned")
    assert long.name == "style-r32-conv-d5x100-1500steps-cos-tuned-s0" and long.finetune_config().steps == 1500
    assert CORE.name == "faces-r32-conv-d5x100-s0" and CORE.finetune_config() == FinetuneConfig()
    with pytest.raises(ValueError, match="steps"):
        replace(CORE, steps=0)

def test_evidence_grid_has_tuned_overtrained_and_style_settings_seed_by_seed():
    cells = evidence_grid(seeds=5)
    names = [c.spec.name for c in cells]
    assert len(set(names)) == len(names) == 5 * len(EVIDENCE_SETTINGS) == 15
    assert [c.spec.seed for c in cells[:3]] == [0, 0, 0]  # every setting at seed 0 before any at seed 1
    assert {(c.spec.data, c.spec.stage, c.spec.duplicate) for c in cells} == {
        ("faces", "tuned", (5, 100)), ("faces", "over-trained", (5, 100)), ("style", "tuned", (5, 20))}
    style = next(c.spec for c in cells if c.spec.data == "style")
    assert style.setting == "style-r32-conv-d5x20-1500steps-cos-tuned" and style.finetune_config().steps == 1500
    assert all(c.plan == EVIDENCE_PLAN for c in cells)
    tuned = next(c.spec for c in cells if c.spec.stage == "tuned")
    assert tuned.name == "faces-r32-conv-d5x100-cos-tuned-s0" and tuned.setting == "faces-r32-conv-d5x100-cos-tuned"
    assert tuned.finetune_config().heldout_every == HELDOUT_EVERY and CORE.finetune_config().heldout_every == 0
    assert tuned.finetune_config().lr_schedule == "cosine" and CORE.finetune_config().lr_schedule == "constant"
    assert replace(tuned, stage="over-trained").finetune_config().heldout_every == 0
    assert replace(tuned, lr_schedule="constant").name == "faces-r32-conv-d5x100-tuned-s0"
    with pytest.raises(ValueError, match="stage must be one of"):
        FinetuneSpec(stage="best")
    with pytest.raises(DiffmemError, match="learning-rate schedule"):
        FinetuneSpec(lr_schedule="step")
    # Two processes can split the seeds of one setting.
    split = evidence_grid(seeds=2, first_seed=3, only=[tuned.setting])
    assert [c.spec.name for c in split] == ["faces-r32-conv-d5x100-cos-tuned-s3", "faces-r32-conv-d5x100-cos-tuned-s4"]
    with pytest.raises(ValueError, match="not a setting of the evidence grid: faces-tuned"):
        evidence_grid(only=["faces-tuned"])


def test_bench_refuses_evidence_options_outside_the_evidence_grid(capsys):
    from diffmem.cli import main

    for argv, said in ((["--first-seed", "1"], "--first-seed and --only choose cells of --grid evidence"),
                       (["--grid", "evidence", "--first-seed", "-1"], "--first-seed must be at least 0"),
                       (["--grid", "evidence", "--only", "nope"], "--only: not a setting of the evidence grid"),
                       (["--grid", "evidence", "--fill-missing", "any_copy"],
                        "--fill-missing: not a measurement of the bench: any_copy")):
        assert main(["bench", "--work", "/nonexistent/diffmem-bench", *argv]) == 2
        assert said in capsys.readouterr().err


def test_variant_keys_are_unique_and_budgets_reach_the_selection():
    keys = [v.key for v in reference_variants() + FULL_PLAN.variants(0.5)]
    assert len(set(keys)) == len(keys)
    variant = budget_variant("magnitude", "energy", 0.8)
    assert variant.config.selection.rule == "energy" and variant.config.selection.keep_fraction == 0.8
    scale = budget_variant("scale", "energy", 0.5)
    assert scale.config.selection.rule == "uniform"
    with pytest.raises(ValueError):
        budget_variant("scale", "fraction", 0.5)
    fractions = [v for v in QUICK_PLAN.variants(0.4321) if v.budget == "fraction"]
    assert {v.level for v in fractions} == {0.432} and {v.key for v in fractions} == {
        "baf@fraction=matched", "random@fraction=matched", "magnitude@fraction=matched"}


def test_peft_intruder_is_a_transform_of_the_full_and_variation_plans_not_the_quick_one():
    for plan in (FULL_PLAN, VARIATION_PLAN):
        assert [v.key for v in plan.variants(0.5)].count("peft-intruder") == 1
    assert all(v.transform is None for cell in quick_grid() for v in cell.plan.variants(0.5))  # --quick: as before
    variant = TRANSFORMS["peft-intruder"]
    assert variant.method == "peft-intruder" and variant.budget == "default" and variant.level is None
    assert variant.config is None and variant.transform is not None and not variant.is_base
    assert [v.is_base for v in reference_variants()] == [False, True, False]
    assert "peft-intruder" in METHOD_COLOURS


def test_extraction_guided_variants_score_each_lora_once_and_keep_their_energy(monkeypatch):
    """The evidence plan's two extraction-guided budgets on the world's example LoRA: one scan-and-score per LoRA
    file (scores from a stand-in here: the scan takes minutes), and each output holds its budget of the energy."""
    import diffmem.mitigations.extraction_guided as extraction_guided
    from diffmem.formats.lora import read_lora
    from diffmem.pipeline import channels_of
    from diffmem.world.check import example_lora_path
    from diffmem.world.model import BASE_FILE, assets_dir

    calls = []

    def stand_in(lora, base, config):
        calls.append(lora.path)
        channels = channels_of(dict(lora.modules))
        return {name: -torch.arange(c.count, dtype=torch.float32) for name, c in channels.items()}  # small first

    monkeypatch.setattr(extraction_guided, "scan_and_score", stand_in)
    monkeypatch.setattr(grid, "EXTRACTION_SCORES", {})
    variants = [v for v in EVIDENCE_PLAN.variants(0.5) if v.method == "extraction-guided"]
    assert [(v.key, v.budget, v.level) for v in variants] == [("extraction-guided@energy=0.9", "energy", 0.9),
                                                            ("extraction-guided@energy=0.8", "energy", 0.8)]
    assert not any(v.method == "extraction-guided" for v in FULL_PLAN.variants(0.5))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kept = [variant_lora(v, example_lora_path(), assets_dir() / BASE_FILE)[2]["energy_kept"] for v in variants]
    finally:
        torch.set_num_threads(threads)
    assert calls == [example_lora_path()]
    assert 0.9 <= kept[0] < 0.92 and 0.8 <= kept[1] < 0.82
    assert read_lora(example_lora_path()).update_energy() > 0


def test_collect_probe_writes_the_rows_commands_and_curves_of_a_probe_folder(tmp_path):
    from diffmem.bench.run import collect_probe

    rows = [{"command": "python b.py --seed 1", "lora": "x-final"}, {"command": "python a.py", "lora": "base"}]
    for row in rows:
        append_row(tmp_path / "rows.jsonl", row)
    curve = {"every": 25, "curve": [[0, 0.07], [25, 0.05]], "best_step": 25}
    (tmp_path / "x-final.json").write_text(json.dumps({"heldout_loss": curve}))
    (tmp_path / "x-tuned.json").write_text(json.dumps({"heldout_loss": {}}))  # a best step's manifest: not a run
    assert collect_probe(tmp_path) == rows and not (tmp_path / "out.json").exists()
    assert collect_probe(tmp_path, tmp_path / "out.json", {"note": 4}) == rows
    record = json.loads((tmp_path / "out.json").read_text())
    assert list(record) == ["commands", "settings", "note", "rows", "heldout_curves"]
    assert record["commands"] == ["python a.py", "python b.py --seed 1"] and record["rows"] == rows
    assert record["heldout_curves"] == {"x-final": curve} and record["settings"]["generations"] == 6
    # A later session's folder holds only its own run: the earlier rows and curves stay in the JSON, a repeated
    # measurement once.
    later = tmp_path / "later"
    later.mkdir()
    for row in ({"command": "python b.py --seed 2", "lora": "y-final"}, rows[1] | {"seconds": 3}):
        append_row(later / "rows.jsonl", row)
    (later / "y-final.json").write_text(json.dumps({"heldout_loss": {"best_step": 50}}))
    assert [r["lora"] for r in collect_probe(later, tmp_path / "out.json")] == ["x-final", "y-final", "base"]
    assert set(json.loads((tmp_path / "out.json").read_text())["heldout_curves"]) == {"x-final", "y-final"}


def test_a_filter_then_scale_holds_the_total_energy_it_names():
    """`scaled_after`: random channels at 90% of each module's energy, then the whole LoRA down to 50% of the input's
    energy; a first step that already keeps less is left as it is; the evidence plan runs both hybrids at 50% and
    35% with random channels as the control."""
    from diffmem.formats.base import open_base
    from diffmem.formats.lora import read_lora
    from diffmem.pipeline import filter_lora
    from diffmem.world.check import example_lora_path
    from diffmem.world.model import BASE_FILE, assets_dir

    lora, base = read_lora(example_lora_path()), open_base(assets_dir() / BASE_FILE)
    first = budget_variant("random", "energy", 0.9)
    hybrid = scaled_after(first, 0.5)
    assert (hybrid.key, hybrid.method, hybrid.budget, hybrid.level) == (
        "random@energy=0.9+scale@energy=0.5", "random+scale", "energy", 0.5)
    out = hybrid.transform(lora, base)
    filtered = filter_lora(lora, base, first.config).lora
    assert out.update_energy() == pytest.approx(0.5 * lora.update_energy(), rel=1e-4)
    for name, module in out.modules.items():  # the same channels as the filter alone, each turned down alike
        factor = (module.delta().norm() / filtered.modules[name].delta().norm()).item()
        assert factor == pytest.approx((0.5 * lora.update_energy() / filtered.update_energy()) ** 0.5, rel=1e-3) \
            or filtered.modules[name].delta().norm() == 0
    weak = scaled_after(budget_variant("scale", "energy", 0.25), 0.5).transform(lora, base)
    assert weak.update_energy() == pytest.approx(0.25 * lora.update_energy(), rel=1e-4)
    hybrids = [v.key for v in EVIDENCE_PLAN.variants(0.5) if "+scale@" in v.key]
    assert hybrids == [f"{f}@energy=0.9+scale@energy={e}" for f in ("extraction-guided", "random") for e in (0.5, 0.35)]


def test_the_peft_intruder_variant_rewrites_the_example_lora_as_peft_does():
    """The bench's path for a transform variant (`variant_lora`, what `run_bench` and `run_real_bench` call) on the
    world's example LoRA: PEFT's own output, module for module, and not the input. A second or two on one torch
    thread, as `run_bench` runs it (two threads on the 2 busy cores make PEFT's 236 small SVDs ten times slower)."""
    pytest.importorskip("peft.tuners.lora.intruders")  # PEFT >= 0.18
    from diffmem.filters.peft_intruder import peft_intruder_lora
    from diffmem.formats.lora import read_lora
    from diffmem.world.check import example_lora_path
    from diffmem.world.model import BASE_FILE, assets_dir

    lora_path, base_path = example_lora_path(), assets_dir() / BASE_FILE
    variant = next(v for v in FULL_PLAN.variants(0.5) if v.key == "peft-intruder")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out, report, kept = variant_lora(variant, lora_path, base_path)
        expected, lora = peft_intruder_lora(lora_path, base_path), read_lora(lora_path)
    finally:
        torch.set_num_threads(threads)
    assert report is None and set(kept) == {"energy_kept"} and 0 < kept["energy_kept"] < 1
    assert kept["energy_kept"] == round(out.update_energy() / lora.update_energy(), 4)
    assert out.format == lora.format and list(out.modules) == list(expected.modules) == list(lora.modules)
    changed = 0
    for name, module in out.modules.items():
        assert module.tensors.keys() == expected.modules[name].tensors.keys()
        assert all(torch.equal(t, expected.modules[name].tensors[role]) for role, t in module.tensors.items())
        changed += not torch.allclose(module.delta(), lora.modules[name].delta())
    assert changed > 0


# --- statistics -----------------------------------------------------------------------------------------------


def test_mean_interval_is_student_t():
    mean, half = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)
    assert mean_interval([5.0]) == (5.0, None)
    assert format_interval([0.25, 0.35], digits=0, percent=True) == "30% ± 64%"
    with pytest.raises(ValueError):
        mean_interval([])


def test_retained_measures_the_share_of_the_gap():
    assert retained(0.06, base=0.06, tuned=0.05) == pytest.approx(0.0)
    assert retained(0.05, base=0.06, tuned=0.05) == pytest.approx(1.0)
    assert retained(0.055, base=0.06, tuned=0.05) == pytest.approx(0.5)
    assert retained(0.05, base=0.05, tuned=0.05) is None


# --- results file ---------------------------------------------------------------------------------------------


def test_read_rows_skips_a_torn_last_line_but_not_a_damaged_middle(tmp_path):
    path = tmp_path / "results.jsonl"
    append_row(path, {"a": 1})
    append_row(path, {"a": 2})
    with open(path, "a") as handle:
        handle.write('{"a": 3, "b"')
    assert [r["a"] for r in read_rows(path)] == [1, 2]
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(DiffmemError, match="line 2"):
        read_rows(path)
    assert read_rows(tmp_path / "missing.jsonl") == []


def test_settings_id_changes_with_settings():
    assert settings_id(BenchSettings()) == settings_id(BenchSettings())
    assert settings_id(BenchSettings()) != settings_id(BenchSettings(steps=25))


# --- report ---------------------------------------------------------------------------------------------------


def fake_row(finetune: str, variant: str, method: str, budget: str, copy: float, loss: float, **extra) -> dict:
    return {"finetune": finetune, "setting": "s", "variant": variant, "method": method, "budget": budget,
            "level": extra.pop("level", None), "copy_rate": copy, "heldout_loss": loss, "duplicated_loss": loss,
            "captions_copied": 1, "own_distance": 0.2, "extracted": 0, "amd": 0.3, "fid": 1.0,
            "settings": {"generations": 6, "quality_generations": 1, "steps": 10, "guidance": 3.0, "seed": 1000},
            **extra}


def fake_rows() -> list[dict]:
    rows = []
    for seed, (baf_copy, random_copy) in enumerate([(0.2, 0.5), (0.3, 0.4)]):
        f = f"ft{seed}"
        rows += [
            fake_row(f, "lora", "none", "none", 0.6, 0.050),
            fake_row(f, "base", "base", "none", 0.0, 0.060),
            fake_row(f, "baf@energy=0.8", "baf", "energy", baf_copy, 0.054, level=0.8, channels_kept=5,
                     channels_total=10, energy_kept=0.8),
            fake_row(f, "random@energy=0.8", "random", "energy", random_copy, 0.052, level=0.8, channels_kept=6,
                     channels_total=10, energy_kept=0.8),
        ]
    return rows


def test_retention_is_relative_to_each_finetune():
    rows = {(r["finetune"], r["variant"]): r for r in with_retention(fake_rows())}
    assert rows["ft0", "lora"]["quality_kept"] == pytest.approx(1.0)
    assert rows["ft0", "base"]["quality_kept"] == pytest.approx(0.0)
    assert rows["ft0", "baf@energy=0.8"]["quality_kept"] == pytest.approx(0.6)


def test_style_settings_report_the_share_of_the_style_kept():
    rows = fake_rows()
    for row in rows:  # the LoRA draws the style on 80% of held-out captions, the base on 10%
        row["style_success"] = {"lora": 0.8, "base": 0.1, "baf@energy=0.8": 0.45}.get(row["variant"], 0.8)
    kept = {(r["finetune"], r["variant"]): r for r in with_retention(rows)}
    assert kept["ft0", "baf@energy=0.8"]["style_kept"] == pytest.approx(0.5)
    assert kept["ft0", "lora"]["style_kept"] == pytest.approx(1.0)
    grouped = {}
    for row in with_retention(rows):
        grouped.setdefault(row["variant"], []).append(row)
    assert setting_table(grouped).splitlines()[0].rstrip(" |").endswith("style kept")
    faces = {}
    for row in with_retention(fake_rows()):
        faces.setdefault(row["variant"], []).append(row)
    assert "style kept" not in setting_table(faces)


def test_comparison_is_paired_by_finetune():
    grouped = {}
    for row in with_retention(fake_rows()):
        grouped.setdefault(row["variant"], []).append(row)
    table = comparison_table(grouped, ["energy=0.8"])
    line = next(line for line in table.splitlines() if "baf - random" in line)
    # copy differences -0.3 and -0.1: mean -20%; quality differences -0.2 and -0.2: mean -20%, no spread.
    assert "-20% ±" in line.split("|")[5] and "-20% ± 0%" in line.split("|")[6]


def test_a_baselines_copy_rate_is_read_off_its_curve_at_the_filters_quality():
    # A scale-like curve: turning the LoRA halfway down improves quality (1.2 > 1) before the base's 0.
    curve = [(0.0, 0.0), (0.5, 0.1), (1.2, 0.3), (1.0, 0.6)]
    # At 1.1 the rising segment crosses 6/7 of the way up (copy 0.1 + 6/7 * 0.2), lower than any point keeping 1.1.
    assert copy_rate_at_quality(curve, 1.1) == pytest.approx(0.1 + 6 / 7 * 0.2)
    assert copy_rate_at_quality(curve, 0.0) == 0.0 and copy_rate_at_quality(curve, 1.3) is None
    assert copy_rate_at_quality(curve, 1.0) == pytest.approx(0.1 + 5 / 7 * 0.2)


def test_equal_quality_table_pairs_each_filter_with_the_baseline_at_its_quality():
    grouped = {}
    for row in with_retention(fake_rows()):
        grouped.setdefault(row["variant"], []).append(row)
    table = equal_quality_table(grouped, baselines=("random",))
    line = next(line for line in table.splitlines() if line.startswith("| baf@energy=0.8"))
    # BAF keeps 60% of the gain; random's line from the base (0, 0) to its 80% point reaches 60% at copy 0.375
    # (ft0) and 0.3 (ft1): differences 0.2 - 0.375 and 0.3 - 0.3, a mean of -8.75%.
    assert [c.strip() for c in line.split("|")[2:5]] == ["random", "2", "0"] and "-9% ±" in line
    assert "random@energy=0.8" not in table  # a baseline is not matched against itself


def test_goal_counts_finetunes_where_a_filter_removes_copies_and_keeps_quality():
    rows = with_retention(fake_rows())
    lora = next(r for r in rows if r["variant"] == "lora")
    # BAF at 0.8 keeps 60% of the held-out gain: short of 90% whatever it copies.
    baf = next(r for r in rows if r["variant"] == "baf@energy=0.8")
    assert not meets_goal(baf, lora)
    assert meets_goal(baf | {"quality_kept": 0.95, "copy_rate": 0.06}, lora)  # 0.06 <= 10% of 0.6
    assert not meets_goal(baf | {"quality_kept": 0.95, "copy_rate": 0.07}, lora)
    assert not meets_goal(baf | {"quality_kept": 0.95, "copy_rate": 0.06, "style_kept": 0.5}, lora)
    assert not meets_goal(baf | {"quality_kept": 1.0, "copy_rate": 0.0}, lora | {"copy_rate": 0.0})
    grouped = {}
    for row in rows:
        grouped.setdefault(row["variant"], []).append(row)
    assert "| baf@energy=0.8 | 0 of 2 |" in goal_table(grouped)


def test_the_goal_and_the_tables_also_count_copies_of_any_training_image():
    """A filter that unbinds memorized images from their captions (its generations copy other captions' images)
    meets the goal on the own-caption copy rate and not on copies of any image; rows measured before
    ``any_copy_rate`` existed are counted apart, never as zero."""
    rows = fake_rows()
    for row in rows:
        if row["finetune"] == "ft0":
            row |= {"any_copy_rate": {"lora": 0.7, "base": 0.0, "random@energy=0.8": 0.5}.get(row["variant"], 0.6),
                    "images_copied": 2}
    rows += [fake_row("ft0", "unbind", "unbind", "none", 0.0, 0.0505, any_copy_rate=0.6, images_copied=1),
             fake_row("ft1", "unbind", "unbind", "none", 0.0, 0.0505)]  # ft1: measured before any_copy_rate was
    grouped = {}
    for row in with_retention(rows):
        grouped.setdefault(row["variant"], []).append(row)
    assert "| unbind | 2 of 2 | 0 of 1 |" in goal_table(grouped)
    table = setting_table(grouped)
    line = next(line for line in table.splitlines() if line.startswith("| unbind"))
    assert "60% (1 of 2)" in line and "0%" in line.split("|")[5]
    equal_any = equal_quality_table(grouped, baselines=("random",), copy_key="any_copy_rate")
    line = next(line for line in equal_any.splitlines() if line.startswith("| unbind"))
    # ft0 alone: unbind keeps 95% of the gain; random's curve runs from its 80% point (0.5) to the LoRA's (1.0, 0.7)
    # and reads 0.65 there: 60% - 65%.
    assert [c.strip() for c in line.split("|")[2:5]] == ["random", "1", "0"] and "| -5%" in line


def test_rules_without_a_budget_are_shown_fine_tune_by_fine_tune_beside_scale_at_their_quality():
    rows = [
        fake_row("ft0", "lora", "none", "none", 0.6, 0.050, any_copy_rate=0.6),
        fake_row("ft0", "base", "base", "none", 0.0, 0.060, any_copy_rate=0.0),
        fake_row("ft0", "scale@energy=0.5", "scale", "energy", 0.2, 0.052, energy_kept=0.5, any_copy_rate=0.2),
        fake_row("ft0", "first-up-block", "unet-blocks", "default", 0.0, 0.0505, any_copy_rate=0.3),
        fake_row("ft1", "lora", "none", "none", 0.6, 0.050),  # measured before copies of any image were counted
        fake_row("ft1", "base", "base", "none", 0.0, 0.060),
        fake_row("ft1", "first-up-block", "unet-blocks", "default", 0.3, 0.055),
        fake_row("ft0", "random@energy=0.8", "random", "energy", 0.5, 0.052, energy_kept=0.8),
    ]
    grouped = {}
    for row in with_retention(rows):
        grouped.setdefault(row["variant"], []).append(row)
    lines = by_finetune_table(grouped, keys=("first-up-block",)).splitlines()
    # ft0 keeps 95% of the gain; scale's curve from its 50%-energy point (80%, 0.2) to the LoRA's (100%, 0.6) reads
    # 0.5 there, both ways. It removes every own-caption copy but half of the copies of any image.
    assert lines[2] == "| first-up-block | ft0 | 60% -> 0% | 60% -> 30% | 95% | 50% / 50% | yes / no |"
    # ft1: scale was not measured, so its curve runs from the base straight to the LoRA.
    assert lines[3] == "| first-up-block | ft1 | 60% -> 30% | - | 50% | 30% / - | no / - |"
    assert len(lines) == 4 and by_finetune_table(grouped, keys=("caption-readers",)) == ""


def test_the_last_row_of_a_cell_is_the_one_that_counts(tmp_path):
    path = tmp_path / "results.jsonl"
    settings = BenchSettings()
    sid = settings_id(settings)
    for row in ({"finetune": "a", "variant": "lora", "copy_rate": 0.5}, {"finetune": "a", "variant": "base"},
                {"finetune": "a", "variant": "lora", "copy_rate": 0.6, "any_copy_rate": 0.7},
                {"finetune": "a", "variant": "lora", "copy_rate": 0.1, "settings_id": "other"}):
        append_row(path, {"settings_id": sid} | row)
    rows = current_rows(path, settings)
    assert [(r["variant"], r.get("any_copy_rate")) for r in rows] == [("lora", 0.7), ("base", None)]


def test_finetunes_whose_lora_copies_nothing_leave_the_comparisons():
    rows = [*fake_rows(), fake_row("ft2", "lora", "none", "none", 0.0, 0.050),
            fake_row("ft2", "base", "base", "none", 0.0, 0.060)]
    grouped = {}
    for row in with_retention(rows):
        grouped.setdefault(row["variant"], []).append(row)
    copying, silent = copying_finetunes(grouped)
    assert silent == ["ft2"] and {r["finetune"] for r in copying["lora"]} == {"ft0", "ft1"}
    assert len(copying["baf@energy=0.8"]) == 2 and len(grouped["lora"]) == 3


def test_write_results_keeps_the_hand_written_tail(tmp_path):
    out = tmp_path / "results.md"
    write_results(fake_rows(), tmp_path, out)
    text = out.read_text()
    assert "baf - random" in text and (tmp_path / "results" / "pareto-s.png").stat().st_size > 1000
    out.write_text(text + "\nOur reasoning.\n")
    write_results(fake_rows()[:4], tmp_path, out)
    text = out.read_text()
    assert text.count(HAND_WRITTEN) == 1 and text.endswith("Our reasoning.\n")
    assert "ft1" not in text.split(HAND_WRITTEN)[0]


def test_sample_panel_comes_from_the_first_finetune_with_images_and_survives_their_loss(tmp_path):
    images, panel = tmp_path / "images", tmp_path / "results" / "samples-s.png"
    for key in ("lora", "base"):
        save_png(torch.full((3, 4, 8), 0.5), images / "ft1" / f"{key}.png")
    caption = image_panel(images, ["ft0", "ft1"], panel)  # ft0's images are gone: ft1 is drawn
    assert caption == "First generation of each duplicated caption, `ft1`; rows top to bottom: lora, base."
    assert png_description(panel) == caption and Image.open(panel).width >= 8 * 3
    shutil.rmtree(images)  # a later session's work folder holds only the rows
    assert image_panel(images, ["ft0", "ft1"], panel) == caption and panel.exists()
    panel.unlink()
    assert image_panel(images, ["ft0", "ft1"], panel) is None


# --- channel truth (pure parts) -------------------------------------------------------------------------------


def test_share_and_labels():
    assert share(0.06, tuned=0.05, base=0.07) == pytest.approx(0.5)
    assert share(0.06, tuned=0.05, base=0.05) == 0.0
    records = [
        {"memorization_share": 0.3, "generalization_share": 0.1, "scores": {"good": 0.1, "bad": 0.9}},
        {"memorization_share": 0.0, "generalization_share": 0.2, "scores": {"good": 0.8, "bad": 0.2}},
        {"memorization_share": 0.1, "generalization_share": 0.4, "scores": {"good": 0.7, "bad": 0.5}},
    ]
    assert memorizing_labels(records).tolist() == [1.0, 0.0, 0.0]
    auc = separation(records)
    assert auc["good"] == pytest.approx(1.0) and auc["bad"] == pytest.approx(0.0)
    assert separation(records[1:]) == {"good": None, "bad": None}


# --- end to end on the embedded world (slow) -------------------------------------------------------------------


@pytest.mark.slow
def test_run_bench_measures_resumes_and_reports(tmp_path):
    torch.manual_seed(0)
    plan = VariantPlan(rules=(), levels=(0.8,), methods=("random",), fraction_methods=("magnitude",))
    settings = BenchSettings(generations=1, steps=2)
    rows = run_bench(tmp_path, [GridCell(CORE, plan)], settings, progress=False)
    assert [r["variant"] for r in rows][:3] == ["lora", "base", "baf"]
    assert {r["variant"] for r in rows} == {"lora", "base", "baf", "random@energy=0.8", rows[-1]["variant"]}
    by_key = {r["variant"]: r for r in rows}
    assert by_key["lora"]["energy_kept"] == 1.0 and by_key["base"].get("energy_kept") is None
    # The energy rule keeps channels until the share is reached, so it may overshoot by the last channel.
    assert 0.8 <= by_key["random@energy=0.8"]["energy_kept"] < 1.0
    # The LoRA learned the faces: lower held-out loss than the base.
    assert by_key["lora"]["heldout_loss"] < by_key["base"]["heldout_loss"]
    assert (tmp_path / "images" / CORE.name / "baf.png").exists()
    assert set(MEASUREMENTS) <= set(by_key["lora"])
    assert by_key["lora"]["any_copy_rate"] >= by_key["lora"]["copy_rate"]
    before = (tmp_path / "results.jsonl").read_text()
    again = run_bench(tmp_path, [GridCell(CORE, plan)], settings, progress=False)
    assert (tmp_path / "results.jsonl").read_text() == before and len(again) == len(rows)
    # A row from before a measurement existed is measured again with --fill-missing, and the new row replaces it.
    lines = before.splitlines()
    old = json.loads(lines[1])
    del old["any_copy_rate"]
    (tmp_path / "results.jsonl").write_text("\n".join([lines[0], json.dumps(old), *lines[2:]]) + "\n")
    again = run_bench(tmp_path, [GridCell(CORE, plan)], settings, progress=False, fill_missing=("any_copy_rate",))
    appended = (tmp_path / "results.jsonl").read_text().splitlines()[len(lines):]
    assert [json.loads(line)["variant"] for line in appended] == [old["variant"]]
    assert len(again) == len(rows) and all("any_copy_rate" in r for r in again)
    out = write_results(again, tmp_path, tmp_path / "results.md")
    assert "faces-r32-conv-d5x100" in out.read_text()


@pytest.mark.slow
def test_ensure_finetune_reuses_the_committed_example(tmp_path):
    path = ensure_finetune(CORE, tmp_path)
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["settings"]["seed"] == 0 and len(manifest["duplicated"]) == 5
    assert not list(path.parent.glob("*.partial"))


@pytest.mark.slow
def test_tuned_and_overtrained_stages_train_from_the_held_out_curve(tmp_path, monkeypatch):
    """A tuned stage keeps the best held-out step of a tracked run (kept too); an over-trained one trains
    OVERTRAIN_FACTOR times that step. Tiny runs: 4 steps, the held-out loss every 2."""
    recipe = FinetuneSpec.finetune_config
    monkeypatch.setattr(FinetuneSpec, "finetune_config", lambda spec: replace(
        recipe(spec), steps=4, heldout_every=2 if spec.stage == "tuned" else 0))
    over = replace(CORE, stage="over-trained", rank=4)
    path = ensure_finetune(over, tmp_path, progress=False)
    tuned = json.loads(path.with_name(replace(over, stage="tuned").name + ".json").read_text())
    assert over.tracked_name == "faces-r4-conv-d5x100-tracked-s0"
    tracked = json.loads(path.with_name(over.tracked_name + ".json").read_text())
    assert tracked["trained_steps"] == 4 and tuned["trained_steps"] == tracked["heldout_loss"]["best_step"] in (2, 4)
    assert json.loads(path.with_suffix(".json").read_text())["settings"]["steps"] == OVERTRAIN_FACTOR * tuned[
        "trained_steps"]
    assert ensure_finetune(over, tmp_path, progress=False) == path  # made once


@pytest.mark.slow
def test_a_style_probe_adds_the_style_s_success_to_the_numbers(tmp_path):
    from diffmem.bench.evaluate import STYLE_GENERATIONS, Probe, measure, style_generations
    from diffmem.formats.lora import read_lora
    from diffmem.world.check import example_lora_path
    from diffmem.world.data import FINETUNE_SETS
    from diffmem.world.lora import apply_lora
    from diffmem.world.model import load_base
    from diffmem.world.style import style_success

    manifest = json.loads(example_lora_path().with_suffix(".json").read_text())
    faces = Probe.from_manifest(manifest)
    ids = {split: FINETUNE_SETS["style"](split).ids for split in ("train", "heldout")}
    style_manifest = {"data": "style", "duplicated": [{"id": i} for i in ids["train"][:5]], "seen_once": [],
                      "heldout": [{"id": i} for i in ids["heldout"]]}
    style = Probe.from_manifest(style_manifest, embedder=faces.embedder)
    assert (faces.data, style.data) == ("faces", "style")

    unet = apply_lora(load_base(), read_lora(example_lora_path()))
    settings = BenchSettings(generations=1, steps=2)
    numbers, _ = measure(unet, style, settings)
    assert 0.0 <= numbers["style_success"] <= 1.0
    styled = style_generations(unet, style, settings)  # what the success is read on: 4 per held-out caption
    assert styled.shape[0] == STYLE_GENERATIONS * len(style.heldout) == 96
    assert numbers["style_success"] == round(style_success(styled), 4)
    assert "style_success" not in measure(unet, faces, settings)[0]


@pytest.mark.slow
def test_channel_ablation_labels_channels_and_scores_them(tmp_path):
    path = ensure_finetune(CORE, tmp_path)
    manifest = json.loads(path.with_suffix(".json").read_text())
    result = ablate_channels(path, manifest, ChannelTruthConfig(max_channels=2, copy_generations=0), progress=False)
    records = result["channels"]
    assert len(records) == 2 and records[0]["sigma"] >= records[1]["sigma"]
    assert set(records[0]["scores"]) >= {"baf", "magnitude", "random"}
    # Removing the largest channel of the LoRA moves the model back towards the base on at least one loss.
    assert max(records[0]["memorization_share"], records[0]["generalization_share"]) > 0
    assert result["reference"]["lora"]["duplicated_loss"] < result["reference"]["base"]["duplicated_loss"]
    assert BAFConfig().name == "baf"


def test_docs_example_prints_what_it_claims():
    import contextlib
    import io
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "bench.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    claimed = re.search(r"prints\n\n```\n(.*?)```", doc, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/bench.md", "exec"), {})
    assert out.getvalue() == claimed


def test_auc_interval_brackets_the_auc():
    from diffmem.bench.channels import auc_interval

    generator = torch.Generator().manual_seed(0)
    records = []
    for i in range(60):
        memorizing = i % 2 == 0
        score = float(torch.rand(1, generator=generator)) + (0.0 if memorizing else 0.5)
        records.append({"memorization_share": 0.2 if memorizing else 0.0, "generalization_share": 0.1,
                        "scores": {"s": score}})
    auc = separation(records)["s"]
    low, high = auc_interval(records, "s", resamples=300)
    assert low <= auc <= high and low > 0.5 and high <= 1.0


def test_new_rows_of_a_finetune_trained_again_must_measure_the_same_weights():
    from diffmem.bench.run import other_weights

    def never() -> dict:
        raise AssertionError("measured although the rows record the file")

    lora_row = {"variant": "lora", "copy_rate": 0.6333, "heldout_loss": 0.055587, "amd": 0.1918}
    assert other_weights([], "abc", never) is None
    assert other_weights([lora_row | {"lora_sha256": "abc"}], "abc", never) is None
    assert "another file" in other_weights([lora_row | {"lora_sha256": "abc"}], "def", never)
    # Rows from before the sha256 was recorded: the file's own LoRA row is measured again. Float rounding on
    # another machine passes; a fine-tune that stopped at another step does not.
    same = {"copy_rate": 0.6333, "heldout_loss": 0.055588, "amd": 0.1917}
    assert other_weights([lora_row], "abc", lambda: same) is None
    moved = other_weights([lora_row], "abc", lambda: same | {"heldout_loss": 0.055474, "amd": 0.1663})
    assert "heldout_loss 0.055587 then, 0.055474 now" in moved and "amd" in moved and "copy_rate" not in moved
