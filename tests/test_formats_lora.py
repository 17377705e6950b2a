"""Reading, rewriting and writing LoRA files of every format (diffmem.formats.lora)."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import builders_lora as bl
from diffmem.errors import BadWeightsError, DiffmemError, FileFormatError
from diffmem.formats import lora as lora_io
from diffmem.formats.lora import read_lora, replace_factors, write_lora

torch.set_num_threads(1)


def truncated_factors(module: lora_io.LoraModule, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` factors of a module's update, divided by its scale (what the filter passes in)."""
    delta = module.delta().reshape(module.weight_shape[0], -1)
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank] / module.scale).float(), vh[:rank].float()


def reduce_all(lora: lora_io.LoraFile, rank: int) -> lora_io.LoraFile:
    """Every module replaced by its best rank-`rank` approximation."""
    return replace_factors(lora, {name: truncated_factors(m, rank) for name, m in lora.modules.items()})


def data_section(path: Path) -> bytes:
    """The tensor bytes of a safetensors file (everything after the header)."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    return raw[8 + header_len :]


# ------------------------------------------------------------------------------------------- reading kohya


@pytest.mark.parametrize("modules", [bl.SD1_KOHYA, bl.SDXL_KOHYA, bl.FLUX_KOHYA], ids=["sd1", "sdxl", "flux"])
def test_kohya_reads_kinds_ranks_and_lookups(tmp_path, modules):
    ranks = {name: 2 + i for i, name in enumerate(modules)}
    tensors = bl.write_kohya_lora(tmp_path / "k.safetensors", modules, rank=ranks, alpha=1.0)
    lora = read_lora(tmp_path / "k.safetensors")
    assert lora.format == "kohya" and not lora.rslora
    assert set(lora.modules) == set(modules)
    for name, module in lora.modules.items():
        assert module.lookup == name
        assert module.kind == ("locon" if len(modules[name]) == 4 else "lora")
        assert module.rank == ranks[name]
        assert module.alpha == 1.0 and module.alpha_stored
        assert module.scale == pytest.approx(1.0 / ranks[name])
        assert module.weight_shape == modules[name]
        assert module.keys["up"] == f"{name}.lora_up.weight"
        up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
        expected = (up.flatten(1) @ down.flatten(1)).reshape(modules[name]) / ranks[name]
        torch.testing.assert_close(module.delta(), expected)


@pytest.mark.parametrize(
    ("alpha", "alpha_shape", "stored", "expected_alpha"),
    [(None, (), False, 4.0), (0.0, (), True, 4.0), (8.0, (), True, 8.0), (2.0, (1,), True, 2.0)],
    ids=["missing", "zero", "double", "shape1"],
)
def test_alpha_conventions(tmp_path, alpha, alpha_shape, stored, expected_alpha):
    bl.write_kohya_lora(tmp_path / "k.safetensors", bl.FLUX_KOHYA, rank=4, alpha=alpha, alpha_shape=alpha_shape)
    for module in read_lora(tmp_path / "k.safetensors").modules.values():
        assert module.alpha_stored is stored
        assert module.alpha == expected_alpha
        assert module.scale == expected_alpha / 4
        b, a = module.factors()
        torch.testing.assert_close(module.delta(), module.scale * b @ a)


def test_locon_delta_acts_like_the_two_convs(tmp_path):
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors = bl.write_kohya_lora(tmp_path / "k.safetensors", {name: (8, 6, 3, 3)}, rank=3, alpha=1.5)
    module = read_lora(tmp_path / "k.safetensors").modules[name]
    x = torch.randn(2, 6, 7, 7)
    two_convs = F.conv2d(F.conv2d(x, tensors[f"{name}.lora_down.weight"], padding=1), tensors[f"{name}.lora_up.weight"])
    torch.testing.assert_close(F.conv2d(x, module.delta(), padding=1), two_convs * 1.5 / 3, atol=1e-5, rtol=1e-4)


def test_tucker_delta_acts_like_the_three_convs(tmp_path):
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors = bl.write_kohya_lora(tmp_path / "t.safetensors", {name: (8, 6, 3, 3)}, rank=3, alpha=None, tucker=True)
    module = read_lora(tmp_path / "t.safetensors").modules[name]
    assert module.kind == "tucker" and module.rank == 3 and module.weight_shape == (8, 6, 3, 3)
    x = torch.randn(2, 6, 7, 7)
    h = F.conv2d(x, tensors[f"{name}.lora_down.weight"])
    h = F.conv2d(h, tensors[f"{name}.lora_mid.weight"], padding=1)
    three_convs = F.conv2d(h, tensors[f"{name}.lora_up.weight"])
    torch.testing.assert_close(F.conv2d(x, module.delta(), padding=1), three_convs, atol=1e-5, rtol=1e-4)


def test_loha_delta_is_the_hadamard_product(tmp_path):
    modules = {"lora_unet_a_to_q": (8, 12), "lora_unet_a_conv": (8, 6, 3, 3)}
    t = bl.write_lycoris(tmp_path / "h.safetensors", modules, algo="loha", rank=3, alpha=1.0)
    lora = read_lora(tmp_path / "h.safetensors")
    for name in modules:
        module = lora.modules[name]
        assert module.kind == "loha" and module.rank == 3 and module.scale == pytest.approx(1 / 3)
        w1 = t[f"{name}.hada_w1_a"] @ t[f"{name}.hada_w1_b"]
        w2 = t[f"{name}.hada_w2_a"] @ t[f"{name}.hada_w2_b"]
        torch.testing.assert_close(module.delta(), w1 * w2 / 3)
    # Without a CP core the file does not record the conv kernel: the shape is flattened.
    assert lora.modules["lora_unet_a_conv"].weight_shape == (8, 54)


def test_loha_with_cp_cores(tmp_path):
    name = "lora_unet_a_conv"
    t = bl.write_lycoris(tmp_path / "h.safetensors", {name: (5, 4, 3, 3)}, algo="loha", rank=2, tucker=True)
    module = read_lora(tmp_path / "h.safetensors").modules[name]
    assert module.weight_shape == (5, 4, 3, 3)
    rebuilt = []
    for i in (1, 2):
        core, wa, wb = t[f"{name}.hada_t{i}"], t[f"{name}.hada_w{i}_a"], t[f"{name}.hada_w{i}_b"]
        w = torch.zeros(5, 4, 3, 3)
        for p in range(5):
            for q in range(4):
                for a in range(2):
                    for b in range(2):
                        w[p, q] += core[a, b] * wa[a, p] * wb[b, q]
        rebuilt.append(w)
    torch.testing.assert_close(module.delta(), rebuilt[0] * rebuilt[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["w1_full", "both_decomposed", "both_full"])
def test_lokr_delta_and_scale_rules(tmp_path, layout):
    modules = {"lora_unet_a_to_q": (6, 4)}
    t = bl.write_lycoris(tmp_path / "k.safetensors", modules, algo="lokr", rank=2, alpha=1.0, lokr_layout=layout)
    module = read_lora(tmp_path / "k.safetensors").modules["lora_unet_a_to_q"]
    n = "lora_unet_a_to_q"
    w1 = t[f"{n}.lokr_w1"] if f"{n}.lokr_w1" in t else t[f"{n}.lokr_w1_a"] @ t[f"{n}.lokr_w1_b"]
    w2 = t[f"{n}.lokr_w2"] if f"{n}.lokr_w2" in t else t[f"{n}.lokr_w2_a"] @ t[f"{n}.lokr_w2_b"]
    # LyCORIS: alpha / rank with a decomposed factor; scale 1 when both factors are stored whole.
    scale = 1.0 if layout == "both_full" else 1.0 / 2
    assert module.scale == scale
    expected = torch.zeros(6, 4)
    for i in range(w1.shape[0]):
        for j in range(w1.shape[1]):
            rows, cols = w2.shape
            expected[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols] = w1[i, j] * w2
    torch.testing.assert_close(module.delta(), expected * scale)


def test_lokr_conv_with_tucker_core(tmp_path):
    n = "lora_unet_a_conv"
    t = bl.write_lycoris(tmp_path / "k.safetensors", {n: (4, 6, 3, 3)}, algo="lokr", rank=2, alpha=4.0, tucker=True)
    module = read_lora(tmp_path / "k.safetensors").modules[n]
    assert module.weight_shape == (4, 6, 3, 3) and module.scale == 2.0
    w2 = torch.einsum("ijkl,ip,jq->pqkl", t[f"{n}.lokr_t2"], t[f"{n}.lokr_w2_a"], t[f"{n}.lokr_w2_b"])
    w1 = t[f"{n}.lokr_w1"]
    delta = module.delta()
    c, d = w2.shape[:2]
    for i in range(w1.shape[0]):
        for j in range(w1.shape[1]):
            torch.testing.assert_close(delta[i * c : (i + 1) * c, j * d : (j + 1) * d], 2.0 * w1[i, j] * w2)


# ------------------------------------------------------------------------------- reading diffusers and PEFT


def test_diffusers_reads_alpha_patterns_and_rslora(tmp_path):
    names = list(bl.SD1_DIFFUSERS)
    ranks = {n: 2 + i for i, n in enumerate(names)}
    alphas = {n: 3.0 if i else 5.0 for i, n in enumerate(names)}
    bl.write_diffusers_lora(tmp_path / "d.safetensors", bl.SD1_DIFFUSERS, rank=ranks, alpha=alphas, rslora=True)
    lora = read_lora(tmp_path / "d.safetensors")
    assert lora.format == "diffusers" and lora.rslora
    assert lora.adapter_config["unet.use_rslora"] is True
    for name, module in lora.modules.items():
        assert module.lookup == name
        assert module.rank == ranks[name] and module.alpha == alphas[name]
        assert module.scale == pytest.approx(alphas[name] / math.sqrt(ranks[name]))


def test_diffusers_without_metadata_means_alpha_equals_rank(tmp_path):
    bl.write_diffusers_lora(tmp_path / "d.safetensors", bl.SD1_DIFFUSERS, rank=3, adapter_metadata=False)
    for module in read_lora(tmp_path / "d.safetensors").modules.values():
        assert module.alpha == 3 and not module.alpha_stored and module.scale == 1.0


def test_peft_folder_reads_config_and_dora(tmp_path):
    modules = {k.split(".", 1)[1]: v for k, v in bl.SD1_DIFFUSERS.items()}
    tensors = bl.write_peft_folder(tmp_path / "adapter", modules, rank=2, alpha=6.0, dora=True)
    lora = read_lora(tmp_path / "adapter")
    assert lora.format == "peft" and lora.adapter_config["r"] == 2
    assert {m.lookup for m in lora.modules.values()} == set(modules)
    for module in lora.modules.values():
        assert module.name == f"base_model.model.{module.lookup}"
        assert module.scale == 3.0
        assert torch.equal(module.tensors["dora_scale"], tensors[f"{module.name}.lora_magnitude_vector"])
    # The weights file inside the folder reads the same way.
    assert set(read_lora(tmp_path / "adapter" / "adapter_model.safetensors").modules) == set(lora.modules)


def test_old_processor_format_lookups(tmp_path):
    bl.write_old_diffusers_lora(tmp_path / "o.safetensors", bl.SD1_DIFFUSERS, rank=2)
    lora = read_lora(tmp_path / "o.safetensors")
    assert lora.format == "diffusers_old"
    assert {m.lookup for m in lora.modules.values()} == set(bl.SD1_DIFFUSERS)
    names = set(lora.modules)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora" in names
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer" in names


# ------------------------------------------------------------------------------------ rewriting and writing

ROUND_TRIP_BUILDS = {
    "kohya": lambda p: bl.write_kohya_lora(p / "x.safetensors", bl.SD1_KOHYA, rank=4, alpha=2.0),
    "kohya_no_alpha": lambda p: bl.write_kohya_lora(p / "x.safetensors", bl.SD1_KOHYA, rank=4, alpha=None),
    "kohya_tucker_dora": lambda p: bl.write_kohya_lora(
        p / "x.safetensors", bl.SD1_KOHYA, rank=4, tucker=True, dora=True, dtype=torch.float16),
    "loha": lambda p: bl.write_lycoris(p / "x.safetensors", bl.FLUX_KOHYA, algo="loha", rank=4, alpha=1.0,
                                       metadata={"ss_output_name": "loha"}),
    "lokr": lambda p: bl.write_lycoris(p / "x.safetensors", bl.FLUX_KOHYA, algo="lokr", rank=4),
    "diffusers_rslora": lambda p: bl.write_diffusers_lora(
        p / "x.safetensors", bl.SD1_DIFFUSERS, rank=4, alpha=8.0, rslora=True),
    "diffusers_plain": lambda p: bl.write_diffusers_lora(
        p / "x.safetensors", bl.SD1_DIFFUSERS, rank=4, adapter_metadata=False),
    "peft": lambda p: bl.write_peft_folder(
        p / "x", {k.split(".", 1)[1]: v for k, v in bl.SD1_DIFFUSERS.items()}, rank=4, alpha=8.0, dora=True),
    "old": lambda p: bl.write_old_diffusers_lora(p / "x.safetensors", bl.SD1_DIFFUSERS, rank=4),
}


def built(tmp_path: Path, kind: str) -> Path:
    """Build one round-trip input in tmp_path/in and return its path."""
    folder = tmp_path / "in"
    folder.mkdir()
    ROUND_TRIP_BUILDS[kind](folder)
    return folder / ("x" if kind == "peft" else "x.safetensors")


def output_path(tmp_path: Path, kind: str, tag: str = "out") -> Path:
    return tmp_path / (tag if kind == "peft" else f"{tag}.safetensors")


@pytest.mark.parametrize("kind", list(ROUND_TRIP_BUILDS))
def test_reduced_rank_round_trip_keeps_scale_and_update(tmp_path, kind):
    source = built(tmp_path, kind)
    before = source.read_bytes() if source.is_file() else (source / "adapter_model.safetensors").read_bytes()
    lora = read_lora(source)
    reduced = reduce_all(lora, 2)
    out = write_lora(reduced, output_path(tmp_path, kind), provenance={"diffmem.method": "test"})
    back = read_lora(out)
    assert back.format == lora.format and set(back.modules) == set(lora.modules)
    for name, original in lora.modules.items():
        module = back.modules[name]
        assert module.rank == 2
        assert module.kind == ("locon" if len(original.weight_shape) == 4 else "lora")
        assert module.scale == pytest.approx(original.scale, rel=1e-6)
        b, a = truncated_factors(original, 2)
        dtype_tol = 2e-3 if module.tensors["up"].dtype == torch.float16 else 1e-5
        expected = (original.scale * b @ a).reshape(original.weight_shape)
        torch.testing.assert_close(module.delta(), expected, atol=dtype_tol * 10, rtol=dtype_tol)
        assert module.lookup == original.lookup
        if "dora_scale" in original.tensors:
            assert torch.equal(module.tensors["dora_scale"], original.tensors["dora_scale"])
    assert back.metadata["diffmem.method"] == "test"
    for key, value in lora.metadata.items():
        if key not in ("ss_network_dim", "ss_network_alpha", "lora_adapter_metadata"):
            assert back.metadata[key] == value
    after = source.read_bytes() if source.is_file() else (source / "adapter_model.safetensors").read_bytes()
    assert after == before


@pytest.mark.parametrize("kind", list(ROUND_TRIP_BUILDS))
def test_identical_factors_give_the_identical_update(tmp_path, kind):
    lora = read_lora(built(tmp_path, kind))
    same = {}
    for name, module in lora.modules.items():
        if module.kind in ("lora", "locon"):
            b, a = module.factors()
        else:
            b, a = truncated_factors(module, min(module.weight_shape[0], math.prod(module.weight_shape[1:])))
        same[name] = (b, a)
    back = read_lora(write_lora(replace_factors(lora, same), output_path(tmp_path, kind)))
    for name, module in lora.modules.items():
        half = back.modules[name].tensors["up"].dtype == torch.float16  # factors rounded to fp16 when rebuilt
        tol = 5e-3 if half and module.kind == "tucker" else 1e-4
        torch.testing.assert_close(back.modules[name].delta(), module.delta(), atol=tol, rtol=1e-3)


def test_untouched_lora_modules_are_written_bit_for_bit(tmp_path):
    source = built(tmp_path, "kohya")
    lora = read_lora(source)
    out = write_lora(replace_factors(lora, {}), tmp_path / "out.safetensors")
    assert data_section(out) == data_section(source)


def test_kohya_metadata_and_hashes(tmp_path):
    source = tmp_path / "k.safetensors"
    ranks = {n: 4 for n in bl.SD1_KOHYA}
    bl.write_kohya_lora(source, bl.SD1_KOHYA, rank=ranks, alpha=2.0, metadata={"sshs_model_hash": "stale"})
    lora = read_lora(source)
    first = next(iter(lora.modules))
    new = {name: truncated_factors(m, 1 if name == first else 2) for name, m in lora.modules.items()}
    out = write_lora(replace_factors(lora, new), tmp_path / "out.safetensors", provenance={"diffmem.x": "1"})
    meta = read_lora(out).metadata
    assert meta["ss_network_dim"] == "Dynamic"
    assert meta["ss_network_alpha"] == "Dynamic"  # alpha 2 at rank 4 becomes 0.5 at rank 1 and 1 at rank 2
    assert meta["ss_output_name"] == "tiny" and meta["diffmem.x"] == "1"
    # The data bytes do not depend on the metadata, so the hash of the written file's data is kohya's hash.
    assert meta["sshs_model_hash"] == hashlib.sha256(data_section(out)).hexdigest()
    raw = out.read_bytes()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]

    uniform = write_lora(reduce_all(lora, 2), tmp_path / "uniform.safetensors")
    meta = read_lora(uniform).metadata
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1.0"


def test_absent_alpha_stays_absent_and_alpha_keys_follow_the_scale(tmp_path):
    source = built(tmp_path, "kohya_no_alpha")
    out = write_lora(reduce_all(read_lora(source), 2), tmp_path / "out.safetensors")
    keys = safetensors.torch.load_file(out)
    assert not any(k.endswith(".alpha") for k in keys)
    source2 = tmp_path / "a.safetensors"
    bl.write_kohya_lora(source2, bl.FLUX_KOHYA, rank=4, alpha=2.0, alpha_shape=(1,))
    keys = safetensors.torch.load_file(write_lora(reduce_all(read_lora(source2), 2), tmp_path / "out2.safetensors"))
    alphas = [v for k, v in keys.items() if k.endswith(".alpha")]
    assert len(alphas) == 2 and all(a.shape == (1,) and float(a) == 1.0 for a in alphas)


def test_lycoris_modules_become_plain_lora_in_kohya_naming(tmp_path):
    lora = read_lora(built(tmp_path, "loha"))
    out = write_lora(reduce_all(lora, 2), tmp_path / "out.safetensors")
    keys = set(safetensors.torch.load_file(out))
    for name in bl.FLUX_KOHYA:
        assert {f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"} <= keys
    assert not any("hada_" in k for k in keys)


def test_loha_conv_takes_the_base_shape(tmp_path):
    name = "lora_unet_a_conv"
    bl.write_lycoris(tmp_path / "h.safetensors", {name: (8, 6, 3, 3)}, algo="loha", rank=2)
    lora = read_lora(tmp_path / "h.safetensors")
    b, a = truncated_factors(lora.modules[name], 3)
    out = replace_factors(lora, {name: (b, a)}, weight_shapes={name: (8, 6, 3, 3)})
    module = out.modules[name]
    assert module.kind == "locon" and module.tensors["down"].shape == (3, 6, 3, 3)
    assert module.tensors["up"].shape == (8, 3, 1, 1)
    with pytest.raises(ValueError, match="does not fit"):
        replace_factors(lora, {name: (b, a)}, weight_shapes={name: (8, 6, 2, 2)})


def test_rank_zero_is_written_as_a_zero_rank_one_module(tmp_path):
    lora = read_lora(built(tmp_path, "kohya"))
    name, module = next(iter(lora.modules.items()))
    fan_in = math.prod(module.weight_shape[1:])
    out = write_lora(replace_factors(lora, {name: (torch.zeros(module.weight_shape[0], 0), torch.zeros(0, fan_in))}),
                     tmp_path / "out.safetensors")
    back = read_lora(out).modules[name]
    assert back.rank == 1 and back.scale == pytest.approx(module.scale)
    assert torch.count_nonzero(back.delta()) == 0


def test_peft_config_patterns_follow_new_ranks(tmp_path):
    lora = read_lora(built(tmp_path, "peft"))
    names = list(lora.modules)
    new = {name: truncated_factors(lora.modules[name], 1 if i == 0 else 3) for i, name in enumerate(names)}
    out = write_lora(replace_factors(lora, new), tmp_path / "out")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["use_dora"] is True
    assert config["rank_pattern"] == {f"^{lora.modules[names[0]].lookup}": 1}
    back = read_lora(out)
    for name in names:
        assert back.modules[name].scale == pytest.approx(lora.modules[name].scale)


def test_unchanged_peft_config_is_kept_verbatim(tmp_path):
    source = built(tmp_path, "peft")
    lora = read_lora(source)
    out = write_lora(replace_factors(lora, {}), tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads(
        (source / "adapter_config.json").read_text())


@pytest.mark.parametrize("kind", ["kohya", "diffusers_rslora", "peft", "loha"])
def test_output_bytes_are_deterministic(tmp_path, kind):
    lora = read_lora(built(tmp_path, kind))
    first = write_lora(reduce_all(lora, 2), output_path(tmp_path, kind, "a"), provenance={"diffmem.v": "1"})
    second = write_lora(reduce_all(read_lora(lora.path), 2), output_path(tmp_path, kind, "b"),
                        provenance={"diffmem.v": "1"})
    if kind == "peft":
        for file in ("adapter_model.safetensors", "adapter_config.json"):
            assert (first / file).read_bytes() == (second / file).read_bytes()
    else:
        assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_input_is_never_overwritten(tmp_path, kind):
    source = built(tmp_path, kind)
    lora = read_lora(source)
    with pytest.raises(DiffmemError, match="refusing"):
        write_lora(reduce_all(lora, 2), lora.path)
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"keep")
    with pytest.raises(DiffmemError, match="refusing"):
        write_lora(lora, other if kind != "peft" else tmp_path / "in", protect=(other,))
    assert other.read_bytes() == b"keep"
    assert read_lora(source).modules.keys() == lora.modules.keys()


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_failed_write_leaves_no_files(tmp_path, kind, monkeypatch):
    lora = read_lora(built(tmp_path, kind))
    before = sorted(p.name for p in tmp_path.iterdir())

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_lora(reduce_all(lora, 2), output_path(tmp_path, kind))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_peft_output_folder_with_other_files_is_refused(tmp_path):
    lora = read_lora(built(tmp_path, "peft"))
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    with pytest.raises(DiffmemError, match="other than"):
        write_lora(lora, target)
    assert (target / "notes.txt").read_text() == "precious"


def test_bundled_embeddings_are_kept_verbatim(tmp_path):
    source = tmp_path / "k.safetensors"
    tensors = bl.write_kohya_lora(source, bl.FLUX_KOHYA)
    tensors["bundle_emb.mytoken.string_to_param.*"] = torch.randn(2, 8)
    safetensors.torch.save_file(tensors, str(source))
    lora = read_lora(source)
    assert set(lora.other) == {"bundle_emb.mytoken.string_to_param.*"}
    out = safetensors.torch.load_file(write_lora(reduce_all(lora, 1), tmp_path / "out.safetensors"))
    assert torch.equal(out["bundle_emb.mytoken.string_to_param.*"], tensors["bundle_emb.mytoken.string_to_param.*"])


# ---------------------------------------------------------------------------------------------- bad inputs


def test_full_checkpoint_is_not_a_lora(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(FileFormatError, match="full Stable Diffusion checkpoint") as info:
        read_lora(path)
    assert info.value.path == path


def test_rank_mismatch_is_reported(tmp_path):
    path = tmp_path / "k.safetensors"
    safetensors.torch.save_file(
        {"lora_unet_a.lora_up.weight": torch.zeros(8, 4), "lora_unet_a.lora_down.weight": torch.zeros(3, 8)},
        str(path))
    with pytest.raises(BadWeightsError, match="rank mismatch: 4 vs 3"):
        read_lora(path)


def test_unknown_key_in_a_lora_is_reported(tmp_path):
    path = tmp_path / "k.safetensors"
    tensors = bl.write_kohya_lora(path, bl.FLUX_KOHYA)
    tensors["lora_unet_double_blocks_0_img_attn_qkv.scale_shift"] = torch.zeros(1)
    safetensors.torch.save_file(tensors, str(path))
    with pytest.raises(FileFormatError, match=r"belong to no LoRA module.*scale_shift"):
        read_lora(path)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"lora_unet_a.lora_up.weight": torch.zeros(8, 4)}, r"incomplete.*lora_down|no \['down'\]"),
        ({"lora_unet_a.hada_w1_a": torch.zeros(8, 2)}, "incomplete"),
        ({"lora_unet_a.diff": torch.zeros(8, 8)}, "full-weight difference"),
        ({"lora_unet_a.lora_up.weight": torch.zeros(8, 2), "lora_unet_a.lora_down.weight": torch.zeros(2, 8),
          "lora_unet_a.hada_w1_a": torch.zeros(8, 2)}, "mixes"),
        ({"lora_unet_a.lora_up.weight": torch.zeros(8, 2), "lora_unet_a.lora_down.weight": torch.zeros(2, 8),
          "lora_unet_a.alpha": torch.zeros(2)}, "not a scalar"),
    ],
    ids=["no_down", "loha_incomplete", "lycoris_full", "mixed", "alpha_vector"],
)
def test_malformed_modules_are_reported(tmp_path, tensors, message):
    path = tmp_path / "k.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    with pytest.raises((FileFormatError, BadWeightsError), match=message):
        read_lora(path)


def test_nan_weights_are_reported(tmp_path):
    path = tmp_path / "k.safetensors"
    tensors = bl.write_kohya_lora(path, bl.FLUX_KOHYA)
    next(iter(tensors.values()))[0] = float("nan")
    safetensors.torch.save_file(tensors, str(path))
    with pytest.raises(BadWeightsError, match="NaN"):
        read_lora(path)


def test_pickles_are_refused(tmp_path):
    torch.save({"lora_unet_a.lora_up.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    with pytest.raises(FileFormatError, match="pickle"):
        read_lora(tmp_path / "lora.safetensors")
    folder = tmp_path / "adapter"
    folder.mkdir()
    torch.save({}, folder / "adapter_model.bin")
    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(FileFormatError, match=r"adapter_model\.bin"):
        read_lora(folder)


def test_native_peft_weights_without_config_are_refused(tmp_path):
    bl.write_peft_folder(tmp_path / "adapter", {"a.to_q": (4, 4)})
    (tmp_path / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(FileFormatError, match=r"adapter_config\.json"):
        read_lora(tmp_path / "adapter" / "adapter_model.safetensors")


def test_bad_factors_are_refused(tmp_path):
    lora = read_lora(built(tmp_path, "kohya"))
    name = next(iter(lora.modules))
    with pytest.raises(ValueError, match="do not give"):
        replace_factors(lora, {name: (torch.zeros(3, 2), torch.zeros(2, 3))})
    with pytest.raises(KeyError):
        replace_factors(lora, {"lora_unet_nothing": (torch.zeros(3, 2), torch.zeros(2, 3))})


def test_header_length_that_starts_like_a_pickle_still_reads(tmp_path):
    path = tmp_path / "k.safetensors"
    tensors = {"lora_unet_a.lora_up.weight": torch.zeros(2, 1), "lora_unet_a.lora_down.weight": torch.zeros(1, 2)}
    for pad in range(1000):
        safetensors.torch.save_file(tensors, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[:2] == b"\x80\x02":
            break
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert set(read_lora(path).modules) == {"lora_unet_a"}


def test_keep_alpha_folds_the_scale_into_the_factors(tmp_path):
    source = tmp_path / "k.safetensors"
    tensors = bl.write_kohya_lora(source, bl.SD1_KOHYA, rank=4, alpha=2.0)
    lora = read_lora(source)
    new = {name: truncated_factors(m, 1 + i % 3) for i, (name, m) in enumerate(lora.modules.items())}
    out = write_lora(replace_factors(lora, new, keep_alpha=True), tmp_path / "out.safetensors")
    written = safetensors.torch.load_file(out)
    back = read_lora(out)
    for name, module in lora.modules.items():
        assert torch.equal(written[f"{name}.alpha"], tensors[f"{name}.alpha"])
        rank = back.modules[name].rank
        assert back.modules[name].scale == pytest.approx(2.0 / rank)
        b, a = new[name]
        torch.testing.assert_close(back.modules[name].delta(), (module.scale * b @ a).reshape(module.weight_shape),
                                   atol=1e-5, rtol=1e-4)
    assert read_lora(out).metadata["ss_network_alpha"] == "2.0"


# ------------------------------------------------------------------------------ loading through diffusers/PEFT


def capture_diffusers_warnings():
    """A list that collects every message the diffusers logger emits from now on (its handler is detached later)."""
    import logging

    from diffusers.utils import logging as diffusers_logging

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                messages.append(record.getMessage())

    handler = Collect()
    diffusers_logging.get_logger("diffusers").addHandler(handler)
    return messages, handler


def load_with_diffusers(family: str, path: Path) -> dict[str, torch.Tensor]:
    """Load a LoRA file through diffusers' `load_lora_weights` into fresh tiny models of `family`; return the
    update each adapted layer applies (flattened to [out, in*kh*kw]) by '<component>.<layer path>'."""
    import copy
    import logging
    import warnings

    from diffusers.loaders import (
        FluxLoraLoaderMixin,
        SD3LoraLoaderMixin,
        StableDiffusionLoraLoaderMixin,
        StableDiffusionXLLoraLoaderMixin,
    )
    from diffusers.utils import logging as diffusers_logging
    from peft.tuners.tuners_utils import BaseTunerLayer

    import builders_base as bb

    mixin = {"sd1": StableDiffusionLoraLoaderMixin, "sdxl": StableDiffusionXLLoraLoaderMixin,
             "flux": FluxLoraLoaderMixin, "sd3": SD3LoraLoaderMixin}[family]
    models = {name: copy.deepcopy(model) for name, model in bb.tiny_models(family).items()}
    # A pipeline without tokenizers, VAE or scheduler: `load_lora_weights` only touches these attributes.
    pipeline_class = type("TinyPipeline", (mixin,), {"hf_device_map": None, "components": property(lambda s: models)})
    pipeline = pipeline_class()
    for name, model in models.items():
        setattr(pipeline, name, model)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if not hasattr(pipeline, name):
            setattr(pipeline, name, None)
    messages, handler = capture_diffusers_warnings()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipeline.load_lora_weights(str(path), adapter_name="filtered")
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(handler)
    signs = ("unexpected key", "missing key", "did not match", "were ignored", "not found in the base model")
    problems = [m for m in messages + [str(w.message) for w in caught] if any(s in m.lower() for s in signs)]
    assert not problems, problems
    assert logging  # imported for the handler type
    applied = {}
    for component, model in models.items():
        for name, layer in model.named_modules():
            if isinstance(layer, BaseTunerLayer):
                delta = layer.get_delta_weight("filtered").detach()
                applied[f"{component}.{name}"] = delta.reshape(delta.shape[0], -1)
    return applied


def assert_same_updates(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """Every layer diffusers adapted applies exactly a row block of one of our modules' updates, and together
    they cover every row of every module once (a fused qkv module becomes three diffusers layers)."""
    cover: dict[str, list[tuple[int, int]]] = {name: [] for name in ours}
    for layer, delta in theirs.items():
        hits = [(name, start) for name, update in ours.items()
                if update.shape[1] == delta.shape[1] and update.shape[0] >= delta.shape[0]
                for start in range(update.shape[0] - delta.shape[0] + 1)
                if torch.allclose(update[start : start + delta.shape[0]], delta, atol=1e-5, rtol=1e-4)]
        assert len(hits) == 1, f"{layer}: applies an update matching {hits} of ours"
        name, start = hits[0]
        cover[name].append((start, start + delta.shape[0]))
    for name, spans in cover.items():
        rows = sorted(spans)
        assert [a for a, _ in rows] == [0] + [b for _, b in rows[:-1]] and rows and rows[-1][1] == ours[name].shape[0], \
            f"{name}: diffusers applies rows {rows} of {ours[name].shape[0]}"


def filtered_file(tmp_path: Path, source: Path, *, uniform: bool, keep_alpha: bool,
                  weight_shapes: dict | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    """Reduce every module of `source` (to rank 2, or to ranks 1..3 by module), write it, and return the output
    path with each written module's update (from reading the output back)."""
    lora = read_lora(source)
    new = {name: truncated_factors(m, 2 if uniform else 1 + i % 3) for i, (name, m) in enumerate(lora.modules.items())}
    out = write_lora(replace_factors(lora, new, keep_alpha=keep_alpha, weight_shapes=weight_shapes),
                     tmp_path / ("out" if lora.format == "peft" else "out.safetensors"))
    back = read_lora(out)
    return out, {name: m.delta().reshape(m.weight_shape[0], -1) for name, m in back.modules.items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "convs", "uniform", "keep_alpha"),
    [("sd1", True, False, True), ("sd1", False, True, False), ("sdxl", True, False, True),
     ("sdxl", False, True, False)],
    ids=["sd1-locon-dynamic", "sd1-uniform", "sdxl-locon-dynamic", "sdxl-uniform"],
)
def test_kohya_output_loads_in_diffusers_with_the_same_update(tmp_path, family, convs, uniform, keep_alpha):
    import builders_base as bb

    source = tmp_path / "in.safetensors"
    bl.write_kohya_lora(source, bb.lora_lookups(family, "kohya", convs=convs), rank=4, alpha=2.0)
    out, ours = filtered_file(tmp_path, source, uniform=uniform, keep_alpha=keep_alpha)
    assert_same_updates(ours, load_with_diffusers(family, out))


