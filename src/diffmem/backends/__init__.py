"""Backends: every text-to-image model diffmem's methods run on, behind one interface (`Backend`).

- `base`: the `Backend` interface and `Conditioning`, shared sampling and layer lookups;
- `world`: the embedded world (its own sampler and loss, so world results are unchanged);
- `stable_diffusion`: Stable Diffusion 1.x/2.x and SDXL pipelines, and loading any supported pipeline;
- `flux`: Flux pipelines (the transformer behind the UNet call signature, flow matching);
- `sd3`: Stable Diffusion 3 / 3.5 pipelines (likewise, with classifier-free guidance);
- `flow_matching`: what Flux and SD3 share (the sampler's interface, the VAE's shift, the loss, the value layers).

`open_backend(base, lora)` opens whichever one `base` names. docs/backends.md: which command runs on which backend,
and how to add one.

The model modules are imported when first used, not with this package: the world pulls in diffusers' UNet and the
world's text encoder, a pipeline all of diffusers, and a command's `--help` or a usage error needs neither
(`diffmem scan --help` would otherwise wait seconds for them). `backends.FluxBackend` and the other names below
work as attributes all the same.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffmem.backends.base import Backend, Conditioning
from diffmem.backends.naming import is_world_base, is_world_file
from diffmem.errors import DiffmemError
from diffmem.formats.merge import merge_lora, pipeline_components
from diffmem.lazy import lazy_names

__all__ = ["DTYPES", "Backend", "Conditioning", "FluxBackend", "SD3Backend", "StableDiffusionBackend", "WorldBackend",
           "as_backend", "is_world_base", "is_world_file", "load_pipeline", "open_backend", "parse_dtype",
           "pipeline_backend", "pipeline_family", "world_backend"]

#: The names this package gives from its model modules, by module (imported on first use, see above).
MODEL_NAMES = {
    "WorldBackend": "world", "world_backend": "world",
    "StableDiffusionBackend": "stable_diffusion", "load_pipeline": "stable_diffusion",
    "pipeline_family": "stable_diffusion",
    "FluxBackend": "flux",
    "SD3Backend": "sd3",
}


# PEP 562: `diffmem.backends.FluxBackend` and friends, imported on first use.
__getattr__, __dir__ = lazy_names(__name__, MODEL_NAMES, globals())
model_name = __getattr__  # `name` from its model module, importing the module the first time

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
    return model if isinstance(model, Backend) else model_name("WorldBackend")(model)


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
        return model_name("world_backend")(base, lora, device)
    path = Path(base)
    family = model_name("pipeline_family")(path) if path.exists() else None
    pipe = model_name("load_pipeline")(path, dtype, config)
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
        return model_name("FluxBackend")(pipe, name)
    if family == "sd3":
        return model_name("SD3Backend")(pipe, name)
    return model_name("StableDiffusionBackend")(pipe, name, family)
