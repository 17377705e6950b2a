"""Base checkpoints: every layout opens lazily, every LoRA name finds the right rows, bad input is a clear error."""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from builders_base import (
    LAYOUTS,
    build_tiny_base,
    classic_key,
    diffusers_state,
    lora_lookups,
    tiny_models,
    to_openclip,
    to_original,
)
from diffmem.errors import BadWeightsError, BaseMismatchError, DiffmemError, FileFormatError
from diffmem.formats import base as base_module
from diffmem.formats.base import (
    Target,
    cached_sha256,
    guess_lora_family,
    open_base,
    resolve_targets,
    shapes_match,
)
from diffmem.formats.names import unet_diffusers_to_ldm, unet_ldm_to_diffusers
from diffmem.formats.safetensors_io import SafetensorsFile, save_file

torch.set_num_threads(1)
CASES = [(family, layout) for family, layouts in LAYOUTS.items() for layout in layouts]
FUSED_ORIGINALS = ("double_blocks", "single_blocks", "joint_blocks", "final_layer")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Keep the hash index of every test in its own folder."""
    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path / "cache"))


def layer_weights(family: str, openclip_stored: bool) -> dict[str, torch.Tensor]:
    """`component.module` -> weight of every Linear/Conv2d layer of the tiny models of `family`."""
    expected = {}
    for component, model in tiny_models(family).items():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                continue
            if openclip_stored and name == "text_projection":
                continue  # OpenCLIP keeps it transposed and outside the targets (documented)
            expected[f"{component}.{classic_key(component, name)}"] = module.weight.detach()
    return expected


@pytest.mark.parametrize(("family", "layout"), CASES)
def test_every_layout_detects_its_family_and_every_layer_is_a_target(tmp_path, family, layout):
    base = open_base(build_tiny_base(tmp_path, family, layout))
    assert (base.family, base.layout) == (family, layout)
    openclip_stored = layout in ("single_file", "ckpt") and family in ("sd2", "sdxl")
    expected = layer_weights(family, openclip_stored)
    modules = {target.module for target in base.targets.values()}
    for name, weight in expected.items():
        target = base.targets[name]
        assert target.module == name
        assert target.shape == tuple(weight.shape)
        assert torch.equal(base.weight(target), weight.float()), name
    extra = modules - set(expected)
    assert all(module.split(".", 1)[1].startswith(FUSED_ORIGINALS) for module in extra), sorted(extra)[:5]
    assert all(target.shape[0] == sum(end - start for _, start, end in target.parts)
               for target in base.targets.values())


def test_flux_with_comfyui_prefix_is_the_same_model(tmp_path):
    plain = open_base(build_tiny_base(tmp_path, "flux", "single_file"))
    (tmp_path / "prefixed").mkdir()
    prefixed = open_base(build_tiny_base(tmp_path / "prefixed", "flux", "single_file",
                                         flux_prefix="model.diffusion_model."))
    assert prefixed.family == "flux" and set(prefixed.targets) == set(plain.targets)
    target = prefixed.targets["lora_unet_double_blocks_0_img_attn_qkv"]
    assert target.parts == (("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", 0, 48),)


@pytest.mark.parametrize(("family", "layouts"), [
    ("sd1", ("single_file", "diffusers_folder", "ckpt")),
    ("sd2", ("single_file", "diffusers_folder")),
    ("sdxl", ("single_file", "diffusers_folder")),
    ("flux", ("single_file", "bare", "diffusers_folder")),
    ("sd3", ("single_file", "diffusers_folder")),
])
def test_every_name_gives_the_same_weight_in_every_layout(tmp_path, family, layouts):
    bases = []
    for layout in layouts:
        (tmp_path / layout).mkdir()
        bases.append(open_base(build_tiny_base(tmp_path / layout, family, layout)))
    shared = set.intersection(*(set(b.targets) for b in bases))
    assert len(shared) >= 0.95 * min(len(b.targets) for b in bases)
    for name in sorted(shared):
        first = bases[0].weight(bases[0].targets[name])
        for other in bases[1:]:
            assert torch.equal(other.weight(other.targets[name]), first), (name, other.layout)


# ----------------------------------------------------------------------------------------------------------
# Real LoRA names


SD1_NAMES = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
         "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"),
    "lora_unet_up_blocks_2_attentions_2_proj_out":
        ("unet.up_blocks.2.attentions.2.proj_out", "model.diffusion_model.output_blocks.8.1.proj_out.weight"),
    "lora_unet_output_blocks_2_1_conv":  # up block 0 has no attention, so its upsampler is slot 1
        ("unet.up_blocks.0.upsamplers.0.conv", "model.diffusion_model.output_blocks.2.1.conv.weight"),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k":
        ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
         "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"),
    "lora_te_text_model_encoder_layers_1_mlp_fc2":
        ("text_encoder.text_model.encoder.layers.1.mlp.fc2",
         "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight"),
    "unet.down_blocks.1.resnets.0.conv_shortcut":
        ("unet.down_blocks.1.resnets.0.conv_shortcut", "model.diffusion_model.input_blocks.4.0.skip_connection.weight"),
    "down_blocks.0.attentions.1.proj_in":  # native PEFT: bare path, unambiguous
        ("unet.down_blocks.0.attentions.1.proj_in", "model.diffusion_model.input_blocks.2.1.proj_in.weight"),
    "text_encoder.encoder.layers.0.self_attn.q_proj":  # transformers 5 drops `text_model.`
        ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
         "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"),
}
SDXL_NAMES = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
        ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",),
    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k":
        ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k",),
    "lora_unet_output_blocks_0_1_transformer_blocks_1_ff_net_2":
        ("unet.up_blocks.0.attentions.0.transformer_blocks.1.ff.net.2",),
    "lora_unet_input_blocks_1_0_in_layers_2": ("unet.down_blocks.0.resnets.0.conv1",),
    "lora_unet_input_blocks_3_0_op": ("unet.down_blocks.0.downsamplers.0.conv",),
    "lora_unet_output_blocks_2_2_conv": ("unet.up_blocks.0.upsamplers.0.conv",),
    "lora_unet_output_blocks_6_0_skip_connection": ("unet.up_blocks.2.resnets.0.conv_shortcut",),
    "lora_unet_label_emb_0_0": ("unet.add_embedding.linear_1",),
    "lora_unet_time_embed_2": ("unet.time_embedding.linear_2",),
    "lora_unet_input_blocks_0_0": ("unet.conv_in",),
    "lora_unet_out_2": ("unet.conv_out",),
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q":
        ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
        ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj",),
    "lora_te2_text_model_encoder_layers_1_mlp_fc1": ("text_encoder_2.text_model.encoder.layers.1.mlp.fc1",),
    "text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj":
        ("text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj",),
}


@pytest.mark.parametrize("layout", ["single_file", "diffusers_folder", "ckpt"])
def test_sd1_kohya_and_peft_names(tmp_path, layout):
    base = open_base(build_tiny_base(tmp_path, "sd1", layout))
    for lookup, (module, ldm_key) in SD1_NAMES.items():
        target = base.targets[lookup]
        assert target.module == module, lookup
        if layout != "diffusers_folder":
            assert target.parts == ((ldm_key, 0, target.shape[0]),), lookup


@pytest.mark.parametrize("layout", ["single_file", "diffusers_folder"])
def test_sdxl_sgm_kohya_names(tmp_path, layout):
    base = open_base(build_tiny_base(tmp_path, "sdxl", layout))
    for lookup, (module,) in SDXL_NAMES.items():
        assert base.targets[lookup].module == module, lookup
    # te1 and te2 share module paths, so a bare path names two weights and is refused rather than guessed.
    assert "text_model.encoder.layers.0.self_attn.q_proj" not in base.targets
    assert "text_model.encoder.layers.0.self_attn.q_proj" in base.ambiguous


def test_openclip_q_k_v_are_row_slices_of_in_proj(tmp_path):
    base = open_base(build_tiny_base(tmp_path, "sdxl", "single_file"))
    fused = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    for index, proj in enumerate("qkv"):
        target = base.targets[f"lora_te2_text_model_encoder_layers_0_self_attn_{proj}_proj"]
        assert target.parts == ((fused, 24 * index, 24 * (index + 1)),)
        assert target.shape == (24, 24)
    fc2 = base.targets["lora_te2_text_model_encoder_layers_1_mlp_fc2"]
    assert fc2.parts == (("conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_proj.weight", 0, 24),)


def test_flux_diffusers_names_are_row_slices_of_fused_originals(tmp_path):
    base = open_base(build_tiny_base(tmp_path, "flux", "single_file"))
    model = tiny_models("flux")["transformer"]
    hidden, mlp = 16, 64
    to_k = base.targets["transformer.transformer_blocks.0.attn.to_k"]
    assert to_k.parts == (("double_blocks.0.img_attn.qkv.weight", hidden, 2 * hidden),)
    add_v = base.targets["transformer_blocks.0.attn.add_v_proj"]  # bare path, as native PEFT names it
    assert add_v.parts == (("double_blocks.0.txt_attn.qkv.weight", 2 * hidden, 3 * hidden),)
    proj_mlp = base.targets["transformer.single_transformer_blocks.1.proj_mlp"]
    assert proj_mlp.parts == (("single_blocks.1.linear1.weight", 3 * hidden, 3 * hidden + mlp),)
    # diffusers keeps (scale, shift) where BFL keeps (shift, scale): two pieces, swapped.
    norm_out = base.targets["transformer.norm_out.linear"]
    key = "final_layer.adaLN_modulation.1.weight"
    assert norm_out.parts == ((key, hidden, 2 * hidden), (key, 0, hidden))
    assert torch.equal(base.weight(norm_out), model.norm_out.linear.weight)
    qkv = base.targets["lora_unet_double_blocks_0_img_attn_qkv"]
    assert qkv.module == "transformer.double_blocks.0.img_attn.qkv" and qkv.shape == (3 * hidden, hidden)
    attn = model.transformer_blocks[0].attn
    assert torch.equal(base.weight(qkv), torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))


def test_kohya_fused_names_on_diffusers_flux_concatenate_q_k_v(tmp_path):
    base = open_base(build_tiny_base(tmp_path, "flux", "bare"))
    qkv = base.targets["lora_unet_double_blocks_0_img_attn_qkv"]
    assert qkv.parts == tuple((f"transformer_blocks.0.attn.to_{p}.weight", 0, 16) for p in "qkv")
    linear1 = base.targets["lora_unet_single_blocks_0_linear1"]
    prefix = "single_transformer_blocks.0."
    assert linear1.parts == (
        (prefix + "attn.to_q.weight", 0, 16), (prefix + "attn.to_k.weight", 0, 16),
        (prefix + "attn.to_v.weight", 0, 16), (prefix + "proj_mlp.weight", 0, 64),
    )
    assert linear1.shape == (112, 16)
    final = base.targets["diffusion_model.final_layer.adaLN_modulation.1"]  # ComfyUI-style dotted name
    assert final.parts == (("norm_out.linear.weight", 16, 32), ("norm_out.linear.weight", 0, 16))
    assert base.targets["lora_transformer_single_transformer_blocks_0_proj_out"].module == (
        "transformer.single_transformer_blocks.0.proj_out"
    )


def test_sd3_fused_names_and_last_block_swap(tmp_path):
    base = open_base(build_tiny_base(tmp_path, "sd3", "single_file"))
    prefix = "model.diffusion_model.joint_blocks"
    qkv = base.targets["lora_unet_joint_blocks_0_x_block_attn_qkv"]
    assert qkv.parts == ((f"{prefix}.0.x_block.attn.qkv.weight", 0, 48),)
    attn2_v = base.targets["transformer.transformer_blocks.0.attn2.to_v"]
    assert attn2_v.parts == ((f"{prefix}.0.x_block.attn2.qkv.weight", 32, 48),)
    last = base.targets["transformer.transformer_blocks.1.norm1_context.linear"]
    key = f"{prefix}.1.context_block.adaLN_modulation.1.weight"
    assert last.parts == ((key, 16, 32), (key, 0, 16))
    first = base.targets["transformer.transformer_blocks.0.norm1_context.linear"]
    assert first.parts == ((f"{prefix}.0.context_block.adaLN_modulation.1.weight", 0, 96),)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "flux", "sd3", "unet"])
@pytest.mark.parametrize("style", ["kohya", "diffusers"])
def test_lookup_helper_names_all_resolve(tmp_path, family, style):
    layout = LAYOUTS[family][0]
    base = open_base(build_tiny_base(tmp_path, family, layout))
    lookups = lora_lookups(family, style, convs=True)
    modules = {name: (lookup, shape) for name, (lookup, shape) in enumerate(lookups.items())}
    resolved = resolve_targets({str(k): v for k, v in modules.items()}, base, tmp_path / "lora.safetensors")
    assert len(resolved) == len(lookups)


# ----------------------------------------------------------------------------------------------------------
# Our maps against diffusers' converters


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "unet"])
def test_unet_map_agrees_with_diffusers_converter(family):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state = diffusers_state(family)["unet"]
    ldm = {f"model.diffusion_model.{k}": v for k, v in to_original(state, "unet").items()}
    converted = convert_ldm_unet_checkpoint(ldm, dict(tiny_models(family)["unet"].config))
    assert set(converted) == set(state)
    for key, value in state.items():
        assert torch.equal(converted[key], value), key


def test_unet_maps_invert_each_other_for_other_block_counts():
    for layers in (1, 2, 3):
        for key in ("input_blocks.5.0.in_layers.2.weight", "input_blocks.4.1.proj_in.weight",
                    "output_blocks.7.0.skip_connection.bias", "middle_block.2.out_layers.3.weight"):
            diffusers = unet_ldm_to_diffusers(key, layers)
            assert unet_diffusers_to_ldm(diffusers, layers, {0, 1, 2}) == key, (key, layers)
    assert unet_ldm_to_diffusers("input_blocks.2.0.op.weight", 1) == "down_blocks.0.downsamplers.0.conv.weight"
    assert unet_ldm_to_diffusers("input_blocks.3.0.op.weight", 2) == "down_blocks.0.downsamplers.0.conv.weight"


def test_clip_maps_agree_with_diffusers_converters():
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    clip = diffusers_state("sdxl")["text_encoder"]
    ldm = {f"conditioner.embedders.0.transformer.{k}": v for k, v in clip.items()}
    converted = convert_ldm_clip_checkpoint(ldm)
    assert set(converted) == set(clip) and all(torch.equal(converted[k], clip[k]) for k in clip)

    for family, prefix, name in (("sdxl", "conditioner.embedders.1.model.", "text_encoder_2"),
                                 ("sd2", "cond_stage_model.model.", "text_encoder")):
        state = diffusers_state(family)[name]
        checkpoint = {prefix + k: v for k, v in to_openclip(state, 24).items()}
        converted = convert_open_clip_checkpoint(tiny_models(family)[name], checkpoint, prefix=prefix)
        assert set(converted) - set(state) <= {"text_projection.weight"}
        for key, value in state.items():
            assert torch.equal(converted[key], value), (family, key)


def synthetic_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of a (meta) model as distinct numbers, with trailing dimensions cut to 2 to stay small."""
    state, start = {}, 0
    for key, value in model.state_dict().items():
        shape = (value.shape[0],) if value.dim() == 1 else (value.shape[0], *([2] * (value.dim() - 1)))
        count = 1
        for dim in shape:
            count *= dim
        state[key] = torch.arange(start, start + count, dtype=torch.float32).reshape(shape)
        start += count
    return state


