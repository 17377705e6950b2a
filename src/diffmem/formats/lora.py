"""Reading and writing LoRA files of every common format, one module at a time.

`read_lora` turns a kohya/LyCORIS, diffusers/PEFT, native PEFT or old-diffusers file into `LoraModule`s that
all expose the same things: the stored tensors, the resolved alpha and scale, the shape of the base weight they
update, and the dense update `delta()`. `replace_factors` swaps in new low-rank factors with an alpha that keeps
each module's scale, and `write_lora` writes the result back in the input's own format and key naming.

What writing does to each kind (also in docs/formats.md):

- lora / locon: new factors in place; conv factors stay k x k down, 1 x 1 up.
- tucker (LoCon with `lora_mid`), loha, lokr: these have no low-rank channels of their own, so a filtered
  module is written as a plain lora/locon module under the same module name in the file's own naming
  (`.lora_up.weight`/`.lora_down.weight` for kohya, `.lora_B.weight`/`.lora_A.weight` for PEFT keys).
- DoRA: `dora_scale` (PEFT `lora_magnitude_vector`) is kept unchanged: the learned magnitude of every
  column stays, only the direction update changes. `delta()` is the direction update scale * B @ A; the
  weight a DoRA loader uses is m * (W + delta) / ||W + delta||, which needs the base weight.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from diffmem.errors import BadWeightsError, DiffmemError, FileFormatError
from diffmem.formats import lora_keys, lora_math
from diffmem.formats.files import check_input, read_text
from diffmem.formats.safetensors_io import (
    TensorBytes,
    addnet_hashes,
    check_finite,
    load_file,
    refuse_overwriting,
    sweep_stale_temps,
    temp_prefix,
    write_atomic,
)

PEFT_WEIGHTS = "adapter_model.safetensors"
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
PEFT_PICKLE = "adapter_model.bin"
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_METADATA = "lora_adapter_metadata"
KIND_ROLES = {
    "lora": {"up", "down"},
    "locon": {"up", "down"},
    "tucker": {"up", "down", "mid"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
}
SHARED_ROLES = {"alpha", "dora_scale"}


@dataclass
class LoraModule:
    """One adapted layer of a LoRA file.

    `name` is the module prefix exactly as in the file; `lookup` is the name the base alias map is searched
    with: the kohya name as-is, the dotted path with its component prefix for diffusers/PEFT-prefixed files
    (`unet.down_blocks.0.attentions.0.proj_in`), the bare dotted path for native PEFT folders, and the dotted
    module path for old diffusers processor files (`unet.X.processor.to_out_lora` -> `unet.X.to_out.0`).

    `rank` is the denominator of the scale: the factor rank for lora/locon/tucker/loha, LyCORIS' `lora_dim`
    for lokr (1 when both Kronecker factors are stored whole, which LyCORIS applies with scale 1).
    `weight_shape` is the base weight's shape, except for LoHa and LoKr conv modules without a Tucker core,
    whose files do not record the kernel size: there it is the flattened (out, in * kh * kw).
    """

    name: str
    lookup: str
    kind: str
    tensors: dict[str, Tensor]
    keys: dict[str, str]
    rank: int
    alpha: float
    alpha_stored: bool
    scale: float
    weight_shape: tuple[int, ...]
    rslora: bool = False  # scale = alpha / sqrt(rank)

    def __repr__(self) -> str:
        return (f"LoraModule({self.name!r}, kind={self.kind!r}, rank={self.rank}, alpha={self.alpha:g}, "
                f"weight_shape={tuple(self.weight_shape)})")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype its factors are stored in (what a rewritten module is written in)."""
        return next(t.dtype for role, t in self.tensors.items() if role not in SHARED_ROLES)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(B [out, r], A [r, in*kh*kw]) as float32, with dW = scale * B @ A; lora and locon modules only."""
        if self.kind not in ("lora", "locon"):
            raise TypeError(f"{self.name}: a {self.kind} module has no low-rank factors; use delta()")
        return lora_math.flat(self.tensors["up"]), lora_math.flat(self.tensors["down"])

    def delta(self) -> Tensor:
        """The dense float32 update this module adds to its base weight, scale included."""
        t = self.tensors
        if self.kind in ("lora", "locon"):
            return lora_math.lora_delta(t["up"], t["down"], self.scale, self.weight_shape)
        if self.kind == "tucker":
            return lora_math.tucker_delta(t["up"], t["mid"], t["down"], self.scale)
        if self.kind == "loha":
            return lora_math.loha_delta(
                t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], self.scale,
                t.get("hada_t1"), t.get("hada_t2"),
            ).reshape(self.weight_shape)
        w1 = lora_math.lokr_factor(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"))
        w2 = lora_math.lokr_factor(t.get("lokr_w2"), t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_t2"))
        return lora_math.lokr_delta(w1, w2, self.scale).reshape(self.weight_shape)


@dataclass
class LoraFile:
    """A whole LoRA file: its modules in file order, untouched extras, metadata and (PEFT) adapter config.

    `format` is "kohya" (kohya/LyCORIS keys), "diffusers" (PEFT keys under `unet.`/`text_encoder.`/
    `text_encoder_2.`/`transformer.`), "peft" (native PEFT folder) or "diffusers_old" (attention processors).
    `adapter_config` is adapter_config.json for "peft" and the parsed `lora_adapter_metadata` header (a flat
    dict with component-prefixed keys such as `unet.r`) for "diffusers"; None when absent.
    """

    path: Path | None
    format: str
    modules: dict[str, LoraModule]
    other: dict[str, Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    adapter_config: dict | None = None
    rslora: bool = False

    def save(self, path: str | Path, protect: tuple[str | Path, ...] = ()) -> Path:
        """Write this LoRA to `path` in its own format and key naming (`write_lora`: atomic, deterministic bytes,
        never over its own source file or `protect`)."""
        sources = (self.path,) if self.path is not None else ()
        return write_lora(self, path, protect=(*sources, *protect))

    def update_energy(self) -> float:
        """The total update energy: the sum over modules of ``||dW||_F^2`` (what `FilterReport.energy_kept` is a
        share of)."""
        return sum(float(module.delta().double().square().sum()) for module in self.modules.values())

    def __repr__(self) -> str:
        # The generated repr would print every tensor of every module.
        kinds = collections.Counter(module.kind for module in self.modules.values())
        return (f"LoraFile(format={self.format!r}, modules={len(self.modules)} "
                f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}), path={str(self.path)!r})")


# ---------------------------------------------------------------------------------------------------- reading


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA `.safetensors` file or a native PEFT adapter folder.

    PEFT's pickled `adapter_model.bin` is refused: unpickling runs code, and a LoRA never needs it
    (re-save it with `save_pretrained(safe_serialization=True)`).
    """
    path = Path(path)
    check_input(path)  # a FIFO, device or link loop is one clear error here, not a hang or a traceback later
    config = None
    weights = path
    if path.is_dir():
        weights = path / PEFT_WEIGHTS
        if not weights.exists():
            if (path / PEFT_PICKLE).exists():
                raise FileFormatError(
                    f"holds only {PEFT_PICKLE}, a pickle that can run code when loaded; diffmem reads LoRAs only "
                    "as safetensors (re-save the adapter with save_pretrained(safe_serialization=True))", path)
            raise FileFormatError(f"is a folder without {PEFT_WEIGHTS}: not a PEFT adapter folder", path)
        config = read_peft_config(path / PEFT_CONFIG)
    tensors, metadata = load_file(weights)
    fmt = lora_keys.detect_format(tensors)
    if fmt is None:
        raise FileFormatError(f"not a LoRA file: {lora_keys.describe_unknown_layout(list(tensors))}", weights)
    if fmt == "peft" and config is None:
        sibling = weights.parent / PEFT_CONFIG
        if not sibling.exists():
            raise FileFormatError(
                f"holds native PEFT keys ('base_model.model.…') but there is no {PEFT_CONFIG} beside it, so its "
                "rank and alpha are unknown; pass the adapter folder", weights)
        config = read_peft_config(sibling)
        path = weights.parent
    if config is not None and fmt != "peft":
        raise FileFormatError(f"{PEFT_WEIGHTS} holds {fmt} keys, not native PEFT 'base_model.model.' keys", weights)
    if fmt == "diffusers" and DIFFUSERS_METADATA in metadata:
        try:
            config = json.loads(metadata[DIFFUSERS_METADATA])
        except json.JSONDecodeError as exc:
            raise FileFormatError(f"its '{DIFFUSERS_METADATA}' header is not JSON ({exc})", weights) from None
    return lora_from_tensors(tensors, metadata, fmt, config, path, weights)


