"""Merging LoRAs of every naming into loaded components (`diffmem.formats.merge`), checked against diffusers'
own LoRA loader and against the dense updates by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DiffusionPipeline

from builders_base import lora_lookups, tiny_models
from builders_lora import write_diffusers_lora, write_kohya_lora
from builders_pipelines import build_tiny_pipeline, write_pipeline_lora
from diffmem.errors import BaseMismatchError
from diffmem.formats.lora import read_lora
from diffmem.formats.merge import merge_lora, module_checkpoint, pipeline_components


def fresh(family: str) -> dict[str, torch.nn.Module]:
    return {name: copy.deepcopy(module) for name, module in tiny_models(family).items()}


def changed_tensors(before: dict[str, torch.nn.Module], after: dict[str, torch.nn.Module]) -> dict[str, float]:
    out = {}
    for name in before:
        old, new = before[name].state_dict(), after[name].state_dict()
        for key in old:
            gap = float((old[key].float() - new[key].float()).abs().max()) if old[key].numel() else 0.0
            if gap > 0:
                out[f"{name}.{key}"] = gap
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux", "sd3"])
def test_module_checkpoint_knows_the_family(family):
    assert module_checkpoint(fresh(family)).family == family


@pytest.mark.parametrize("family, style", [("sd1", "kohya"), ("sd1", "diffusers"), ("sdxl", "kohya"),
                                           ("flux", "kohya")])
def test_merge_adds_each_modules_dense_update(tmp_path, family, style):
    lookups = lora_lookups(family, style)
    path = tmp_path / "l.safetensors"
    (write_kohya_lora if style == "kohya" else write_diffusers_lora)(path, lookups, rank=2)
    models = fresh(family)
    before = {name: copy.deepcopy(module) for name, module in models.items()}
    merged = merge_lora(models, path, scale=0.5)
    lora = read_lora(path)
    assert merged == len(lora.modules) > 0
    changed = changed_tensors(before, models)
    assert changed, "merging changed no weight"
    # Every changed weight is exactly base + 0.5 * delta of the modules targeting it.
    base = module_checkpoint(before)
    expected: dict[str, torch.Tensor] = {}
    for module in lora.modules.values():
        target = base.targets[module.lookup]
        delta = module.delta().reshape(target.shape)
        row = 0
        for key, start, end in target.parts:
            full = expected.setdefault(key, torch.zeros(base._store.shape(key)))
            full[start:end] += 0.5 * delta[row : row + end - start].reshape(full[start:end].shape)
            row += end - start
    assert set(changed) == {key for key, value in expected.items() if value.abs().max() > 0}
    for key, update in expected.items():
        component, inner = key.split(".", 1)
        got = models[component].state_dict()[inner] - before[component].state_dict()[inner]
        torch.testing.assert_close(got, update, atol=1e-6, rtol=1e-5)


def test_flux_fused_qkv_lands_in_the_three_projections(tmp_path):
    lookups = {k: v for k, v in lora_lookups("flux", "kohya").items() if k.endswith("img_attn_qkv")}
    assert lookups
    path = tmp_path / "qkv.safetensors"
    write_kohya_lora(path, lookups, rank=2)
    models = fresh("flux")
    before = copy.deepcopy(models["transformer"])
    merge_lora(models, path)
    names = {key.rsplit(".", 2)[-2] for key in changed_tensors({"transformer": before}, models)}
    assert names == {"to_q", "to_k", "to_v"}


def test_merge_matches_diffusers_loader(tmp_path):
    """The same kohya file merged by diffmem and applied by diffusers' UNet loader gives the same outputs."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from safetensors.torch import load_file

    lookups = {k: v for k, v in lora_lookups("sd1", "kohya").items() if k.startswith("lora_unet_")}
    path = tmp_path / "k.safetensors"
    write_kohya_lora(path, lookups, rank=2)
    models = fresh("sd1")
    reference: UNet2DConditionModel = copy.deepcopy(models["unet"])
    merge_lora(models, path)
    state, _ = _convert_non_diffusers_lora_to_diffusers(load_file(str(path)))
    unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    reference.load_lora_adapter(unet_state, adapter_name="x", prefix=None)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = models["unet"](x, 10, encoder_hidden_states=context).sample
        theirs = reference(x, 10, encoder_hidden_states=context).sample
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_lora_for_another_model_changes_nothing(tmp_path):
    path = tmp_path / "xl.safetensors"
    write_kohya_lora(path, lora_lookups("sdxl", "kohya"), rank=2)
    models = fresh("sd1")
    before = {name: copy.deepcopy(module) for name, module in models.items()}
    with pytest.raises(BaseMismatchError, match=r"xl\.safetensors"):
        merge_lora(models, path)
    assert not changed_tensors(before, models)


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux", "sd3"])
def test_merged_pipeline_generates_differently(tmp_path, family):
    """On complete tiny pipelines, including Flux, whose kohya file diffusers' own converter cannot load at tiny
    widths (it hard-codes Flux-dev's), and SD3 (three text encoders, T5 among them, beside the transformer), the
    merged LoRA changes the generated image."""
    folder = build_tiny_pipeline(tmp_path, family)
    lora = write_pipeline_lora(folder, family, tmp_path / "l.safetensors", strength=0.6)
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def image() -> torch.Tensor:
        return pipe("abc", num_inference_steps=2, output_type="pt", height=16, width=16,
                    generator=torch.Generator().manual_seed(0)).images

    before = image()
    assert merge_lora(pipeline_components(pipe), lora) == len(read_lora(lora).modules)
    after = image()
    assert torch.isfinite(after).all() and float((after - before).abs().max()) > 1e-4
