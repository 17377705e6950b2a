"""Stateless maths of LoRA-family weight updates: scales and dense updates from stored factors.

Pure functions on tensors, no file I/O (LyCORIS `functional/` style). Every function returns float32.
Shapes follow the files: `up` [out, r] or [out, r, 1, 1], `down` [r, in] or [r, in, kh, kw].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def resolve_alpha(alpha: float | None, rank: int) -> float:
    """Alpha as trainers apply it: a missing or zero alpha means alpha = rank (kohya sd-scripts, LyCORIS)."""
    return float(rank) if alpha is None or alpha == 0 else float(alpha)


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """alpha / r (Hu et al. 2021), or alpha / sqrt(r) for rank-stabilised LoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def alpha_keeping_scale(scale: float, new_rank: int, rslora: bool = False) -> float:
    """The alpha that gives `scale` at `new_rank`; snapped to an integer when it is one up to rounding."""
    alpha = scale * (math.sqrt(new_rank) if rslora else new_rank)
    nearest = round(alpha)
    return float(nearest) if math.isclose(alpha, nearest, rel_tol=1e-9, abs_tol=1e-12) else alpha


def flat(tensor: Tensor) -> Tensor:
    """A factor as a float32 matrix: conv factors are flattened over (in, kh, kw)."""
    return tensor.reshape(tensor.shape[0], -1).float()


def lora_delta(up: Tensor, down: Tensor, scale: float, shape: tuple[int, ...]) -> Tensor:
    """dW = scale * up @ down, reshaped to the weight's shape (LoRA, and LoCon with a k x k down)."""
    return (scale * flat(up) @ flat(down)).reshape(shape)


def tucker_rebuild(core: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """The LyCORIS CP/Tucker rebuild W[p, q, ...] = sum_ij core[i, j, ...] wa[i, p] wb[j, q]."""
    return torch.einsum("ij...,ip,jq->pq...", core.float(), wa.float(), wb.float())


def tucker_delta(up: Tensor, mid: Tensor, down: Tensor, scale: float) -> Tensor:
    """dW of a Tucker LoCon (1x1 down, k x k `lora_mid` core, 1x1 up): up o mid o down as one conv."""
    return scale * tucker_rebuild(mid, flat(up).T, flat(down))


def loha_delta(
    w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, scale: float,
    t1: Tensor | None = None, t2: Tensor | None = None,
) -> Tensor:
    """LoHa dW = scale * (w1a @ w1b) * (w2a @ w2b) (Hyeon-Woo et al. 2022, FedPara); with CP cores t1, t2
    each Hadamard factor is rebuilt as a Tucker product (LyCORIS `use_tucker`)."""
    if t1 is not None and t2 is not None:
        return scale * tucker_rebuild(t1, w1a, w1b) * tucker_rebuild(t2, w2a, w2b)
    kernel = tuple(w1b.shape[2:])
    product = (flat(w1a) @ flat(w1b)) * (flat(w2a) @ flat(w2b))
    return scale * product.reshape(product.shape[0], w1b.shape[1], *kernel)


def lokr_factor(
    full: Tensor | None, a: Tensor | None, b: Tensor | None, core: Tensor | None = None
) -> Tensor:
    """One Kronecker factor of LoKr: stored whole, as a @ b (b may carry a conv kernel), or Tucker-rebuilt."""
    if full is not None:
        return full.float()
    assert a is not None and b is not None
    if core is not None:
        return tucker_rebuild(core, a, b)
    return (a.float() @ flat(b)).reshape(a.shape[0], *b.shape[1:])


def lokr_delta(w1: Tensor, w2: Tensor, scale: float) -> Tensor:
    """LoKr dW = scale * kron(w1, w2) (Yeh et al. 2023, LyCORIS); a 2-D w1 acts on the out/in axes of a conv w2."""
    w1 = w1.float().reshape(*w1.shape, *([1] * (w2.dim() - w1.dim())))
    return scale * torch.kron(w1, w2.float().contiguous())