def lora_from_tensors(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str], fmt: str, config: Mapping | None = None,
    path: Path | None = None, weights: Path | None = None,
) -> LoraFile:
    """A `LoraFile` from a state dict in format `fmt` (what `read_lora` does after reading the file);
    `weights` names the file in errors."""
    groups, other = group_keys(tensors, fmt, weights or path or Path("<memory>"))
    rslora = file_uses_rslora(fmt, config)
    modules = {
        name: build_module(name, roles, fmt, config, weights or path or Path("<memory>"))
        for name, roles in groups.items()
    }
    return LoraFile(path, fmt, modules, other, dict(metadata), dict(config) if config else None, rslora)


def lora_from_factors(
    factors: Mapping[str, tuple[Tensor, Tensor]],
    fmt: str = "kohya",
    *,
    alpha: float | None = None,
    metadata: Mapping[str, str] | None = None,
) -> LoraFile:
    """A new LoRA from ``{module name: (up [out, r(, 1, 1)], down [r, in(, kh, kw)])}``, ready for `write_lora`.

    ``fmt`` "kohya" takes kohya module names (``lora_unet_<path with _>``) and stores ``alpha`` per module;
    "diffusers" takes dotted names with their component (``unet.<path>``) and records ``alpha`` and the rank in
    the ``lora_adapter_metadata`` header, per component, as diffusers does. ``alpha=None`` stores no alpha, which
    every loader reads as alpha = rank (scale 1).
    """
    if fmt not in ("kohya", "diffusers"):
        raise ValueError(f"lora_from_factors writes kohya or diffusers naming, not {fmt!r}")
    tensors: dict[str, Tensor] = {}
    for name, (up, down) in factors.items():
        tensors[lora_keys.key_for(name, "up", fmt)] = up
        tensors[lora_keys.key_for(name, "down", fmt)] = down
        if alpha is not None and fmt == "kohya":
            tensors[lora_keys.key_for(name, "alpha", fmt)] = torch.tensor(float(alpha), dtype=up.dtype)
    metadata = dict(metadata or {})
    config = None
    if fmt == "diffusers" and alpha is not None:
        # Keep any LoraConfig fields the caller put in the header (target_modules, ...); set rank and alpha.
        config = json.loads(metadata.get(DIFFUSERS_METADATA, "{}"))
        ranks = {int(up.shape[1]) for up, _ in factors.values()}
        for component in sorted({name.split(".", 1)[0] for name in factors}):
            config.update({f"{component}.r": max(ranks), f"{component}.lora_alpha": float(alpha)})
        metadata[DIFFUSERS_METADATA] = json.dumps(config, sort_keys=True)
    return lora_from_tensors(tensors, metadata, fmt, config)