def test_flux_map_agrees_with_diffusers_converter():
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    # The converter hard-codes Flux.1's width (3072), so the model has full widths, built on the meta device.
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    state = synthetic_state(model)
    original = to_original(state, "flux")
    converted = convert_flux_transformer_checkpoint_to_diffusers(
        {f"model.diffusion_model.{k}": v for k, v in original.items()}
    )
    assert set(converted) == set(state)
    for key, value in state.items():
        assert torch.equal(converted[key], value), key


def test_sd3_map_agrees_with_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    state = diffusers_state("sd3")["transformer"]
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(to_original(state, "sd3")))
    assert set(converted) == set(state)
    for key, value in state.items():
        assert torch.equal(converted[key], value), key


# ----------------------------------------------------------------------------------------------------------
# Laziness and hashing


def test_building_targets_reads_no_tensor_and_weight_reads_only_its_own(tmp_path, monkeypatch):
    base = open_base(build_tiny_base(tmp_path, "sdxl", "single_file"))
    reads = []
    whole, rows = SafetensorsFile.__getitem__, SafetensorsFile.rows
    monkeypatch.setattr(SafetensorsFile, "__getitem__", lambda self, key: reads.append(key) or whole(self, key))
    monkeypatch.setattr(SafetensorsFile, "rows",
                        lambda self, key, start, end: reads.append((key, start, end)) or rows(self, key, start, end))
    targets = base.targets
    assert reads == []
    target = targets["lora_te2_text_model_encoder_layers_0_self_attn_k_proj"]
    weight = base.weight(target)
    ((key, start, end),) = target.parts
    assert reads == [(key, start, end)]  # only the k rows of the fused in_proj, not the whole tensor
    assert key == "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    torch.testing.assert_close(weight, whole(SafetensorsFile(base.path), key)[start:end].float())


