"""Writers of tiny LoRA files in every format diffmem reads, with the real key names.

Each builder takes module names and the shapes of the base weights they update, draws seeded random factors,
writes the file (or PEFT folder) and returns the tensors it wrote, so tests can compute the expected update
by hand. Ranks and alphas may be one value or a per-module mapping; alpha `None` means "no alpha stored".
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch

Shape = tuple[int, ...]
RANK_ALPHA = "rank"  # alpha equal to the module's rank


def per_module(value, name: str):
    """`value[name]` for a per-module mapping, else `value` itself."""
    return value[name] if isinstance(value, Mapping) else value


def randn(shape: Shape, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Seeded normal values of a size that keeps products of factors near 1."""
    return (torch.randn(shape, generator=generator) * 0.3).to(dtype)


def lora_factors(shape: Shape, rank: int, generator: torch.Generator, dtype=torch.float32):
    """(up, down) of a LoRA (2-D shape) or LoCon (4-D: k x k down, 1 x 1 up) for a weight of `shape`."""
    out, fan_in, *kernel = shape
    if kernel:
        return randn((out, rank, 1, 1), generator, dtype), randn((rank, fan_in, *kernel), generator, dtype)
    return randn((out, rank), generator, dtype), randn((rank, fan_in), generator, dtype)


def alpha_value(alpha, name: str, rank: int) -> float | None:
    """The alpha a builder stores for a module (None: none stored)."""
    value = per_module(alpha, name)
    return float(rank) if value == RANK_ALPHA else value