@pytest.mark.slow
def test_kohya_flux_fused_modules_load_in_diffusers(tmp_path):
    import builders_base as bb

    # diffusers' Flux converter hard-codes the real model's 3072/12288 split of single_blocks.*.linear1.
    lookups = {n: s for n, s in bb.lora_lookups("flux", "kohya").items() if not n.endswith("_linear1")}
    assert any(n.endswith("_img_attn_qkv") for n in lookups)
    source = tmp_path / "in.safetensors"
    bl.write_kohya_lora(source, lookups, rank=3, alpha={n: 1.0 + i % 2 for i, n in enumerate(lookups)})
    out, ours = filtered_file(tmp_path, source, uniform=False, keep_alpha=False)
    assert_same_updates(ours, load_with_diffusers("flux", out))


@pytest.mark.slow
@pytest.mark.parametrize("adapter_metadata", [True, False], ids=["metadata", "no-metadata"])
def test_diffusers_output_loads_in_diffusers_with_the_same_update(tmp_path, adapter_metadata):
    import builders_base as bb

    # Only UNet modules: with transformers 5, CLIPTextModel has no `text_model.` level, which diffusers-format
    # text-encoder keys (in every published file) name, so diffusers cannot place them in this environment.
    lookups = {n: s for n, s in bb.lora_lookups("sd1", "diffusers", convs=True).items() if n.startswith("unet.")}
    source = tmp_path / "in.safetensors"
    bl.write_diffusers_lora(source, lookups, rank=4, alpha=8.0 if adapter_metadata else bl.RANK_ALPHA,
                            adapter_metadata=adapter_metadata)
    out, ours = filtered_file(tmp_path, source, uniform=False, keep_alpha=False)
    assert_same_updates(ours, load_with_diffusers("sd1", out))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_diffusers_transformer_output_loads_in_diffusers(tmp_path, family):
    import builders_base as bb

    source = tmp_path / "in.safetensors"
    lookups = bb.lora_lookups(family, "diffusers")
    bl.write_diffusers_lora(source, lookups, rank=4, alpha=8.0)
    out, ours = filtered_file(tmp_path, source, uniform=False, keep_alpha=False)
    theirs = load_with_diffusers(family, out)
    assert_same_updates(ours, theirs)
    assert len(theirs) == len(lookups)


