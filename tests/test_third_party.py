"""LoRA files written by third-party libraries, read, filtered, written back and applied by third-party readers.

Every file here is written by the real library (lycoris-lora's `create_lycoris`, PEFT's `save_pretrained`,
diffusers' `save_lora_weights` and `convert_state_dict_to_kohya`) around the tiny models of
`tests/builders_base.py`, filtered against a tiny base of the real layout, and the output is loaded by a reader
that is not diffmem (lycoris-lora's `create_lycoris_from_weights` + `merge_to`, PEFT's `PeftModel.from_pretrained`,
diffusers' `load_lora_weights`). What that reader applies must be, module by module, the update the filter's report
says it kept: `U diag(sigma * weight) V^T` of the input module, with `sigma` and `weight` read from the report.

Each passing case adds one row to the writer x family matrix of docs/formats.md. Regenerate docs/formats_matrix.json
(and check the table against it) with

    DIFFMEM_FORMATS_MATRIX=docs/formats_matrix.json .venv/bin/python -m pytest tests/test_third_party.py

Every optional library is skipped cleanly where it is absent.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import builders_base as bb
from diffmem.cli import main
from diffmem.errors import BaseMismatchError
from diffmem.formats.lora import read_lora
from diffmem.pipeline import FilterReport, filter_file, module_channels

DOCS = Path(__file__).resolve().parents[1] / "docs"
MATRIX_JSON = DOCS / "formats_matrix.json"
MATRIX: list[dict] = []  # rows recorded by the tests that passed, in run order
TABLE_START, TABLE_END = "<!-- formats-matrix:start -->", "<!-- formats-matrix:end -->"


def version(package: str) -> str:
    """Installed version of `package` (the distribution name)."""
    return importlib.metadata.version(package)


def record(request: pytest.FixtureRequest, writer: str, package: str, family: str, *, read: str, written_back: str,
           applied_by: str) -> None:
    """Add this test's row to the matrix; called last in a test, so only passing tests give rows."""
    MATRIX.append({"writer": writer, "writer_version": f"{package} {version(package)}", "family": family,
                   "read": read, "written_back": written_back, "applied_exactly_by": applied_by,
                   "test": request.node.name})


@pytest.fixture(scope="module", autouse=True)
def write_matrix() -> Iterator[None]:
    """With DIFFMEM_FORMATS_MATRIX=path, write the rows of this run there when the module's tests are done."""
    yield
    target = os.environ.get("DIFFMEM_FORMATS_MATRIX")
    if target and MATRIX:
        rows = sorted(MATRIX, key=lambda row: (row["writer"], row["family"], row["test"]))
        Path(target).write_text(json.dumps(rows, indent=1) + "\n")


@pytest.fixture(autouse=True)
def quiet_libraries() -> Iterator[None]:
    """lycoris-lora and PEFT log every module they wrap; nothing in these tests reads those lines."""
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


# --------------------------------------------------------------------------------------------------------------
# Helpers


def fresh(family: str, component: str) -> torch.nn.Module:
    """A private copy of a tiny model: wrapping one in an adapter must not change the cached original."""
    return copy.deepcopy(bb.tiny_models(family)[component])


