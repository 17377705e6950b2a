"""Base checkpoints: open any layout lazily and map every LoRA module name to the base weight it updates.

`open_base` reads only headers. Its `targets` is a model-first alias map: it enumerates the base's own
weights and generates every name a LoRA may use for each (kohya names in diffusers and in LDM/SGM naming,
diffusers/PEFT dotted names, original Flux/SD3 fused names), so a LoRA module either finds its weight or is
reported as not belonging to this base. `weight` reads one tensor at a time, by byte range, so an
SDXL or Flux base is never held in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from diffmem.cache import default_cache_dir
from diffmem.errors import BaseMismatchError, DiffmemError, FileFormatError
from diffmem.formats.files import check_input, open_regular, read_text
from diffmem.formats.names import clip_name_variants, fusions_for, is_layer_weight, kohya_name, module_of
from diffmem.formats.safetensors_io import (
    SafetensorsFile,
    check_finite,
    sha256_file,
    write_atomic,
)

if TYPE_CHECKING:  # formats.lora reads files; this module only takes its LoraFile
    from diffmem.formats.lora import LoraFile

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DENOISER_KINDS = ("unet", "flux", "sd3")  # components whose original names LoRAs use (`lora_unet_...`)
TEXT_KINDS = ("hf", "openclip")  # text encoders whose modules carry Hugging Face CLIP names
HASH_INDEX_NAME = "file-hashes.json"


@dataclass(frozen=True)
class Target:
    """The base weight a LoRA module updates: row slices of base tensors, concatenated along dim 0."""

    parts: tuple[tuple[str, int, int], ...]  # (base key, first row, end row)
    shape: tuple[int, ...]  # full shape of the updated weight: (out, in) or (out, in, kh, kw)
    module: str  # readable module path for reports, e.g. "unet.down_blocks.0.attentions.0.proj_in"


# --------------------------------------------------------------------------------------------------------------
# Tensor storage: which file holds which key


class TorchPickleFile(Mapping[str, torch.Tensor]):
    """Tensors of a `.ckpt/.pt/.pth/.bin` file, loaded with `torch.load(weights_only=True, mmap=True)`.

    `weights_only` refuses any pickle that would build objects other than tensors and plain containers, so a
    file with code in it is an error and never runs; `mmap` leaves the tensor data on disk until it is read.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open_regular(self.path):
            pass  # refuses a FIFO, a device or an unreadable file with one line before torch.load could block on it
        try:
            loaded = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # UnpicklingError for code, RuntimeError for a bad or old-format archive
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FileFormatError(
                "cannot be read safely as a PyTorch checkpoint: torch.load(weights_only=True, mmap=True) refused "
                f"it ({first_line}). A pickle that holds code is never run; convert the checkpoint to "
                ".safetensors with a tool you trust",
                self.path,
            ) from None
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]  # Lightning / original SD checkpoints nest the weights
        if not isinstance(loaded, dict):
            raise FileFormatError(f"holds a {type(loaded).__name__}, not a dict of tensors", self.path)
        self.tensors = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if not self.tensors:
            raise FileFormatError("holds no tensors", self.path)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of `key`."""
        return tuple(self.tensors[key].shape)

    def __getitem__(self, key: str) -> torch.Tensor:
        return check_finite(self.tensors[key], key, self.path)

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


Reader = SafetensorsFile | TorchPickleFile


def open_weights_file(path: Path) -> Reader:
    """A lazy reader for one weight file: safetensors, or a PyTorch pickle through `TorchPickleFile`."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return TorchPickleFile(path)
    return SafetensorsFile(path)


