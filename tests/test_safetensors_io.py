"""Every file diffmem reads is validated: bad files get a clear error naming the file and the problem."""

import json
import pickle
import struct

import pytest
import torch

from diffmem.errors import BadWeightsError, DiffmemError, FileFormatError
from diffmem.formats.safetensors_io import (
    SafetensorsFile,
    TensorBytes,
    addnet_hashes,
    load_file,
    read_header,
    save_file,
    serialize,
)


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"b": torch.ones(2, 3), "a": torch.arange(4.0)}, path, {"ss_network_dim": "4", "other": "x"})
    return path


def test_round_trip_and_lazy_access(good_file):
    tensors, metadata = load_file(good_file)
    assert set(tensors) == {"a", "b"} and metadata == {"ss_network_dim": "4", "other": "x"}
    lazy = SafetensorsFile(good_file)
    assert lazy.shape("b") == (2, 3) and len(lazy) == 2
    torch.testing.assert_close(lazy["a"], torch.arange(4.0))


def test_same_tensors_give_identical_bytes():
    tensors = {"x": torch.randn(3, 3, generator=torch.Generator().manual_seed(0)), "y": torch.zeros(2)}
    reordered = {"y": tensors["y"], "x": tensors["x"]}
    assert serialize(tensors, {"k": "v", "a": "b"}) == serialize(reordered, {"a": "b", "k": "v"})


def test_truncated_file_is_named(good_file, tmp_path):
    data = good_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-5])
    with pytest.raises(FileFormatError, match="truncated") as info:
        read_header(cut)
    assert "cut.safetensors" in str(info.value)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(FileFormatError, match="too short"):
        read_header(tiny)


def test_not_a_safetensors_file(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_bytes(b"hello world, this is not a model file at all")
    with pytest.raises(FileFormatError, match="not a safetensors file"):
        read_header(text)


def test_header_that_lies_about_sizes(good_file, tmp_path):
    data = good_file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["b"]["shape"] = [3, 3]  # 9 floats claimed, 6 stored
    raw = json.dumps(header).encode()
    liar = tmp_path / "liar.safetensors"
    liar.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])
    with pytest.raises(FileFormatError, match="header lies about tensor 'b'"):
        read_header(liar)


def test_nan_and_inf_weights_are_refused(tmp_path):
    path = tmp_path / "nan.safetensors"
    save_file({"w": torch.tensor([1.0, float("nan"), float("inf")])}, path)
    with pytest.raises(BadWeightsError, match="2 NaN or Inf"):
        load_file(path)


class Exploit:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_pickles_are_refused_without_unpickling(tmp_path):
    raw = tmp_path / "evil.safetensors"
    raw.write_bytes(pickle.dumps(Exploit(), protocol=4))
    with pytest.raises(FileFormatError, match="pickle"):
        read_header(raw)
    zipped = tmp_path / "model.ckpt"
    torch.save({"w": torch.zeros(1)}, zipped)
    with pytest.raises(FileFormatError, match="zip archive"):
        read_header(zipped)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DiffmemError, match="no such file"):
        read_header(tmp_path / "absent.safetensors")
    with pytest.raises(FileFormatError, match="folder"):
        read_header(tmp_path)


def test_atomic_write_refuses_the_input_and_leaves_no_temp_files(good_file, tmp_path, monkeypatch):
    before = good_file.read_bytes()
    with pytest.raises(DiffmemError, match="refusing to overwrite"):
        save_file({"a": torch.zeros(1)}, good_file, protect=(good_file,))
    link = tmp_path / "link.safetensors"
    link.symlink_to(good_file)
    with pytest.raises(DiffmemError, match="refusing to overwrite"):
        save_file({"a": torch.zeros(1)}, link, protect=(good_file,))
    assert good_file.read_bytes() == before

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("diffmem.formats.safetensors_io.os.fsync", disk_full)
    with pytest.raises(DiffmemError, match=r"broken.safetensors: could not write the output \(No space"):
        save_file({"a": torch.zeros(1)}, tmp_path / "broken.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.safetensors", "link.safetensors"]


def test_addnet_hashes_follow_kohya_definition(tmp_path):
    import hashlib

    tensors = {"w": torch.arange(300_000, dtype=torch.float32)}  # > 1 MiB so the legacy window has data
    metadata = {"ss_network_dim": "8", "modelspec.title": "ignored by the hash"}
    model_hash, legacy = addnet_hashes(tensors, metadata)
    only_ss = serialize(tensors, {"ss_network_dim": "8"})
    (length,) = struct.unpack("<Q", only_ss[:8])
    assert model_hash == hashlib.sha256(only_ss[8 + length :]).hexdigest()
    assert legacy == hashlib.sha256(only_ss[0x100000:0x110000]).hexdigest()[:8]
    assert addnet_hashes(tensors, {"ss_network_dim": "8"}) == (model_hash, legacy)
    assert addnet_hashes(TensorBytes.of(tensors), metadata) == (model_hash, legacy)  # one serialization serves both
    # A header reaching into or past the legacy window (a large ss_tag_frequency): the window is cut the same way.
    for size in (0x100000 - 100, 0x110000 + 10):
        big = {"ss_tag_frequency": "x" * size}
        whole = serialize(tensors, big)
        assert addnet_hashes(TensorBytes.of(tensors), big)[1] == hashlib.sha256(whole[0x100000:0x110000]).hexdigest()[:8]