@pytest.mark.slow
def test_old_processor_output_loads_in_diffusers(tmp_path):
    import builders_base as bb

    attention = ("to_q", "to_k", "to_v", "to_out.0")
    lookups = {n: s for n, s in bb.lora_lookups("sd1", "diffusers").items()
               if n.startswith("unet.") and n.endswith(attention)}
    source = tmp_path / "in.safetensors"
    bl.write_old_diffusers_lora(source, lookups, rank=4)
    out, ours = filtered_file(tmp_path, source, uniform=False, keep_alpha=False)
    assert_same_updates(ours, load_with_diffusers("sd1", out))


@pytest.mark.slow
def test_loha_output_loads_in_diffusers_as_a_plain_lora(tmp_path):
    import builders_base as bb

    lookups = bb.lora_lookups("sd1", "kohya", convs=True)
    source = tmp_path / "in.safetensors"
    bl.write_lycoris(source, lookups, algo="loha", rank=3, alpha=1.0)
    out, ours = filtered_file(tmp_path, source, uniform=False, keep_alpha=True, weight_shapes=lookups)
    theirs = load_with_diffusers("sd1", out)
    assert_same_updates(ours, theirs)
    assert len(theirs) == len(lookups)


@pytest.mark.slow
def test_peft_folder_output_loads_in_peft_with_the_same_update(tmp_path):
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    import builders_base as bb

    lookups = {n.split(".", 1)[1]: s for n, s in bb.lora_lookups("sd1", "diffusers", convs=True).items()
               if n.startswith("unet.")}
    bl.write_peft_folder(tmp_path / "adapter", lookups, rank=4, alpha=8.0, rslora=True)
    out, ours = filtered_file(tmp_path, tmp_path / "adapter", uniform=False, keep_alpha=False)
    import copy

    model = PeftModel.from_pretrained(copy.deepcopy(bb.tiny_models("sd1")["unet"]), str(out))
    theirs = {}
    for name, layer in model.named_modules():
        if isinstance(layer, BaseTunerLayer):
            delta = layer.get_delta_weight("default").detach()
            theirs[name] = delta.reshape(delta.shape[0], -1)
    assert_same_updates(ours, theirs)


