"""Stateless maths of the MemControl PEFT methods, on tensors only."""

from __future__ import annotations

import torch


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A linear or convolution weight as the matrix [out, in * kernel] that SV-DIFF decomposes (Han et al. 2023)."""
    return weight.reshape(weight.shape[0], -1)


def spectral_shift_update(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """U diag(relu(S + delta) - S) V^T: what SV-DIFF's W' = U diag(relu(S + delta)) V^T adds to W (Han et al. 2023,
    eq. 1). Adding it to W instead of rebuilding W' from its factors keeps the untrained model bit-identical to
    the base (delta = 0 gives an exact zero) where a rebuilt W' differs from W by the SVD's rounding."""
    return (u * (torch.relu(s + delta) - s)) @ vh


def spectral_shifted_weight(weight: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
                            delta: torch.Tensor) -> torch.Tensor:
    """W + U diag(relu(S + delta) - S) V^T in W's shape (Han et al. 2023, eq. 1, on the exact W)."""
    return weight + spectral_shift_update(u, s, vh, delta).reshape(weight.shape).to(weight.dtype)


def scale_output_rows(weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold a per-channel output scale into a linear layer: gamma * (W x + b) = (diag(gamma) W) x + gamma * b
    (how a trained DiffFit gamma (Xie et al. 2023) merges into the layer in front of it)."""
    scaled = weight * gamma.reshape(-1, *([1] * (weight.ndim - 1))).to(weight.dtype)
    return scaled, None if bias is None else bias * gamma.to(bias.dtype)


def insert_random_words(caption: str, vocabulary: list[str], probability: float, generator: torch.Generator) -> str:
    """Random word addition (Somepalli et al. 2023, "Understanding and mitigating copying in diffusion models",
    sec. 5): before each word, and at the end, insert a word drawn uniformly from `vocabulary` with `probability`."""
    words = caption.split()
    out: list[str] = []
    for position in range(len(words) + 1):
        if torch.rand((), generator=generator).item() < probability:
            out.append(vocabulary[int(torch.randint(len(vocabulary), (), generator=generator))])
        if position < len(words):
            out.append(words[position])
    return " ".join(out)