def test_content_hash_is_stable_and_hashed_once(tmp_path, monkeypatch):
    path = build_tiny_base(tmp_path, "unet", "bare")
    first = open_base(path).content_hash()
    assert len(first) == 64
    index = json.loads((tmp_path / "cache" / "file-hashes.json").read_text())
    assert index[str(path.resolve())]["sha256"] == first
    assert open_base(path).content_hash(cache_dir=tmp_path / "elsewhere") == first
    assert (tmp_path / "elsewhere" / "file-hashes.json").is_file()
    monkeypatch.setattr(base_module, "sha256_file", lambda path: pytest.fail("hashed twice"))
    assert open_base(path).content_hash() == first
    monkeypatch.undo()
    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path / "cache"))
    tensors = {k: v.clone() for k, v in diffusers_state("unet")["unet"].items()}
    tensors["conv_in.weight"] += 1
    save_file(tensors, path)  # a new file at the same path: new mtime and content, so a new hash
    assert open_base(path).content_hash() != first


def test_folder_hash_covers_every_weight_file(tmp_path):
    folder = build_tiny_base(tmp_path, "flux", "diffusers_folder")
    base = open_base(folder)
    assert len(base.files) == 2  # the sharded transformer
    first = base.content_hash()
    assert open_base(folder).content_hash() == first
    assert first != cached_sha256(base.files[0])