def read_peft_config(path: Path) -> dict:
    """adapter_config.json of a PEFT LoRA adapter, checked to describe a LoRA."""
    if not path.exists():
        raise FileFormatError(f"PEFT adapter folder without {PEFT_CONFIG}", path.parent)
    try:
        config = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"not valid JSON ({exc})", path) from None
    if not isinstance(config, dict):
        raise FileFormatError("not a PEFT adapter config (not a JSON object)", path)
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise FileFormatError(f"PEFT adapter type {peft_type!r} is not supported; only LORA adapters are", path)
    return config


def group_keys(
    tensors: Mapping[str, Tensor], fmt: str, path: Path
) -> tuple[dict[str, dict[str, tuple[str, Tensor]]], dict[str, Tensor]]:
    """Split a file's tensors into modules (name -> role -> (key, tensor)) and verbatim extras."""
    groups: dict[str, dict[str, tuple[str, Tensor]]] = {}
    other: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, tensor in tensors.items():
        if key.startswith(lora_keys.HARMLESS_PREFIXES):
            other[key] = tensor
            continue
        reason = lora_keys.unsupported_reason(key)
        if reason is not None:
            raise FileFormatError(f"tensor {key!r} belongs to {reason}, which diffmem cannot filter", path)
        parsed = lora_keys.parse_key(key, fmt)
        if parsed is None:
            unknown.append(key)
            continue
        roles = groups.setdefault(parsed.module, {})
        if parsed.role in roles:
            raise FileFormatError(f"module {parsed.module!r} has two {parsed.role!r} tensors", path)
        roles[parsed.role] = (key, tensor)
    if unknown:
        listed = ", ".join(repr(k) for k in unknown[:5])
        raise FileFormatError(
            f"{len(unknown)} tensor(s) of this {fmt} LoRA belong to no LoRA module: {listed}", path)
    for name in [n for n, roles in groups.items() if set(roles) == {"alpha"}]:
        # An alpha without factors adds nothing to any weight: keep it verbatim.
        for key, tensor in groups.pop(name).values():
            other[key] = tensor
    return groups, other


