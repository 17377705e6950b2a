"""`diffmem scan --filter`: filter, re-scan and attack the filtered LoRA towards the first scan's extracted images
(small settings on the world: the machinery and the direction of the results, not their size)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffmem.attack import DoriConfig
from diffmem.cli import main
from diffmem.filters import FILTERS, BAFConfig
from diffmem.scan import ScanConfig
from diffmem.scan.loop import AttackRow, LoopConfig, loop_verdict, scan_filter_attack, write_loop
from diffmem.world.check import write_example_lora

SMALL = ScanConfig(max_prompts=6, generic_prompts=False, extract_prompts=1, generations=4, steps=8, wen_draws=2)
QUICK_ATTACK = LoopConfig(attack_targets=1, dori=DoriConfig(steps=3), generations=2)
SMALL_FLAGS = ["--max-prompts", "6", "--no-generic", "--extract-prompts", "1", "--generations", "4", "--steps", "8",
               "--attack-targets", "1", "--dori-steps", "2"]


def attack(reachable: bool) -> AttackRow:
    return AttackRow("p", 4, 0.0, 0.25 if reachable else 0.0, 0.3, 0.05 if reachable else 0.3, reachable)


def test_loop_verdicts():
    assert loop_verdict("not memorizing", "not memorizing", []) == "nothing to fix"
    assert loop_verdict("unsure", "memorizing", [attack(True)]) == "nothing to fix"
    assert loop_verdict("memorizing", "memorizing", []) == "still memorizing"
    assert loop_verdict("memorizing", "not memorizing", [attack(False), attack(True)]) == "images still reachable"
    assert loop_verdict("memorizing", "not memorizing", [attack(False)]) == "removed"
    assert loop_verdict("memorizing", "unsure", [attack(False)]) == "unsure"
    with pytest.raises(ValueError, match="copied_share"):
        LoopConfig(copied_share=0)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return write_example_lora(tmp_path_factory.mktemp("loop") / "example.safetensors")


def test_baf_loop_on_the_example_lora(example, tmp_path, one_torch_thread):
    filtered = tmp_path / "example.filtered.safetensors"
    result = scan_filter_attack(example, "world", BAFConfig(), SMALL, QUICK_ATTACK, filtered,
                                cache_dir=tmp_path / "cache")
    assert result.before.verdict == "memorizing" and filtered.is_file() and result.filtered == filtered
    assert 0 < result.filter_report["channels_kept"] < result.filter_report["channels_total"]
    # The filtered LoRA is scanned on the same candidate prompts, with lower Wen evidence than the original.
    assert [p.prompt for p in result.after.prompts] == [p.prompt for p in result.before.prompts]
    assert result.after.largest_ratio.wen_ratio < result.before.largest_ratio.wen_ratio
    assert len(result.attacks) == 1
    row = result.attacks[0]
    assert row.prompt == max(result.before.kept_groups, key=lambda g: g.size).prompt
    assert 0 <= row.attack_copy_share <= 1 and row.generated.shape == (2, 3, 32, 32) and row.target.shape == (3, 32, 32)
    summary = result.summary()
    assert summary["verdict"] == result.verdict and summary["attacks"][0]["prompt"] == row.prompt
    assert "generated" not in summary["attacks"][0]
    paths = write_loop(result, tmp_path / "out", protect=[example])
    assert set(paths) == {"before/summary.json", "before/report.html", "after/summary.json", "after/report.html",
                          "loop.json", "report.html"}
    html = paths["report.html"].read_text()
    assert "before/report.html" in html and "Dori" in html and html.count("data:image/png;base64,") >= 2
    assert json.loads(paths["loop.json"].read_text())["verdict"] == result.verdict


def test_a_filter_that_keeps_everything_leaves_the_lora_memorizing(example, tmp_path, one_torch_thread):
    result = scan_filter_attack(example, "world", FILTERS["none"](), SMALL, LoopConfig(attack_targets=0),
                                cache_dir=tmp_path / "cache")
    assert result.filtered is None and not list(tmp_path.glob("**/*.safetensors"))  # nothing but the cache
    assert result.after.verdict == "memorizing" and result.verdict == "still memorizing" and result.attacks == []


def test_cli_scan_filter(example, tmp_path, capsys, one_torch_thread):
    out = tmp_path / "out"
    code = main(["scan", str(example), "--filter", "--out", str(out), "--json", "--cache-dir", str(tmp_path / "c"),
                 *SMALL_FLAGS])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["before"]["verdict"] == "memorizing" and summary["filter"]["method"] == "baf"
    assert (out / "example.filtered.safetensors").is_file() and (out / "after" / "report.html").is_file()
    # The filtered LoRA is not replaced without --force; filter options need --filter.
    assert main(["scan", str(example), "--filter", "--out", str(out), *SMALL_FLAGS]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["scan", str(example), "--keep-fraction", "0.3"]) == 2
    assert "--keep-fraction applies only with --filter" in capsys.readouterr().err
    assert main(["scan", str(example), "--filter", "--filter-seed", "3"]) == 2
    assert "--filter-seed does not apply to --method baf" in capsys.readouterr().err


SCAN_FLAGS = ["--max-prompts", "3", "--no-generic", "--extract-prompts", "1", "--generations", "4", "--steps", "6"]


def test_scan_many_resumes_and_a_bad_file_is_one_failed_row(example, tmp_path, capsys, one_torch_thread):
    folder = tmp_path / "uploads"
    folder.mkdir()
    write_example_lora(folder / "zero.safetensors", 0.0)
    (folder / "example.safetensors").write_bytes(example.read_bytes())
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    out = tmp_path / "scans"
    assert main(["scan-many", str(folder), "--out", str(out), "--json", *SCAN_FLAGS]) == 1
    document = json.loads(capsys.readouterr().out)
    rows = {row["input"].rsplit("/", 1)[1]: row for row in document["files"]}
    assert document["counts"] == {"scanned": 2, "skipped": 0, "failed": 1}
    assert rows["example.safetensors"]["verdict"] == "memorizing" and rows["zero.safetensors"]["verdict"] == \
        "not memorizing"
    assert "broken.safetensors" in rows["broken.safetensors"]["error"] and "\n" not in rows["broken.safetensors"]["error"]
    assert (out / "example" / "report.html").is_file() and (out / "summary.csv").is_file()
    assert json.loads((out / "example" / "summary.json").read_text())["lora_sha256"]
    # Again: the two scanned files are skipped, the broken one fails again; other settings scan again.
    assert main(["scan-many", str(folder), "--out", str(out), "--json", *SCAN_FLAGS]) == 1
    assert json.loads(capsys.readouterr().out)["counts"] == {"scanned": 0, "skipped": 2, "failed": 1}
    (folder / "broken.safetensors").unlink()
    assert main(["scan-many", str(folder / "zero.safetensors"), "--out", str(out), *SCAN_FLAGS[:-1], "5"]) == 0
    printed = capsys.readouterr().out
    assert "scanned  " in printed and "1 scanned, 0 skipped, 0 failed" in printed
    summary = json.loads((out / "summary.json").read_text())  # the earlier rows stay
    assert [row["status"] for row in summary["files"]] == ["failed", "skipped", "scanned"]  # broken, example, zero


@pytest.mark.slow
def test_scan_many_on_ray_gives_the_local_verdicts_and_one_failed_row(example, tmp_path, one_torch_thread):
    pytest.importorskip("ray")
    import ray

    from diffmem.scan.batch import scan_many

    folder = tmp_path / "uploads"
    folder.mkdir()
    (folder / "example.safetensors").write_bytes(example.read_bytes())
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    tiny = ScanConfig(max_prompts=3, generic_prompts=False, extract_prompts=1, generations=4, steps=6)
    local = scan_many([folder], "world", tmp_path / "local", tiny, progress=False)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        remote = scan_many([folder], "world", tmp_path / "ray", tiny, engine="ray", progress=False)
    finally:
        ray.shutdown()
    assert [row.status for row in remote] == [row.status for row in local] == ["failed", "scanned"]
    assert "broken.safetensors" in remote[0].error and "\n" not in remote[0].error
    summaries = [json.loads((out / "example" / "summary.json").read_text()) for out in (tmp_path / "local",
                                                                                     tmp_path / "ray")]
    assert summaries[0]["verdict"] == summaries[1]["verdict"] == "memorizing"
    assert summaries[0]["evidence"] == summaries[1]["evidence"]


def test_the_loop_runs_on_a_tiny_sdxl_pipeline(tmp_path, one_torch_thread):
    from dataclasses import replace

    from builders_pipelines import build_tiny_pipeline, write_pipeline_lora
    from diffmem.backends import open_backend
    from diffmem.scan.extraction import ExtractedGroup
    from diffmem.scan.loop import attack_extracted

    pipeline = build_tiny_pipeline(tmp_path, "sdxl")
    lora = write_pipeline_lora(pipeline, "sdxl", tmp_path / "lora.safetensors")
    filtered = tmp_path / "lora.filtered.safetensors"
    tiny = ScanConfig(max_prompts=1, extract_prompts=1, generations=3, steps=2, generic_prompts=False)
    result = scan_filter_attack(lora, pipeline, BAFConfig(), tiny, LoopConfig(attack_targets=0), filtered,
                                cache_dir=tmp_path / "cache")
    assert filtered.is_file() and result.after.family == "sdxl" and result.after.lora == str(filtered)
    assert [p.prompt for p in result.after.prompts] == [p.prompt for p in result.before.prompts]
    # Random weights group nothing, so one sampled image is named a group here to drive Dori (pooled embedding and
    # all) on the filtered pipeline LoRA: machinery only.
    group = ExtractedGroup(prompt="", members=(0, 1, 2), representative=0, spread=0.0, base_distance=1.0,
                           base_also=False)
    rows = attack_extracted(replace(result.before, groups=[group]), open_backend(pipeline, filtered),
                            LoopConfig(attack_targets=1, dori=DoriConfig(steps=2), generations=2))
    assert len(rows) == 1 and rows[0].generated.shape[0] == 2 and 0 <= rows[0].attack_copy_share <= 1


def test_the_loop_opens_the_base_once_and_each_lora_once(example, tmp_path, monkeypatch, one_torch_thread):
    import diffmem.scan.loop as loop
    import diffmem.scan.run as run
    from diffmem.backends import open_backend

    opened = []

    def counting(base, lora=None, *args, **kwargs):
        opened.append(None if lora is None else Path(lora).name)
        return open_backend(base, lora, *args, **kwargs)

    monkeypatch.setattr(loop, "open_backend", counting)
    monkeypatch.setattr(run, "open_backend", counting)
    filtered = tmp_path / "example.filtered.safetensors"
    scan_filter_attack(example, "world", BAFConfig(), SMALL, QUICK_ATTACK, filtered, cache_dir=tmp_path / "c")
    assert sorted(opened, key=str) == sorted([None, example.name, filtered.name], key=str)


def test_a_loop_that_fails_leaves_no_filtered_lora(example, tmp_path, monkeypatch, one_torch_thread):
    import diffmem.scan.loop as loop

    def broken(*args, **kwargs):
        raise RuntimeError("the attack broke")

    monkeypatch.setattr(loop, "attack_extracted", broken)
    filtered = tmp_path / "example.filtered.safetensors"
    with pytest.raises(RuntimeError, match="the attack broke"):
        scan_filter_attack(example, "world", BAFConfig(), SMALL, QUICK_ATTACK, filtered, cache_dir=tmp_path / "c")
    assert not filtered.exists()
