"""Key-name maps between original checkpoint layouts and diffusers, and the LoRA names front-ends use.

Original layouts: the LDM/SGM UNet (`input_blocks`, `middle_block`, `output_blocks`), OpenCLIP text towers
(`transformer.resblocks.N` with a fused `attn.in_proj_weight`), the BFL Flux transformer (`double_blocks`,
`single_blocks`) and the SAI MMDiT of SD3 (`joint_blocks`). Each map is stated as a list of `Fusion`s on
parameter keys: one original tensor is the concatenation, along dim 0, of row ranges of diffusers tensors.
A plain rename is a Fusion with one full-range piece; a fused qkv is three pieces; the scale/shift swap that
diffusers applies to final modulation layers is two pieces of the same tensor in the other order.

Everything here is a pure function of key names and shapes; reading files is `diffmem.formats.base`'s job.
The maps were written from the module definitions and are checked in tests/test_formats_base.py against
diffusers' own converters (`diffusers.loaders.single_file_utils`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

Piece = tuple[str, int, int]  # (diffusers key, first row, end row)
Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class Fusion:
    """An original tensor whose rows are `pieces` of diffusers tensors, concatenated in order along dim 0."""

    original: str
    pieces: tuple[Piece, ...]

    @property
    def is_rename(self) -> bool:
        """True when the original tensor is one whole diffusers tensor under another name."""
        return len(self.pieces) == 1 and self.pieces[0][1] == 0


# --------------------------------------------------------------------------------------------------------------
# Small helpers


def kohya_name(prefix: str, module: str) -> str:
    """kohya/sd-scripts LoRA name of `module`: `<prefix>_<module path with '.' replaced by '_'>`."""
    return f"{prefix}_{module.replace('.', '_')}"


def module_of(key: str) -> str | None:
    """Module path of a weight key (`a.b.weight` -> `a.b`, OpenCLIP `attn.in_proj_weight` -> `attn.in_proj`)."""
    if key.endswith(".weight"):
        return key[: -len(".weight")]
    if key.endswith(".in_proj_weight"):
        return key[: -len("_weight")]
    return None


# nn.Embedding tables: 2-d `.weight`s that are lookups, not Linear layers, so no LoRA target.
EMBEDDING_MODULES = frozenset(
    {"token_embedding", "position_embedding", "shared", "embed_tokens", "relative_attention_bias", "label_emb",
     "class_embedding"}
)


def is_layer_weight(key: str, shape: tuple[int, ...]) -> bool:
    """True for the weight of a Linear (2-d) or Conv2d (4-d) layer, judged from its key and shape."""
    module = module_of(key)
    return module is not None and len(shape) in (2, 4) and module.rsplit(".", 1)[-1] not in EMBEDDING_MODULES


def replace_prefix(path: str, table: Iterable[tuple[str, str]]) -> str | None:
    """`path` with the first matching dotted prefix of `table` replaced, or None when none matches."""
    for old, new in table:
        if path == old or path.startswith(old + "."):
            return new + path[len(old) :]
    return None


def block_indices(keys: Iterable[str], prefix: str) -> list[int]:
    """Sorted indices N of keys that start with `<prefix>.N.`."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for key in keys if (m := pattern.match(key))})


# --------------------------------------------------------------------------------------------------------------
# UNet: LDM/SGM <-> diffusers UNet2DConditionModel


UNET_TOP_LEVEL = (
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("input_blocks.0.0", "conv_in"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
)
UNET_RESNET = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)


def label_embedding_table(label_embedding: str) -> tuple[tuple[str, str], ...]:
    """LDM `label_emb` names for a diffusers `add_embedding` (SDXL) or `class_embedding` (unCLIP, upscaler)."""
    return (
        ("label_emb.0.0", f"{label_embedding}.linear_1"),
        ("label_emb.0.2", f"{label_embedding}.linear_2"),
        ("label_emb", "class_embedding"),  # a plain nn.Embedding of class labels
    )


