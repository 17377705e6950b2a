"""What the pruning mitigations (NeMo, Wanda) share: weight masks that say exactly which entries they zero,
applying them to a copy of a model, storing them in a file, recording layer inputs and outputs with hooks, and
turning what the callers pass (a backend or a bare world UNet, a LoRA) into the backend the methods run on.

A mask is ``{parameter name: bool tensor of the parameter's shape}``, True where the weight is set to zero, keyed
by the parameter names of the backend's `denoiser` (the UNet; for Flux the `FluxDenoiser` wrapper, so names start
with "transformer."). It is the report of what a method changed: applying it changes those entries and no other.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from diffmem.backends import Backend, Conditioning, as_backend
from diffmem.errors import BaseMismatchError, DiffmemError, FileFormatError
from diffmem.formats.safetensors_io import load_file, save_file

WeightMasks = dict[str, torch.Tensor]

#: Metadata key naming the method that wrote a mask file.
METHOD_KEY = "diffmem_mitigation"
#: Metadata key naming the model family ("world", "sd1", "sd2", "sdxl", "flux", "sd3") a mask file was made for.
FAMILY_KEY = "diffmem_family"


def masked_count(masks: Mapping[str, torch.Tensor]) -> int:
    """Number of weight entries a mask zeroes."""
    return sum(int(mask.sum()) for mask in masks.values())


def zero_masked(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`weight` with the entries where `mask` is True set to zero (a new tensor)."""
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
    return weight.masked_fill(mask.to(device=weight.device, dtype=torch.bool), 0)


