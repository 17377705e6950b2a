"""Key naming of LoRA files: which format a key set is in, and (module, role) of each key.

Four namings exist in the wild (see docs/formats.md):

- kohya / sd-scripts and LyCORIS: `lora_unet_<path with _>.lora_down.weight`, `.hada_w1_a`, `.lokr_w1`, `.alpha`
- diffusers / PEFT with a component prefix: `unet.<path>.lora_A.weight`, `transformer.<path>.lora_B.weight`
- native PEFT (`adapter_model.safetensors`): `base_model.model.<path>.lora_A.weight`
- diffusers before PEFT: `unet.<path>.processor.to_q_lora.down.weight`, `text_encoder.<path>.q_proj.lora_linear_layer.up.weight`
  and the LoRACompatible layers' `unet.<path>.to_q.lora.down.weight`
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_", "lycoris_")
PEFT_PREFIX = "base_model.model."

# Role -> key suffix. The first suffix listed for a role is the one a writer uses for a new key.
KOHYA_ROLES: dict[str, tuple[str, ...]] = {
    "up": (".lora_up.weight",),
    "down": (".lora_down.weight",),
    "mid": (".lora_mid.weight",),
    "alpha": (".alpha",),
    "dora_scale": (".dora_scale",),
    **{role: (f".{role}",) for role in (
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    )},
}
PEFT_ROLES: dict[str, tuple[str, ...]] = {
    "up": (".lora_B.weight",),
    "down": (".lora_A.weight",),
    "alpha": (".alpha",),
    "dora_scale": (".lora_magnitude_vector", ".lora_magnitude_vector.weight"),
}
OLD_DIFFUSERS_ROLES: dict[str, tuple[str, ...]] = {
    "up": (".up.weight",),
    "down": (".down.weight",),
    "alpha": (".alpha",),
}
ROLES = {"kohya": KOHYA_ROLES, "diffusers": PEFT_ROLES, "peft": PEFT_ROLES, "diffusers_old": OLD_DIFFUSERS_ROLES}

# LyCORIS algorithms whose keys we recognise but cannot turn into low-rank channels.
UNSUPPORTED_SUFFIXES = {
    ".diff": "LyCORIS full-weight difference ('full' algorithm)",
    ".diff_b": "LyCORIS full bias difference",
    ".oft_blocks": "LyCORIS OFT/BOFT",
    ".oft_diag": "LyCORIS OFT",
    ".w_norm": "LyCORIS norm-layer training",
    ".b_norm": "LyCORIS norm-layer training",
    ".on_input": "(IA)^3",
    ".lora_B.bias": "PEFT lora_bias",
    ".lora_embedding_A": "PEFT embedding LoRA",
    ".lora_embedding_B": "PEFT embedding LoRA",
}

# Tensors that modify no weight and are written back verbatim: kohya's bundled textual-inversion embeddings.
HARMLESS_PREFIXES = ("bundle_emb.",)

OLD_PROCESSOR = re.compile(r"^(?P<parent>.+)\.processor\.(?P<proj>[a-z0-9_]+?)_lora$")


def detect_format(keys: Iterable[str]) -> str | None:
    """The naming a LoRA file's keys follow, or None when they follow none of them."""
    keys = [k for k in keys if not k.startswith(HARMLESS_PREFIXES)]
    if any(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if any(k.startswith(PEFT_PREFIX) for k in keys):
        return "peft"
    if any(".lora_A." in k or ".lora_B." in k or ".lora_magnitude_vector" in k for k in keys):
        return "diffusers"
    if any(
        k.endswith((".up.weight", ".down.weight"))
        and (".lora_linear_layer." in k or ".lora." in k or OLD_PROCESSOR.match(k.rsplit(".", 2)[0]))
        for k in keys
    ):
        return "diffusers_old"
    return None


@dataclass(frozen=True)
class ParsedKey:
    """A key split into the module it belongs to and its role in that module."""

    module: str
    role: str


def parse_key(key: str, fmt: str) -> ParsedKey | None:
    """(module, role) of `key` in a file of format `fmt`, or None when the key is not a LoRA tensor."""
    best: ParsedKey | None = None
    for role, suffixes in ROLES[fmt].items():
        for suffix in suffixes:
            # The longest suffix wins: `.lora_magnitude_vector.weight` over a shorter one ending the same.
            longer = best is None or len(key) - len(best.module) < len(suffix)
            if key.endswith(suffix) and len(key) > len(suffix) and longer:
                best = ParsedKey(key[: -len(suffix)], role)
    if best is None or not module_name_fits(best.module, fmt):
        return None
    return best


def module_name_fits(name: str, fmt: str) -> bool:
    """Whether a module name has the shape its format requires."""
    if fmt == "kohya":
        return name.startswith(KOHYA_PREFIXES)
    if fmt == "peft":
        return name.startswith(PEFT_PREFIX)
    if fmt == "diffusers_old":
        return old_diffusers_lookup(name) is not None
    return "." in name


def unsupported_reason(key: str) -> str | None:
    """Why a recognisable but unsupported key cannot be filtered, or None."""
    for suffix, what in UNSUPPORTED_SUFFIXES.items():
        if key.endswith(suffix):
            return what
    return None


def key_for(name: str, role: str, fmt: str) -> str:
    """The key a writer gives to `role` of module `name` in format `fmt`."""
    return name + ROLES[fmt][role][0]


def old_diffusers_lookup(name: str) -> str | None:
    """Dotted module path of an old diffusers LoRA module name (`...processor.to_out_lora` -> `....to_out.0`)."""
    for marker in (".lora_linear_layer", ".lora"):
        if name.endswith(marker):
            return name[: -len(marker)]
    match = OLD_PROCESSOR.match(name)
    if match is None:
        return None
    proj = match["proj"]
    return f"{match['parent']}.{'to_out.0' if proj == 'to_out' else proj}"


def lookup_name(name: str, fmt: str) -> str:
    """The name the base alias map is searched with (see the `LoraModule.lookup` docs)."""
    if fmt == "peft":
        return name[len(PEFT_PREFIX):]
    if fmt == "diffusers_old":
        lookup = old_diffusers_lookup(name)
        assert lookup is not None
        return lookup
    return name


def component_of(name: str, fmt: str) -> str | None:
    """The pipeline component (`unet`, `text_encoder`, `transformer`, ...) a diffusers-format module belongs to."""
    return name.split(".", 1)[0] if fmt == "diffusers" else None


def peft_path(name: str, fmt: str) -> str:
    """The module path PEFT matches `rank_pattern`/`alpha_pattern` against (no component, no base_model.model.)."""
    if fmt == "peft":
        return name[len(PEFT_PREFIX):]
    if fmt == "diffusers":
        return name.split(".", 1)[1]
    return name


def pattern_value(patterns: dict, path: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first pattern that matches the end of `path`
    after a dot (peft.utils.other.get_pattern_key semantics), else `default`."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def describe_unknown_layout(keys: list[str]) -> str:
    """A sentence saying what a file that is no LoRA looks like, for the error message."""
    sample = ", ".join(repr(k) for k in keys[:3])
    if not keys:
        return "it holds no tensors"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return (f"it looks like a full Stable Diffusion checkpoint ({len(keys)} tensors under "
                "'model.diffusion_model.'), not a LoRA; pass it as the base")
    if any(k.startswith(("double_blocks.", "single_blocks.", "joint_blocks.")) for k in keys):
        return f"it looks like a full Flux/SD3 transformer checkpoint ({len(keys)} tensors), not a LoRA"
    if any(k in ("emb_params", "clip_l", "clip_g", "string_to_param.*") or k.startswith("string_to_param")
           for k in keys):
        return "it looks like a textual-inversion embedding, not a LoRA"
    if any(k.rsplit(".", 1)[-1].startswith(("hada_", "lokr_")) for k in keys):
        return ("it holds LyCORIS LoHa/LoKr tensors in diffusers/PEFT naming (e.g. " + sample + "); diffmem reads "
                "LoHa/LoKr only in kohya/LyCORIS naming (`lora_unet_…`, `lycoris_…`)")
    if all(k.endswith((".weight", ".bias")) for k in keys):
        return f"it looks like a full model state dict ({len(keys)} weights such as {sample}), not a LoRA"
    return f"none of its {len(keys)} keys (e.g. {sample}) follows a known LoRA naming"