def file_uses_rslora(fmt: str, config: Mapping | None) -> bool:
    """Whether the file's scale is alpha / sqrt(r): PEFT's `use_rslora` (adapter config or diffusers metadata).

    kohya-named files are always applied as alpha / r: A1111, ComfyUI and kohya know no rsLoRA, and LyCORIS
    (4.x) trained with `rs_lora` stores alpha * sqrt(r) so that alpha / r is the scale it trained with.
    """
    if fmt == "kohya":
        return False
    if config is None:
        return False
    return any(bool(v) for k, v in config.items() if k == "use_rslora" or k.endswith(".use_rslora"))


def component_config(config: Mapping | None, component: str | None) -> dict:
    """The LoraConfig fields that apply to one component of a diffusers file (or the whole PEFT config)."""
    if not config:
        return {}
    if component is not None:
        prefix = f"{component}."
        scoped = {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}
        if scoped:
            return scoped
    return dict(config)


def build_module(
    name: str, roles: dict[str, tuple[str, Tensor]], fmt: str, config: Mapping | None, path: Path
) -> LoraModule:
    """Make a `LoraModule` from the tensors of one module, checking their shapes fit together."""
    tensors = {role: tensor for role, (_, tensor) in roles.items()}
    keys = {role: key for role, (key, _) in roles.items()}
    kind = module_kind(name, set(tensors), path)
    check_dtypes(name, tensors, path)
    rank, weight_shape = check_shapes(name, kind, tensors, path)
    if rank == 0 or 0 in weight_shape:
        raise FileFormatError(f"module {name!r} has rank 0 or an empty shape {tuple(weight_shape)}: its factors "
                              "hold no values (a broken export)", path)
    comp = component_config(config, lora_keys.component_of(name, fmt))
    if "alpha" in tensors:
        alpha_tensor = tensors["alpha"]
        if alpha_tensor.numel() != 1:
            raise BadWeightsError(f"alpha of {name!r} has shape {tuple(alpha_tensor.shape)}, not a scalar", path)
        stored_alpha: float | None = float(alpha_tensor.float().reshape(()))
    elif fmt in ("diffusers", "peft") and comp:
        path_in_model = lora_keys.peft_path(name, fmt)
        stored_alpha = float(lora_keys.pattern_value(comp.get("alpha_pattern") or {}, path_in_model,
                                                     comp.get("lora_alpha", 8)))
    else:
        stored_alpha = None
    if stored_alpha is not None and not abs(stored_alpha) <= FLOAT32_MAX:
        # Every front-end applies the update in float32 or less: such an alpha makes it Inf (or NaN) everywhere.
        raise BadWeightsError(f"alpha of {name!r} is {stored_alpha:g}, beyond float32; the update would not be "
                              "finite", path)
    rslora = file_uses_rslora(fmt, comp)
    alpha = lora_math.resolve_alpha(stored_alpha, rank)
    if kind == "lokr" and "lokr_w1" in tensors and "lokr_w2" in tensors:
        alpha = float(rank)  # LyCORIS applies a LoKr of two whole factors with scale 1 (rank 1), whatever alpha says
    if kind == "lora" and len(weight_shape) == 4:
        kind = "locon"
    return LoraModule(
        name=name, lookup=lora_keys.lookup_name(name, fmt), kind=kind, tensors=tensors, keys=keys, rank=rank,
        alpha=alpha, alpha_stored=stored_alpha is not None, scale=lora_math.lora_scale(alpha, rank, rslora),
        weight_shape=weight_shape, rslora=rslora,
    )


def check_dtypes(name: str, tensors: Mapping[str, Tensor], path: Path) -> None:
    """Raise unless every factor is floating point (an integer or bool factor is a broken or hostile file; alpha may
    be stored as an integer, as some trainers write it)."""
    for role, tensor in tensors.items():
        numeric_alpha = role == "alpha" and tensor.dtype != torch.bool
        if not (tensor.is_floating_point() or numeric_alpha):
            raise FileFormatError(f"module {name!r}: {role} is {str(tensor.dtype).removeprefix('torch.')}; LoRA "
                                  "factors must be floating point", path)