def random_like(mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random mask with the structure of `mask`, as a control: as many whole rows zeroed when `mask` zeroes whole
    rows (NeMo's neurons), otherwise as many entries zeroed in every row (Wanda's per-row pruning)."""
    rows = mask.reshape(mask.shape[0], -1)
    if bool((rows.any(dim=1) == rows.all(dim=1)).all()):
        return mask[torch.randperm(mask.shape[0], generator=generator)]
    ranks = torch.rand(rows.shape, generator=generator).argsort(dim=1).argsort(dim=1)
    return (ranks < rows.sum(dim=1, keepdim=True)).reshape(mask.shape)


def random_masks(masks: Mapping[str, torch.Tensor], seed: int) -> WeightMasks:
    """`random_like` for every mask; a weight and its bias get the same random rows."""
    permuted = {}
    for name in sorted(masks):
        layer = name.rsplit(".", 1)[0]
        generator = torch.Generator().manual_seed(seed + sum(map(ord, layer)))
        permuted[name] = random_like(masks[name], generator)
    return permuted


def check_masks_fit(model: torch.nn.Module, masks: Mapping[str, torch.Tensor], path: str | Path | None = None) -> None:
    """Raise `BaseMismatchError` when a mask names a parameter the model lacks or has another shape."""
    parameters = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in parameters:
            raise BaseMismatchError(f"the mask prunes {name!r}, which this model does not have", path)
        if tuple(mask.shape) != tuple(parameters[name].shape):
            raise BaseMismatchError(
                f"the mask for {name!r} is {tuple(mask.shape)} but the model's parameter is "
                f"{tuple(parameters[name].shape)}: the mask was made for another model", path)


def apply_masks(model: torch.nn.Module, masks: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of `model` with the masked weights zeroed; `model` itself is untouched."""
    check_masks_fit(model, masks)
    pruned = copy.deepcopy(model)
    parameters = dict(pruned.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            parameters[name].copy_(zero_masked(parameters[name], mask))
    return pruned


def save_masks(masks: Mapping[str, torch.Tensor], path: str | Path, method: str, report: Mapping,
               protect: tuple[str | Path, ...] = (), family: str | None = None) -> Path:
    """Write masks as a safetensors file of uint8 tensors (1 = zeroed), with the method, the model family it was
    made for (when given: parameter names alone do not say which model a mask fits) and its report (JSON) in the
    metadata; atomic, and never over one of the `protect` input files."""
    tensors = {name: mask.to(torch.uint8).contiguous() for name, mask in masks.items()}
    metadata = {METHOD_KEY: method, "diffmem_report": json.dumps(report, sort_keys=True)}
    if family is not None:
        metadata[FAMILY_KEY] = family
    return save_file(tensors, path, metadata, protect=protect)


def load_masks(path: str | Path) -> tuple[WeightMasks, str, dict]:
    """(masks, method, report) of a file written by `save_masks`."""
    tensors, metadata = load_file(path)
    if METHOD_KEY not in metadata:
        raise FileFormatError(f"has no `{METHOD_KEY}` metadata: not a pruning mask written by diffmem", path)
    masks = {}
    for name, tensor in tensors.items():
        if tensor.dtype != torch.uint8 or bool((tensor > 1).any()):
            raise FileFormatError(f"mask {name!r} must hold only 0 and 1 as uint8, got {tensor.dtype}", path)
        masks[name] = tensor.bool()
    try:
        report = json.loads(metadata.get("diffmem_report", "{}"))
    except json.JSONDecodeError as error:
        raise FileFormatError(f"the `diffmem_report` metadata is not valid JSON ({error})", path) from None
    return masks, metadata[METHOD_KEY], report


def modules_matching(model: torch.nn.Module, accept: Callable[[str, torch.nn.Module], bool]) -> dict[str, torch.nn.Linear]:
    """{path: module} of the Linear layers of `model` that `accept(path, module)` picks, in model order."""
    return {path: module for path, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and accept(path, module)}


@contextlib.contextmanager
def forward_hooks(modules: Mapping[str, torch.nn.Module], make_hook: Callable[[str], Callable]) -> Iterator[None]:
    """Register `make_hook(path)` as a forward hook on every module for the duration of the block."""
    handles = [module.register_forward_hook(make_hook(path)) for path, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------------- models
def conditioning_of(states: Conditioning | torch.Tensor) -> Conditioning:
    """A conditioning as given; text-encoder states alone [N, L, D] as the conditioning of the world or SD 1.x/2.x
    (what the methods' callers passed before backends existed)."""
    return states if isinstance(states, Conditioning) else Conditioning(states)


def mitigation_backend(model: Backend | UNet2DConditionModel, lora=None) -> Backend:
    """The backend a method runs on: `model` itself, or a bare world UNet as the world backend; `lora` (a file or
    `LoraFile`) merged into a copy of a world model first. A pipeline's LoRA is merged when it is opened
    (`diffmem.backends.open_backend(base, lora)`), so one given here is refused rather than silently ignored."""
    backend = as_backend(model)
    if lora is None:
        return backend
    if backend.family != "world":
        raise DiffmemError(f"the lora argument merges into world models only; open the {backend.family} pipeline "
                           "with its LoRA merged instead (diffmem.backends.open_backend(base, lora))")
    from diffmem.backends.world import WorldBackend
    from diffmem.world.lora import apply_lora

    return WorldBackend(apply_lora(backend.denoiser, lora), backend.name)


def masked_backend(backend: Backend, masks: Mapping[str, torch.Tensor]) -> Backend:
    """A shallow copy of `backend` whose denoiser is a pruned copy (`apply_masks`); `backend` is untouched.

    Only the denoiser is copied: the text encoders and the VAE, most of a pipeline's memory besides it, are shared,
    as the masks never touch them. diffmem's methods reach the network only through `backend.denoiser`, so the copy
    samples, scores and trains pruned; the diffusers pipeline object inside (`backend.pipe`) still holds the
    unpruned network."""
    pruned = copy.copy(backend)
    pruned.denoiser = apply_masks(backend.denoiser, masks)
    return pruned


def mitigated_output(model: Backend | UNet2DConditionModel, backend: Backend, masks: Mapping[str, torch.Tensor],
                     apply: bool | None) -> Backend | UNet2DConditionModel | None:
    """What `nemo_mitigate` and `wanda_mitigate` return as the mitigated model: for a bare UNet a pruned copy of it
    (the world callers' contract); for a backend a pruned `masked_backend`. `apply=None` prunes a copy of the world
    (small) and not of a pipeline (gigabytes; the masks are the result, `masked_backend` applies them when
    needed): None is returned then."""
    if apply is None:
        apply = backend.family == "world"
    if not apply:
        return None
    return masked_backend(backend, masks) if isinstance(model, Backend) else apply_masks(backend.denoiser, masks)
