"""benchmarks/filter_speed.py's I/O measurement: the plain safetensors reads it times are exactly the cached anchor
tensors a warm filter reads, and its save writes an output of the filtered LoRA's size."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import builders_base as bb
import builders_lora as bl
from diffmem.formats.safetensors_io import SafetensorsFile
from diffmem.pipeline import filter_lora

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "filter_speed.py"


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("filter_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["filter_speed"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def warm(tmp_path):
    """A tiny SD1 base, a kohya LoRA on it (float16, as trainers write) and an anchor cache a cold filter filled."""
    base = bb.build_tiny_base(tmp_path, "sd1", "single_file")
    lora = tmp_path / "lora.safetensors"
    bl.write_kohya_lora(lora, bb.lora_lookups("sd1", "kohya"), rank=4, dtype=torch.float16)
    cache = tmp_path / "cache"
    assert filter_lora(lora, base, cache_dir=cache).report.anchors_computed > 0
    return lora, base, cache


def test_anchor_reads_are_the_tensors_a_warm_filter_reads(speed, warm, monkeypatch):
    lora, base, cache = warm
    read = []
    original = SafetensorsFile.get

    def recording(self, key, *args, **kwargs):
        if self.path.parent == cache / "anchors":
            read.append((self.path, key))
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(SafetensorsFile, "get", recording)
    report = filter_lora(lora, base, cache_dir=cache).report
    assert report.anchors_computed == 0 and report.anchors_cached == len(report.modules)
    monkeypatch.undo()
    reads = speed.anchor_reads(lora, base, cache)
    assert sorted(reads) == sorted(read)  # the same shard and tensor, once per module (the filter's threads reorder)
    assert len(reads) == 2 * len(report.modules) and {name.rsplit(".", 1)[1] for _, name in reads} == {"v", "spectrum"}


def test_read_exact_reads_what_safetensors_loads(speed, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"half": torch.randn(3, 5).half(), "brain": torch.randn(7).bfloat16(), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 4), "ints": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    save_file(tensors, tmp_path / "t.safetensors", {"ss_network_dim": "4"})
    read, metadata = speed.read_exact(tmp_path / "t.safetensors")
    expected = load_file(tmp_path / "t.safetensors")
    assert metadata == {"ss_network_dim": "4"} and set(read) == set(expected)
    for name, tensor in expected.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor)
    only, _ = speed.read_exact(tmp_path / "t.safetensors", ["ints"])
    assert list(only) == ["ints"]


def test_plain_io_reads_the_lora_and_anchors_and_writes_an_output_of_the_filtered_size(speed, warm, tmp_path):
    lora, base, cache = warm
    reads = speed.anchor_reads(lora, base, cache)
    output = tmp_path / "plain.safetensors"
    moved = speed.plain_io(lora, reads, output)
    anchor_bytes = sum(SafetensorsFile(shard)[name].numel() * SafetensorsFile(shard)[name].element_size()
                       for shard, name in reads)
    lora_bytes = sum(t.numel() * t.element_size() for t in SafetensorsFile(lora).values())
    assert moved["read_bytes"] == lora_bytes + anchor_bytes
    filtered = tmp_path / "filtered.safetensors"
    filter_lora(lora, base, cache_dir=cache).lora.save(filtered)
    # Same tensors, shapes and dtypes; only the header's metadata differs (diffmem's provenance keys).
    assert {k: (t.shape, t.dtype) for k, t in SafetensorsFile(output).items()} == {
        k: (t.shape, t.dtype) for k, t in SafetensorsFile(filtered).items()}
    assert moved["written_bytes"] == output.stat().st_size


def test_the_io_and_warm_children_report_what_the_ratio_needs(speed, warm, capsys):
    lora, base, cache = warm
    results = {}
    for kind in ("warm", "io"):
        speed.child(kind, lora, base, cache, torch.get_num_threads(), "cpu")
        results[kind] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    warm_result, io_result = results["warm"], results["io"]
    assert io_result["anchor_entries"] == warm_result["anchors_cached"] > 0
    assert warm_result["write_seconds"] > 0 and io_result["seconds"] > 0 and io_result["peak_mb"] > 0
    lora_bytes = sum(t.numel() * t.element_size() for t in SafetensorsFile(lora).values())
    assert io_result["read_bytes"] > lora_bytes  # the anchors' bytes as well
    assert speed.same_output_size(io_result["written_bytes"], warm_result["written_bytes"])
    assert not speed.same_output_size(io_result["written_bytes"], 2 * warm_result["written_bytes"] + 2**16)
    assert not (cache / "io-output.safetensors").exists() and not (cache / "warm-output.safetensors").exists()
