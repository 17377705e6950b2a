"""What every channel filter shares: the view of one module it scores, and its config base class."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from diffmem.filters.selection import Selection
from diffmem.spectral import Anchors, Channels


@dataclass
class ModuleView:
    """One LoRA module as a filter sees it: its channels, and lazy access to the base weight it updates."""

    name: str
    channels: Channels
    anchors: Callable[[float, int | None, str], Anchors]  # (energy, k, side) -> anchors of the base weight
    weight: Callable[[], torch.Tensor]  # the base weight, float32, flattened to 2-D
    module: str = ""  # the base module it updates, in diffusers naming, e.g. "unet.mid_block.attentions.0.proj_in"


@dataclass
class FilterConfig:
    """Base of every filter's config: a scoring method (in the subclass) plus a `Selection` rule."""

    name: str = field(default="", init=False)
    selection: Selection = field(default_factory=Selection)

    def score(self, view: ModuleView) -> torch.Tensor:
        """Per-channel scores of one module; higher means keep."""
        raise NotImplementedError

    def check_modules(self, modules: list[str]) -> None:
        """Called once with the base modules (diffusers naming) the LoRA updates, before any is scored: a filter
        that cannot act on this LoRA raises a `DiffmemError` here rather than return it unchanged."""

    def to_dict(self) -> dict:
        """The config as plain data, for reports and file provenance."""
        return dataclasses.asdict(self)
