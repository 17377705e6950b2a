"""Baseline channel filters that BAF must beat at the same kept share of channels or energy (issue 5)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

from diffmem.filters.core import FilterConfig, ModuleView
from diffmem.filters.selection import Selection
from diffmem.spectral import base_gain, max_cosine_to_base


@dataclass
class RandomConfig(FilterConfig):
    """Keep random channels: the floor any informed filter must clear.

    Args:
        seed: mixed with each module's name, so a module's draw does not depend on which other modules exist.
        selection: default keeps a random half of each module's channels.
    """

    name: str = field(default="random", init=False)
    seed: int = 0
    selection: Selection = field(default_factory=lambda: Selection(rule="fraction", keep_fraction=0.5))

    def score(self, view: ModuleView) -> torch.Tensor:
        """Uniform random scores, reproducible per (seed, module)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(view.name.encode()))
        return torch.rand(view.channels.count, generator=generator)


@dataclass
class MagnitudeConfig(FilterConfig):
    """Keep the largest singular values: kohya ``networks/resize_lora.py``-style rank reduction.

    Args:
        selection: default keeps the channels holding 90% of each module's update energy (kohya's ``sv_fro``).
    """

    name: str = field(default="magnitude", init=False)
    selection: Selection = field(default_factory=lambda: Selection(rule="energy", keep_fraction=0.9))

    def score(self, view: ModuleView) -> torch.Tensor:
        """The channels' singular values."""
        return view.channels.sigma.clone()


@dataclass
class BaseGainConfig(FilterConfig):
    """Keep channels along which the base already has gain, ``|u_i^T W0 v_i|`` (elias-gaeros/resize_lora's score),
    divided by ``W0``'s largest singular value so scores compare across modules.

    Args:
        selection: default keeps the top half of each module's channels.
    """

    name: str = field(default="base-gain", init=False)
    selection: Selection = field(default_factory=lambda: Selection(rule="fraction", keep_fraction=0.5))

    def score(self, view: ModuleView) -> torch.Tensor:
        """Normalised base gain per channel."""
        weight = view.weight()
        top = torch.linalg.matrix_norm(weight, ord=2)
        return base_gain(view.channels, weight) / top.clamp_min(1e-12)


@dataclass
class IntruderConfig(FilterConfig):
    """Drop intruder dimensions: channels whose output direction has max cosine below ``threshold`` with every left
    singular vector of the base weight (Shuttleworth et al., "LoRA vs full fine-tuning: an illusion of
    equivalence", arXiv 2410.21228).

    PEFT's ``reduce_intruder_dimension`` (PEFT >= 0.18) uses the same cosine test and cut-off on other vectors, with
    another action: it takes the SVD of the merged weight ``W0 + dW`` (not of ``dW``), tests only its ``top_k``
    (10) largest directions, multiplies each intruder component ``sigma'_j u'_j v'_j^T`` of the merged weight by
    ``mitigation_lambda`` (0.75) instead of dropping a channel, and re-factorises ``W' - W0`` at the adapter's
    rank. So it flags little or nothing where the LoRA's channels are small beside the base's top-k singular
    values, and where it acts it also scales the base's own map along the intruders' input directions. The two
    updates are equal when the merged SVD splits into base and LoRA directions (intruders orthogonal to the base
    on both sides and within the top k, flagged channels weighted ``mitigation_lambda``), and on a full-rank base
    they flag the same channels and differ by about ``||W0|| / (3 sigma_intruder)`` of the update's norm
    (tests/test_intruder_peft.py; docs/filter.md). PEFT's rule itself: `diffmem.filters.peft_intruder`.

    Args:
        selection: default threshold 0.5, the paper's cut-off for an intruder.
    """

    name: str = field(default="intruder", init=False)
    selection: Selection = field(default_factory=lambda: Selection(rule="threshold", threshold=0.5))

    def score(self, view: ModuleView) -> torch.Tensor:
        """Max absolute cosine of each channel's u_i to the base's left singular vectors."""
        return max_cosine_to_base(view.channels, view.weight())


@dataclass
class ScaleConfig(FilterConfig):
    """Scale the whole LoRA down to ``keep_fraction`` of its update energy: every channel times
    ``sqrt(keep_fraction)``. The trivial way to weaken a LoRA, at the cost of everything it learned."""

    name: str = field(default="scale", init=False)
    selection: Selection = field(default_factory=lambda: Selection(rule="uniform", keep_fraction=0.5))

    def score(self, view: ModuleView) -> torch.Tensor:
        """Every channel scores the same."""
        return torch.ones(view.channels.count)


@dataclass
class KeepAllConfig(FilterConfig):
    """No filter: every channel kept. Writing it reproduces the input's update exactly (a control)."""

    name: str = field(default="none", init=False)
    selection: Selection = field(default_factory=lambda: Selection(rule="all"))

    def score(self, view: ModuleView) -> torch.Tensor:
        """Every channel scores the same."""
        return torch.ones(view.channels.count)