def module_kind(name: str, roles: set[str], path: Path) -> str:
    """lora / tucker / loha / lokr from the roles present (conv-ness is decided from shapes later), or a
    clear error for a module whose tensors are incomplete or mixed."""
    core = roles - SHARED_ROLES
    lycoris = [kind for kind in ("loha", "lokr") if core & KIND_ROLES[kind]]
    if core & KIND_ROLES["tucker"]:
        if lycoris:
            raise FileFormatError(f"module {name!r} mixes LoRA and LyCORIS tensors: {sorted(roles)}", path)
        kind = "tucker" if "mid" in core else "lora"
    elif len(lycoris) == 1:
        kind = lycoris[0]
    elif lycoris:
        raise FileFormatError(f"module {name!r} mixes LyCORIS algorithms: {sorted(roles)}", path)
    else:
        raise FileFormatError(f"module {name!r} has {sorted(roles)} but no factors", path)
    missing = {"up", "down"} - core if kind in ("lora", "tucker") else set()
    if kind == "loha":
        missing = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} - core
        if len(core & {"hada_t1", "hada_t2"}) == 1:
            missing |= {"hada_t1", "hada_t2"} - core
    if kind == "lokr":
        for factor in ("lokr_w1", "lokr_w2"):
            halves = {f"{factor}_a", f"{factor}_b"}
            if factor not in core and not halves <= core:
                missing |= halves - core if core & halves else {factor}
    if missing:
        raise FileFormatError(f"module {name!r} is incomplete: it has {sorted(roles)} but no {sorted(missing)}",
                              path)
    return kind


def check_shapes(name: str, kind: str, t: Mapping[str, Tensor], path: Path) -> tuple[int, tuple[int, ...]]:
    """(rank, weight_shape) of a module, after checking that its factors' shapes chain together."""

    def need(condition: bool, what: str) -> None:
        if not condition:
            shapes = ", ".join(f"{role} {tuple(x.shape)}" for role, x in t.items() if role != "alpha")
            raise BadWeightsError(f"module {name!r}: {what} ({shapes})", path)

    if kind in ("lora", "tucker"):
        up, down = t["up"], t["down"]
        need(up.dim() in (2, 4) and down.dim() in (2, 4), "factors must be 2-D or 4-D")
        need(up.dim() == 2 or tuple(up.shape[2:]) == (1, 1), "a conv lora_up must be 1 x 1")
        if kind == "tucker":
            mid = t["mid"]
            need(mid.dim() == 4 and down.dim() == 4 and tuple(down.shape[2:]) == (1, 1),
                 "a Tucker module needs a 1 x 1 down and a 4-D lora_mid")
            need(mid.shape[0] == up.shape[1] and mid.shape[1] == down.shape[0], "up/mid/down ranks differ")
            return int(down.shape[0]), (up.shape[0], down.shape[1], *mid.shape[2:])
        need(up.shape[1] == down.shape[0], f"up/down rank mismatch: {up.shape[1]} vs {down.shape[0]}")
        return int(down.shape[0]), (up.shape[0], *down.shape[1:])
    if kind == "loha":
        w1a, w1b, w2a, w2b = t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"]
        if "hada_t1" in t:
            t1, t2 = t["hada_t1"], t["hada_t2"]
            need(all(x.dim() == 2 for x in (w1a, w1b, w2a, w2b)) and t1.shape == t2.shape and t1.dim() >= 3,
                 "a Tucker LoHa needs 2-D factors and matching cores")
            need(tuple(t1.shape[:2]) == (w1a.shape[0], w1b.shape[0]) and w1a.shape == w2a.shape
                 and w1b.shape == w2b.shape, "LoHa core and factor ranks differ")
            return int(w1b.shape[0]), (w1a.shape[1], w1b.shape[1], *t1.shape[2:])
        need(w1a.dim() == 2 and w2a.dim() == 2, "hada_w*_a must be 2-D")
        need(w1a.shape[1] == w1b.shape[0] and w2a.shape[1] == w2b.shape[0], "LoHa a/b rank mismatch")
        need(w1a.shape[0] == w2a.shape[0] and w1b.shape == w2b.shape, "the two Hadamard factors differ in shape")
        return int(w1b.shape[0]), (w1a.shape[0], *w1b.shape[1:])
    # lokr
    shapes = []
    rank = None
    for factor in ("lokr_w1", "lokr_w2"):
        if factor in t:
            need(t[factor].dim() >= 2, f"{factor} must be at least 2-D")
            shapes.append(tuple(t[factor].shape))
            continue
        a, b = t[f"{factor}_a"], t[f"{factor}_b"]
        core = t.get("lokr_t2") if factor == "lokr_w2" else None
        if core is not None:
            need(a.dim() == 2 and b.dim() == 2 and tuple(core.shape[:2]) == (a.shape[0], b.shape[0]),
                 "LoKr Tucker core and factor ranks differ")
            shapes.append((a.shape[1], b.shape[1], *core.shape[2:]))
        else:
            need(a.dim() == 2 and a.shape[1] == b.shape[0], f"{factor}_a/_b rank mismatch")
            shapes.append((a.shape[0], *b.shape[1:]))
        rank = int(b.shape[0]) if rank is None or factor == "lokr_w1" else rank
    (s1, s2) = shapes
    need(len(s1) == 2, "lokr_w1 must be 2-D")
    return (rank or 1), (s1[0] * s2[0], s1[1] * s2[1], *s2[2:])