# ----------------------------------------------------------------------------------------------------------
# Errors


def test_truncated_and_non_safetensors_files_are_named(tmp_path):
    path = build_tiny_base(tmp_path, "unet", "bare")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match="truncated") as error:
        open_base(truncated)
    assert error.value.path == truncated
    text = tmp_path / "notes.safetensors"
    text.write_text("these are not weights, just a text file that is long enough")
    with pytest.raises(FileFormatError, match="not a safetensors file") as error:
        open_base(text)
    assert error.value.path == text


def test_header_that_lies_about_sizes(tmp_path):
    path = build_tiny_base(tmp_path, "unet", "bare")
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["conv_in.weight"]["shape"] = [16, 4, 3, 3]  # twice the bytes its offsets cover
    raw = json.dumps(header).encode().ljust(length)
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])
    with pytest.raises(FileFormatError, match=r"header lies about tensor 'conv_in\.weight'"):
        open_base(lying)


def test_nan_in_a_base_weight_is_reported_when_read(tmp_path):
    tensors = {k: v.clone() for k, v in diffusers_state("unet")["unet"].items()}
    tensors["down_blocks.1.attentions.0.proj_in.weight"][0, 0] = float("nan")
    path = tmp_path / "nan-unet.safetensors"
    save_file(tensors, path)
    base = open_base(path)
    base.weight(base.targets["unet.conv_in"])  # other weights still read
    with pytest.raises(BadWeightsError, match=r"proj_in\.weight") as error:
        base.weight(base.targets["lora_unet_down_blocks_1_attentions_0_proj_in"])
    assert error.value.path == path