def randomize(parameters: Iterator[torch.nn.Parameter], seed: int = 0) -> None:
    """Seeded random adapter weights: LoRA up factors start at zero, which would make every update empty."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def filter_to(tmp_path: Path, source: Path, base: Path, **options) -> tuple[Path, FilterReport]:
    """Filter `source` with BAF's defaults (top half of each module's channels) into tmp_path."""
    out = tmp_path / ("out" if source.is_dir() else "out.safetensors")
    report = filter_file(source, base, out, cache_dir=tmp_path / "cache", **options)
    return out, report


def layer_key(module: str) -> str:
    """`component.path` with the CLIP `text_model.` level removed: transformers 5's CLIPTextModel has none, the
    report names the classic form, and both name one layer."""
    return module.replace(".text_model.", ".")


def kept_updates(source: Path, report: FilterReport) -> dict[str, torch.Tensor]:
    """The update of every filtered module as the report describes it, by base layer: the input module's channels
    `U diag(sigma) V^T`, each scaled by the report's weight (0 or 1 for BAF's fraction rule)."""
    lora = read_lora(source)
    kept = {}
    for entry in report.modules:
        channels = module_channels(lora.modules[entry.name])
        assert torch.allclose(channels.sigma, torch.tensor(entry.sigma), rtol=1e-4, atol=1e-5), entry.name
        kept[layer_key(entry.module)] = channels.dense(torch.tensor(entry.weights, dtype=channels.sigma.dtype)).float()
    assert any(0 < entry.kept < entry.channels for entry in report.modules), "the filter removed nothing"
    return kept


def assert_applied_exactly(kept: dict[str, torch.Tensor], applied: dict[str, torch.Tensor]) -> None:
    """The reader changed exactly the layers the report filtered, each by exactly the kept update."""
    applied = {layer_key(name): delta.reshape(delta.shape[0], -1) for name, delta in applied.items()}
    unexpected = sorted(name for name, delta in applied.items() if name not in kept and bool(delta.abs().max() > 0))
    assert not unexpected, f"the reader changed layers the filter never saw: {unexpected[:5]}"
    for name, update in kept.items():
        assert name in applied or bool(update.abs().max() == 0), f"the reader did not apply {name}"
        delta = applied.get(name, torch.zeros_like(update))
        assert torch.allclose(delta.float(), update, rtol=1e-4, atol=1e-5), \
            f"{name}: max difference {float((delta - update).abs().max()):.3g}"


def weight_changes(models: dict[str, torch.nn.Module], apply: Callable[[], None]) -> dict[str, torch.Tensor]:
    """`component.layer` -> how much `apply()` changed that Linear/Conv weight (only those it changed)."""
    before = {(c, n): m.weight.detach().clone() for c, model in models.items() for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}
    apply()
    changes = {}
    for (component, name), old in before.items():
        new = dict(models[component].named_modules())[name].weight.detach()
        if not torch.equal(new, old):
            changes[f"{component}.{name}"] = (new - old).float()
    return changes


def peft_deltas(model: torch.nn.Module, component: str, adapter: str, strip: str = "") -> dict[str, torch.Tensor]:
    """PEFT's own `get_delta_weight` of every adapted layer of `model`, by `component.layer`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    deltas = {}
    for name, layer in model.named_modules():
        if isinstance(layer, BaseTunerLayer):
            deltas[f"{component}.{name.removeprefix(strip)}"] = layer.get_delta_weight(adapter).detach()
    return deltas


# --------------------------------------------------------------------------------------------------------------
# lycoris-lora: the generic `create_lycoris(module)` (keys `lycoris_<path inside module>`)


def write_lycoris(path: Path, model: torch.nn.Module, algo: str = "lora") -> Path:
    """What a LyCORIS training script saves for `model` (all Linear and Conv layers of the "full" preset)."""
    from lycoris import create_lycoris

    network = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2.0, algo=algo)
    network.apply_to()
    randomize(network.parameters())
    network.save_weights(str(path), torch.float32, {})
    return path


def lycoris_applies(family: str, component: str, path: Path) -> dict[str, torch.Tensor]:
    """Load `path` with lycoris-lora's own loader into a fresh tiny model and merge it: the weight changes."""
    from lycoris import create_lycoris_from_weights

    models = {component: fresh(family, component)}
    network, _ = create_lycoris_from_weights(1.0, str(path), models[component])
    assert network.loras, "lycoris-lora found no module of the file in the model"
    return weight_changes(models, lambda: network.merge_to(1.0))


LYCORIS_CASES = {
    # (family, base layout, component wrapped, algo, modules the base cannot map)
    "sd1_unet": ("sd1", "single_file", "unet", "lora", []),
    "sd1_unet_loha": ("sd1", "single_file", "unet", "loha", []),
    "sd1_text_encoder": ("sd1", "single_file", "text_encoder", "lora", []),
    "sdxl_unet": ("sdxl", "single_file", "unet", "lora", []),
    "sdxl_text_encoder": ("sdxl", "single_file", "text_encoder", "lora", []),
    "sdxl_text_encoder_2": ("sdxl", "diffusers_folder", "text_encoder_2", "lora", []),
    # A single file stores bigG's text_projection transposed (OpenCLIP), which no row map reaches: skipped on request.
    "sdxl_text_encoder_2_single_file": ("sdxl", "single_file", "text_encoder_2", "lora", ["lycoris_text_projection"]),
}