# ---------------------------------------------------------------------------------------------- replacing


def replace_factors(
    lora: LoraFile,
    new: Mapping[str, tuple[Tensor, Tensor]],
    *,
    weight_shapes: Mapping[str, tuple[int, ...]] | None = None,
    keep_alpha: bool = False,
) -> LoraFile:
    """A copy of `lora` whose modules in `new` carry the factors new[name] = (B [out, r'], A [r', in*kh*kw]).

    The new alpha keeps each module's scale (alpha' = scale * r', or scale * sqrt(r') for rsLoRA), so
    scale * B @ A is the update the file applies; an absent alpha stays absent when alpha' == r'. This is
    what kohya's resize_lora does, and gives per-module alphas when ranks differ ("Dynamic").
    `keep_alpha=True` instead keeps every stored alpha as it is and folds the scale change into B
    (B' = B * old scale / new scale), so the file applies the same update with its original, uniform alphas:
    diffusers (0.42) misreads per-module alphas of kohya attention modules, and loads such files right only
    this way. Whole-factor LoKr modules, whose alpha LyCORIS ignores, always get the scale-keeping alpha. A rank of 0
    (every channel removed) is written as rank-1 zero factors, which every loader accepts and which change
    nothing. Tucker, LoHa and LoKr modules become plain lora/locon modules under the same module name.
    `weight_shapes` gives the base weight's shape for LoHa/LoKr modules, whose files do not record a conv kernel
    (other kinds keep the layout they were stored in, so a 2-D LoRA on a 1x1 conv stays 2-D);
    4-D shapes are written as a k x k down and a 1 x 1 up. Modules not in `new` are untouched.
    """
    unknown = sorted(set(new) - set(lora.modules))
    if unknown:
        raise KeyError(f"modules not in {lora.path}: {unknown[:5]}")
    modules = dict(lora.modules)
    for name, (b, a) in new.items():
        module = lora.modules[name]
        # Only LoHa/LoKr files can lose a conv kernel; every other kind keeps the factor layout it was stored in.
        given = (weight_shapes or {}).get(name) if module.kind in ("loha", "lokr") else None
        shape = tuple(given) if given is not None else module.weight_shape
        modules[name] = module_with_factors(module, b, a, shape, lora, name, keep_alpha)
    return dataclasses.replace(lora, modules=modules)


def module_with_factors(
    module: LoraModule, b: Tensor, a: Tensor, shape: tuple[int, ...], lora: LoraFile, name: str,
    keep_alpha: bool = False,
) -> LoraModule:
    """`module` rewritten as a lora/locon module whose update is module.scale * b @ a (see `replace_factors`)."""
    out, fan_in = shape[0], math.prod(shape[1:])
    if math.prod(shape) != math.prod(module.weight_shape):
        raise ValueError(f"{name}: weight shape {shape} does not fit the module's {module.weight_shape}")
    if b.dim() != 2 or a.dim() != 2 or b.shape[0] != out or a.shape[1] != fan_in or b.shape[1] != a.shape[0]:
        raise ValueError(f"{name}: factors {tuple(b.shape)} @ {tuple(a.shape)} do not give a {shape} update")
    if b.shape[1] == 0:
        b, a = b.new_zeros(out, 1), a.new_zeros(1, fan_in)
    rank = int(b.shape[1])
    old_alpha = module.tensors.get("alpha")
    whole_lokr = module.kind == "lokr" and {"lokr_w1", "lokr_w2"} <= module.tensors.keys()
    if keep_alpha and not whole_lokr:
        # A missing or zero alpha means "alpha = rank" at the new rank too.
        follows_rank = not module.alpha_stored or (old_alpha is not None and float(old_alpha.float().sum()) == 0)
        alpha = float(rank) if follows_rank else module.alpha
        scale = lora_math.lora_scale(alpha, rank, module.rslora)
        if scale != module.scale:
            b = b * (module.scale / scale)
        alpha_stored = module.alpha_stored
    else:
        alpha, scale = lora_math.alpha_keeping_scale(module.scale, rank, module.rslora), module.scale
        alpha_stored = module.alpha_stored or alpha != rank
    dtype = module.dtype
    conv = len(shape) == 4
    b, a = b.detach().to("cpu", dtype), a.detach().to("cpu", dtype)
    up = b.reshape(out, rank, 1, 1) if conv else b
    down = a.reshape(rank, *shape[1:]) if conv else a
    tensors = {"up": up.contiguous(), "down": down.contiguous()}
    keys = {role: lora_keys.key_for(name, role, lora.format) for role in ("up", "down")}
    if "dora_scale" in module.tensors:
        tensors["dora_scale"], keys["dora_scale"] = module.tensors["dora_scale"], module.keys["dora_scale"]
    if alpha_stored and ("alpha" in module.tensors or lora.format in ("kohya", "diffusers_old")):
        keep = keep_alpha and not whole_lokr and old_alpha is not None
        tensors["alpha"] = old_alpha if keep else alpha_tensor(alpha, old_alpha)
        keys["alpha"] = module.keys.get("alpha", lora_keys.key_for(name, "alpha", lora.format))
    return dataclasses.replace(
        module, kind="locon" if conv else "lora", tensors=tensors, keys=keys, rank=rank, alpha=alpha,
        alpha_stored=alpha_stored, scale=scale, weight_shape=shape,
    )