class CreatesAFile:
    """An object whose unpickling would create a file: stands in for a checkpoint with code in it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)},
                "payload": CreatesAFile(marker)}, path)
    with pytest.raises(FileFormatError, match="weights_only") as error:
        open_base(path)
    assert error.value.path == path
    assert not marker.exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(CreatesAFile(marker)))
    with pytest.raises(FileFormatError):
        open_base(raw)
    assert not marker.exists()
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(path.read_bytes())
    with pytest.raises(FileFormatError, match="pickle"):
        open_base(disguised)


def test_unknown_layouts_say_so(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, path)
    with pytest.raises(FileFormatError, match="unknown checkpoint layout") as error:
        open_base(path)
    assert error.value.path == path
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(FileFormatError, match=r"model_index\.json"):
        open_base(folder)
    with pytest.raises(DiffmemError, match="no such file"):
        open_base(tmp_path / "missing.safetensors")


def test_a_lora_passed_as_base_is_named_as_such(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)}, path)
    with pytest.raises(FileFormatError, match="is a LoRA file, not a base checkpoint"):
        open_base(path)


def test_component_folder_opens_as_bare(tmp_path):
    folder = build_tiny_base(tmp_path, "sdxl", "diffusers_folder")
    pipeline = open_base(folder)
    unet = open_base(folder / "unet")
    assert (unet.family, unet.layout) == ("sdxl", "bare")  # the added text_time embedding says SDXL
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert torch.equal(unet.weight(unet.targets[name]), pipeline.weight(pipeline.targets[name]))
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" not in unet.targets


def test_missing_shard_is_named(tmp_path):
    folder = build_tiny_base(tmp_path, "flux", "diffusers_folder")
    shard = sorted((folder / "transformer").glob("*-00002-of-00002.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileFormatError, match="00002-of-00002"):
        open_base(folder)


def as_modules(lookups: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The `{module: (lookup, shape)}` form `resolve_targets` takes, with kohya-style module names."""
    return {lookup: (lookup, shape) for lookup, shape in lookups.items()}