@pytest.mark.parametrize("case", list(LYCORIS_CASES))
def test_lycoris_generic_files_are_read_and_applied_exactly_by_lycoris(tmp_path, request, case):
    """Refused before ("the LoRA looks like sd1/sd2 and the base like sd1"): `lycoris_` names had no alias.
    SDXL's two text encoders share module paths; their widths tell them apart."""
    pytest.importorskip("lycoris")
    family, layout, component, algo, unmapped = LYCORIS_CASES[case]
    base = bb.build_tiny_base(tmp_path, family, layout)
    source = write_lycoris(tmp_path / "lycoris.safetensors", fresh(family, component), algo)
    if unmapped:
        with pytest.raises(BaseMismatchError, match=f"{unmapped[0]}.*--skip-unmapped"):
            filter_to(tmp_path, source, base)
    out, report = filter_to(tmp_path, source, base, skip_unmapped=bool(unmapped))
    assert {layer_key(m.module).split(".", 1)[0] for m in report.modules} == {component}
    assert report.skipped_unmapped == unmapped
    assert len(report.modules) == len(read_lora(source).modules) - len(unmapped)
    written, original = load_file(out), load_file(source)
    if algo == "lora":
        assert set(written) == set(original)  # the same keys: the same format, as LyCORIS wrote it
    else:  # LoHa has no channels of its own: written as plain LoRA under the same module names
        assert {k.split(".")[0] for k in written} == {k.split(".")[0] for k in original}
    applied = lycoris_applies(family, component, out)
    for name in unmapped:  # written back unchanged, so applied as the trainer wrote it
        layer = f"{component}.{name.removeprefix('lycoris_')}"
        unchanged = read_lora(source).modules[name].delta()
        assert torch.allclose(applied.pop(layer), unchanged.reshape(unchanged.shape[0], -1), atol=1e-5)
    assert_applied_exactly(kept_updates(source, report), applied)
    kinds = "LoHa modules as plain LoRA (lora_up/lora_down)" if algo == "loha" else "same keys"
    read = f"yes ({layout} base)" if not unmapped else f"with --skip-unmapped ({layout} base: {', '.join(unmapped)})"
    record(request, f"lycoris-lora create_lycoris({component}, algo={algo})", "lycoris-lora", family,
           read=read, written_back=kinds,
           applied_by=f"lycoris-lora {version('lycoris-lora')} create_lycoris_from_weights + merge_to")


def test_lycoris_message_no_longer_contradicts_itself(tmp_path):
    """A `lycoris_` module the SD1 base lacks: the error says the names fit SD1, not "sd1/sd2 ... like sd1"."""
    pytest.importorskip("lycoris")
    base = bb.build_tiny_base(tmp_path, "sd1", "single_file")
    source = write_lycoris(tmp_path / "lycoris.safetensors", fresh("sd1", "unet"))
    tensors = load_file(source)
    extra = "lycoris_down_blocks_7_attentions_0_proj_in"
    tensors.update({f"{extra}.lora_up.weight": torch.ones(8, 4), f"{extra}.lora_down.weight": torch.ones(4, 8),
                    f"{extra}.alpha": torch.tensor(4.0)})
    save_file(tensors, tmp_path / "extra.safetensors")
    with pytest.raises(BaseMismatchError) as error:
        filter_to(tmp_path, tmp_path / "extra.safetensors", base)
    message = str(error.value)
    assert "looks like sd1/sd2 and the base like sd1" not in message
    assert "fit a sd1 model, as the base is" in message and f"1 of {len(read_lora(source).modules) + 1}" in message
    assert extra in message and "--skip-unmapped" in message


# --------------------------------------------------------------------------------------------------------------
# diffusers' convert_state_dict_to_kohya (a PEFT state dict -> kohya names with diffusers module paths)


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def peft_wrapped(model: torch.nn.Module, targets: list[str], seed: int) -> torch.nn.Module:
    """`model` with a PEFT LoRA (rank 4, alpha 8) injected in place, weights random."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    model = inject_adapter_in_model(config, model)
    randomize((p for n, p in model.named_parameters() if "lora_" in n), seed)
    return model


def peft_state(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """`<component>.<path>.lora_A.weight` etc., as diffusers' training scripts pass them to its converters."""
    from peft import get_peft_model_state_dict

    return {f"{name}.{key}": value for name, model in models.items()
            for key, value in get_peft_model_state_dict(model).items()}