@dataclass
class TensorStore:
    """Where each tensor of a checkpoint lives: store key -> (reader, key inside that reader)."""

    entries: dict[str, tuple[Reader, str]] = field(default_factory=dict)

    def add(self, reader: Reader, prefix: str = "", keys: Iterable[str] | None = None) -> None:
        """Register `keys` of `reader` (all of them by default) under `prefix + key`."""
        for key in reader if keys is None else keys:
            self.entries[prefix + key] = (reader, key)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of a store key, from the file header."""
        reader, inner = self.entries[key]
        return tuple(reader.shape(inner))

    def read(self, key: str, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """One tensor, or its rows ``start:end``, checked to be finite (the error names the file). Safetensors
        readers read only the rows asked for."""
        reader, inner = self.entries[key]
        if start is None:
            return reader[inner]
        if hasattr(reader, "rows"):
            return reader.rows(inner, start, end)
        return reader[inner][start:end]

    @property
    def files(self) -> list[Path]:
        """Every file that holds a tensor of this store."""
        return sorted({reader.path for reader, _ in self.entries.values()})


# --------------------------------------------------------------------------------------------------------------
# Components and layouts


@dataclass(frozen=True)
class Component:
    """One model inside a checkpoint (UNet, text encoder, transformer) and how its keys are named."""

    name: str  # "unet" | "text_encoder" | "text_encoder_2" | "text_encoder_3" | "transformer"
    kind: str  # key map in `diffmem.formats.names.FUSIONS`
    naming: str  # "original" | "diffusers"
    prefix: str  # prefix of its keys in the store
    kohya: str | None = None  # kohya prefix of its diffusers module names (lora_unet, lora_te1, ...)
    # Other kohya prefixes writers use for this component where they can mean no other one (see KOHYA_ALIASES).
    kohya_aliases: tuple[str, ...] = ()


# Text encoders inside single-file checkpoints: (key prefix, kind, component).
SINGLE_FILE_TEXT_ENCODERS = (
    ("cond_stage_model.transformer.", "hf", "text_encoder"),  # SD1 CLIP ViT-L
    ("cond_stage_model.model.", "openclip", "text_encoder"),  # SD2 OpenCLIP ViT-H
    ("conditioner.embedders.0.transformer.", "hf", "text_encoder"),  # SDXL CLIP ViT-L
    ("conditioner.embedders.1.model.", "openclip", "text_encoder_2"),  # SDXL OpenCLIP ViT-bigG
    ("conditioner.embedders.0.model.", "openclip", "text_encoder_2"),  # SDXL refiner: only ViT-bigG
    ("text_encoders.clip_l.transformer.", "hf", "text_encoder"),  # SD3 / Flux all-in-one files
    ("text_encoders.clip_g.transformer.", "hf", "text_encoder_2"),
    ("text_encoders.t5xxl.transformer.", "hf", "text_encoder_3"),
)
NOT_DENOISER_PREFIXES = (
    "first_stage_model.", "vae.", "cond_stage_model.", "conditioner.", "text_encoders.", "model_ema.", "alphas",
    "betas", "sqrt_", "log_one_minus", "posterior_", "lvlb_weights",
)
UNET_PREFIX = "model.diffusion_model."

# kohya prefixes of text encoders per family (sd-scripts: lora_te for SD1/2, te1/te2 for SDXL and SD3 CLIPs,
# te3 for T5; diffusers' Flux text_encoder_2 is T5).
KOHYA_TEXT_ENCODER = {
    ("sd1", "text_encoder"): "lora_te",
    ("sd2", "text_encoder"): "lora_te",
    ("unet", "text_encoder"): "lora_te",
    ("sdxl", "text_encoder"): "lora_te1",
    ("sdxl", "text_encoder_2"): "lora_te2",
    ("sd3", "text_encoder"): "lora_te1",
    ("sd3", "text_encoder_2"): "lora_te2",
    ("sd3", "text_encoder_3"): "lora_te3",
    ("flux", "text_encoder"): "lora_te1",
    ("flux", "text_encoder_2"): "lora_te3",
}


# Prefixes other writers use for a component whose family has only one text encoder, so they name no other:
# diffusers' `convert_state_dict_to_kohya` writes `lora_te1_` for any `text_encoder`, SD1's included.
KOHYA_ALIASES = {
    ("sd1", "text_encoder"): ("lora_te1",),
    ("sd2", "text_encoder"): ("lora_te1",),
    ("unet", "text_encoder"): ("lora_te1",),
}
# The generic `lycoris.create_lycoris(module)` names a wrapped module `lycoris_<path inside module>`, whatever the
# module is (UNet, text encoder, transformer): such names carry no component, so they are generated for every
# component and those that two components share (SDXL's two CLIP towers) are told apart by shape.
LYCORIS_PREFIX = "lycoris"


def detect_denoiser(keys: Iterable[str]) -> tuple[str, str] | None:
    """(kind, naming) of the denoiser whose keys (prefix removed) are `keys`, or None."""
    keys = set(keys)

    def has(fragment: str) -> bool:
        return any(key.startswith(fragment) for key in keys)

    if has("input_blocks.") and has("output_blocks."):
        return "unet", "original"
    if has("double_blocks.") or has("single_blocks."):
        return "flux", "original"
    if has("joint_blocks."):
        return "sd3", "original"
    if has("single_transformer_blocks.") or ("x_embedder.weight" in keys and has("transformer_blocks.")):
        return "flux", "diffusers"
    if "pos_embed.proj.weight" in keys and has("transformer_blocks."):
        return "sd3", "diffusers"
    if has("down_blocks.") and "conv_in.weight" in keys:
        return "unet", "diffusers"
    return None


LORA_KEY_MARKERS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1_a", ".lokr_w1", "_lora.down.")


def unknown_layout(path: Path, keys: list[str], what: str) -> FileFormatError:
    """The error for a file whose keys match no supported layout, showing a few of them."""
    if any(marker in key for key in keys for marker in LORA_KEY_MARKERS):
        return FileFormatError("is a LoRA file, not a base checkpoint; pass the model the LoRA was trained on", path)
    sample = ", ".join(sorted(keys)[:5]) or "none"
    return FileFormatError(
        f"unknown checkpoint layout: {what} has no Stable Diffusion UNet, Flux or SD3 transformer keys "
        f"(supported: single-file SD1/SD2/SDXL/Flux/SD3, diffusers folders, bare diffusers UNet or "
        f"transformer files; first keys: {sample})",
        path,
    )


def single_file_components(path: Path, keys: list[str]) -> list[Component]:
    """Components of a single-file checkpoint, found from its key names."""
    components = []
    for prefix, kind, name in SINGLE_FILE_TEXT_ENCODERS:
        if any(key.startswith(prefix) for key in keys):
            components.append(Component(name, kind, "original", prefix))
    denoiser_prefix = UNET_PREFIX if any(key.startswith(UNET_PREFIX) for key in keys) else ""
    denoiser_keys = [
        key[len(denoiser_prefix) :]
        for key in keys
        if key.startswith(denoiser_prefix) and (denoiser_prefix or not key.startswith(NOT_DENOISER_PREFIXES))
    ]
    detected = detect_denoiser(denoiser_keys)
    if detected is None:
        raise unknown_layout(path, keys, "the file")
    kind, naming = detected
    name = "unet" if kind == "unet" else "transformer"
    components.append(Component(name, kind, naming, denoiser_prefix))
    return components


def component_keys(store: TensorStore, components: list[Component]) -> dict[str, list[str]]:
    """Store keys of each component: text encoders claim their prefixes first, the denoiser takes the rest."""
    claimed: dict[str, list[str]] = {c.name: [] for c in components}
    specific = [c for c in components if c.prefix]
    generic = [c for c in components if not c.prefix]
    for key in store.entries:
        owner = next((c for c in specific if key.startswith(c.prefix)), None)
        if owner is None and generic and not key.startswith(NOT_DENOISER_PREFIXES):
            owner = generic[0]
        if owner is not None:
            claimed[owner.name].append(key)
    return claimed


def context_dim(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """Cross-attention context width of a UNet (in-features of the first `attn2.to_k`)."""
    for key, shape in shapes.items():
        if key.endswith("attn2.to_k.weight") and len(shape) == 2:
            return shape[1]
    return None


def unet_family(
    unet_shapes: Mapping[str, tuple[int, ...]], text_encoders: list[Component], hidden_act: str | None = None
) -> str:
    """sd1, sd2, sdxl, or "unet" for a UNet that matches none of them (e.g. diffmem's tiny world model)."""
    names = {c.name for c in text_encoders}
    if "text_encoder_2" in names or any(k.startswith(("label_emb.0.0.", "add_embedding.")) for k in unet_shapes):
        return "sdxl"
    width = context_dim(unet_shapes)
    by_width = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
    if width in by_width:
        return by_width[width]
    if any(c.kind == "openclip" for c in text_encoders) or hidden_act == "gelu":
        return "sd2"  # SD2's OpenCLIP text tower uses gelu, SD1's CLIP quick_gelu
    if text_encoders:
        return "sd1"
    return "unet"


# --------------------------------------------------------------------------------------------------------------
# Diffusers folders


def component_readers(folder: Path) -> list[Reader]:
    """Readers for the weights of one diffusers component folder (single file, sharded, or .bin)."""
    for stem in ("diffusion_pytorch_model", "model"):
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return [SafetensorsFile(single)]
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            return sharded_readers(index)
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return [SafetensorsFile(candidates[0])]
    if len(candidates) > 1:
        raise FileFormatError(
            "holds several weight files (" + ", ".join(p.name for p in candidates) + ") and none is the "
            "standard name; pass the one you mean as a bare file",
            folder,
        )
    for name in ("diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [TorchPickleFile(folder / name)]
    raise FileFormatError("holds no weight file (diffusion_pytorch_model.safetensors or model.safetensors)", folder)


def sharded_readers(index: Path) -> list[Reader]:
    """Readers of a sharded checkpoint, checking its `.index.json` against the shards' headers."""
    try:
        weight_map = json.loads(read_text(index))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FileFormatError(f"is not a valid sharded-checkpoint index ({exc})", index) from None
    readers = {}
    for key, name in weight_map.items():
        if name not in readers:
            shard = index.parent / name
            if not shard.is_file():
                raise FileFormatError(f"names the shard {name!r}, which does not exist", index)
            readers[name] = SafetensorsFile(shard)
        if key not in readers[name].header:
            raise FileFormatError(f"says tensor {key!r} is in {name}, but that shard does not hold it", index)
    return list(readers.values())


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or a FileFormatError naming it."""
    try:
        value = json.loads(read_text(path))
    except ValueError as exc:
        raise FileFormatError(f"is not valid JSON ({exc})", path) from None
    if not isinstance(value, dict):
        raise FileFormatError("is not a JSON object", path)
    return value


def folder_component(folder: Path, name: str, store: TensorStore) -> Component | None:
    """Register the weights of component `name` of a diffusers pipeline folder; None if it has none."""
    sub = folder / name
    if not sub.is_dir():
        return None
    prefix = f"{name}."
    keys = []
    for reader in component_readers(sub):
        store.add(reader, prefix)
        keys += list(reader)
    component = diffusers_component(name, keys)
    if component is None:
        raise unknown_layout(sub, keys, f"the {name} folder")
    return component


def diffusers_component(name: str, keys: Iterable[str]) -> Component | None:
    """The `Component` of a diffusers pipeline component `name` whose keys (in the store under `name.`) are `keys`:
    text encoders by name, the denoiser's kind from its keys; None for a denoiser diffmem does not know."""
    prefix = f"{name}."
    if name.startswith("text_encoder"):
        return Component(name, "hf", "diffusers", prefix)
    detected = detect_denoiser(keys)
    return None if detected is None else Component(name, detected[0], "diffusers", prefix)


def open_folder(path: Path) -> tuple[list[Component], TensorStore, str, str | None]:
    """Components, store and layout of a diffusers pipeline folder or of one component folder."""
    store = TensorStore()
    if (path / "model_index.json").is_file():
        read_json(path / "model_index.json")
        names = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
        components = [c for name in names if (c := folder_component(path, name, store)) is not None]
        if not any(c.name in ("unet", "transformer") for c in components):
            raise FileFormatError("is a diffusers folder without a unet/ or transformer/ component", path)
        text_config = path / "text_encoder" / "config.json"
        hidden_act = read_json(text_config).get("hidden_act") if text_config.is_file() else None
        return components, store, "diffusers_folder", hidden_act
    if (path / "config.json").is_file():
        readers = component_readers(path)
        keys = [key for reader in readers for key in reader]
        for reader in readers:
            store.add(reader)
        detected = detect_denoiser(keys)
        if detected is None:
            raise unknown_layout(path, keys, "the folder")
        name = "unet" if detected[0] == "unet" else "transformer"
        return [Component(name, detected[0], "diffusers", "")], store, "bare", None
    raise FileFormatError("is a folder without model_index.json or config.json: not a diffusers model", path)


# --------------------------------------------------------------------------------------------------------------
# The alias map


def diffusers_aliases(component: Component, module: str) -> list[tuple[list[str], str]]:
    """[(prefixed names, bare name)] a LoRA may use for a module in diffusers naming (one per variant)."""
    variants = clip_name_variants(module) if component.kind in TEXT_KINDS else (module,)
    aliases = []
    for variant in variants:
        names = [f"{component.name}.{variant}"]
        for prefix in (component.kohya, *component.kohya_aliases, LYCORIS_PREFIX):
            if prefix:
                names.append(kohya_name(prefix, variant))
        aliases.append((names, variant))
    return aliases


def original_aliases(component: Component, module: str) -> tuple[list[str], str | None]:
    """(prefixed names, bare name) a LoRA may use for a module in original (LDM/SGM, BFL, SAI) naming."""
    if component.kind not in DENOISER_KINDS:
        return [], None  # nobody names LoRA modules after OpenCLIP's own keys
    names = [kohya_name("lora_unet", module), f"diffusion_model.{module}", f"{component.name}.{module}"]
    return names, module


@dataclass
class AliasMap:
    """Collects alias -> Target, dropping names that two different weights claim."""

    explicit: dict[str, Target] = field(default_factory=dict)
    bare: dict[str, set[Target]] = field(default_factory=lambda: defaultdict(set))
    ambiguous: set[str] = field(default_factory=set)
    # Every target each name was given for, ambiguous or not: `resolve_targets` tells ambiguous ones apart by shape.
    candidates: dict[str, set[Target]] = field(default_factory=lambda: defaultdict(set))

    def add(self, target: Target, names: list[str], bare: str | None) -> None:
        """Record the prefixed `names` and the `bare` name of `target`."""
        for name in [*names, *([bare] if bare is not None else [])]:
            self.candidates[name].add(target)
        for name in names:
            if name in self.ambiguous:
                continue
            if name in self.explicit and self.explicit[name] != target:
                del self.explicit[name]
                self.ambiguous.add(name)
                continue
            self.explicit[name] = target
        if bare is not None:
            self.bare[bare].add(target)

    def result(self) -> dict[str, Target]:
        """The final map: explicit names, plus bare names that exactly one weight claims."""
        result = dict(self.explicit)
        for name, targets in self.bare.items():
            if name in result or name in self.ambiguous:
                continue
            if len(targets) == 1:
                result[name] = next(iter(targets))
            else:
                self.ambiguous.add(name)
        return result


def add_component_targets(aliases: AliasMap, component: Component, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Add a Target and all its names for every Linear/Conv weight of `component` (keys without prefix)."""
    fusions = fusions_for(component.kind, shapes, component.naming)
    weights = {key: shape for key, shape in shapes.items() if is_layer_weight(key, shape)}
    stored_key = component.prefix.__add__
    covered: set[str] = set()

    def label(module: str) -> str:
        canonical = clip_name_variants(module)[0] if component.kind in TEXT_KINDS else module
        return f"{component.name}.{canonical}"

    def add(target: Target, diffusers_module: str | None, original_module: str | None) -> None:
        if diffusers_module is not None:
            for names, bare in diffusers_aliases(component, diffusers_module):
                aliases.add(target, names, bare)
        if original_module is not None:
            aliases.add(target, *original_aliases(component, original_module))

    if component.naming == "original":
        segments: dict[str, list[tuple[int, int, str, int]]] = defaultdict(list)
        for fusion in fusions:
            if fusion.original not in weights:
                continue
            covered.add(fusion.original)
            shape = weights[fusion.original]
            original = module_of(fusion.original)
            whole = Target(((stored_key(fusion.original), 0, shape[0]),), shape, "")
            if fusion.is_rename and module_of(fusion.pieces[0][0]) is not None:
                diffusers = module_of(fusion.pieces[0][0])
                add(replace(whole, module=label(diffusers)), diffusers, original)
                continue
            add(replace(whole, module=label(original)), None, original)
            offset = 0
            for name, start, end in fusion.pieces:
                segments[name].append((start, end, fusion.original, offset))
                offset += end - start
        for name, pieces in segments.items():
            pieces.sort()
            if module_of(name) is None or [p[0] for p in pieces] != [0] + [p[1] for p in pieces[:-1]]:
                continue  # not a weight, or rows not all present
            parts = tuple((stored_key(orig), offset, offset + end - start) for start, end, orig, offset in pieces)
            tail = weights[pieces[0][2]][1:]
            shape = (sum(end - start for start, end, _, _ in pieces), *tail)
            add(Target(parts, shape, label(module_of(name))), module_of(name), None)
    else:
        renamed = {}
        for fusion in fusions:
            names = [name for name, _, _ in fusion.pieces]
            if module_of(fusion.original) is None or not all(name in weights for name in names):
                continue
            if fusion.is_rename:
                renamed[names[0]] = module_of(fusion.original)
                continue
            parts = tuple((stored_key(name), start, end) for name, start, end in fusion.pieces)
            shape = (sum(end - start for _, start, end in fusion.pieces), *weights[names[0]][1:])
            original = module_of(fusion.original)
            add(Target(parts, shape, label(original)), None, original)
        for key, shape in weights.items():
            covered.add(key)
            module = module_of(key)
            add(Target(((stored_key(key), 0, shape[0]),), shape, label(module)), module, renamed.get(key))
    for key, shape in weights.items():
        if key not in covered:  # a weight the name maps do not know: reachable under its stored name only
            module = module_of(key)
            target = Target(((stored_key(key), 0, shape[0]),), shape, label(module))
            if component.naming == "diffusers":
                add(target, module, None)
            else:
                add(target, None, module)


# --------------------------------------------------------------------------------------------------------------
# The checkpoint


def cached_sha256(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """sha256 of a file, memoised in `<cache dir>/file-hashes.json` under (real path, size, mtime_ns)."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    index_path = Path(cache_dir or default_cache_dir()) / HASH_INDEX_NAME

    def load_index() -> dict:
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError):
            return {}
        return index if isinstance(index, dict) else {}

    entry = load_index().get(real)
    if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return str(entry["sha256"])
    digest = sha256_file(real)
    index = load_index()  # re-read: another process may have added entries meanwhile
    index[real] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    try:
        write_atomic(json.dumps(index, indent=1, sort_keys=True).encode(), index_path)
    except (OSError, DiffmemError) as exc:  # a full disk or read-only cache: the hash is right, only not memoised
        warnings.warn(f"could not write the hash index {index_path}: {exc}; hashing will repeat", stacklevel=2)
    return digest


class BaseCheckpoint:
    """A base model checkpoint opened lazily: headers are read, tensors only when `weight` asks for them."""

    def __init__(self, path: Path, family: str, layout: str, components: list[Component], store: TensorStore):
        self.path = path
        self.family = family
        self.layout = layout
        self.components = components
        self._store = store
        self._hash: str | None = None

    def __repr__(self) -> str:
        parts = ", ".join(f"{c.name}:{c.kind}/{c.naming}" for c in self.components)
        return f"BaseCheckpoint({str(self.path)!r}, family={self.family!r}, layout={self.layout!r}, {parts})"

    @property
    def store(self) -> TensorStore:
        """Where each tensor lives (store key -> reader and its key); over loaded modules, their own tensors."""
        return self._store

    @property
    def files(self) -> list[Path]:
        """Every file this checkpoint's tensors are read from."""
        return self._store.files

    @cached_property
    def _aliases(self) -> tuple[dict[str, Target], frozenset[str]]:
        claimed = component_keys(self._store, self.components)
        aliases = AliasMap()
        for component in self.components:
            shapes = {key[len(component.prefix) :]: self._store.shape(key) for key in claimed[component.name]}
            add_component_targets(aliases, component, shapes)
        result = aliases.result()
        candidates = {name: frozenset(found) for name, found in aliases.candidates.items() if name in aliases.ambiguous}
        return result, frozenset(aliases.ambiguous), candidates

    @property
    def targets(self) -> Mapping[str, Target]:
        """Every accepted LoRA lookup name -> the Target it updates (built from headers only, once)."""
        return self._aliases[0]

    @property
    def ambiguous(self) -> frozenset[str]:
        """Names that would fit two different weights (e.g. a bare CLIP path in SDXL), so are not accepted."""
        return self._aliases[1]

    def candidates(self, name: str) -> frozenset[Target]:
        """The weights an ambiguous name fits (empty for a name that is unambiguous or not in the base)."""
        return self._aliases[2].get(name, frozenset())

    def weight(self, target: Target) -> torch.Tensor:
        """The float32 weight `target` describes, reading only the tensors it needs (by byte range)."""
        rows = []
        for key, start, end in target.parts:
            if key not in self._store.entries:
                raise DiffmemError(f"has no tensor {key!r} (target of {target.module})", self.path)
            rows.append(self._store.read(key, start, end))
        weight = (rows[0] if len(rows) == 1 else torch.cat(rows)).to(torch.float32)
        if tuple(weight.shape) != tuple(target.shape):
            raise FileFormatError(
                f"weight {target.module} has shape {tuple(weight.shape)} on disk, not {target.shape}", self.path
            )
        return weight

    def content_hash(self, cache_dir: str | Path | None = None) -> str:
        """sha256 of the checkpoint's weight file (or, for a folder, of its files' relative paths and hashes).

        Each file is hashed once: the result is kept in `cache_dir` (default `diffmem.cache.default_cache_dir()`)
        under its real path, size and modification time.
        """
        if self._hash is None:
            files = self.files
            if len(files) == 1 and not self.path.is_dir():
                self._hash = cached_sha256(files[0], cache_dir)
            else:
                digest = hashlib.sha256()
                root = self.path if self.path.is_dir() else self.path.parent
                for file in files:
                    line = f"{file.relative_to(root).as_posix()}\t{cached_sha256(file, cache_dir)}\n"
                    digest.update(line.encode())
                self._hash = digest.hexdigest()
        return self._hash


def open_base(path: str | Path) -> BaseCheckpoint:
    """Open a base checkpoint of any supported layout and family without reading its tensors."""
    path = Path(path)
    check_input(path)  # a FIFO, device or link loop is one clear error here, not a hang or a traceback later
    if path.is_dir():
        components, store, layout, hidden_act = open_folder(path)
        return assemble(path, components, store, layout, hidden_act)
    return single_file_checkpoint(path, open_weights_file(path))


def single_file_checkpoint(path: Path, reader: Reader) -> BaseCheckpoint:
    """The checkpoint held by one weight file (any object with the `SafetensorsFile` reading interface)."""
    store = TensorStore()
    store.add(reader)
    components = single_file_components(path, list(reader))
    if isinstance(reader, TorchPickleFile):
        layout = "ckpt"
    elif components[-1].naming == "diffusers" and len(components) == 1:
        layout = "bare"
    else:
        layout = "single_file"
    return assemble(path, components, store, layout)


def assemble(
    path: Path, components: list[Component], store: TensorStore, layout: str, hidden_act: str | None = None
) -> BaseCheckpoint:
    """A BaseCheckpoint whose components get the kohya prefixes of the family their keys say it is."""
    family = checkpoint_family(components, store, hidden_act)
    components = [
        replace(c, kohya=KOHYA_TEXT_ENCODER.get((family, c.name)))
        if c.name.startswith("text_encoder")
        else replace(c, kohya="lora_unet" if c.kind == "unet" else "lora_transformer")
        for c in components
    ]
    components = [replace(c, kohya_aliases=KOHYA_ALIASES.get((family, c.name), ())) for c in components]
    return BaseCheckpoint(path, family, layout, components, store)


def checkpoint_family(components: list[Component], store: TensorStore, hidden_act: str | None) -> str:
    """The model family a checkpoint's components belong to."""
    denoiser = next(c for c in components if c.kind in DENOISER_KINDS)
    if denoiser.kind != "unet":
        return denoiser.kind
    keys = component_keys(store, components)[denoiser.name]
    shapes = {key[len(denoiser.prefix) :]: store.shape(key) for key in keys}
    text_encoders = [c for c in components if c.name.startswith("text_encoder")]
    return unet_family(shapes, text_encoders, hidden_act)


# --------------------------------------------------------------------------------------------------------------
# Matching a LoRA to a base


VERSION_FAMILIES = (("sdxl", "sdxl"), ("sd_v1", "sd1"), ("sd_v2", "sd2"), ("flux", "flux"), ("sd3", "sd3"))
ARCHITECTURE_FAMILIES = (
    ("stable-diffusion-xl", "sdxl"),
    ("stable-diffusion-v1", "sd1"),
    ("stable-diffusion-v2", "sd2"),
    ("stable-diffusion-3", "sd3"),
    ("flux", "flux"),
)


def guess_lora_family(lookups: Iterable[str], metadata: Mapping[str, str]) -> str | None:
    """The family a LoRA was trained for, from its module names, with kohya/ModelSpec metadata to break ties.

    Names that only one family uses (Flux's double blocks, SD3's joint blocks, SDXL's SGM blocks and second text
    encoder) win over metadata, which trainers copy between runs and can get wrong; metadata decides what names
    alone cannot (SD1 against SD2, whose UNet module names are the same), and names it doesn't contradict.
    """
    by_names = family_from_names(list(lookups))
    by_metadata = family_from_metadata(metadata)
    if by_names is None or (by_metadata is not None and by_metadata in by_names.split("/")):
        return by_metadata or by_names
    return by_names


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The family kohya's `ss_base_model_version` or ModelSpec's `modelspec.architecture` names, if any."""
    version = metadata.get("ss_base_model_version", "").lower()
    for prefix, family in VERSION_FAMILIES:
        if version.startswith(prefix):
            return family
    architecture = metadata.get("modelspec.architecture", "").lower()
    for prefix, family in ARCHITECTURE_FAMILIES:
        if architecture.startswith(prefix):
            return family
    return None


def family_from_names(names: list[str]) -> str | None:
    """The family LoRA module names point to; "sd1/sd2", "sd1/sd2/sdxl" or "flux/sd3" where names alone cannot
    tell."""

    def any_has(*fragments: str) -> bool:
        return any(fragment in name for name in names for fragment in fragments)

    if any_has("double_blocks", "single_blocks", "single_transformer_blocks"):
        return "flux"
    if any_has("joint_blocks", "context_block", "attn2.to_add_out", "pos_embed"):
        return "sd3"
    if any_has("transformer_blocks") and not any_has("attentions", "_attentions_", "input_blocks", "output_blocks"):
        return "flux/sd3"
    if any_has("lora_te2_", "text_encoder_2.", "input_blocks", "output_blocks", "middle_block", "add_embedding"):
        return "sdxl"
    if any_has("lora_te1_"):
        # sd-scripts writes lora_te1_ only for SDXL, but diffusers' kohya converter writes it for any first text
        # encoder; without SGM UNet names or a second text encoder it does not tell SDXL from SD1/SD2.
        return "sd1/sd2/sdxl"
    if any_has("down_blocks", "up_blocks", "mid_block", "lora_te_", "text_encoder."):
        return "sd1/sd2"
    return None


def shapes_match(lora_shape: tuple[int, ...], base_shape: tuple[int, ...]) -> bool:
    """Equal shapes; a Linear update for a 1x1 conv (and back), which front-ends apply alike; or a conv update
    given flattened as (out, in * kh * kw), as LoHa/LoKr files without a Tucker core record it."""
    lora_shape, base_shape = tuple(lora_shape), tuple(base_shape)
    if lora_shape == base_shape:
        return True
    if len(lora_shape) == 2 and len(base_shape) == 4:
        return lora_shape == (base_shape[0], base_shape[1] * base_shape[2] * base_shape[3])
    if len(lora_shape) == 4 and len(base_shape) == 2:
        return lora_shape == (*base_shape, 1, 1)
    return False


def resolve_targets(
    modules: Mapping[str, tuple[str, tuple[int, ...]]],
    base: BaseCheckpoint,
    lora_path: str | Path,
    metadata: Mapping[str, str] | None = None,
    *,
    skip_unmapped: bool = False,
) -> dict[str, Target]:
    """Target of every LoRA module `{name: (lookup, weight_shape)}`, or a BaseMismatchError naming the LoRA.

    A name that fits several base weights (a bare CLIP path or a `lycoris_` name in SDXL, whose two text encoders
    share module paths) is mapped when exactly one of them has the module's shape. The error says which family the
    LoRA and the base look like, how many modules did not map (with examples) and every shape mismatch. With
    `skip_unmapped`, modules that name no base weight are left out of the result (the caller writes them back
    unchanged) as long as at least one module maps and no shape mismatches; shape mismatches always refuse, since
    they mean the LoRA was trained for another model.
    """
    targets = base.targets
    resolved: dict[str, Target] = {}
    by_shape: dict[str, Target] = {}
    missing: list[str] = []
    ambiguous: list[str] = []
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for name, (lookup, shape) in modules.items():
        target = targets.get(lookup)
        if target is None:
            fitting = [t for t in base.candidates(lookup) if shapes_match(tuple(shape), t.shape)]
            if len(fitting) == 1:
                by_shape[name] = fitting[0]
            else:
                missing.append(name)
                if base.candidates(lookup):
                    ambiguous.append(name)
        elif not shapes_match(tuple(shape), target.shape):
            mismatched.append((name, tuple(shape), target.shape))
        else:
            resolved[name] = target
    # Names told apart by shape must agree on one component: a file whose bare names land in two text encoders by
    # shape alone is not unambiguous, so none of them is mapped.
    if len({t.module.split(".", 1)[0] for t in by_shape.values()}) > 1:
        missing += list(by_shape)
        ambiguous += list(by_shape)
    else:
        resolved.update(by_shape)
    if not missing and not mismatched:
        return resolved
    if skip_unmapped and resolved and not mismatched:
        return resolved
    lora_family = guess_lora_family((lookup for lookup, _ in modules.values()), metadata or {})
    if lora_family is not None and base.family in lora_family.split("/"):
        # Same family: the base is likely the right model and only some modules name weights it lacks.
        looks = f"the LoRA's module names fit a {base.family} model, as the base is"
    else:
        looks = f"the LoRA looks like {lora_family or 'an unknown family'} and the base like {base.family}"
    problems = [
        f"it does not fit the base {base.path} (a {base.family} checkpoint, {base.layout} layout); {looks}"
    ]
    if missing:
        examples = ", ".join(sorted(missing)[:3])
        note = f" ({len(ambiguous)} of them name more than one base weight)" if ambiguous else ""
        problems.append(f"{len(missing)} of {len(modules)} modules have no weight in the base{note}, e.g. {examples}")
    if mismatched:
        shown = "; ".join(f"{name}: LoRA {shape} vs base {base_shape}" for name, shape, base_shape in mismatched[:3])
        more = f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""
        problems.append(f"{len(mismatched)} modules have the wrong shape ({shown}{more})")
    elif resolved:
        maps = "1 other module maps" if len(resolved) == 1 else f"{len(resolved)} other modules map"
        problems.append(
            f"{maps}: pass --skip-unmapped (skip_unmapped=True) to filter them and write the unmapped ones back "
            "unchanged"
        )
    raise BaseMismatchError(". ".join(problems), lora_path)


def resolve_lora_targets(lora: LoraFile, base: BaseCheckpoint, *, skip_unmapped: bool = False) -> dict[str, Target]:
    """`resolve_targets` of every module of a read LoRA file (its lookups, weight shapes, path and metadata)."""
    lookups = {name: (module.lookup, tuple(module.weight_shape)) for name, module in lora.modules.items()}
    return resolve_targets(lookups, base, lora.path, metadata=lora.metadata, skip_unmapped=skip_unmapped)