@pytest.mark.slow
def test_the_diffusers_check_notices_a_module_diffusers_does_not_apply(tmp_path):
    import builders_base as bb

    lookups = dict(bb.lora_lookups("sd1", "kohya"))
    lookups["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_qq"] = (8, 8)  # no such layer
    source = tmp_path / "in.safetensors"
    bl.write_kohya_lora(source, lookups, rank=2)
    lora = read_lora(source)
    ours = {name: m.delta().reshape(m.weight_shape[0], -1) for name, m in lora.modules.items()}
    with pytest.raises(AssertionError):
        assert_same_updates(ours, load_with_diffusers("sd1", source))


def test_docs_example_runs_and_prints_what_it_claims(tmp_path, monkeypatch, capsys):
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "formats.md").read_text()
    code, printed = re.findall(r"```(?:python)?\n(.*?)```", doc, re.S)[:2]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/formats.md", "exec"), {})
    assert capsys.readouterr().out == printed


def test_weight_shapes_do_not_change_the_layout_of_plain_lora_modules(tmp_path):
    name = "lora_unet_middle_block_1_proj_in"
    bl.write_kohya_lora(tmp_path / "k.safetensors", {name: (8, 8)}, rank=2)
    lora = read_lora(tmp_path / "k.safetensors")
    out = replace_factors(lora, {name: truncated_factors(lora.modules[name], 1)}, weight_shapes={name: (8, 8, 1, 1)})
    assert out.modules[name].kind == "lora" and out.modules[name].tensors["down"].shape == (1, 8)


