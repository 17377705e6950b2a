"""MemControl's search space: a binary mask over a UNet's attention modules (Dutt et al. 2025, sec. 4.1).

The entries are read off the model, never hard-coded. Every `Transformer2DModel` of a diffusers
`UNet2DConditionModel` sits at `down_blocks.N.attentions.M`, `mid_block.attentions.M` or `up_blocks.N.attentions.M`.

- granularity "layers": one entry per attention module. Stable Diffusion 1.x has 16 (6 down, 1 mid, 9 up): the
  seed's search space for attention tuning.
- granularity "blocks": one entry per attention module of the down and mid blocks, and `layers_per_block` entries
  per up block, so that each entry of the way down has its mirror on the way up. SD 1.x has 13 (6 down, 1 mid,
  6 up): the seed's search space for SV-DIFF and DiffFit. An up block holds `layers_per_block + 1` attention
  modules (the extra one follows the skip from the down block's resampler); it joins the block's last entry.
  The seed's code left that module out of the mask and trained it always; here every attention module is under
  the mask, so a masked-out entry trains nothing.

On the diffmem world (attention at 16 and 8 pixels only, one layer per block) "blocks" gives 5 entries and
"layers" 7.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffmem.errors import DiffmemError, FileFormatError
from diffmem.formats.safetensors_io import write_atomic
from diffmem.memcontrol.settings import GRANULARITIES

MASK_FORMAT = "diffmem-memcontrol-mask"
MASK_VERSION = 1
ATTENTION_PATH = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)|mid_block\.attentions\.(\d+)")


@dataclass(frozen=True)
class MaskEntry:
    """One switch of the mask: a name (its first attention module) and the attention modules it covers."""

    name: str
    modules: tuple[str, ...]


@dataclass(frozen=True)
class Mask:
    """Which entries train. `train[i]` switches `entries[i]`; the entries come from `mask_entries`."""

    granularity: str
    entries: tuple[MaskEntry, ...]
    train: tuple[bool, ...]

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise DiffmemError(f"unknown mask granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        if len(self.train) != len(self.entries):
            raise DiffmemError(f"mask has {len(self.entries)} entries but {len(self.train)} switches")

    @property
    def modules(self) -> list[str]:
        """Attention modules (dotted paths) whose entry is switched on."""
        return [m for entry, on in zip(self.entries, self.train) if on for m in entry.modules]

    @property
    def bits(self) -> str:
        """The switches as a string of 0 and 1, in entry order (down, mid, up)."""
        return "".join("1" if on else "0" for on in self.train)

    def with_train(self, train: Sequence[bool]) -> Mask:
        """The same entries with other switches."""
        return Mask(self.granularity, self.entries, tuple(bool(t) for t in train))


def attention_modules(unet: torch.nn.Module) -> list[str]:
    """Paths of the UNet's attention modules, ordered down blocks, mid block, up blocks (the data's path)."""

    def order(path: str) -> tuple[int, int, int]:
        match = ATTENTION_PATH.fullmatch(path)
        if match.group(4) is not None:
            return (1, 0, int(match.group(4)))
        return (0 if match.group(1) == "down_blocks" else 2, int(match.group(2)), int(match.group(3)))

    found = [name for name, _ in unet.named_modules() if ATTENTION_PATH.fullmatch(name)]
    return sorted(found, key=order)


def layers_per_block(unet: torch.nn.Module, up_block: int) -> int:
    """`layers_per_block` of the down block that up block `up_block` mirrors (diffusers allows one per block)."""
    value = unet.config.layers_per_block
    if isinstance(value, int):
        return value
    return list(reversed(value))[up_block]


def mask_entries(unet: torch.nn.Module, granularity: str = "blocks") -> list[MaskEntry]:
    """The mask's entries for this UNet at `granularity` ("blocks" or "layers"; see the module docstring)."""
    if granularity not in GRANULARITIES:
        raise DiffmemError(f"unknown mask granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    paths = attention_modules(unet)
    if not paths:
        raise DiffmemError("the model has no attention modules under down_blocks/mid_block/up_blocks: "
                           "not a diffusers UNet2DConditionModel with cross-attention blocks")
    if granularity == "layers":
        return [MaskEntry(p, (p,)) for p in paths]
    entries: list[MaskEntry] = []
    by_up_block: dict[int, list[str]] = {}
    for path in paths:
        match = ATTENTION_PATH.fullmatch(path)
        if match.group(1) == "up_blocks":
            by_up_block.setdefault(int(match.group(2)), []).append(path)
        else:
            entries.append(MaskEntry(path, (path,)))
    for block, members in sorted(by_up_block.items()):
        switches = max(1, min(len(members), layers_per_block(unet, block)))
        groups = [[m] for m in members[:switches]]
        groups[-1].extend(members[switches:])
        entries.extend(MaskEntry(group[0], tuple(group)) for group in groups)
    return entries


def derive_mask(unet: torch.nn.Module, granularity: str = "blocks", train: Sequence[bool] | str | None = None) -> Mask:
    """A mask over this UNet's entries; `train` as booleans or a "0101..." string, all on by default."""
    entries = tuple(mask_entries(unet, granularity))
    if train is None:
        switches = (True,) * len(entries)
    elif isinstance(train, str):
        if set(train) - {"0", "1"}:
            raise DiffmemError(f"mask bits must be 0s and 1s, got {train!r}")
        switches = tuple(bit == "1" for bit in train)
    else:
        switches = tuple(bool(t) for t in train)
    if len(switches) != len(entries):
        raise DiffmemError(f"this UNet has {len(entries)} {granularity} entries, got {len(switches)} switches")
    return Mask(granularity, entries, switches)


def mask_to_dict(mask: Mask) -> dict:
    """The JSON form of a mask."""
    return {
        "format": MASK_FORMAT,
        "version": MASK_VERSION,
        "granularity": mask.granularity,
        "bits": mask.bits,
        "entries": [{"name": e.name, "modules": list(e.modules), "train": on} for e, on in zip(mask.entries, mask.train)],
    }


def save_mask(mask: Mask, path: str | Path, extra: dict | None = None) -> Path:
    """Write a mask as JSON (atomically); `extra` adds fields such as the search that chose it."""
    record = {**mask_to_dict(mask), **(extra or {})}
    return write_atomic((json.dumps(record, indent=2) + "\n").encode(), path)


def load_mask(path: str | Path) -> Mask:
    """Read a mask written by `save_mask`; anything else is a `FileFormatError` naming the file."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise DiffmemError("mask file not found", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FileFormatError(f"not a JSON mask file ({error})", path) from None
    if not isinstance(record, dict) or record.get("format") != MASK_FORMAT:
        raise FileFormatError(f"not a MemControl mask: `format` must be {MASK_FORMAT!r}", path)
    if record.get("version") != MASK_VERSION:
        raise FileFormatError(f"mask version {record.get('version')!r} is not supported (expected {MASK_VERSION})", path)
    try:
        entries = tuple(MaskEntry(str(e["name"]), tuple(str(m) for m in e["modules"])) for e in record["entries"])
        train = tuple(bool(e["train"]) for e in record["entries"])
        return Mask(str(record["granularity"]), entries, train)
    except (KeyError, TypeError) as error:
        raise FileFormatError(f"mask entry lacks a field or has the wrong type ({error!r})", path) from None
    except DiffmemError as error:
        raise FileFormatError(error.problem, path) from None


def check_mask_fits(mask: Mask, unet: torch.nn.Module, path: str | Path | None = None) -> None:
    """Refuse a mask whose entries are not the ones this UNet gives (a mask for another architecture)."""
    expected = tuple(mask_entries(unet, mask.granularity))
    if expected != mask.entries:
        names = [e.name for e in expected]
        raise DiffmemError(
            f"the mask's {len(mask.entries)} {mask.granularity} entries do not match this UNet's {len(expected)} "
            f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})",
            path,
        )