def alpha_tensor(alpha: float, like: Tensor | None) -> Tensor:
    """An alpha tensor shaped and typed like the file's own, in float32 when its dtype cannot hold `alpha`."""
    shape = tuple(like.shape) if like is not None else ()
    dtype = like.dtype if like is not None and like.is_floating_point() else torch.float32
    value = torch.tensor(alpha, dtype=dtype)
    if float(value) != alpha:
        value = torch.tensor(alpha, dtype=torch.float32)
    return value.reshape(shape)


# ------------------------------------------------------------------------------------------------ writing


def write_lora(
    lora: LoraFile,
    path: str | Path,
    *,
    provenance: Mapping[str, str] = {},
    protect: tuple[str | Path, ...] = (),
) -> Path:
    """Write `lora` in its own format and key naming, atomically and with deterministic bytes.

    Every metadata key diffmem does not own is kept. Updated: `ss_network_dim` (the common rank, or "Dynamic"
    as kohya's resize_lora writes), `ss_network_alpha` (the common alpha, or "Dynamic"), `sshs_model_hash`/
    `sshs_legacy_hash` (recomputed when the input had them or has any `ss_*` key), PEFT `r`/`lora_alpha`/
    `rank_pattern`/`alpha_pattern` (adapter_config.json or `lora_adapter_metadata`) when the modules no longer
    match them. `provenance` keys are added to the header. The input file and every path in `protect` are
    never written over. A PEFT adapter is written as a folder (through a temporary folder and a rename).
    """
    path = Path(path)
    bad = [k for k, v in provenance.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"provenance keys and values must be strings: {bad[:3]}")
    protected = (*protect, *((lora.path,) if lora.path is not None else ()))
    refuse_overwriting(path, protected)
    tensors = dict(lora.other)
    for module in lora.modules.values():
        for role, tensor in module.tensors.items():
            tensors[module.keys[role]] = tensor
    metadata = dict(lora.metadata)
    config = None if lora.adapter_config is None else json.loads(json.dumps(lora.adapter_config))
    if lora.format == "diffusers" and config is not None:
        updated = updated_diffusers_metadata(config, lora.modules)
        if updated != config:  # an unchanged header keeps its own formatting
            metadata[DIFFUSERS_METADATA] = json.dumps(updated, indent=2, sort_keys=True)
    if lora.format == "peft":
        config = updated_peft_config(config or {}, list(lora.modules.values()), "peft")
    update_kohya_metadata(metadata, list(lora.modules.values()))
    metadata.update(provenance)
    refuse_non_finite(tensors, lora.path)
    laid_out = TensorBytes.of(tensors)  # once: kohya's hashes and the file share the data bytes
    if lora.metadata.keys() & {"sshs_model_hash", "sshs_legacy_hash"} or any(k.startswith("ss_") for k in metadata):
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = addnet_hashes(laid_out, metadata)
    data = laid_out.with_metadata(metadata)
    if lora.format == "peft":
        return write_peft_folder(data, config, path, protected)
    return write_atomic(data, path, protect=protected)


def refuse_non_finite(tensors: Mapping[str, Tensor], source: Path | None) -> None:
    """Raise rather than write a NaN or Inf: a front-end would load it silently and render black images. An alpha
    too large for the factors' dtype (1e300 in a float16 LoRA) is how a finite input gets here."""
    for key, tensor in tensors.items():
        try:
            check_finite(tensor, key, source)
        except BadWeightsError:
            raise BadWeightsError(f"refusing to write {key!r}: its values would not be finite (an alpha or scale too "
                                  f"large for {str(tensor.dtype).removeprefix('torch.')}?)", source) from None