def test_lora_compatible_layer_naming_reads_and_writes_back(tmp_path):
    path = tmp_path / "o.safetensors"
    name = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora"
    safetensors.torch.save_file({f"{name}.down.weight": torch.randn(2, 6), f"{name}.up.weight": torch.randn(8, 2)},
                                str(path))
    lora = read_lora(path)
    assert lora.format == "diffusers_old"
    assert lora.modules[name].lookup == "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    out = write_lora(reduce_all(lora, 1), tmp_path / "out.safetensors")
    assert set(safetensors.torch.load_file(out)) == {f"{name}.down.weight", f"{name}.up.weight"}


def test_kohya_files_are_never_rslora(tmp_path):
    # LyCORIS stores alpha * sqrt(r) when it trains with rs_lora, so front-ends' alpha / r is right as it is.
    path = tmp_path / "k.safetensors"
    bl.write_kohya_lora(path, bl.FLUX_KOHYA, rank=4, alpha=2.0,
                        metadata={"ss_network_args": json.dumps({"algo": "lora", "rs_lora": "True"})})
    lora = read_lora(path)
    assert not lora.rslora and all(m.scale == 0.5 for m in lora.modules.values())


def test_hashes_are_added_only_to_kohya_style_files(tmp_path):
    source = built(tmp_path, "diffusers_plain")
    meta = read_lora(write_lora(reduce_all(read_lora(source), 2), tmp_path / "out.safetensors")).metadata
    assert not any(k.startswith("sshs_") for k in meta)
    source = tmp_path / "k.safetensors"
    bl.write_kohya_lora(source, bl.FLUX_KOHYA, kohya_metadata=False)
    meta = read_lora(write_lora(reduce_all(read_lora(source), 2), tmp_path / "k_out.safetensors")).metadata
    assert not any(k.startswith("sshs_") for k in meta)


