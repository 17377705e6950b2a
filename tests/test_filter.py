"""`diffmem filter` end to end: every LoRA format against a tiny base of its family with the real key names."""

import copy
import json
import math
import os
import struct
from pathlib import Path

import pytest
import torch

import builders_base as bb
import builders_lora as bl
from diffmem.cli import main
from diffmem.errors import BadWeightsError, BaseMismatchError, DiffmemError, FileFormatError
from diffmem.filters import (
    BAFConfig,
    CaptionReadersConfig,
    KeepAllConfig,
    MagnitudeConfig,
    RandomConfig,
    Selection,
    UNetBlocksConfig,
)
from diffmem.filters.caption_readers import reads_caption
from diffmem.filters.unet_blocks import unet_block
from diffmem.formats.lora import read_lora
from diffmem.formats.safetensors_io import load_file, save_file
from diffmem.pipeline import filter_file, filter_lora, module_channels


def kohya(family, convs=False, **kwargs):
    def write(path):
        bl.write_kohya_lora(path, bb.lora_lookups(family, "kohya", convs=convs), **kwargs)
    return write


def lycoris(algo, **kwargs):
    def write(path):
        bl.write_lycoris(path, bb.lora_lookups("sd1", "kohya", convs=True), algo=algo, **kwargs)
    return write


def diffusers_style(family, **kwargs):
    def write(path):
        bl.write_diffusers_lora(path, bb.lora_lookups(family, "diffusers"), **kwargs)
    return write


def peft_folder(path):
    lookups = bb.lora_lookups("unet", "diffusers")
    bl.write_peft_folder(path, {name.removeprefix("unet."): shape for name, shape in lookups.items()}, rank=4)


def old_processor(path):
    lookups = bb.lora_lookups("sd1", "diffusers")
    wanted = {n: s for n, s in lookups.items() if ".attn" in n and n.split(".")[-1] in ("to_q", "to_k", "to_v", "0")}
    wanted.update({n: s for n, s in lookups.items() if n.startswith("text_encoder.") and n.endswith("_proj")})
    bl.write_old_diffusers_lora(path, wanted, rank=4)


# (case id, base family, base layout, LoRA writer, output is a folder)
CASES = [
    ("kohya-sd1", "sd1", "single_file", kohya("sd1", rank=4, alpha=2.0), False),
    ("kohya-sd1-diffusers-folder-base", "sd1", "diffusers_folder", kohya("sd1", rank=4), False),
    ("kohya-sd1-ckpt-base", "sd1", "ckpt", kohya("sd1", rank=4), False),
    ("kohya-sd2", "sd2", "single_file", kohya("sd2", rank=4), False),
    ("kohya-sdxl", "sdxl", "single_file", kohya("sdxl", rank=4, alpha=1.0), False),
    ("kohya-flux", "flux", "single_file", kohya("flux", rank=4), False),
    ("kohya-flux-diffusers-base", "flux", "diffusers_folder", kohya("flux", rank=4), False),
    ("kohya-sd3", "sd3", "single_file", kohya("sd3", rank=4), False),
    ("kohya-no-alpha", "sd1", "single_file", kohya("sd1", rank=4, alpha=None), False),
    ("kohya-zero-alpha", "sd1", "single_file", kohya("sd1", rank=4, alpha=0.0), False),
    ("locon", "sd1", "single_file", kohya("sd1", convs=True, rank=4, alpha=2.0), False),
    ("tucker", "sd1", "single_file", kohya("sd1", convs=True, rank=4, tucker=True), False),
    ("dora", "sd1", "single_file", kohya("sd1", rank=4, dora=True), False),
    ("loha", "sd1", "single_file", lycoris("loha"), False),
    ("lokr", "sd1", "single_file", lycoris("lokr"), False),
    ("diffusers-sd1", "sd1", "single_file", diffusers_style("sd1"), False),
    ("diffusers-sdxl-rslora", "sdxl", "diffusers_folder", diffusers_style("sdxl", rslora=True), False),
    ("diffusers-flux", "flux", "single_file", diffusers_style("flux"), False),
    ("peft-folder", "unet", "bare", peft_folder, True),
    ("old-processor", "sd1", "single_file", old_processor, False),
]