def update_kohya_metadata(metadata: dict[str, str], modules: list[LoraModule]) -> None:
    """Set `ss_network_dim`/`ss_network_alpha` to the modules' common rank/alpha, or "Dynamic", when present."""
    if not modules:
        return
    if "ss_network_dim" in metadata:
        ranks = {m.rank for m in modules}
        metadata["ss_network_dim"] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    if "ss_network_alpha" in metadata:
        alphas = {m.alpha for m in modules}
        if len(alphas) == 1:
            value = alphas.pop()
            metadata["ss_network_alpha"] = format_number(value, like=metadata["ss_network_alpha"])
        else:
            metadata["ss_network_alpha"] = "Dynamic"


def format_number(value: float, like: str) -> str:
    """`value` written the way the file wrote the number it replaces ("16" or "16.0")."""
    if value == int(value) and "." not in like and "e" not in like.lower():
        return str(int(value))
    return repr(float(value))


def updated_diffusers_metadata(config: dict, modules: Mapping[str, LoraModule]) -> dict:
    """`lora_adapter_metadata` with each component's LoraConfig fields brought in line with its modules."""
    by_component: dict[str | None, list[LoraModule]] = collections.defaultdict(list)
    for name, module in modules.items():
        by_component[lora_keys.component_of(name, "diffusers")].append(module)
    result = dict(config)
    for component, members in by_component.items():
        scoped = component_config(config, component)
        if not scoped:
            continue
        prefixed = any(k.startswith(f"{component}.") for k in config)
        updated = updated_peft_config(scoped, members, "diffusers")
        if prefixed:
            result.update({f"{component}.{k}": v for k, v in updated.items()})
        else:
            result = updated
    return result


def updated_peft_config(config: dict, modules: list[LoraModule], fmt: str) -> dict:
    """A PEFT LoraConfig dict whose r/lora_alpha/rank_pattern/alpha_pattern give every module its rank and
    alpha; returned unchanged when they already do (so an untouched adapter keeps its own patterns)."""
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    default_r, default_alpha = config.get("r", 8), config.get("lora_alpha", 8)
    needs = {
        lora_keys.peft_path(m.name, fmt): (m.rank, None if "alpha" in m.tensors else m.alpha) for m in modules
    }
    current = {
        path: (lora_keys.pattern_value(rank_pattern, path, default_r),
               lora_keys.pattern_value(alpha_pattern, path, default_alpha))
        for path in needs
    }
    if all(current[p][0] == r and (a is None or float(current[p][1]) == a) for p, (r, a) in needs.items()):
        return config
    r = collections.Counter(rank for rank, _ in needs.values()).most_common(1)[0][0]
    alphas = [alpha for _, alpha in needs.values() if alpha is not None]
    lora_alpha = collections.Counter(alphas).most_common(1)[0][0] if alphas else default_alpha
    updated = dict(config)
    updated["r"] = r
    updated["lora_alpha"] = int(lora_alpha) if float(lora_alpha).is_integer() else lora_alpha
    # "^" anchors the pattern at the start of the module path, as diffusers writes rank patterns.
    updated["rank_pattern"] = {f"^{p}": rank for p, (rank, _) in needs.items() if rank != r}
    updated["alpha_pattern"] = {
        f"^{p}": (int(a) if a.is_integer() else a) for p, (_, a) in needs.items() if a is not None and a != lora_alpha
    }
    return updated


def write_peft_folder(data: bytes, config: dict, path: Path, protected: tuple[str | Path, ...]) -> Path:
    """Write a PEFT adapter folder (weights + adapter_config.json) through a temporary folder and a rename."""
    for other in protected:
        if path.resolve() in Path(other).resolve().parents:
            raise DiffmemError(f"refusing to write over the folder of the input {other}; choose another folder", path)
    if path.exists() and not path.is_dir():
        raise DiffmemError("a PEFT adapter is written as a folder, but this path is a file", path)
    if path.exists() and not {p.name for p in path.iterdir()} <= {PEFT_WEIGHTS, PEFT_CONFIG}:
        raise DiffmemError("the output folder exists and holds files other than a PEFT adapter's; "
                           "choose a new or adapter-only folder", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path)
    staging = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes the folder private; an adapter folder is an ordinary folder
    try:
        write_atomic(data, staging / PEFT_WEIGHTS)
        config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        write_atomic(config_text.encode(), staging / PEFT_CONFIG)
        if path.exists():
            # A folder cannot be renamed over a non-empty one: swap the old one aside, then drop it.
            retired = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".old", dir=path.parent))
            os.replace(path, retired / path.name)
            os.replace(staging, path)
            shutil.rmtree(retired)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path