def test_lycoris_tensors_in_peft_naming_are_refused_clearly(tmp_path):
    path = tmp_path / "lokr.safetensors"
    safetensors.torch.save_file({"transformer.blocks.0.attn.to_q.lokr_w1": torch.zeros(2, 2),
                                 "transformer.blocks.0.attn.to_q.lokr_w2": torch.zeros(4, 4)}, str(path))
    with pytest.raises(FileFormatError, match="LoHa/LoKr tensors in diffusers/PEFT naming"):
        read_lora(path)


LYCORIS_CASES = {
    "loha-linear": ("loha", "linear", {}),
    "loha-conv": ("loha", "conv", {}),
    "loha-conv-tucker": ("loha", "conv", {"use_tucker": True}),
    "lokr-linear": ("lokr", "linear", {"factor": 4}),
    "lokr-linear-whole": ("lokr", "small", {}),
    "lokr-conv": ("lokr", "conv", {"factor": 4}),
    "lokr-conv-tucker": ("lokr", "conv", {"factor": 4, "use_tucker": True}),
    "locon-conv": ("locon", "conv", {}),
    "locon-conv-tucker": ("locon", "conv", {"use_tucker": True}),
    "locon-rslora": ("locon", "linear", {"rs_lora": True}),
}


@pytest.mark.parametrize("case", list(LYCORIS_CASES))
def test_delta_matches_the_lycoris_forward_pass(tmp_path, case):
    """Cross-check against LyCORIS itself (pip install lycoris-lora; skipped where it is not installed)."""
    lycoris_modules = pytest.importorskip("lycoris.modules")
    algo, layer, options = LYCORIS_CASES[case]
    cls = {"loha": lycoris_modules.LohaModule, "lokr": lycoris_modules.LokrModule,
           "locon": lycoris_modules.LoConModule}[algo]
    torch.manual_seed(0)
    base = {"linear": torch.nn.Linear(64, 32), "small": torch.nn.Linear(12, 8),
            "conv": torch.nn.Conv2d(32, 16, 3, padding=1)}[layer]
    module = cls("lora_unet_x", base, multiplier=1.0, lora_dim=2 if layer != "small" else 8, alpha=1.5, **options)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if not name.startswith("org"):
                parameter.copy_(torch.randn_like(parameter) * 0.3)
    module.apply_to()
    state = {f"lora_unet_x.{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items()
             if "org" not in k and "scalar" not in k}
    safetensors.torch.save_file(state, str(tmp_path / "x.safetensors"))
    delta = read_lora(tmp_path / "x.safetensors").modules["lora_unet_x"].delta().reshape(base.weight.shape)
    x = torch.randn(2, 64) if layer == "linear" else torch.randn(2, 12) if layer == "small" else torch.randn(2, 32, 6, 6)
    with torch.no_grad():
        if isinstance(base, torch.nn.Linear):
            expected, got = module(x) - F.linear(x, base.weight, base.bias), F.linear(x, delta)
        else:
            expected = module(x) - F.conv2d(x, base.weight, base.bias, padding=1)
            got = F.conv2d(x, delta, padding=1)
    torch.testing.assert_close(got, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-4)


