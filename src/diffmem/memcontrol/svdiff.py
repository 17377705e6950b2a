"""SV-DIFF: fine-tune only a shift of the singular values of each weight (Han et al. 2023, "SVDiff: Compact
Parameter Space for Diffusion Fine-Tuning")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils import parametrize

from diffmem.memcontrol.functional import as_matrix, spectral_shifted_weight


@dataclass(frozen=True)
class SVDiffConfig:
    """Where SV-DIFF puts its spectral shifts, and how they train.

    Attributes:
        lr: AdamW learning rate of the shifts, 1e-3 as in SVDiff's reference training script: a shift moves a
            singular value directly, so it tolerates far larger steps than full weights (1e-5 to 1e-4).
        convolutions: also shift the 1 x 1 `proj_in`/`proj_out` convolutions of the attention modules (SD 1.x and
            the world use convolutions there). Han et al. shift every weight matrix and kernel of the UNet;
            MemControl masks the ones inside attention modules, so these two belong to the mask.
    """

    lr: float = 1e-3
    convolutions: bool = True


class SpectralShift(torch.nn.Module):
    """Parametrization W -> W + U diag(relu(S + delta) - S) V^T with a frozen SVD of W and a learnable delta."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        u, s, vh = torch.linalg.svd(as_matrix(weight.detach().float()), full_matrices=False)
        self.register_buffer("u", u)
        self.register_buffer("s", s)
        self.register_buffer("vh", vh)
        self.delta = torch.nn.Parameter(torch.zeros_like(s))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return spectral_shifted_weight(weight, self.u, self.s, self.vh, self.delta)


def shifted_layers(unet: torch.nn.Module, modules: Sequence[str], config: SVDiffConfig) -> list[str]:
    """Paths of the linear (and, per `config`, convolution) layers inside `modules` that get a spectral shift."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d) if config.convolutions else (torch.nn.Linear,)
    roots = tuple(f"{m}." for m in modules)
    return [name for name, layer in unet.named_modules() if name.startswith(roots) and isinstance(layer, kinds)]


def apply_svdiff(unet: torch.nn.Module, modules: Sequence[str], config: SVDiffConfig | None = None
                 ) -> list[torch.nn.Parameter]:
    """Add a spectral shift (delta = 0, so the model is unchanged) to every layer inside `modules`; returns the
    shifts, the only parameters to train."""
    config = config or SVDiffConfig()
    layers = dict(unet.named_modules())
    trainable = []
    for path in shifted_layers(unet, modules, config):
        shift = SpectralShift(layers[path].weight)
        parametrize.register_parametrization(layers[path], "weight", shift)
        trainable.append(shift.delta)
    return trainable


def merge_svdiff(unet: torch.nn.Module) -> None:
    """Write the shifted weights into the layers and drop the parametrizations (in place)."""
    for layer in list(unet.modules()):
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