def build(tmp_path, family, layout, writer, folder):
    base = bb.build_tiny_base(tmp_path, family, layout)
    lora = tmp_path / ("lora" if folder else "lora.safetensors")
    writer(lora)
    return base, lora


def updates(lora):
    return {name: module.delta().reshape(module.delta().shape[0], -1) for name, module in read_lora(lora).modules.items()}


@pytest.mark.parametrize(("family", "layout", "writer", "folder"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_filtered_update_is_the_sum_of_the_kept_channels(tmp_path, family, layout, writer, folder):
    base, lora = build(tmp_path, family, layout, writer, folder)
    out = tmp_path / ("out" if folder else "out.safetensors")
    report = filter_file(lora, base, out, cache_dir=tmp_path / "cache")
    source, filtered = read_lora(lora), read_lora(out)
    assert filtered.format == source.format
    assert set(filtered.modules) == set(source.modules)
    assert 0 < report.channels_kept < report.channels_total  # BAF's default keeps some channels, drops others
    weights = {m.name: torch.tensor(m.weights) for m in report.modules}
    for name, module in source.modules.items():
        expected = module_channels(module).dense(weights[name])
        got = filtered.modules[name].delta().reshape(expected.shape)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("case", ["kohya-sd1", "locon", "kohya-no-alpha", "diffusers-sdxl-rslora", "peft-folder",
                                  "loha", "kohya-flux"])
def test_keeping_every_channel_reproduces_the_original_update(tmp_path, case):
    _, family, layout, writer, folder = next(c for c in CASES if c[0] == case)
    base, lora = build(tmp_path, family, layout, writer, folder)
    out = tmp_path / ("out" if folder else "out.safetensors")
    filter_file(lora, base, out, KeepAllConfig(), cache_dir=tmp_path / "cache")
    before, after = updates(lora), updates(out)
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(("alpha", "rank", "scale"), [(None, 4, 1.0), (0.0, 4, 1.0), (1.0, 4, 0.25), (8.0, 4, 2.0)])
def test_scale_follows_alpha_conventions(tmp_path, alpha, rank, scale):
    base = bb.build_tiny_base(tmp_path, "sd1", "single_file")
    lora = tmp_path / "lora.safetensors"
    tensors = bl.write_kohya_lora(lora, bb.lora_lookups("sd1", "kohya"), rank=rank, alpha=alpha)
    result = filter_lora(lora, base, KeepAllConfig(), cache_dir=tmp_path / "cache")
    name = next(iter(result.lora.modules))
    up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
    total = sum(m.sigma[0] ** 2 for m in result.report.modules if m.name == name)
    assert total == pytest.approx(float(torch.linalg.matrix_norm(scale * up @ down, ord=2)) ** 2, rel=1e-4)


def test_reduced_rank_writes_only_kept_channels_with_the_same_update(tmp_path):
    base, lora = build(tmp_path, "sdxl", "single_file", kohya("sdxl", rank=4, alpha=2.0), False)
    full, small = tmp_path / "full.safetensors", tmp_path / "small.safetensors"
    report = filter_file(lora, base, full, cache_dir=tmp_path / "cache")
    filter_file(lora, base, small, reduce_rank=True, cache_dir=tmp_path / "cache")
    ranks = {m.name: m.rank for m in read_lora(small).modules.values()}
    kept = {m.name: max(1, m.kept) for m in report.modules}
    assert ranks == kept
    assert small.stat().st_size < full.stat().st_size
    a, b = updates(full), updates(small)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4)


def test_metadata_round_trips_with_provenance_and_deterministic_bytes(tmp_path):
    base, lora = build(tmp_path, "sd1", "single_file", kohya("sd1", rank=4, metadata={"ss_tag_frequency": "{}",
                                                                                      "modelspec.title": "tiny"}), False)
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    filter_file(lora, base, one, cache_dir=tmp_path / "cache")
    filter_file(lora, base, two, cache_dir=tmp_path / "other-cache")  # cold anchors give the same bytes as warm
    assert one.read_bytes() == two.read_bytes()
    before, after = read_lora(lora).metadata, read_lora(one).metadata
    for key in ("ss_tag_frequency", "modelspec.title", "ss_output_name", "ss_base_model_version"):
        assert after[key] == before[key]
    assert after["diffmem.method"] == "baf"
    assert json.loads(after["diffmem.config"])["energy"] == 0.5
    assert after["diffmem.base_sha256"] == bb_sha256(base)
    assert after["diffmem.source_sha256"] == bb_sha256(lora)
    assert after["sshs_model_hash"] != before.get("sshs_model_hash")
    kept = json.loads(after["diffmem.kept_per_module"])
    assert set(kept) == set(read_lora(lora).modules)


def bb_sha256(path):
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_anchor_cache_is_reused_and_survives_corruption(tmp_path):
    base, lora = build(tmp_path, "sd1", "single_file", kohya("sd1", rank=4), False)
    cache = tmp_path / "cache"
    cold = filter_lora(lora, base, cache_dir=cache).report
    warm = filter_lora(lora, base, cache_dir=cache).report
    assert cold.anchors_computed == len(cold.modules) and cold.anchors_cached == 0
    assert warm.anchors_computed == 0 and warm.anchors_cached == len(warm.modules)
    assert [m.weights for m in cold.modules] == [m.weights for m in warm.modules]
    assert [m.scores for m in cold.modules] == [m.scores for m in warm.modules]
    stored, _ = load_file(next((cache / "anchors").iterdir()))
    assert {t.dtype for name, t in stored.items() if not name.endswith(".spectrum")} == {torch.float16}
    shard = next((cache / "anchors").iterdir())
    poisoned, metadata = load_file(shard)
    poisoned[next(name for name in sorted(poisoned) if name.endswith(".v"))][0, 0] = float("nan")
    save_file(poisoned, shard, metadata)  # readable, but one anchor holds a NaN
    mended = filter_lora(lora, base, cache_dir=cache).report
    assert mended.anchors_computed > 0 and [m.weights for m in mended.modules] == [m.weights for m in cold.modules]
    assert all(math.isfinite(s) for m in mended.modules for s in m.scores)
    for file in (cache / "anchors").iterdir():
        file.write_bytes(b"garbage")
    again = filter_lora(lora, base, cache_dir=cache).report
    assert again.anchors_computed == len(again.modules)
    assert [m.weights for m in again.modules] == [m.weights for m in cold.modules]


def test_whole_base_anchor_build_makes_every_later_filter_warm(tmp_path, capsys):
    from diffmem.anchors import FLUSH_EVERY, AnchorStore, build_anchors, distinct_targets
    from diffmem.formats.base import open_base

    base, lora = build(tmp_path, "sd1", "single_file", kohya("sd1", convs=True, rank=4), False)
    cache = tmp_path / "cache"
    assert main(["anchors", str(base), "--cache-dir", str(cache), "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    everything = distinct_targets(open_base(base))
    assert built["weights"] == built["computed"] == len(everything) > FLUSH_EVERY  # flushed part-way at least once
    report = filter_lora(lora, base, cache_dir=cache).report
    assert report.anchors_computed == 0 and report.anchors_cached == len(report.modules)
    again = build_anchors(base, cache_dir=cache)
    assert again.computed == 0 and again.loaded == len(everything)
    unet = build_anchors(base, only="unet", cache_dir=tmp_path / "unet-cache")
    assert 0 < unet.computed < len(everything)  # the text encoder's weights were left out
    assert all(t.module.startswith("unet.") for t in distinct_targets(open_base(base), "unet"))
    with pytest.raises(DiffmemError, match="no LoRA-targetable weights under 'vae'"):
        build_anchors(base, only="vae", cache_dir=cache)
    store = AnchorStore(open_base(base), cache_dir=tmp_path / "fresh-cache")
    store.get(everything[0])
    assert store.get(everything[0], side="right").u is None  # the unwritten anchors serve again, one side only
    assert store.computed == 1 and store.loaded == 0


def test_an_anchor_build_on_two_threads_caches_exactly_what_one_thread_does(tmp_path):
    """Weights are decomposed side by side (one thread each) and shards are written while the other thread works:
    the same anchors, bit for bit, as a build on one thread."""
    from diffmem.anchors import AnchorStore, build_anchors, distinct_targets
    from diffmem.formats.base import open_base

    base, _ = build(tmp_path, "sd1", "single_file", kohya("sd1", rank=4), False)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            build_anchors(base, only="unet", cache_dir=tmp_path / f"threads-{count}")
            assert torch.get_num_threads() == count  # restored after the build
    finally:
        torch.set_num_threads(threads)
    stores = [AnchorStore(open_base(base), cache_dir=tmp_path / f"threads-{count}") for count in (1, 2)]
    for target in distinct_targets(open_base(base), "unet"):
        one, two = (store.get(target) for store in stores)
        for part in ("u", "v", "spectrum"):
            assert torch.equal(getattr(one, part), getattr(two, part)), (target, part)
    assert stores[0].computed == stores[1].computed == 0


def test_a_flush_while_another_thread_writes_a_shard_leaves_its_anchors_pending(tmp_path):
    from diffmem.anchors import AnchorStore, distinct_targets
    from diffmem.formats.base import open_base

    base, _ = build(tmp_path, "sd1", "single_file", kohya("sd1", rank=4), False)
    store = AnchorStore(open_base(base), cache_dir=tmp_path / "cache")
    target = distinct_targets(open_base(base), "unet")[0]
    store.get(target)
    with store.flushing:  # as if another thread were writing a shard
        store.flush(wait=False)
        assert store.unflushed() == 1 and not list(store.folder.glob("*.safetensors"))
    store.flush()
    assert store.unflushed() == 0 and len(list(store.folder.glob("*.safetensors"))) == 1
    fresh = AnchorStore(open_base(base), cache_dir=tmp_path / "cache")
    fresh.get(target)
    assert fresh.loaded == 1 and fresh.computed == 0


def test_baselines_run_through_the_same_pipeline(tmp_path):
    base, lora = build(tmp_path, "sd1", "single_file", kohya("sd1", rank=4), False)
    half = filter_lora(lora, base, RandomConfig(selection=Selection(rule="fraction", keep_fraction=0.5)),
                       cache_dir=tmp_path / "c").report
    assert all(m.kept == 2 for m in half.modules)
    magnitude = filter_lora(lora, base, MagnitudeConfig(), cache_dir=tmp_path / "c").report
    assert all(m.weights[0] == 1.0 for m in magnitude.modules)  # the largest channel always survives
    glob = filter_lora(lora, base, BAFConfig(selection=Selection(rule="fraction", keep_fraction=0.25, scope="global")),
                       cache_dir=tmp_path / "c").report
    assert glob.channels_kept == round(0.25 * glob.channels_total)


# ----------------------------------------------------------------------------------------------- bad input


def good_pair(tmp_path):
    return build(tmp_path, "sd1", "single_file", kohya("sd1", rank=4), False)


def assert_refused(tmp_path, lora, base, error, match):
    out = tmp_path / "out.safetensors"
    with pytest.raises(error, match=match) as info:
        filter_file(lora, base, out, cache_dir=tmp_path / "cache")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp files left
    return str(info.value)


def test_truncated_lora(tmp_path):
    base, lora = good_pair(tmp_path)
    data = lora.read_bytes()
    lora.write_bytes(data[: len(data) // 2])
    assert "lora.safetensors" in assert_refused(tmp_path, lora, base, FileFormatError, "truncated")


def test_not_safetensors(tmp_path):
    base, _ = good_pair(tmp_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_text("definitely not a model")
    assert_refused(tmp_path, junk, base, FileFormatError, "not a safetensors file")


def test_header_that_lies(tmp_path):
    base, lora = good_pair(tmp_path)
    data = lora.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 4
    raw = json.dumps(header).encode()
    lora.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])
    assert_refused(tmp_path, lora, base, FileFormatError, "header lies")


def test_nan_weights(tmp_path):
    base = bb.build_tiny_base(tmp_path, "sd1", "single_file")
    lora = tmp_path / "lora.safetensors"
    tensors = bl.write_kohya_lora(lora, bb.lora_lookups("sd1", "kohya"), rank=4)
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key][0, 0] = float("nan")
    bl.save(tensors, lora, None)
    assert_refused(tmp_path, lora, base, BadWeightsError, "NaN or Inf")


def test_finite_factors_too_large_for_float32_name_their_module(tmp_path):
    """Finite values whose products overflow float32 (a hostile file): the batched decomposition's channels are not
    finite, and the module at fault is named."""
    base = bb.build_tiny_base(tmp_path, "sd1", "single_file")
    lora = tmp_path / "lora.safetensors"
    tensors = bl.write_kohya_lora(lora, bb.lora_lookups("sd1", "kohya"), rank=4)
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key] = tensors[key].float() * 1e25
    bl.save(tensors, lora, None)
    message = assert_refused(tmp_path, lora, base, BadWeightsError, "too large for float32 arithmetic")
    assert key.removesuffix(".lora_up.weight") in message


def test_malicious_pickle_base_is_not_unpickled(tmp_path):
    _, lora = good_pair(tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": Exploit()}}, evil)
    assert_refused(tmp_path, lora, evil, FileFormatError, "evil.ckpt")
    assert not marker.exists()


def test_lora_for_another_family(tmp_path):
    base = bb.build_tiny_base(tmp_path, "sd1", "single_file")
    lora = tmp_path / "lora.safetensors"
    bl.write_kohya_lora(lora, bb.lora_lookups("sdxl", "kohya"), rank=4)
    message = assert_refused(tmp_path, lora, base, BaseMismatchError, "sdxl")
    assert "sd1" in message


def test_module_missing_from_the_base(tmp_path):
    base, _ = good_pair(tmp_path)
    lookups = dict(bb.lora_lookups("sd1", "kohya"))
    lookups["lora_unet_down_blocks_7_attentions_0_proj_in"] = (8, 8)
    lora = tmp_path / "lora.safetensors"
    bl.write_kohya_lora(lora, lookups, rank=4)
    assert_refused(tmp_path, lora, base, BaseMismatchError, "down_blocks_7")


def test_output_equal_to_input_is_refused_before_any_work(tmp_path, monkeypatch):
    base, lora = good_pair(tmp_path)
    before = lora.read_bytes()
    monkeypatch.setattr("diffmem.pipeline.filter_lora", lambda *a, **k: pytest.fail("worked before refusing"))
    with pytest.raises(DiffmemError, match="refusing to overwrite"):
        filter_file(lora, base, lora)
    assert lora.read_bytes() == before


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_filter_inspect_and_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path / "cache"))
    base, lora = good_pair(tmp_path)
    out = tmp_path / "out.safetensors"
    assert main(["filter", str(lora), "--base", str(base), "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["output"] == str(out) and report["channels_kept"] < report["channels_total"]
    assert main(["filter", str(lora), "--base", str(base), "-o", str(tmp_path / "m.safetensors"), "--method",
                 "magnitude", "--rule", "fraction", "--keep-fraction", "0.25", "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert read_lora(tmp_path / "m.safetensors").metadata["diffmem.method"] == "magnitude"
    assert main(["inspect", str(lora), "--base", str(base)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert "energy kept" in printed[0] and printed[-1].startswith("reading: ")
    assert f"diffmem scan {lora} --base {base}" in printed[-1]
    assert main(["filter", str(lora), "--base", str(base), "-o", str(lora)]) == 1
    assert "the output exists; pass --force" in capsys.readouterr().err
    assert main(["filter", str(lora), "--base", str(base), "-o", str(lora), "--force"]) == 1
    assert "refusing to overwrite the LoRA" in capsys.readouterr().err
    assert main(["filter", str(lora), "--base", str(base), "-o", str(out), "--method", "magnitude", "--energy",
                 "0.3"]) == 2  # a usage error, like argparse's own
    assert "--energy does not apply" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["filter", str(lora)])
    assert usage.value.code == 2


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "diffmem", "filter", "--help"], capture_output=True, text=True,
                          check=True)
    assert "--keep-fraction" in done.stdout and "--base" in done.stdout


# ------------------------------------------------------------------------------- front-ends load the output


def kohya_flux_without_linear1(path):
    # diffusers' Flux converter hard-codes the real model's 3072/12288 split of single_blocks.*.linear1.
    lookups = {n: s for n, s in bb.lora_lookups("flux", "kohya").items() if not n.endswith("_linear1")}
    bl.write_kohya_lora(path, lookups, rank=4)


def diffusers_sd1_unet(path):
    # transformers 5's CLIPTextModel has no `text_model.` level, so diffusers cannot place text-encoder keys here.
    lookups = {n: s for n, s in bb.lora_lookups("sd1", "diffusers", convs=True).items() if n.startswith("unet.")}
    bl.write_diffusers_lora(path, lookups, rank=4)


CASES += [
    ("kohya-flux-loadable", "flux", "single_file", kohya_flux_without_linear1, False),
    ("diffusers-sd1-unet", "sd1", "single_file", diffusers_sd1_unet, False),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "loader_family"),
    [("kohya-sd1", "sd1"), ("locon", "sd1"), ("kohya-sdxl", "sdxl"), ("kohya-flux-loadable", "flux"),
     ("diffusers-sd1-unet", "sd1"), ("old-processor", "sd1"), ("loha", "sd1"), ("kohya-no-alpha", "sd1")],
)
@pytest.mark.parametrize("reduce_rank", [False, True], ids=["same-rank", "reduced-rank"])
def test_diffusers_applies_exactly_the_filtered_update(tmp_path, case, loader_family, reduce_rank):
    from test_formats_lora import assert_same_updates, load_with_diffusers

    _, family, layout, writer, folder = next(c for c in CASES if c[0] == case)
    base, lora = build(tmp_path, family, layout, writer, folder)
    out = tmp_path / "out.safetensors"
    # Half of each module's channels: every module keeps a distinct update, so the by-value matcher is unambiguous.
    half = BAFConfig(selection=Selection(rule="fraction", keep_fraction=0.5))
    report = filter_file(lora, base, out, half, reduce_rank=reduce_rank, cache_dir=tmp_path / "cache")
    weights = {m.name: torch.tensor(m.weights) for m in report.modules}
    intended = {name: module_channels(module).dense(weights[name]) for name, module in read_lora(lora).modules.items()}
    assert_same_updates(intended, load_with_diffusers(loader_family, out))


@pytest.mark.slow
def test_peft_loads_the_filtered_folder_with_the_intended_update(tmp_path):
    from peft import PeftModel

    base, lora = build(tmp_path, "unet", "bare", peft_folder, True)
    out = tmp_path / "out"
    report = filter_file(lora, base, out, cache_dir=tmp_path / "cache")
    weights = {m.name: torch.tensor(m.weights) for m in report.modules}
    source = read_lora(lora)
    unet = copy.deepcopy(bb.tiny_models("unet")["unet"])  # PEFT injects in place; the cached model is shared
    model = PeftModel.from_pretrained(unet, str(out), adapter_name="filtered")
    checked = 0
    for name, module in source.modules.items():
        layer = model.base_model.model.get_submodule(module.lookup)
        applied = layer.get_delta_weight("filtered").reshape(layer.get_delta_weight("filtered").shape[0], -1)
        torch.testing.assert_close(applied, module_channels(module).dense(weights[name]), atol=1e-5, rtol=1e-4)
        checked += 1
    assert checked == len(source.modules) > 0


def test_device_option(tmp_path):
    base, lora = good_pair(tmp_path)
    on_cpu = filter_lora(lora, base, cache_dir=tmp_path / "a", device="cpu").report
    default = filter_lora(lora, base, cache_dir=tmp_path / "b").report
    assert [m.weights for m in on_cpu.modules] == [m.weights for m in default.modules]
    with pytest.raises(DiffmemError, match="unknown device"):
        filter_lora(lora, base, device="gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(DiffmemError, match="no CUDA GPU"):
            filter_lora(lora, base, device="cuda")


def test_several_threads_give_the_same_filter_and_leave_torch_threads_as_they_were(tmp_path):
    """Modules are decomposed, scored and rebuilt side by side on torch's threads (one torch thread each)."""
    base, lora = build(tmp_path, "sd1", "single_file", kohya("sd1", convs=True, rank=4), False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = filter_lora(lora, base, cache_dir=tmp_path / "serial")
        torch.set_num_threads(3)
        parallel = filter_lora(lora, base, cache_dir=tmp_path / "parallel")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert [m.scores for m in parallel.report.modules] == [m.scores for m in serial.report.modules]
    assert parallel.report.anchors_computed == serial.report.anchors_computed == len(serial.report.modules)
    for name, module in serial.lora.modules.items():
        for role, tensor in module.tensors.items():
            assert torch.equal(parallel.lora.modules[name].tensors[role], tensor), (name, role)


# --- the caption-readers filter (by module role) ----------------------------------------------------------------


def test_only_cross_attention_keys_and_values_read_the_caption():
    block = "unet.mid_block.attentions.0.transformer_blocks.0"
    assert reads_caption(f"{block}.attn2.to_k") and reads_caption(f"{block}.attn2.to_v")
    assert not any(reads_caption(f"{block}.{m}") for m in ("attn2.to_q", "attn2.to_out.0", "attn1.to_k", "ff.net.2"))
    assert reads_caption("transformer.transformer_blocks.3.attn.add_v_proj")
    assert not reads_caption("transformer.transformer_blocks.3.attn.add_q_proj")
    assert not reads_caption("transformer.double_blocks.0.txt_attn.qkv")  # fused with the text queries


#: The filters by module role, each at factor 0.5 with the test of the base modules it turns down.
ROLE_FILTERS = {
    "caption-readers": (CaptionReadersConfig(factor=0.5), reads_caption),
    "unet-blocks": (UNetBlocksConfig(factor=0.5), lambda module: unet_block(module) == "up_blocks.0"),
}


@pytest.mark.parametrize(("method", "case"), [
    *(("caption-readers", case) for case in ("kohya-sd1", "diffusers-sdxl-rslora", "diffusers-flux", "loha",
                                             "peft-folder")),
    *(("unet-blocks", case) for case in ("kohya-sdxl", "locon", "peft-folder")),
])
def test_a_module_role_filter_turns_down_exactly_its_modules(tmp_path, method, case):
    config, chosen = ROLE_FILTERS[method]
    _, family, layout, writer, folder = next(c for c in CASES if c[0] == case)
    base, lora = build(tmp_path, family, layout, writer, folder)
    out = tmp_path / ("out" if folder else "out.safetensors")
    report = filter_file(lora, base, out, config, cache_dir=tmp_path / "cache")
    module_of = {m.name: m.module for m in report.modules}
    before, after = updates(lora), updates(out)
    turned_down = [name for name in before if chosen(module_of[name])]
    assert 0 < len(turned_down) < len(before)
    for name in before:
        factor = 0.5 if name in turned_down else 1.0
        torch.testing.assert_close(after[name], factor * before[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(("method", "case", "problem"), [
    ("caption-readers", "kohya-flux", "reads the caption"),  # BFL's fused txt_attn.qkv: no separable caption reader
    # SD1's up_blocks.0 has no attention, so an attention-only LoRA never touches it; a Flux LoRA has no UNet.
    ("unet-blocks", "kohya-sd1", "updates no module of up_blocks.0"),
    ("unet-blocks", "kohya-flux", "updates no module of up_blocks.0"),
])
def test_a_module_role_filter_refuses_a_lora_it_would_leave_unchanged(tmp_path, capsys, method, case, problem):
    _, family, layout, writer, folder = next(c for c in CASES if c[0] == case)
    base, lora = build(tmp_path, family, layout, writer, folder)
    out = tmp_path / "out.safetensors"
    assert main(["filter", str(lora), "--base", str(base), "-o", str(out), "--method", method]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(lora) in error and problem in error
    assert not out.exists()


def test_caption_readers_factor_is_an_option_of_that_method_only(tmp_path):
    base, lora = build(tmp_path, "sd1", "single_file", kohya("sd1", rank=4), False)
    out = tmp_path / "out.safetensors"
    assert main(["filter", str(lora), "--base", str(base), "-o", str(out), "--method", "caption-readers",
                 "--factor", "0", "--cache-dir", str(tmp_path / "c")]) == 0
    dropped = [m for m in read_lora(out).modules.values() if float(m.delta().abs().max()) == 0.0]
    assert dropped and all("attn2_to_k" in m.name or "attn2_to_v" in m.name for m in dropped)
    for argv in (["--method", "baf", "--factor", "0.5"], ["--method", "caption-readers", "--factor", "2"]):
        assert main(["filter", str(lora), "--base", str(base), "-o", str(tmp_path / "x.safetensors"), *argv]) == 2


# --- the unet-blocks filter (by UNet block) ---------------------------------------------------------------------


def test_a_module_s_unet_block_is_read_from_its_diffusers_path():
    assert unet_block("unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k") == "up_blocks.0"
    assert unet_block("up_blocks.12.resnets.0.conv1") == "up_blocks.12"
    assert unet_block("unet.mid_block.resnets.1.conv2") == "mid_block"
    assert unet_block("unet.down_blocks.2.downsamplers.0.conv") == "down_blocks.2"
    for outside in ("unet.conv_in", "unet.time_embedding.linear_1", "text_encoder.text_model.encoder.layers.0.mlp.fc1",
                    "transformer.transformer_blocks.0.attn.to_out.0", "unet.up_blocks_0.resnets.0.conv1"):
        assert unet_block(outside) is None, outside


def test_unet_blocks_takes_the_blocks_and_factor_from_the_command_line(tmp_path):
    base, lora = build(tmp_path, "sd1", "single_file", kohya("sd1", rank=4), False)
    out = tmp_path / "out.safetensors"
    assert main(["filter", str(lora), "--base", str(base), "-o", str(out), "--method", "unet-blocks",
                 "--block", "up_blocks.1", "--block", "mid_block", "--cache-dir", str(tmp_path / "c")]) == 0
    modules = read_lora(out).modules.values()
    dropped = [m.name for m in modules if float(m.delta().abs().max()) == 0.0]
    assert dropped and all("up_blocks_1_" in name or "mid_block_" in name for name in dropped)
    assert len(dropped) == sum("up_blocks_1_" in m.name or "mid_block_" in m.name for m in modules)
    for argv in (["--method", "baf", "--block", "up_blocks.0"], ["--method", "unet-blocks", "--block", "up.0"],
                 ["--method", "unet-blocks", "--factor", "1.5"]):
        assert main(["filter", str(lora), "--base", str(base), "-o", str(tmp_path / "x.safetensors"), *argv]) == 2
    assert not (tmp_path / "x.safetensors").exists()
