"""The command-line flags that name a model (`--base`, `--lora`, `--config`, `--device`, `--dtype`), shared by
every model-using command, and the backend they open (`diffmem.backends.open_backend`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffmem.backends import DTYPES, open_backend, parse_dtype


def add_backend_options(parser: argparse.ArgumentParser, base_required: bool = False) -> None:
    """Add the model flags to `parser`. Without `base_required`, --base defaults to the committed world base."""
    default = "" if base_required else " (default: the committed world base)"
    parser.add_argument("--base", required=base_required, default=None if base_required else "world",
                        help=f"the model: 'world', a world UNet file{default}, or a diffusers pipeline folder / "
                             "single-file checkpoint of Stable Diffusion 1.x/2.x, SDXL, SD3 or Flux (loaded offline)")
    parser.add_argument("--lora", type=Path, default=None, help="LoRA merged into the base (any format diffmem reads)")
    parser.add_argument("--config", type=Path, default=None,
                        help="for a single-file --base: a local diffusers folder of the same architecture (its configs)")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, mps")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                        help="precision of a pipeline's weights (default float32; the world is always float32)")


def backend_from(args: argparse.Namespace):
    """The `Backend` the model flags of `args` name."""
    return open_backend(args.base, args.lora, args.device, parse_dtype(args.dtype), args.config)


def model_inputs(args: argparse.Namespace) -> tuple[Path, ...]:
    """The files the model flags name (outputs must never overwrite them)."""
    return tuple(Path(p) for p in (args.base, args.lora, args.config) if p is not None and str(p) != "world")
