"""Channel filters: each a config dataclass that scores a module's spectral channels, plus a shared selection rule.

Add a filter: subclass `FilterConfig` with a ``score(view)`` method and register it in `FILTERS`.
"""

from __future__ import annotations

from diffmem.filters.baf import BAFConfig, InverseBAFConfig
from diffmem.filters.baselines import (
    BaseGainConfig,
    IntruderConfig,
    KeepAllConfig,
    MagnitudeConfig,
    RandomConfig,
    ScaleConfig,
)
from diffmem.filters.caption_readers import CaptionReadersConfig
from diffmem.filters.core import FilterConfig, ModuleView
from diffmem.filters.selection import Selection, select
from diffmem.filters.unet_blocks import UNetBlocksConfig

FILTERS: dict[str, type[FilterConfig]] = {
    "baf": BAFConfig,
    "inverse-baf": InverseBAFConfig,
    "random": RandomConfig,
    "magnitude": MagnitudeConfig,
    "base-gain": BaseGainConfig,
    "intruder": IntruderConfig,
    "scale": ScaleConfig,
    "caption-readers": CaptionReadersConfig,
    "unet-blocks": UNetBlocksConfig,
    "none": KeepAllConfig,
}

__all__ = [
    "FILTERS",
    "BAFConfig",
    "BaseGainConfig",
    "CaptionReadersConfig",
    "FilterConfig",
    "IntruderConfig",
    "InverseBAFConfig",
    "KeepAllConfig",
    "MagnitudeConfig",
    "ModuleView",
    "RandomConfig",
    "ScaleConfig",
    "Selection",
    "UNetBlocksConfig",
    "select",
]
