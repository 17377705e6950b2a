"""`diffmem scan`: candidate prompts from a LoRA's header, model-guided extraction, Wen's first-step ratio, the
provisional rule, the report and the command on the world and a tiny SD1 pipeline (small settings throughout)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from builders_lora import write_kohya_lora
from builders_pipelines import build_tiny_pipeline, write_pipeline_lora
from diffmem.backends import open_backend
from diffmem.cli import main
from diffmem.errors import DiffmemError
from diffmem.scan import (
    RULE,
    ScanConfig,
    candidate_groups,
    candidate_prompts,
    model_guided_generate,
    scan_lora,
    write_scan,
)
from diffmem.scan.extraction import near_identical_groups
from diffmem.scan.prompts import GENERIC_PROMPTS, folder_prompt, tag_prompts
from diffmem.scan.run import scan_prompts
from diffmem.scan.score import extraction_evidence, risk_of, verdict_of, wen_evidence
from diffmem.world.check import example_lora_path, write_example_lora


def kohya_metadata() -> dict[str, str]:
    """The dataset fields of a kohya LoRA trained on 10 captions in one folder, 8 with the trigger word."""
    tags = {"sks woman": 8, "portrait": 6, "smiling": 2, "red hair": 5, "outdoors": 1}
    return {"ss_tag_frequency": json.dumps({"10_sks woman": tags}),
            "ss_dataset_dirs": json.dumps({"10_sks woman": {"n_repeats": 10, "img_count": 10}}),
            "ss_output_name": "anna_v2"}


def test_tags_give_a_typical_caption_and_the_frequent_tags():
    prompts = tag_prompts(json.loads(kohya_metadata()["ss_tag_frequency"]), tags_per_prompt=3)
    assert prompts == ["sks woman, portrait, red hair", "sks woman", "portrait", "red hair"]


def test_candidates_are_specific_first_unique_and_end_with_the_empty_prompt():
    found = candidate_prompts(kohya_metadata(), limit=8)
    assert [c.source for c in found[:4]] == ["ss_tag_frequency"] * 4
    prompts = [c.prompt for c in found]
    assert prompts.count("sks woman") == 1  # the folder's instance prompt is the trigger tag again
    assert "anna v2" in prompts and found[-1].prompt == "" and found[-1].source == "empty"
    assert len(found) == 9 and {c.source for c in found} >= {"generic"}


def test_without_metadata_generic_prompts_fill_in_and_bad_fields_are_ignored():
    found = candidate_prompts({"ss_tag_frequency": "not json", "ss_dataset_dirs": "[1, 2]"}, limit=3)
    assert [c.prompt for c in found] == [*GENERIC_PROMPTS[:3], ""]
    assert [c.prompt for c in candidate_prompts({}, generic=False)] == [""]


def test_kohya_folder_names_and_modelspec():
    assert folder_prompt("10_sks person") == "sks person" and folder_prompt("my_style") == "my style"
    found = candidate_prompts({"modelspec.trigger_phrase": "ohwx dog", "modelspec.title": "My Dog"}, generic=False)
    assert [(c.prompt, c.source) for c in found] == [("ohwx dog", "modelspec"), ("My Dog", "modelspec"),
                                                     ("", "empty")]


# --- the scan itself ------------------------------------------------------------------------------------------------




#: Small settings: the example's six metadata prompts, one extracted prompt plus the empty one, 4 generations of
#: 8 steps (the world's first step is t = 999 whatever the step count, so Wen's statistic is the default's).
SMALL = ScanConfig(max_prompts=6, generic_prompts=False, extract_prompts=1, generations=4, steps=8, wen_draws=2)




@pytest.fixture(scope="module")
def world_scans(tmp_path_factory, one_torch_thread):
    """(scan of the example LoRA, scan of the same LoRA scaled by 0: the world base alone), small settings."""
    folder = tmp_path_factory.mktemp("scan")
    example = write_example_lora(folder / "example.safetensors")
    zero = write_example_lora(folder / "zero.safetensors", 0.0)
    return scan_lora(example, "world", SMALL), scan_lora(zero, "world", SMALL), folder


def test_the_example_lora_is_flagged_above_the_base_alone(world_scans):
    example, zero, _ = world_scans
    duplicated = [d["caption"] for d in json.loads(example_lora_path().with_suffix(".json").read_text())["duplicated"]]
    assert {p.prompt for p in example.prompts} >= set(duplicated)  # read from the kohya metadata
    assert example.risk > zero.risk and example.verdict == "memorizing" and zero.verdict == "not memorizing"
    assert example.largest_ratio.wen_ratio > 1.3 and example.largest_ratio.prompt in duplicated
    assert all(p.wen_ratio == pytest.approx(1.0) for p in zero.prompts if p.wen_ratio is not None)
    kept = example.kept_groups
    assert kept and kept[0].prompt in duplicated and kept[0].size >= SMALL.min_group
    assert not zero.kept_groups  # whatever the base repeats by itself is dropped
    summary = example.summary()
    assert summary["rule"] == RULE == "provisional" and "PROVISIONAL" in summary["rule_note"]
    assert summary["evidence"]["extracted_groups"] == len(kept) and summary["settings"]["steps"] == SMALL.steps
    assert set(summary["timings_s"]) == {"load", "wen", "extraction", "total"}
    json.dumps(summary)  # JSON-ready


def test_write_scan_writes_a_self_contained_report_and_never_the_inputs(world_scans, tmp_path):
    example, _, _ = world_scans
    paths = write_scan(example, tmp_path / "out")
    html = paths["report.html"].read_text()
    assert "provisional" in html and html.count("data:image/png;base64,") >= 3 and "http" not in html.split("<body>")[1]
    assert json.loads(paths["summary.json"].read_text())["verdict"] == "memorizing"
    with pytest.raises(DiffmemError, match="input"):
        write_scan(example, tmp_path / "out", protect=[tmp_path / "out" / "summary.json"])


def test_model_guidance_changes_the_samples_and_lam_zero_is_plain_sampling(one_torch_thread):
    tuned, base = open_backend("world", example_lora_path()), open_backend("world")
    prompt, seeds = "a black and white photo of Jonas Castell", [0, 1]
    plain = model_guided_generate(tuned, base, prompt, seeds, lam=0.0, steps=6)
    guided = model_guided_generate(tuned, base, prompt, seeds, lam=1.0, steps=6)
    reference = tuned.generate(tuned.encode([prompt]).expand(2), seeds, steps=6)
    assert torch.allclose(plain, reference, atol=1e-4)
    assert (guided - plain).abs().max() > 0.05
    # The base guided towards itself is the base: the model-guidance term vanishes (up to float rounding, which six
    # steps at lam = 3 amplify to about 1e-4; seen at 1.1e-4 on a fresh install).
    assert torch.allclose(model_guided_generate(base, base, prompt, seeds, lam=3.0, steps=6),
                          base.generate(base.encode([prompt]).expand(2), seeds, steps=6), atol=1e-3)


def picture(seed: int) -> torch.Tensor:
    return torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_a_group_the_base_also_produces_is_dropped():
    a, b = picture(1), picture(2)
    wiggle = [0.01 * (picture(10 + i) - 0.5) for i in range(6)]
    tuned = torch.stack([a + wiggle[0], a + wiggle[1], a + wiggle[2], b + wiggle[3], b + wiggle[4], b + wiggle[5],
                         picture(3), picture(4)]).clamp(0, 1)
    base = torch.stack([picture(5), (a + wiggle[4]).clamp(0, 1), picture(6)])  # the base makes `a` by itself
    groups = candidate_groups("p", tuned, base, threshold=0.1, min_group=3)
    assert [g.members for g in groups] == [(0, 1, 2), (3, 4, 5)]
    assert [g.base_also for g in groups] == [True, False]
    assert groups[0].base_distance < 0.1 < groups[1].base_distance and groups[1].spread < 0.05
    assert near_identical_groups(tuned, 0.1, min_group=4) == []
    assert candidate_groups("p", tuned, base, threshold=0.1, min_group=3)[1].row()["size"] == 3


def test_the_provisional_rule():
    config = ScanConfig()
    assert wen_evidence(None, config) == wen_evidence(1.0, config) == 0.0 and wen_evidence(2.5, config) == 1.0
    assert 0 < wen_evidence(1.5, config) < 1
    assert extraction_evidence([0, 8], 8) == 1.0 and extraction_evidence([], 8) == 0.0
    assert extraction_evidence([3], 8) == pytest.approx(0.375)
    assert risk_of(0.0, 0.0) == 0.0 and risk_of(1.0, 0.2) == 1.0 and math.isclose(risk_of(0.5, 0.5), 0.75)
    # Extraction-led default: the Wen evidence alone stops short of "memorizing"; with a kept group of 3 of 8 it decides.
    assert verdict_of(risk_of(1.0, 0.0, config.wen_weight), config) == "unsure"
    assert verdict_of(risk_of(1.0, 0.375, config.wen_weight), config) == "memorizing"
    assert verdict_of(risk_of(0.0, 0.375, config.wen_weight), config) == "unsure"
    assert verdict_of(0.375, config) == "unsure" and verdict_of(0.1, config) == "not memorizing"
    assert verdict_of(0.5, config) == "memorizing"
    for bad in ({"generations": 0}, {"guidance": 0.0}, {"ratio_floor": 3.0}, {"risk_clear": 0.9}, {"wen_weight": 1.5}):
        with pytest.raises(ValueError):
            ScanConfig(**bad)


def test_given_prompts_come_first_and_the_empty_prompt_last():
    found = scan_prompts(kohya_metadata(), ScanConfig(max_prompts=3, generic_prompts=False),
                         ["my caption", "sks woman"])
    assert [(c.prompt, c.source) for c in found][:2] == [("my caption", "given"), ("sks woman", "given")]
    assert found[-1].prompt == "" and [c.prompt for c in found].count("sks woman") == 1


def test_cli_scan_on_the_world(world_scans, tmp_path, capsys):
    _, _, folder = world_scans
    out = tmp_path / "report"
    code = main(["scan", str(folder / "zero.safetensors"), "--out", str(out), "--json", "--max-prompts", "1",
                 "--no-generic", "--extract-prompts", "0", "--generations", "3", "--steps", "4"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["verdict"] == "not memorizing" and summary["rule"] == "provisional"
    assert summary["settings"]["generations"] == 3 and [p["prompt"] for p in summary["prompts"] if p["sampled"]] == [""]
    assert {p.name for p in out.iterdir()} == {"summary.json", "report.html"}
    code = main(["scan", str(folder / "zero.safetensors"), "--max-prompts", "1", "--no-generic", "--extract-prompts",
                 "0", "--generations", "3", "--steps", "2"])
    printed = capsys.readouterr().out
    assert code == 0 and "not memorizing" in printed and "PROVISIONAL" in printed


def test_cli_scan_on_a_tiny_sd1_pipeline(tmp_path, capsys, one_torch_thread):
    pipeline = build_tiny_pipeline(tmp_path, "sd1")
    lora = write_pipeline_lora(pipeline, "sd1", tmp_path / "lora.safetensors")
    out = tmp_path / "out"
    code = main(["scan", str(lora), "--base", str(pipeline), "--out", str(out), "--json", "--prompt", "a cat",
                 "--max-prompts", "1", "--extract-prompts", "1", "--generations", "3", "--steps", "2"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0, summary
    assert summary["family"] == "sd1" and summary["verdict"] in ("memorizing", "not memorizing", "unsure")
    # On random weights only the machinery is checked: the given prompt first, the metadata's ("tiny", its
    # ss_output_name) next, the one with the higher Wen ratio sampled together with the empty prompt.
    rows = summary["prompts"]
    assert [(r["prompt"], r["source"]) for r in rows] == [("a cat", "given"), ("tiny", "ss_output_name"), ("", "empty")]
    top = max(rows[:2], key=lambda r: r["wen_ratio"])
    assert [r["prompt"] for r in rows if r["sampled"]] == [r["prompt"] for r in rows if r is top or not r["prompt"]]
    assert 0 <= summary["risk"] <= 1 and (out / "report.html").is_file()


def test_bad_input_is_one_line_and_exit_1_with_no_output(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    other_base = tmp_path / "sd.safetensors"
    write_kohya_lora(other_base, {"lora_unet_foo_proj": (8, 4)}, rank=2)
    for lora in (tmp_path / "missing.safetensors", corrupt, other_base):
        out = tmp_path / f"out-{lora.stem}"
        assert main(["scan", str(lora), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("diffmem: error: ") and err.count("\n") == 1 and str(lora) in err, err
        assert not out.exists()
    assert main(["scan", str(corrupt), "--lora", str(corrupt)]) == 2
    assert "positional" in capsys.readouterr().err
    assert main(["scan", str(corrupt), "--generations", "0"]) == 2
    assert "--generations must be at least 1" in capsys.readouterr().err  # the flag, not the Python field
    assert main(["scan", str(corrupt), "--filter", "--dori-steps", "0"]) == 2
    assert "--dori-steps" in capsys.readouterr().err


@pytest.mark.parametrize(("family", "guidance"), [("flux", 1.0), ("sdxl", 7.5), ("sd3", 7.0), ("sd2", 7.5)])
def test_scan_runs_on_tiny_pipelines(tmp_path, one_torch_thread, family, guidance):
    # Flow matching with guidance 1.0, SDXL's and SD3's pooled conditioning, SD2's v-prediction: the model-guided
    # loop must run on each (machinery only: random weights).
    pipeline = build_tiny_pipeline(tmp_path, family)
    lora = write_pipeline_lora(pipeline, family, tmp_path / "lora.safetensors")
    result = scan_lora(lora, pipeline, ScanConfig(max_prompts=1, extract_prompts=1, generations=3, steps=2,
                                                  generic_prompts=False))
    assert result.family == family and result.config.guidance == guidance
    images, _ = result.samples[""]
    assert images.shape[0] == 3 and images.min() >= 0 and images.max() <= 1
    assert result.summary()["rule"] == "provisional"


def test_the_python_example_in_docs_scan_md_runs(tmp_path, monkeypatch, capsys, one_torch_thread):
    import re

    import diffmem.scan

    # The page's settings take over a minute; the same code on a few generations of a few steps checks it runs.
    def small(**settings):
        return ScanConfig(**{**settings, "generations": 3, "steps": 4, "wen_draws": 1, "extract_prompts": 1,
                             "generic_prompts": False})

    monkeypatch.setattr(diffmem.scan, "ScanConfig", small)
    monkeypatch.chdir(tmp_path)
    page = (Path(__file__).resolve().parent.parent / "docs" / "scan.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    exec(compile(block, "docs/scan.md", "exec"), {})
    assert "provisional" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "scan-out").iterdir()} == {"summary.json", "report.html"}


def test_a_memorizing_verdict_on_the_wen_ratio_alone_carries_a_caveat():
    from diffmem.scan.run import PromptScan, ScanResult

    first_rule = ScanConfig(wen_weight=1.0)  # the first rule, in which the ratio alone could decide

    def result(groups, config=first_rule):
        return ScanResult(lora="l", base="world", model="m", family="world", config=config,
                          prompts=[PromptScan("'Copper Glass No. 41'", "ss_tag_frequency", 3.0, 1.0, 3.0)],
                          groups=groups)

    alone = result([])
    assert alone.verdict == "memorizing" and "Wen ratio alone" in alone.summary()["caveat"]
    # The extraction-led default: the same ratio with nothing extracted is "unsure", and needs no caveat.
    assert result([], ScanConfig()).verdict == "unsure" and result([], ScanConfig()).summary()["caveat"] is None
    from diffmem.scan.extraction import ExtractedGroup

    group = ExtractedGroup("'Copper Glass No. 41'", (0, 1, 2, 3), 0, 0.05, 0.4, False)
    assert result([group]).summary()["caveat"] is None