def test_lora_of_another_family_names_both_families(tmp_path):
    base = open_base(build_tiny_base(tmp_path, "sd1", "single_file"))
    lora = tmp_path / "flux_lora.safetensors"
    lookups = lora_lookups("flux", "kohya")
    with pytest.raises(BaseMismatchError) as error:
        resolve_targets(as_modules(lookups), base, lora)
    message = str(error.value)
    assert error.value.path == lora
    assert "looks like flux" in message and "base like sd1" in message
    assert f"{len(lookups)} of {len(lookups)} modules have no weight" in message
    assert "e.g. lora_unet_double_blocks_0" in message


def test_module_missing_from_the_base_and_wrong_shapes(tmp_path):
    base = open_base(build_tiny_base(tmp_path, "sd1", "single_file"))
    lora = tmp_path / "lora.safetensors"
    modules = as_modules(lora_lookups("sd1", "kohya"))
    modules["lora_unet_down_blocks_9_attentions_0_proj_in"] = ("lora_unet_down_blocks_9_attentions_0_proj_in", (8, 8))
    with pytest.raises(BaseMismatchError, match=r"1 of \d+ modules have no weight in the base, e.g. lora_unet_down_blocks_9"):
        resolve_targets(modules, base, lora)
    # An SD1 LoRA on an SD2 base: same names, other cross-attention width.
    sd2 = open_base(build_tiny_base(tmp_path, "sd2", "single_file"))
    with pytest.raises(BaseMismatchError, match=r"wrong shape \(lora_unet_.*attn2_to_k: LoRA \(8, 16\) vs base \(8, 24\)"):
        resolve_targets(as_modules(lora_lookups("sd1", "kohya")), sd2, lora, {"ss_base_model_version": "sd_v1"})