def test_streaming_writer_matches_the_library(tmp_path):
    from safetensors.torch import load_file as library_load

    from diffmem.formats.safetensors_io import save_file_streaming

    tensors = {"w": torch.randn(5, 7), "a.b": torch.randn(3), "z": torch.randn(2, 2, 3, 3)}
    path = save_file_streaming({k: tuple(v.shape) for k, v in tensors.items()}, tensors.__getitem__,
                               tmp_path / "big.safetensors", dtype=torch.float16, metadata={"m": "1"})
    loaded = library_load(str(path))
    for key, value in tensors.items():
        torch.testing.assert_close(loaded[key], value.half())
    assert read_header(path)[1] == {"m": "1"}
    with pytest.raises(ValueError, match="declared"):
        save_file_streaming({"w": (2, 2)}, lambda name: torch.zeros(3), tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists() and len(list(tmp_path.iterdir())) == 1


def test_rows_reads_a_slice(good_file):
    lazy = SafetensorsFile(good_file)
    torch.testing.assert_close(lazy.rows("a", 1, 3), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(lazy.rows("b", 0, 1), torch.ones(1, 3))


def test_written_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    path = save_file({"a": torch.zeros(1)}, tmp_path / "out.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_finite_check_is_exact_for_huge_finite_values(tmp_path):
    path = tmp_path / "huge.safetensors"
    save_file({"w": torch.full((4,), 3e38)}, path)  # finite, but the float32 sum overflows to inf
    tensors, _ = load_file(path)
    assert torch.isfinite(tensors["w"]).all()
    save_file({"w": torch.tensor([1.0, -float("inf")], dtype=torch.float16)}, path)
    with pytest.raises(BadWeightsError, match="1 NaN or Inf"):
        load_file(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_finite_check_finds_one_bad_value_anywhere(tmp_path, dtype, bad):
    """The one-pass check (min/max for 16-bit floats, a sum for wider ones) must see a single NaN or Inf in the
    vectorised body and in the scalar tail of the reduction."""
    values = torch.randn(4099, generator=torch.Generator().manual_seed(0)).to(dtype)
    for position in (0, 2048, 4098):
        broken = values.clone()
        broken[position] = bad
        path = save_file({"w": broken}, tmp_path / f"bad{position}.safetensors")
        with pytest.raises(BadWeightsError, match="1 NaN or Inf"):
            load_file(path)


def test_get_converts_before_checking_and_rows_read_any_dtype(tmp_path):
    weights = torch.arange(12, dtype=torch.bfloat16).reshape(4, 3)
    path = save_file({"w": weights, "i": torch.arange(5, dtype=torch.int64), "e": torch.zeros(0, 3)},
                     tmp_path / "mixed.safetensors")
    lazy = SafetensorsFile(path)
    assert lazy.get("w", torch.float32).dtype == torch.float32
    torch.testing.assert_close(lazy.get("w", torch.float32), weights.float())
    assert torch.equal(lazy.rows("w", 1, 3), weights[1:3]) and lazy.rows("w", 3, 9).shape == (1, 3)
    assert torch.equal(lazy["i"], torch.arange(5)) and lazy["e"].shape == (0, 3)


def test_reading_a_file_that_shrank_after_opening_is_named(tmp_path):
    path = save_file({"w": torch.ones(1000)}, tmp_path / "shrinks.safetensors")
    lazy = SafetensorsFile(path)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 100)
    with pytest.raises(FileFormatError, match="truncated while reading tensor 'w'"):
        lazy["w"]


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_tensors_are_read_and_checked(tmp_path, dtype):
    """fp8 checkpoints (Flux's, say) read back exactly, and a NaN in one is found (torch has no min/max of fp8)."""
    values = torch.linspace(-2, 2, 9).to(dtype)
    path = save_file({"w": values}, tmp_path / "fp8.safetensors")
    assert torch.equal(load_file(path)[0]["w"].view(torch.uint8), values.view(torch.uint8))
    broken = values.float()
    broken[4] = float("nan")
    save_file({"w": broken.to(dtype)}, path)
    with pytest.raises(BadWeightsError, match="1 NaN or Inf"):
        load_file(path)
