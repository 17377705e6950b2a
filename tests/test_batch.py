"""`diffmem filter-many`: many LoRAs against one base, anchors computed once, resumable, robust to bad files."""

import json
from pathlib import Path

import pytest
import torch

import builders_base as bb
import builders_lora as bl
from diffmem.batch import filter_many, find_inputs
from diffmem.cli import main
from diffmem.errors import DiffmemError
from diffmem.filters import BAFConfig
from diffmem.formats.lora import read_lora


@pytest.fixture
def batch(tmp_path):
    base = bb.build_tiny_base(tmp_path, "sd1", "single_file")
    folder = tmp_path / "loras"
    folder.mkdir()
    lookups = bb.lora_lookups("sd1", "kohya")
    for seed in range(3):
        bl.write_kohya_lora(folder / f"lora{seed}.safetensors", lookups, rank=4, seed=seed)
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    bl.write_kohya_lora(folder / "sdxl.safetensors", bb.lora_lookups("sdxl", "kohya"), rank=4)  # wrong base
    (folder / "notes.txt").write_text("ignored: not a LoRA")
    return base, folder


def test_filters_every_file_reports_failures_and_resumes(tmp_path, batch, monkeypatch):
    base, folder = batch
    out, cache = tmp_path / "out", tmp_path / "cache"
    rows = filter_many([folder], base, out, BAFConfig(), workers=2, cache_dir=cache, progress=False)
    status = {row.input.split("/")[-1]: row.status for row in rows}
    assert status == {"broken.safetensors": "failed", "lora0.safetensors": "filtered", "lora1.safetensors": "filtered",
                      "lora2.safetensors": "filtered", "sdxl.safetensors": "failed"}
    failed = {row.input.split("/")[-1]: row.error for row in rows if row.status == "failed"}
    assert "not a safetensors file" in failed["broken.safetensors"] and "sdxl" in failed["sdxl.safetensors"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == [f"lora{i}.filtered.safetensors" for i in range(3)]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in summary["files"]] == [r.status for r in rows]
    assert summary["schema_version"] == 1 and summary["counts"] == {"filtered": 3, "skipped": 0, "failed": 2}
    assert (out / "summary.csv").read_text().splitlines()[0].startswith("input,output,status")
    # Anchors were computed once, in the parent, before any worker started: no worker computed one.
    assert list((cache / "anchors").glob("*.safetensors"))
    assert [row.anchors_computed for row in rows if row.status == "filtered"] == [0, 0, 0]
    written = {p: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    monkeypatch.setattr("diffmem.batch.filter_file", lambda *a, **k: pytest.fail("re-filtered a finished file"))
    again = filter_many([folder], base, out, BAFConfig(), workers=1, cache_dir=cache, progress=False)
    assert [r.status for r in again if r.status != "failed"] == ["skipped"] * 3
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == written
    assert read_lora(out / "lora0.filtered.safetensors").metadata["diffmem.method"] == "baf"


def test_changed_config_is_not_skipped(tmp_path, batch):
    base, folder = batch
    out = tmp_path / "out"
    filter_many([folder / "lora0.safetensors"], base, out, BAFConfig(), workers=1, cache_dir=tmp_path / "c",
                progress=False)
    rows = filter_many([folder / "lora0.safetensors"], base, out, BAFConfig(energy=0.8), workers=1,
                       cache_dir=tmp_path / "c", progress=False)
    assert [r.status for r in rows] == ["filtered"]


def test_inputs_and_cli(tmp_path, batch, capsys, monkeypatch):
    base, folder = batch
    assert [p.name for p in find_inputs([folder])] == ["broken.safetensors", "lora0.safetensors", "lora1.safetensors",
                                                      "lora2.safetensors", "sdxl.safetensors"]
    if not torch.cuda.is_available():
        with pytest.raises(DiffmemError, match="no CUDA GPU"):
            filter_many([folder], base, tmp_path / "o", BAFConfig(), device="cuda", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffmemError, match="no LoRA files"):
        filter_many([tmp_path / "empty"], base, tmp_path / "o", BAFConfig(), progress=False)
    (missing,) = filter_many([tmp_path / "absent.safetensors"], base, tmp_path / "o", BAFConfig(), workers=1,
                             progress=False)
    assert missing.status == "failed" and "no such file" in missing.error
    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path / "cache"))
    code = main(["filter-many", str(folder / "lora0.safetensors"), str(folder / "broken.safetensors"), "--base",
                 str(base), "--out", str(tmp_path / "cli-out"), "--workers", "1", "--json"])
    assert code == 1  # one file failed
    result = json.loads(capsys.readouterr().out)
    assert result["counts"] == {"filtered": 1, "skipped": 0, "failed": 1}


@pytest.mark.slow
def test_ray_engine_gives_the_same_outputs(tmp_path, batch):
    pytest.importorskip("ray")
    import ray

    base, folder = batch
    files = [folder / "lora0.safetensors", folder / "lora1.safetensors"]
    local = filter_many(files, base, tmp_path / "local", BAFConfig(), workers=1, cache_dir=tmp_path / "c",
                        progress=False)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        remote = filter_many(files, base, tmp_path / "ray", BAFConfig(), engine="ray", cache_dir=tmp_path / "c",
                             progress=False)
    finally:
        ray.shutdown()
    assert [r.status for r in remote] == ["filtered", "filtered"]
    for a, b in zip(local, remote):
        assert Path(a.output).read_bytes() == Path(b.output).read_bytes()


def test_workers_share_the_cores_instead_of_each_taking_all_of_them():
    from diffmem.batch import threads_per_worker

    assert threads_per_worker(1, 8) == 8 and threads_per_worker(2, 8) == 4 and threads_per_worker(3, 8) == 2
    assert threads_per_worker(8, 2) == 1 and threads_per_worker(0, 2) == 2


def test_recursive_inputs_mirror_the_folder_tree(tmp_path, batch):
    base, folder = batch
    nested = folder / "users" / "alice"
    bl.write_kohya_lora(nested / "style.safetensors", bb.lora_lookups("sd1", "kohya"), rank=4, seed=7)
    assert "style.safetensors" not in [p.name for p in find_inputs([folder])]
    found = find_inputs([folder], recursive=True)
    assert nested / "style.safetensors" in found
    rows = filter_many([folder / "users"], base, tmp_path / "out", BAFConfig(), workers=1, recursive=True,
                       cache_dir=tmp_path / "cache", progress=False)
    assert [(Path(r.output).relative_to(tmp_path / "out").as_posix(), r.status) for r in rows] == [
        ("alice/style.filtered.safetensors", "filtered")]


def test_summary_keeps_earlier_runs_rows_and_has_the_json_shape(tmp_path, batch, capsys):
    base, folder = batch
    out = tmp_path / "out"
    common = ["--base", str(base), "--out", str(out), "--workers", "1", "--cache-dir", str(tmp_path / "cache")]
    assert main(["filter-many", str(folder / "broken.safetensors"), *common]) == 1
    capsys.readouterr()
    assert main(["filter-many", str(folder / "lora0.safetensors"), *common, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["counts"] == {"filtered": 1, "skipped": 0, "failed": 0}
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == set(printed) == {"diffmem_version", "schema_version", "counts", "files"}
    # The earlier run's failure is still there, beside this run's file.
    assert {Path(r["input"]).name: r["status"] for r in summary["files"]} == {
        "broken.safetensors": "failed", "lora0.safetensors": "filtered"}
    assert summary["counts"] == {"filtered": 1, "skipped": 0, "failed": 1}
    assert len((out / "summary.csv").read_text().splitlines()) == 3