def kohya_from_diffusers(path: Path, family: str, text_layers: int | None = None) -> Path:
    """A kohya file from diffusers' `convert_state_dict_to_kohya`, for the UNet and text encoder(s) of `family`.
    `text_layers` trains a text encoder deeper than the base's (its extra layers have no weight in the base)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from transformers import CLIPTextConfig, CLIPTextModel

    models = {"unet": peft_wrapped(fresh(family, "unet"), UNET_TARGETS, 0)}
    for seed, name in enumerate(n for n in bb.tiny_models(family) if n.startswith("text_encoder")):
        encoder = fresh(family, name)
        if text_layers is not None and name == "text_encoder":
            torch.manual_seed(0)
            config = CLIPTextConfig(**{**bb.CLIP_L, "num_hidden_layers": text_layers}, bos_token_id=0, eos_token_id=1,
                                    pad_token_id=1)
            encoder = CLIPTextModel(config)
        models[name] = peft_wrapped(encoder, TEXT_TARGETS, seed + 1)
    tensors = {key: value.contiguous() for key, value in convert_state_dict_to_kohya(peft_state(models)).items()}
    save_file(tensors, path)
    return path


def diffusers_applies(family: str, path: Path) -> dict[str, torch.Tensor]:
    """Load a LoRA file with diffusers' `load_lora_weights` into fresh tiny models (the helper that checks
    diffusers reports no skipped key), returning PEFT's delta of every adapted layer."""
    from test_formats_lora import load_with_diffusers

    return load_with_diffusers(family, path)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_kohya_converter_files_are_read(tmp_path, request, family):
    """Refused before on SD1 ("looks like sdxl"): diffusers writes `lora_te1_` for SD1's only text encoder, under
    transformers 5 without `text_model_`. On SDXL it writes diffusers-path UNet names, not SGM ones."""
    pytest.importorskip("peft")
    base = bb.build_tiny_base(tmp_path, family, "single_file")
    source = kohya_from_diffusers(tmp_path / "kohya.safetensors", family)
    assert any(key.startswith("lora_te1_encoder_layers_") for key in load_file(source))  # the names at issue
    out, report = filter_to(tmp_path, source, base)
    assert len(report.modules) == len(read_lora(source).modules) and not report.skipped_unmapped
    assert set(load_file(out)) == set(load_file(source))
    assert_applied_exactly(kept_updates(source, report), diffusers_applies(family, out))
    record(request, "diffusers convert_state_dict_to_kohya (UNet + text encoders)", "diffusers", family,
           read="yes (single_file base)", written_back="same keys",
           applied_by=f"diffusers {version('diffusers')} load_lora_weights")


def test_unmapped_modules_are_named_and_skipped_on_request(tmp_path, request, capsys):
    """A kohya file whose text encoder has a layer the base lacks: the error names those modules, counts them and
    offers --skip-unmapped; with it the rest is filtered and the unmapped modules are written back bit for bit."""
    pytest.importorskip("peft")
    base = bb.build_tiny_base(tmp_path, "sd1", "single_file")
    source = kohya_from_diffusers(tmp_path / "kohya.safetensors", "sd1", text_layers=3)
    unmapped = sorted(name for name in read_lora(source).modules if name.startswith("lora_te1_encoder_layers_2_"))
    assert len(unmapped) == len(TEXT_TARGETS)
    total = len(read_lora(source).modules)
    with pytest.raises(BaseMismatchError) as error:
        filter_to(tmp_path, source, base)
    message = str(error.value)
    assert f"{len(unmapped)} of {total} modules have no weight in the base, e.g. {unmapped[0]}" in message
    assert f"{total - len(unmapped)} other modules map: pass --skip-unmapped" in message
    assert "fit a sd1 model, as the base is" in message

    out, report = filter_to(tmp_path, source, base, skip_unmapped=True)
    assert sorted(report.skipped_unmapped) == unmapped and len(report.modules) == total - len(unmapped)
    assert report.to_dict()["skipped_unmapped_count"] == len(unmapped)
    written, original = load_file(out), load_file(source)
    assert set(written) == set(original)
    for key in original:
        if key.split(".")[0] in unmapped:
            assert torch.equal(written[key], original[key]), key
    assert json.loads(read_lora(out).metadata["diffmem.skipped_unmapped"]) == unmapped
    assert_applied_exactly(kept_updates(source, report), {
        entry.module: read_lora(out).modules[entry.name].delta() for entry in report.modules})

    # The command line: refused without the flag (one line, exit 1), filtered with it.
    assert main(["filter", str(source), "--base", str(base), "-o", str(tmp_path / "cli.safetensors"), "-q"]) == 1
    assert "--skip-unmapped" in capsys.readouterr().err
    code = main(["filter", str(source), "--base", str(base), "-o", str(tmp_path / "cli.safetensors"), "--json",
                 "--skip-unmapped", "--cache-dir", str(tmp_path / "cache")])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and printed["skipped_unmapped_count"] == len(unmapped)
    assert sorted(printed["skipped_unmapped"]) == unmapped
    record(request, "diffusers convert_state_dict_to_kohya, text encoder deeper than the base", "diffusers", "sd1",
           read="refused, naming the unmapped modules; with --skip-unmapped yes",
           written_back="same keys; unmapped modules bit for bit",
           applied_by="no third-party reader checked (the base lacks the unmapped layers); diffmem's reader of "
                      "the output")