def unet_ldm_to_diffusers(key: str, layers_per_block: int, label_embedding: str = "add_embedding") -> str | None:
    """diffusers name of an LDM/SGM UNet key (without `model.diffusion_model.`), or None if it has no place.

    Down block b, layer l sits at `input_blocks.{1 + b*(L+1) + l}` and its downsampler at `l = L`; up block b,
    layer l at `output_blocks.{b*(L+1) + l}` with the upsampler after its resnet (`.1.conv`) or after its
    attention (`.2.conv`); `middle_block.{0,1,2}` are resnet, attention, resnet.
    """
    renamed = replace_prefix(key, UNET_TOP_LEVEL) or replace_prefix(key, label_embedding_table(label_embedding))
    if renamed is not None:
        return renamed
    parts = key.split(".")
    if len(parts) < 4 or not parts[1].isdigit():
        return None
    index, slot, rest = int(parts[1]), parts[2], ".".join(parts[3:])
    if parts[0] == "input_blocks" and index > 0:
        block, layer = divmod(index - 1, layers_per_block + 1)
        if slot == "0" and rest.startswith("op."):
            return f"down_blocks.{block}.downsamplers.0.conv.{rest[3:]}"
        if slot == "0":
            inner = replace_prefix(rest, UNET_RESNET)
            return None if inner is None else f"down_blocks.{block}.resnets.{layer}.{inner}"
        if slot == "1":
            return f"down_blocks.{block}.attentions.{layer}.{rest}"
        return None
    if parts[0] == "middle_block":
        rest = ".".join(parts[2:])
        if index % 2 == 0:
            inner = replace_prefix(rest, UNET_RESNET)
            return None if inner is None else f"mid_block.resnets.{index // 2}.{inner}"
        return f"mid_block.attentions.{index // 2}.{rest}"
    if parts[0] == "output_blocks":
        block, layer = divmod(index, layers_per_block + 1)
        if slot in ("1", "2") and rest.startswith("conv."):
            return f"up_blocks.{block}.upsamplers.0.conv.{rest[5:]}"
        if slot == "0":
            inner = replace_prefix(rest, UNET_RESNET)
            return None if inner is None else f"up_blocks.{block}.resnets.{layer}.{inner}"
        if slot == "1":
            return f"up_blocks.{block}.attentions.{layer}.{rest}"
    return None


def unet_diffusers_to_ldm(key: str, layers_per_block: int, up_blocks_with_attention: Collection[int]) -> str | None:
    """LDM/SGM name of a diffusers UNet key (the inverse of `unet_ldm_to_diffusers`), or None."""
    top = [(new, old) for old, new in UNET_TOP_LEVEL]
    top += [(new, old) for old, new in label_embedding_table("add_embedding")[:2]]
    top += [(new, old) for old, new in label_embedding_table("class_embedding")]  # linear_1/2 before the plain one
    renamed = replace_prefix(key, top)
    if renamed is not None:
        return renamed
    resnet = [(new, old) for old, new in UNET_RESNET]
    stride = layers_per_block + 1
    match = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if match:
        side, block, kind, layer, rest = match.group(1), int(match.group(2)), match.group(3), int(match.group(4)), match.group(5)
        if side == "down_blocks":
            first = 1 + block * stride
            if kind == "resnets":
                inner = replace_prefix(rest, resnet)
                return None if inner is None else f"input_blocks.{first + layer}.0.{inner}"
            if kind == "attentions":
                return f"input_blocks.{first + layer}.1.{rest}"
            return f"input_blocks.{first + layers_per_block}.0.op.{rest[5:]}" if rest.startswith("conv.") else None
        first = block * stride
        if kind == "resnets":
            inner = replace_prefix(rest, resnet)
            return None if inner is None else f"output_blocks.{first + layer}.0.{inner}"
        if kind == "attentions":
            return f"output_blocks.{first + layer}.1.{rest}"
        slot = 2 if block in up_blocks_with_attention else 1
        return f"output_blocks.{first + layers_per_block}.{slot}.{rest}" if rest.startswith("conv.") else None
    match = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if match:
        kind, index, rest = match.group(1), int(match.group(2)), match.group(3)
        if kind == "attentions":
            return f"middle_block.{2 * index + 1}.{rest}"
        inner = replace_prefix(rest, resnet)
        return None if inner is None else f"middle_block.{2 * index}.{inner}"
    return None


