"""Merge a LoRA of any format diffmem reads into loaded model components (a diffusers pipeline's UNet or
transformer and text encoders), with the same name maps the filter uses.

`diffmem.formats.base` maps every LoRA naming (kohya, diffusers, PEFT, LyCORIS, the BFL/SAI fused names of Flux
and SD3) to `Target`s: row ranges of base tensors keyed `component.<state-dict key>` when the base is in diffusers
naming. A loaded pipeline *is* a base in diffusers naming, so its modules' state dicts are wrapped as one
`BaseCheckpoint` and each LoRA module's dense update is added to the rows its target names. This reaches what
`pipe.load_lora_weights` refuses (LoHa, LoKr, Tucker, DoRA-free LyCORIS files, unprefixed PEFT folders) and gives
the same clear mismatch errors as `diffmem filter`, whatever file the pipeline was loaded from.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from diffmem.errors import FileFormatError
from diffmem.formats.base import (
    BaseCheckpoint,
    TensorStore,
    assemble,
    diffusers_component,
    resolve_lora_targets,
)
from diffmem.formats.lora import LoraFile, read_lora

#: Pipeline attributes whose weights a LoRA may update, in diffusers' own component names.
LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


class StateDictReader:
    """The reading interface of `SafetensorsFile` over a module's in-memory state dict (no copy)."""

    def __init__(self, module: torch.nn.Module, path: Path) -> None:
        self.path = path
        self.tensors = {k: v for k, v in module.state_dict(keep_vars=False).items() if isinstance(v, torch.Tensor)}

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)


def module_checkpoint(components: Mapping[str, torch.nn.Module], name: str | Path = "pipeline") -> BaseCheckpoint:
    """A `BaseCheckpoint` in diffusers naming over loaded components {"unet" | "transformer" | "text_encoder*": module}.

    Its tensors are the modules' own parameters, so writing into `weight` targets changes the model."""
    path = Path(name)
    store = TensorStore()
    parts = []
    hidden_act = None
    for component, module in components.items():
        reader = StateDictReader(module, path)
        store.add(reader, f"{component}.")
        part = diffusers_component(component, reader)
        if part is None:
            raise FileFormatError(f"the {component} of this model is not a UNet or transformer diffmem knows", path)
        parts.append(part)
        if component == "text_encoder":
            hidden_act = getattr(getattr(module, "config", None), "hidden_act", None)
    return assemble(path, parts, store, "diffusers_folder", hidden_act)


def pipeline_components(pipe: object) -> dict[str, torch.nn.Module]:
    """The components of a diffusers pipeline that LoRAs update (`LORA_COMPONENTS` it has)."""
    return {name: module for name in LORA_COMPONENTS
            if isinstance(module := getattr(pipe, name, None), torch.nn.Module)}


@torch.no_grad()
def merge_lora(
    components: Mapping[str, torch.nn.Module],
    lora: str | Path | LoraFile,
    scale: float = 1.0,
    *,
    skip_unmapped: bool = False,
    name: str | Path = "pipeline",
) -> int:
    """Add `scale` times every module of `lora` (a file in any format `read_lora` reads, or a `LoraFile`) to the
    weights of `components`, in place; returns the number of LoRA modules merged.

    A LoRA for another model is a `BaseMismatchError` naming the LoRA, before any weight changes. With
    `skip_unmapped`, modules that name no weight of the model are left out (as `diffmem filter --skip-unmapped`)."""
    lora = lora if isinstance(lora, LoraFile) else read_lora(lora)
    base = module_checkpoint(components, name)
    targets = resolve_lora_targets(lora, base, skip_unmapped=skip_unmapped)
    for key, target in targets.items():
        delta = lora.modules[key].delta().reshape(target.shape)
        row = 0
        for tensor_key, start, end in target.parts:
            reader, inner = base.store.entries[tensor_key]
            weight = reader[inner]  # the module's own parameter: the store wraps the live state dict
            rows = delta[row : row + end - start].reshape(weight[start:end].shape)
            weight[start:end] += scale * rows.to(weight.device, weight.dtype)
            row += end - start
    return len(targets)
