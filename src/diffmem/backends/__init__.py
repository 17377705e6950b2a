"""Backends: every text-to-image model diffmem's methods run on, behind one interface (`Backend`).

- `base`: the `Backend` interface and `Conditioning`, shared sampling and layer lookups;
- `world`: the embedded world (its own sampler and loss, so world results are unchanged);
- `stable_diffusion`: Stable Diffusion 1.x/2.x and SDXL pipelines, and loading any supported pipeline;
- `flux`: Flux pipelines (the transformer behind the UNet call signature, flow matching);
- `sd3`: Stable Diffusion 3 / 3.5 pipelines (likewise, with classifier-free guidance);
- `flow_matching`: what Flux and SD3 share (the sampler's interface, the VAE's shift, the loss, the value layers).

`open_backend(base, lora)` opens whichever one `base` names. docs/backends.md: which command runs on which backend,
and how to add one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffmem.backends.base import Backend, Conditioning
from diffmem.backends.flux import FluxBackend
from diffmem.backends.sd3 import SD3Backend
from diffmem.backends.stable_diffusion import StableDiffusionBackend, load_pipeline, pipeline_family
from diffmem.backends.world import WorldBackend, is_world_base, is_world_file, world_backend
from diffmem.errors import DiffmemError
from diffmem.formats.merge import merge_lora, pipeline_components

__all__ = ["DTYPES", "Backend", "Conditioning", "as_backend", "is_world_base", "is_world_file", "open_backend", "parse_dtype", "pipeline_backend"]

#: The `--dtype` names as torch dtypes.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    """A `--dtype` name ("float32", "float16", "bfloat16") as a torch dtype."""
    if name not in DTYPES:
        raise DiffmemError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def as_backend(model: Backend | torch.nn.Module) -> Backend:
    """A backend as given; a bare world UNet (what the library's world functions take) as the world backend
    around it."""
    return model if isinstance(model, Backend) else WorldBackend(model)


def check_device(device: str) -> None:
    """A clear error for a `--device` that is not a torch device, or one this torch build or machine lacks."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise DiffmemError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise DiffmemError(f"--device {device}: this torch has no usable CUDA device "
                           f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'})")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise DiffmemError(f"--device {device}: the MPS backend is not available on this machine")


def open_backend(
    base: str | Path | None = None,
    lora: str | Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: str | Path | None = None,
) -> Backend:
    """The model `base` names, with `lora` (any format diffmem reads) merged into its weights:

    - None, "world" or a world UNet file: the embedded world (`world_backend`; float32 on its device);
    - a diffusers pipeline folder or a single-file checkpoint (`config`: a diffusers folder of the same
      architecture, for single files): SD 1.x/2.x, SDXL, Flux or SD3, loaded offline in `dtype` on `device`.

    A LoRA for another model is refused in one line before any weight changes (`diffmem.formats.merge`), and so is
    a device this torch cannot use, before anything is loaded."""
    check_device(device)
    if is_world_base(base):
        return world_backend(base, lora, device)
    path = Path(base)
    family = pipeline_family(path) if path.exists() else None
    pipe = load_pipeline(path, dtype, config)
    name = path.name
    if lora is not None:
        lora = Path(lora)
        if not lora.is_file():
            raise DiffmemError("no such LoRA file", lora)
        # diffmem's own merge: every format `diffmem filter` reads (LyCORIS LoHa/LoKr included, which diffusers'
        # load_lora_weights refuses), with the filter's base-mismatch errors.
        merge_lora(pipeline_components(pipe), lora, name=path)
        name += f" + {lora.name}"
    return pipeline_backend(pipe.to(device), name, family)


def pipeline_backend(pipe, name: str, family: str) -> Backend:
    """A loaded diffusers pipeline of `family` ("sd1", "sd2", "sdxl", "flux", "sd3") as its `Backend`, with the
    pipeline's own progress bars off. The backend keeps `pipe`, so a LoRA loaded into it afterwards (diffusers'
    `load_lora_weights`, as `bench-real` does) acts on the backend's denoiser too."""
    pipe.set_progress_bar_config(disable=True)
    if family == "flux":
        return FluxBackend(pipe, name)
    if family == "sd3":
        return SD3Backend(pipe, name)
    return StableDiffusionBackend(pipe, name, family)