def test_filter_many_skips_unmapped_modules_on_request(tmp_path, capsys):
    """`filter-many --skip-unmapped`: the file is filtered (not a failed row) and its output keeps the rest."""
    pytest.importorskip("peft")
    base = bb.build_tiny_base(tmp_path, "sd1", "single_file")
    folder = tmp_path / "in"
    folder.mkdir()
    kohya_from_diffusers(folder / "deep.safetensors", "sd1", text_layers=3)
    args = ["filter-many", str(folder), "--base", str(base), "--out", str(tmp_path / "out"), "--workers", "1",
            "--cache-dir", str(tmp_path / "cache"), "--json"]
    assert main(args) == 1  # refused without the flag: a failed row
    capsys.readouterr()
    assert main([*args, "--skip-unmapped"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["counts"]["filtered"] == 1
    assert result["files"][0]["skipped_unmapped"] > 0


# --------------------------------------------------------------------------------------------------------------
# PEFT save_pretrained (native adapter folders) and diffusers save_lora_weights


PEFT_CASES = {
    # (family, component, base layout, target modules)
    "sdxl_unet": ("sdxl", "unet", "single_file", [*UNET_TARGETS, "conv1", "conv2"]),
    "sd1_text_encoder": ("sd1", "text_encoder", "single_file", TEXT_TARGETS),
    "flux_transformer": ("flux", "transformer", "single_file",
                         ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_v_proj", "proj_mlp", "ff.net.2"]),
    "sd3_transformer": ("sd3", "transformer", "single_file",
                        ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "to_add_out", "ff_context.net.2"]),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_save_pretrained_folders_are_applied_exactly_by_peft(tmp_path, request, case):
    """PEFT's own folder, filtered against a single-file base (SGM UNet, BFL/SAI fused qkv), and loaded back with
    `PeftModel.from_pretrained`: each layer's delta is the kept update."""
    peft = pytest.importorskip("peft")
    family, component, layout, targets = PEFT_CASES[case]
    base = bb.build_tiny_base(tmp_path, family, layout)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    model = peft.get_peft_model(fresh(family, component), config)
    randomize(p for n, p in model.named_parameters() if "lora_" in n)
    model.save_pretrained(tmp_path / "adapter")
    source = tmp_path / "adapter"
    out, report = filter_to(tmp_path, source, base)
    assert len(report.modules) == len(read_lora(source).modules) and not report.skipped_unmapped
    assert set(load_file(out / "adapter_model.safetensors")) == set(load_file(source / "adapter_model.safetensors"))
    loaded = peft.PeftModel.from_pretrained(fresh(family, component), str(out))
    applied = peft_deltas(loaded, component, "default", strip="base_model.model.")
    assert_applied_exactly(kept_updates(source, report), applied)
    record(request, f"PEFT save_pretrained ({component})", "peft", family, read=f"yes ({layout} base)",
           written_back="same folder layout and keys",
           applied_by=f"peft {version('peft')} PeftModel.from_pretrained")


SAVE_LORA_CASES = {
    # (family, pipeline class, components wrapped, base layout)
    "sdxl": ("sdxl", "StableDiffusionXLPipeline", ("unet",), "single_file"),
    "flux": ("flux", "FluxPipeline", ("transformer",), "single_file"),
    "sd3": ("sd3", "StableDiffusion3Pipeline", ("transformer",), "single_file"),
}


@pytest.mark.parametrize("case", list(SAVE_LORA_CASES))
def test_diffusers_save_lora_weights_files_are_applied_exactly_by_diffusers(tmp_path, request, case):
    """`<Pipeline>.save_lora_weights` (`unet.` / `transformer.` keys, `lora_adapter_metadata` header), filtered
    against a single-file base and loaded back with diffusers' `load_lora_weights`."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    family, pipeline, components, layout = SAVE_LORA_CASES[case]
    base = bb.build_tiny_base(tmp_path, family, layout)
    targets = UNET_TARGETS if family == "sdxl" else PEFT_CASES[f"{family}_transformer"][3]
    models = {name: peft_wrapped(fresh(family, name), targets, seed) for seed, name in enumerate(components)}
    from peft import get_peft_model_state_dict

    layers = {f"{name}_lora_layers": get_peft_model_state_dict(model) for name, model in models.items()}
    metadata = {f"{name}_lora_adapter_metadata": model.peft_config["default"].to_dict()
                for name, model in models.items()}
    getattr(diffusers, pipeline).save_lora_weights(tmp_path / "lora", **layers, **metadata)
    source = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    prefix = "transformer." if family != "sdxl" else "unet."
    assert all(key.startswith(prefix) for key in load_file(source))
    out, report = filter_to(tmp_path, source, base)
    assert len(report.modules) == len(read_lora(source).modules) and not report.skipped_unmapped
    assert set(load_file(out)) == set(load_file(source))
    assert_applied_exactly(kept_updates(source, report), diffusers_applies(family, out))
    record(request, f"diffusers {pipeline}.save_lora_weights ({', '.join(components)})", "diffusers", family,
           read=f"yes ({layout} base)", written_back="same keys and lora_adapter_metadata",
           applied_by=f"diffusers {version('diffusers')} load_lora_weights")


# --------------------------------------------------------------------------------------------------------------
# The name and shape rules behind the cases above


def test_names_told_apart_by_shape_must_agree_on_one_component(tmp_path):
    """`lycoris_text_model_…` fits both SDXL text encoders: a module is mapped by shape when exactly one fits, but a
    file whose modules would land in both encoders that way is not unambiguous, and is refused."""
    from diffmem.formats.base import open_base, resolve_targets

    base = open_base(bb.build_tiny_base(tmp_path, "sdxl", "single_file"))
    name = "lycoris_text_model_encoder_layers_{}_self_attn_q_proj"
    assert name.format(0) in base.ambiguous and len(base.candidates(name.format(0))) == 2
    te1 = {"a": (name.format(0), (16, 16))}
    assert resolve_targets(te1, base, tmp_path / "l.safetensors")["a"].module.startswith("text_encoder.")
    both = {**te1, "b": (name.format(1), (24, 24))}
    with pytest.raises(BaseMismatchError, match=r"2 of 2 modules have no weight in the base \(2 of them name more"):
        resolve_targets(both, base, tmp_path / "l.safetensors")
    with pytest.raises(BaseMismatchError, match="no weight in the base"):  # nothing maps: --skip-unmapped won't do
        resolve_targets(both, base, tmp_path / "l.safetensors", skip_unmapped=True)


def test_lora_te1_names_the_only_text_encoder_of_sd1_but_not_sdxls_second(tmp_path):
    from diffmem.formats.base import guess_lora_family, open_base

    sd1 = open_base(bb.build_tiny_base(tmp_path, "sd1", "single_file"))
    assert sd1.targets["lora_te1_encoder_layers_0_self_attn_q_proj"].module == \
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert sd1.targets["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] == \
        sd1.targets["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    # The names alone no longer claim SDXL for diffusers' converter output (lora_te1_ + diffusers UNet paths).
    names = ["lora_te1_encoder_layers_0_self_attn_q_proj", "lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert guess_lora_family(names, {}) == "sd1/sd2/sdxl"
    assert guess_lora_family([*names, "lora_te2_encoder_layers_0_mlp_fc1"], {}) == "sdxl"


# --------------------------------------------------------------------------------------------------------------
# The matrix in docs/formats.md


def matrix_markdown(rows: list[dict]) -> str:
    """The docs/formats.md table of `rows` (as written to docs/formats_matrix.json)."""
    lines = ["| writer (library, version) | family | read? | written back | applied exactly by | test |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        cells = [f"{row['writer']} ({row['writer_version']})", row["family"], row["read"], row["written_back"],
                 row["applied_exactly_by"], f"`{row['test']}`"]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def test_docs_matrix_matches_the_json_and_names_tests_of_this_file():
    """docs/formats.md shows docs/formats_matrix.json exactly, and every row names a test defined here."""
    rows = json.loads(MATRIX_JSON.read_text())
    doc = (DOCS / "formats.md").read_text()
    table = doc.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()
    assert table == matrix_markdown(rows)
    defined = {name for name in globals() if name.startswith("test_")}
    for row in rows:
        assert row["test"].split("[", 1)[0] in defined, row["test"]