def ldm_layers_per_block(keys: Iterable[str]) -> int:
    """Resnets per down block of an LDM UNet: the first downsampler `input_blocks.{L+1}.0.op` gives L."""
    keys = list(keys)
    downsamplers = [int(m.group(1)) for key in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", key))]
    if downsamplers:
        return min(downsamplers) - 1
    return max(block_indices(keys, "input_blocks"), default=1)  # one block and no downsampler


def diffusers_layers_per_block(keys: Iterable[str]) -> int:
    """Resnets per down block of a diffusers UNet (those of `down_blocks.0`)."""
    return len(block_indices(keys, "down_blocks.0.resnets"))


def unet_fusions(shapes: Shapes, naming: str) -> list[Fusion]:
    """Renames between the LDM/SGM and diffusers UNet for every key in `shapes` (stored in `naming`)."""
    keys = list(shapes)
    if naming == "original":
        layers = ldm_layers_per_block(keys)
        label = "add_embedding"
        pairs = {key: unet_ldm_to_diffusers(key, layers, label) for key in keys}
    else:
        layers = diffusers_layers_per_block(keys)
        with_attention = {int(k.split(".")[1]) for k in keys if re.match(r"up_blocks\.\d+\.attentions\.", k)}
        pairs = {unet_diffusers_to_ldm(key, layers, with_attention): key for key in keys}
    return renames(pairs, shapes, naming)


def renames(pairs: Mapping[str | None, str | None], shapes: Shapes, naming: str) -> list[Fusion]:
    """Fusions for one-to-one `{original: diffusers}` pairs, sized from the stored side's `shapes`."""
    fusions = []
    for original, diffusers in pairs.items():
        if original is None or diffusers is None:
            continue
        stored = original if naming == "original" else diffusers
        rows = shapes[stored][0] if shapes[stored] else 1
        fusions.append(Fusion(original, ((diffusers, 0, rows),)))
    return fusions


# --------------------------------------------------------------------------------------------------------------
# Text encoders: Hugging Face CLIP (identity) and OpenCLIP


def identity_fusions(shapes: Shapes, naming: str) -> list[Fusion]:
    """Hugging Face text encoders (CLIP, T5) keep their names in single files: every key maps to itself."""
    return renames({key: key for key in shapes}, shapes, naming)


CLIP_TEXT_MODEL_PARTS = ("embeddings.", "encoder.layers.", "final_layer_norm.")


def clip_name_variants(module: str) -> tuple[str, ...]:
    """A CLIP text-model module with and without the `text_model.` level.

    Checkpoints and LoRAs written with transformers < 5 name `text_model.encoder.layers.0...`; transformers 5
    saves `CLIPTextModel` without that level (`encoder.layers.0...`). The first variant is the classic one.
    """
    if module.startswith("text_model."):
        return module, module[len("text_model.") :]
    if (module + ".").startswith(CLIP_TEXT_MODEL_PARTS):
        return f"text_model.{module}", module
    return (module,)


OPENCLIP_RENAMES = (
    ("token_embedding", "text_model.embeddings.token_embedding"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("ln_final", "text_model.final_layer_norm"),
)
OPENCLIP_LAYER = (
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
    ("attn.out_proj", "self_attn.out_proj"),
)


def openclip_fusions(shapes: Shapes, naming: str = "original") -> list[Fusion]:
    """OpenCLIP text tower (keys after `...model.`) -> Hugging Face CLIPTextModel names.

    `attn.in_proj_weight` stacks q, k and v along dim 0; `text_projection` is stored transposed relative to
    diffusers' `text_projection.weight`, which a row map cannot express, so it has no entry here.
    """
    if naming != "original":
        raise ValueError("OpenCLIP names exist only in original checkpoints")
    fusions = []
    for key, shape in shapes.items():
        match = re.match(r"transformer\.resblocks\.(\d+)\.(.+)", key)
        if match is None:
            target = replace_prefix(key, OPENCLIP_RENAMES)
            if target is not None:
                fusions.append(Fusion(key, ((target, 0, shape[0]),)))
            continue
        layer, rest = match.group(1), match.group(2)
        base = f"text_model.encoder.layers.{layer}"
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            suffix = rest.rsplit("_", 1)[1]
            third = shape[0] // 3
            fusions.append(Fusion(key, tuple((f"{base}.self_attn.{p}_proj.{suffix}", 0, third) for p in "qkv")))
            continue
        target = replace_prefix(rest, OPENCLIP_LAYER)
        if target is not None:
            fusions.append(Fusion(key, ((f"{base}.{target}", 0, shape[0]),)))
    return fusions


# --------------------------------------------------------------------------------------------------------------
# Flux (BFL) and SD3 (SAI MMDiT) transformers


@dataclass(frozen=True)
class Rule:
    """How one original key is made from diffusers keys: `full` rename, `equal` parts, `hidden` (h, h, h, rest)
    as in Flux's single-block `linear1`, or `swap` of the two halves (diffusers' scale/shift order)."""

    original: str
    diffusers: tuple[str, ...]
    split: str = "full"


def module_rules(original: str, diffusers: str | tuple[str, ...], split: str = "full") -> list[Rule]:
    """Rules for a module's `.weight` and `.bias`."""
    targets = (diffusers,) if isinstance(diffusers, str) else diffusers
    return [Rule(f"{original}.{p}", tuple(f"{t}.{p}" for t in targets), split) for p in ("weight", "bias")]


def block_rules(original: str, diffusers: str, table: Iterable[tuple[str, str | tuple[str, ...]]]) -> list[Rule]:
    """Module rules of one block: a string target is a rename, a tuple an equal split (fused qkv)."""
    rules = []
    for source, target in table:
        if isinstance(target, str):
            rules += module_rules(f"{original}.{source}", f"{diffusers}.{target}")
        else:
            rules += module_rules(f"{original}.{source}", tuple(f"{diffusers}.{t}" for t in target), "equal")
    return rules


def realise(rules: Iterable[Rule], shapes: Shapes, naming: str, hidden: int | None = None) -> list[Fusion]:
    """Fusions with row ranges for the rules whose stored-side keys are all present in `shapes`."""
    fusions = []
    for rule in rules:
        stored = (rule.original,) if naming == "original" else rule.diffusers
        if not all(key in shapes for key in stored):
            continue
        if naming == "original":
            rows = shapes[rule.original][0]
            if rule.split == "swap":
                sizes = [rows // 2]
            elif rule.split == "hidden":
                sizes = [hidden, hidden, hidden, rows - 3 * hidden]
            else:
                sizes = [rows // len(rule.diffusers)] * len(rule.diffusers)
        else:
            sizes = [shapes[key][0] for key in rule.diffusers]
        if rule.split == "swap":
            half = sizes[0] if naming == "original" else sizes[0] // 2
            (name,) = rule.diffusers
            pieces = ((name, half, 2 * half), (name, 0, half))
        else:
            pieces = tuple((name, 0, size) for name, size in zip(rule.diffusers, sizes))
        fusions.append(Fusion(rule.original, pieces))
    return fusions


FLUX_TOP = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
)
FLUX_DOUBLE = (
    ("img_mod.lin", "norm1.linear"),
    ("txt_mod.lin", "norm1_context.linear"),
    ("img_attn.proj", "attn.to_out.0"),
    ("txt_attn.proj", "attn.to_add_out"),
    ("img_mlp.0", "ff.net.0.proj"),
    ("img_mlp.2", "ff.net.2"),
    ("txt_mlp.0", "ff_context.net.0.proj"),
    ("txt_mlp.2", "ff_context.net.2"),
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
)
FLUX_DOUBLE_NORMS = (
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
)
FLUX_SINGLE = (
    ("linear2", "proj_out"),
    ("modulation.lin", "norm.linear"),
)
FLUX_SINGLE_NORMS = (
    ("norm.query_norm.scale", "attn.norm_q.weight"),
    ("norm.key_norm.scale", "attn.norm_k.weight"),
)


def flux_rules(double_blocks: Iterable[int], single_blocks: Iterable[int]) -> list[Rule]:
    """Every original Flux.1 transformer key, as made from diffusers `FluxTransformer2DModel` keys."""
    rules = [rule for original, diffusers in FLUX_TOP for rule in module_rules(original, diffusers)]
    rules += module_rules("final_layer.adaLN_modulation.1", "norm_out.linear", "swap")
    for i in double_blocks:
        rules += block_rules(f"double_blocks.{i}", f"transformer_blocks.{i}", FLUX_DOUBLE)
        rules += [Rule(f"double_blocks.{i}.{o}", (f"transformer_blocks.{i}.{d}",)) for o, d in FLUX_DOUBLE_NORMS]
    for i in single_blocks:
        prefix = f"single_transformer_blocks.{i}"
        rules += block_rules(f"single_blocks.{i}", prefix, FLUX_SINGLE)
        rules += [Rule(f"single_blocks.{i}.{o}", (f"{prefix}.{d}",)) for o, d in FLUX_SINGLE_NORMS]
        parts = tuple(f"{prefix}.{d}" for d in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
        rules += module_rules(f"single_blocks.{i}.linear1", parts, "hidden")
    return rules


def flux_fusions(shapes: Shapes, naming: str) -> list[Fusion]:
    """Original Flux.1 <-> diffusers Flux transformer, for a transformer stored in `naming`."""
    if naming == "original":
        double, single = block_indices(shapes, "double_blocks"), block_indices(shapes, "single_blocks")
        hidden = shapes["img_in.weight"][0] if "img_in.weight" in shapes else None
    else:
        double = block_indices(shapes, "transformer_blocks")
        single = block_indices(shapes, "single_transformer_blocks")
        hidden = None
    return realise(flux_rules(double, single), shapes, naming, hidden)


SD3_TOP = (
    ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("context_embedder", "context_embedder"),
    ("final_layer.linear", "proj_out"),
)
SD3_BLOCK = (
    ("x_block.attn.proj", "attn.to_out.0"),
    ("context_block.attn.proj", "attn.to_add_out"),
    ("x_block.attn2.proj", "attn2.to_out.0"),
    ("x_block.adaLN_modulation.1", "norm1.linear"),
    ("x_block.mlp.fc1", "ff.net.0.proj"),
    ("x_block.mlp.fc2", "ff.net.2"),
    ("context_block.mlp.fc1", "ff_context.net.0.proj"),
    ("context_block.mlp.fc2", "ff_context.net.2"),
    ("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")),
)
SD3_BLOCK_NORMS = (
    ("x_block.attn.ln_q.weight", "attn.norm_q.weight"),
    ("x_block.attn.ln_k.weight", "attn.norm_k.weight"),
    ("context_block.attn.ln_q.weight", "attn.norm_added_q.weight"),
    ("context_block.attn.ln_k.weight", "attn.norm_added_k.weight"),
    ("x_block.attn2.ln_q.weight", "attn2.norm_q.weight"),
    ("x_block.attn2.ln_k.weight", "attn2.norm_k.weight"),
)


def sd3_rules(blocks: list[int]) -> list[Rule]:
    """Every original SD3/SD3.5 MMDiT key, as made from diffusers `SD3Transformer2DModel` keys.

    The last block's context stream only modulates (shift, scale): diffusers stores its `norm1_context`
    with the halves swapped, like the final layer's modulation.
    """
    rules = [Rule("pos_embed", ("pos_embed.pos_embed",))]
    rules += [rule for original, diffusers in SD3_TOP for rule in module_rules(original, diffusers)]
    rules += module_rules("final_layer.adaLN_modulation.1", "norm_out.linear", "swap")
    for i in blocks:
        rules += block_rules(f"joint_blocks.{i}", f"transformer_blocks.{i}", SD3_BLOCK)
        rules += [Rule(f"joint_blocks.{i}.{o}", (f"transformer_blocks.{i}.{d}",)) for o, d in SD3_BLOCK_NORMS]
        last = i == blocks[-1]
        rules += module_rules(
            f"joint_blocks.{i}.context_block.adaLN_modulation.1",
            f"transformer_blocks.{i}.norm1_context.linear",
            "swap" if last else "full",
        )
    return rules


def sd3_fusions(shapes: Shapes, naming: str) -> list[Fusion]:
    """Original SD3 MMDiT <-> diffusers SD3 transformer, for a transformer stored in `naming`."""
    prefix = "joint_blocks" if naming == "original" else "transformer_blocks"
    return realise(sd3_rules(block_indices(shapes, prefix)), shapes, naming)


FUSIONS = {
    "unet": unet_fusions,
    "clip": identity_fusions,
    "hf": identity_fusions,
    "openclip": openclip_fusions,
    "flux": flux_fusions,
    "sd3": sd3_fusions,
}


def fusions_for(kind: str, shapes: Shapes, naming: str) -> list[Fusion]:
    """The original <-> diffusers correspondence of a component of `kind` whose keys are `shapes`."""
    return FUSIONS[kind](shapes, naming)