def test_existing_adapter_folder_is_replaced_whole(tmp_path):
    lora = read_lora(built(tmp_path, "peft"))
    target = write_lora(lora, tmp_path / "out")
    (target / "adapter_config.json").write_text("{}")  # a stale adapter in the output folder
    write_lora(reduce_all(lora, 1), target)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert all(m.rank == 1 for m in read_lora(target).modules.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no staging or retired folders left


def test_unchanged_diffusers_metadata_keeps_its_text(tmp_path):
    source = built(tmp_path, "diffusers_rslora")
    lora = read_lora(source)
    compact = json.dumps(lora.adapter_config)  # another formatting of the same config
    lora.metadata["lora_adapter_metadata"] = compact
    out = read_lora(write_lora(replace_factors(lora, {}), tmp_path / "out.safetensors"))
    assert out.metadata["lora_adapter_metadata"] == compact
    changed = read_lora(write_lora(reduce_all(lora, 2), tmp_path / "changed.safetensors"))
    assert json.loads(changed.metadata["lora_adapter_metadata"])["unet.r"] == 2


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("alpha", [None, 2.0])
def test_lora_from_factors_round_trips(tmp_path, fmt, alpha):
    from diffmem.formats.lora import lora_from_factors

    g = torch.Generator().manual_seed(0)
    linear = "lora_unet_down_blocks_0_attentions_0_proj_in" if fmt == "kohya" else "unet.down_blocks.0.attentions.0.proj_in"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1" if fmt == "kohya" else "unet.down_blocks.0.resnets.0.conv1"
    factors = {linear: (torch.randn(8, 4, generator=g), torch.randn(4, 6, generator=g)),
               conv: (torch.randn(8, 4, 1, 1, generator=g), torch.randn(4, 6, 3, 3, generator=g))}
    out = write_lora(lora_from_factors(factors, fmt, alpha=alpha, metadata={"ss_output_name": "x"}),
                     tmp_path / "made.safetensors")
    back = read_lora(out)
    assert back.format == fmt and set(back.modules) == set(factors)
    scale = 1.0 if alpha is None else alpha / 4
    for name, (up, down) in factors.items():
        module = back.modules[name]
        assert module.scale == pytest.approx(scale)
        torch.testing.assert_close(module.delta().flatten(1), scale * up.flatten(1) @ down.flatten(1))
    assert back.metadata["ss_output_name"] == "x"


def test_lorafile_save_writes_the_same_lora_and_never_over_its_source(tmp_path):
    source = tmp_path / "mine.safetensors"
    bl.write_kohya_lora(source, {"lora_unet_down_blocks_0_attentions_0_proj_in": (8, 6)}, rank=2)
    lora = read_lora(source)
    copy = lora.save(tmp_path / "copy.safetensors")
    again = read_lora(copy)
    assert again.format == lora.format and set(again.modules) == set(lora.modules)
    for name, module in lora.modules.items():
        torch.testing.assert_close(again.modules[name].delta(), module.delta())
    before = source.read_bytes()
    with pytest.raises(DiffmemError):
        lora.save(source)
    assert source.read_bytes() == before