def save(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None) -> None:
    """Write with the safetensors library directly, as a trainer would (not through diffmem)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata else None)


KOHYA_METADATA = {
    "ss_network_module": "networks.lora",
    "ss_output_name": "tiny",
    "ss_base_model_version": "sd_v1",
    "ss_training_comment": "built by tests/builders_lora.py",
}


def write_kohya_lora(
    path: str | Path,
    modules: Mapping[str, Shape],
    *,
    rank: int | Mapping[str, int] = 4,
    alpha=RANK_ALPHA,
    tucker: bool = False,
    dora: bool = False,
    alpha_shape: Shape = (),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    metadata: Mapping[str, str] | None = None,
    kohya_metadata: bool = True,
) -> dict[str, torch.Tensor]:
    """A kohya/sd-scripts LoRA: `<name>.lora_up.weight`, `.lora_down.weight`, `.alpha`; 4-D shapes give
    LoCon convs, or Tucker (`lora_mid`) with `tucker=True`; `dora=True` adds a LyCORIS `dora_scale` [out, 1]."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in modules.items():
        r = per_module(rank, name)
        if tucker and len(shape) == 4 and shape[2:] != (1, 1):
            tensors[f"{name}.lora_up.weight"] = randn((shape[0], r, 1, 1), generator, dtype)
            tensors[f"{name}.lora_mid.weight"] = randn((r, r, *shape[2:]), generator, dtype)
            tensors[f"{name}.lora_down.weight"] = randn((r, shape[1], 1, 1), generator, dtype)
        else:
            up, down = lora_factors(shape, r, generator, dtype)
            tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"] = up, down
        value = alpha_value(alpha, name, r)
        if value is not None:
            tensors[f"{name}.alpha"] = torch.tensor(value, dtype=dtype).reshape(alpha_shape)
        if dora:
            tensors[f"{name}.dora_scale"] = (1 + randn((shape[0], *[1] * (len(shape) - 1)), generator)).to(dtype)
    meta = dict(KOHYA_METADATA) if kohya_metadata else {}
    if kohya_metadata:
        ranks = {per_module(rank, n) for n in modules}
        meta["ss_network_dim"] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
        alphas = {alpha_value(alpha, n, per_module(rank, n)) for n in modules}
        if alphas != {None}:
            meta["ss_network_alpha"] = str(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    meta.update(metadata or {})
    save(tensors, Path(path), meta)
    return tensors


def split_dim(n: int) -> tuple[int, int]:
    """n = small * large with `small` the smallest divisor above 1 (any split is a valid LoKr layout)."""
    small = next((d for d in range(2, math.isqrt(n) + 1) if n % d == 0), 1)
    return small, n // small


def write_lycoris(
    path: str | Path,
    modules: Mapping[str, Shape],
    *,
    algo: str = "loha",
    rank: int | Mapping[str, int] = 4,
    alpha=RANK_ALPHA,
    tucker: bool = False,
    lokr_layout: str = "w1_full",
    dora: bool = False,
    seed: int = 0,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """A LyCORIS LoHa (`hada_*`) or LoKr (`lokr_*`) file in kohya naming, shaped as LyCORIS' modules store them.

    LoKr layouts: "w1_full" (lokr_w1 whole, lokr_w2_a/_b), "both_decomposed" (lokr_w1_a/_b and lokr_w2_a/_b),
    "both_full" (lokr_w1 and lokr_w2 whole, which LyCORIS applies with scale 1). `tucker=True` gives CP cores
    (hada_t1/t2, lokr_t2) for convs with k > 1; without it a conv's kernel is flattened into the `_b` factor.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in modules.items():
        r = per_module(rank, name)
        out, fan_in, *kernel = shape
        use_core = tucker and kernel and any(k != 1 for k in kernel)
        if algo == "loha":
            for i in (1, 2):
                if use_core:
                    tensors[f"{name}.hada_t{i}"] = randn((r, r, *kernel), generator)
                    tensors[f"{name}.hada_w{i}_a"] = randn((r, out), generator)
                    tensors[f"{name}.hada_w{i}_b"] = randn((r, fan_in), generator)
                else:
                    tensors[f"{name}.hada_w{i}_a"] = randn((out, r), generator)
                    tensors[f"{name}.hada_w{i}_b"] = randn((r, fan_in * math.prod(kernel)), generator)
        elif algo == "lokr":
            (a, c), (b, d) = split_dim(out), split_dim(fan_in)
            if lokr_layout == "both_decomposed":
                tensors[f"{name}.lokr_w1_a"] = randn((a, r), generator)
                tensors[f"{name}.lokr_w1_b"] = randn((r, b), generator)
            else:
                tensors[f"{name}.lokr_w1"] = randn((a, b), generator)
            if lokr_layout == "both_full":
                tensors[f"{name}.lokr_w2"] = randn((c, d, *kernel), generator)
            elif use_core:
                tensors[f"{name}.lokr_t2"] = randn((r, r, *kernel), generator)
                tensors[f"{name}.lokr_w2_a"] = randn((r, c), generator)
                tensors[f"{name}.lokr_w2_b"] = randn((r, d), generator)
            else:
                tensors[f"{name}.lokr_w2_a"] = randn((c, r), generator)
                tensors[f"{name}.lokr_w2_b"] = randn((r, d * math.prod(kernel)), generator)
        else:
            raise ValueError(f"unknown LyCORIS algo {algo!r}")
        value = alpha_value(alpha, name, r)
        if value is not None:
            tensors[f"{name}.alpha"] = torch.tensor(value)
        if dora:
            tensors[f"{name}.dora_scale"] = 1 + randn((1, fan_in, *[1] * len(kernel)), generator)
    meta = {"ss_network_module": "lycoris.kohya",
            "ss_network_args": json.dumps({"algo": algo, "use_tucker": str(tucker)}),
            **(metadata or {})}
    save(tensors, Path(path), meta)
    return tensors


def peft_config(
    paths: list[str], ranks: Mapping[str, int], alphas: Mapping[str, float], *, rslora: bool, dora: bool
) -> dict:
    """The LoraConfig fields PEFT and diffusers write for modules with these ranks and alphas."""
    r = Counter(ranks[p] for p in paths).most_common(1)[0][0]
    lora_alpha = Counter(alphas[p] for p in paths).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": {f"^{p}": ranks[p] for p in paths if ranks[p] != r},
        "alpha_pattern": {f"^{p}": alphas[p] for p in paths if alphas[p] != lora_alpha},
        "target_modules": sorted(paths),
        "use_rslora": rslora,
        "use_dora": dora,
        "peft_type": "LORA",
        "bias": "none",
        "lora_dropout": 0.0,
        "init_lora_weights": True,
    }


def peft_factors(
    prefix: str, paths_shapes: Mapping[str, Shape], rank, generator: torch.Generator, dora: bool
) -> dict[str, torch.Tensor]:
    """`<prefix><path>.lora_A.weight` / `.lora_B.weight` (and `.lora_magnitude_vector` for DoRA)."""
    tensors = {}
    for path, shape in paths_shapes.items():
        up, down = lora_factors(shape, per_module(rank, path), generator)
        tensors[f"{prefix}{path}.lora_A.weight"] = down
        tensors[f"{prefix}{path}.lora_B.weight"] = up
        if dora:
            magnitude_shape = (shape[0],) if len(shape) == 2 else (1, shape[0], 1, 1)
            tensors[f"{prefix}{path}.lora_magnitude_vector"] = 1 + randn(magnitude_shape, generator)
    return tensors


def write_diffusers_lora(
    path: str | Path,
    modules: Mapping[str, Shape],
    *,
    rank: int | Mapping[str, int] = 4,
    alpha=RANK_ALPHA,
    adapter_metadata: bool = True,
    rslora: bool = False,
    dora: bool = False,
    seed: int = 0,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """A diffusers `save_lora_weights` file: `unet.<path>.lora_A.weight` etc., with (by default) the
    component-prefixed LoraConfig in the `lora_adapter_metadata` header. Module names include the component."""
    generator = torch.Generator().manual_seed(seed)
    tensors = peft_factors("", modules, rank, generator, dora)
    meta = {"format": "pt", **(metadata or {})}
    if adapter_metadata:
        packed = {}
        for component in sorted({name.split(".", 1)[0] for name in modules}):
            names = [n for n in modules if n.split(".", 1)[0] == component]
            paths = [n.split(".", 1)[1] for n in names]
            ranks = {n.split(".", 1)[1]: per_module(rank, n) for n in names}
            alphas = {n.split(".", 1)[1]: alpha_value(alpha, n, per_module(rank, n)) for n in names}
            config = peft_config(paths, ranks, alphas, rslora=rslora, dora=dora)
            packed.update({f"{component}.{k}": v for k, v in config.items()})
        meta["lora_adapter_metadata"] = json.dumps(packed, indent=2, sort_keys=True)
    save(tensors, Path(path), meta)
    return tensors


def write_peft_folder(
    folder: str | Path,
    modules: Mapping[str, Shape],
    *,
    rank: int | Mapping[str, int] = 4,
    alpha=RANK_ALPHA,
    rslora: bool = False,
    dora: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A native PEFT `save_pretrained` folder: `base_model.model.<path>.lora_A.weight` + adapter_config.json."""
    folder = Path(folder)
    generator = torch.Generator().manual_seed(seed)
    tensors = peft_factors("base_model.model.", modules, rank, generator, dora)
    ranks = {p: per_module(rank, p) for p in modules}
    alphas = {p: alpha_value(alpha, p, ranks[p]) for p in modules}
    save(tensors, folder / "adapter_model.safetensors", {"format": "pt"})
    config = peft_config(list(modules), ranks, alphas, rslora=rslora, dora=dora)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return tensors


def old_diffusers_name(lookup: str) -> str:
    """Old diffusers LoRA module name of a dotted module path (the inverse of diffmem's lookup)."""
    component, rest = lookup.split(".", 1)
    if component.startswith("text_encoder"):
        return f"{lookup}.lora_linear_layer"
    parent, proj = rest.rsplit(".", 1)
    if proj == "0" and parent.endswith(".to_out"):
        parent, proj = parent[: -len(".to_out")], "to_out"
    return f"{component}.{parent}.processor.{proj}_lora"


def write_old_diffusers_lora(
    path: str | Path, modules: Mapping[str, Shape], *, rank: int | Mapping[str, int] = 4, seed: int = 0
) -> dict[str, torch.Tensor]:
    """An old diffusers attention-processor LoRA (`...processor.to_q_lora.down.weight`,
    `...q_proj.lora_linear_layer.up.weight`); `modules` maps dotted module paths (`unet.X.to_out.0`) to shapes."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for lookup, shape in modules.items():
        name = old_diffusers_name(lookup)
        up, down = lora_factors(shape, per_module(rank, lookup), generator)
        tensors[f"{name}.down.weight"], tensors[f"{name}.up.weight"] = down, up
    save(tensors, Path(path), None)
    return tensors


# Real module names with tiny shapes, for format tests that need no base.
SD1_KOHYA = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (8, 8),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (8, 12),
    "lora_unet_down_blocks_0_attentions_0_proj_in": (8, 8, 1, 1),
    "lora_unet_down_blocks_0_resnets_0_conv1": (8, 6, 3, 3),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (12, 12),
}
SDXL_KOHYA = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (8, 8),
    "lora_unet_middle_block_1_proj_in": (8, 8),
    "lora_te1_text_model_encoder_layers_0_self_attn_k_proj": (12, 12),
    "lora_te2_text_model_encoder_layers_0_mlp_fc1": (16, 12),
}
FLUX_KOHYA = {
    "lora_unet_double_blocks_0_img_attn_qkv": (24, 8),
    "lora_unet_single_blocks_0_linear1": (40, 8),
}
SD1_DIFFUSERS = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (8, 8),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": (8, 8),
    "unet.down_blocks.0.resnets.0.conv1": (8, 6, 3, 3),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (12, 12),
}