def test_resolve_targets_maps_every_module(tmp_path):
    base = open_base(build_tiny_base(tmp_path, "sdxl", "single_file"))
    modules = {"m1": ("lora_unet_input_blocks_4_1_proj_in", (16, 16)),
               "m2": ("lora_te2_text_model_encoder_layers_0_self_attn_v_proj", (24, 24)),
               "m3": ("lora_unet_input_blocks_1_0_in_layers_2", (8, 8 * 3 * 3))}  # LoHa conv, flattened
    resolved = resolve_targets(modules, base, tmp_path / "lora.safetensors")
    assert resolved["m1"].module == "unet.down_blocks.1.attentions.0.proj_in"
    assert resolved["m2"].parts[0][1:] == (48, 72)
    assert resolved["m3"].shape == (8, 8, 3, 3)


def test_guess_lora_family():
    assert guess_lora_family([], {"ss_base_model_version": "sdxl_base_v1-0"}) == "sdxl"
    assert guess_lora_family([], {"modelspec.architecture": "stable-diffusion-v1/lora"}) == "sd1"
    assert guess_lora_family([], {"ss_base_model_version": "flux1"}) == "flux"
    assert guess_lora_family(["lora_unet_double_blocks_0_img_attn_qkv"], {}) == "flux"
    assert guess_lora_family(["lora_unet_joint_blocks_0_x_block_attn_qkv"], {}) == "sd3"
    assert guess_lora_family(["lora_unet_input_blocks_4_1_proj_in", "lora_te1_text_model_x"], {}) == "sdxl"
    assert guess_lora_family(["unet.down_blocks.0.attentions.0.proj_in"], {}) == "sd1/sd2"
    assert guess_lora_family(["something"], {}) is None
    sd_names = ["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert guess_lora_family(sd_names, {"ss_base_model_version": "sd_v2_v"}) == "sd2"  # metadata breaks the tie
    sdxl_names = ["lora_unet_input_blocks_4_1_proj_in", "lora_te1_text_model_x"]
    assert guess_lora_family(sdxl_names, {"ss_base_model_version": "sd_v1"}) == "sdxl"  # names only SDXL uses win


def test_shapes_match_rules():
    assert shapes_match((8, 16), (8, 16))
    assert shapes_match((8, 16, 1, 1), (8, 16)) and shapes_match((8, 16), (8, 16, 1, 1))
    assert shapes_match((8, 72), (8, 8, 3, 3))
    assert not shapes_match((8, 16), (16, 8)) and not shapes_match((8, 8, 3, 3), (8, 8, 1, 1))


def test_target_is_hashable_and_frozen():
    target = Target((("a.weight", 0, 4),), (4, 2), "unet.a")
    assert {target: 1}[Target((("a.weight", 0, 4),), (4, 2), "unet.a")] == 1
    with pytest.raises(AttributeError):
        target.shape = (1,)  # type: ignore[misc]


def test_all_in_one_flux_file_with_clip_l(tmp_path):
    from builders_base import original_state

    state = original_state("flux", "model.diffusion_model.")
    clip = diffusers_state("sd1")["text_encoder"]
    state.update({f"text_encoders.clip_l.transformer.{k}": v for k, v in clip.items()})
    state["vae.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
    path = tmp_path / "flux-aio.safetensors"
    save_file(state, path)
    base = open_base(path)
    assert (base.family, base.layout) == ("flux", "single_file")
    target = base.targets["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"]
    assert target.parts == (("text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                             0, 16),)
    assert not any("vae" in t.module for t in base.targets.values())


def test_docs_example_runs_and_prints_what_it_claims():
    import contextlib
    import io
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "base-checkpoints.md").read_text()
    code = re.findall(r"```python\n(.*?)```", doc, re.S)[-1]
    claimed = doc.split("prints\n\n", 1)[1].strip().splitlines()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/base-checkpoints.md", "exec"), {})
    assert out.getvalue().strip().splitlines() == [line.strip() for line in claimed]


# ----------------------------------------------------------------------------------------------------------
# Full-size models, from headers alone


class HeaderOnly(Mapping):
    """Key shapes of a multi-GB checkpoint without its data: opening a base may read nothing else."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
        self.shapes, self.path = shapes, path

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def __getitem__(self, key: str) -> torch.Tensor:
        raise AssertionError(f"read tensor {key}")

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


SDXL_UNET = {"sample_size": 128, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
             "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
             "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
             "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")}
VIT_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
         "hidden_act": "quick_gelu", "vocab_size": 49408, "max_position_embeddings": 77}
VIT_BIG_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
             "projection_dim": 1280, "hidden_act": "gelu", "vocab_size": 49408, "max_position_embeddings": 77}
# Names as sd-scripts writes them for SDXL, with the shapes of sd_xl_base_1.0.
SDXL_REAL = {
    "lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k":
        ("unet.down_blocks.2.attentions.0.transformer_blocks.9.attn2.to_k", (1280, 2048)),
    "lora_unet_input_blocks_5_1_proj_in": ("unet.down_blocks.1.attentions.1.proj_in", (640, 640)),
    "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2":
        ("unet.mid_block.attentions.0.transformer_blocks.9.ff.net.2", (1280, 5120)),
    "lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_out_0":
        ("unet.up_blocks.1.attentions.2.transformer_blocks.1.attn1.to_out.0", (640, 640)),
    "lora_unet_output_blocks_8_0_skip_connection": ("unet.up_blocks.2.resnets.2.conv_shortcut", (320, 640, 1, 1)),
    "lora_unet_label_emb_0_0": ("unet.add_embedding.linear_1", (1280, 2816)),
    "lora_te1_text_model_encoder_layers_11_mlp_fc1": ("text_encoder.text_model.encoder.layers.11.mlp.fc1", (3072, 768)),
    "lora_te2_text_model_encoder_layers_31_self_attn_v_proj":
        ("text_encoder_2.text_model.encoder.layers.31.self_attn.v_proj", (1280, 1280)),
}


def test_full_size_sdxl_names_and_shapes_from_the_header_alone():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        clip = CLIPTextModel(CLIPTextConfig(**VIT_L))
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(**VIT_BIG_G))
    shapes = {f"model.diffusion_model.{k}": tuple(v.shape) for k, v in to_original(unet.state_dict(), "unet").items()}
    shapes.update({f"conditioner.embedders.0.transformer.{classic_key('text_encoder', k)}": tuple(v.shape)
                   for k, v in clip.state_dict().items()})
    big_g_state = {classic_key("text_encoder_2", k): v for k, v in big_g.state_dict().items()}
    shapes.update({f"conditioner.embedders.1.model.{k}": tuple(v.shape)
                   for k, v in to_openclip(big_g_state, 1280).items()})
    path = Path("sd_xl_base_1.0.safetensors")
    base = base_module.single_file_checkpoint(path, HeaderOnly(shapes, path))
    assert (base.family, base.layout) == ("sdxl", "single_file")
    for lookup, (module, shape) in SDXL_REAL.items():
        assert (base.targets[lookup].module, base.targets[lookup].shape) == (module, shape), lookup
    v_proj = base.targets["lora_te2_text_model_encoder_layers_31_self_attn_v_proj"]
    assert v_proj.parts == (("conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight", 2560, 3840),)
    layers = sum(isinstance(m, torch.nn.Linear | torch.nn.Conv2d) for model in (unet, clip, big_g) for m in model.modules())
    assert len({target.module for target in base.targets.values()}) == layers - 1  # all but bigG's text_projection


def test_full_size_flux_dev_fused_slices_from_the_header_alone():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)  # FLUX.1-dev: 19 double, 38 single blocks
    shapes = {k: tuple(v.shape) for k, v in to_original(model.state_dict(), "flux").items()}
    path = Path("flux1-dev.safetensors")
    base = base_module.single_file_checkpoint(path, HeaderOnly(shapes, path))
    assert (base.family, base.layout) == ("flux", "single_file")
    assert base.targets["lora_unet_single_blocks_37_linear1"].shape == (21504, 3072)
    assert base.targets["transformer.single_transformer_blocks.37.attn.to_v"].parts == (
        ("single_blocks.37.linear1.weight", 6144, 9216),
    )
    assert base.targets["transformer.single_transformer_blocks.0.proj_mlp"].parts == (
        ("single_blocks.0.linear1.weight", 9216, 21504),
    )
    assert base.targets["lora_unet_double_blocks_18_txt_attn_qkv"].shape == (9216, 3072)
    assert base.targets["transformer.proj_out"].shape == (64, 3072)
