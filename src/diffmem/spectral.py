"""Spectral channels of low-rank updates and their alignment with a base weight: pure functions on tensors.

Notation (../docs/filter.md): base weight ``W0`` (out x in, convs flattened to out x in*kh*kw), update
``dW = s * B @ A`` with ``B`` out x r, ``A`` r x in, ``s`` the LoRA scale. A *spectral channel* is one rank-1 term
``sigma_i u_i v_i^T`` of the SVD of ``dW``; an *anchor* is the top-k left/right singular subspace of ``W0``.
Base-Anchored Filtering (BAF, arXiv 2605.10439) keeps the channels aligned with the anchors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffmem.lapack import gram_upper, leading_eigenpairs

# The Gram matrix is formed in float32 (eigenvalue error about 1e-7 sigma_1^2): anchors reaching singular values
# below this share of sigma_1 are taken from an SVD instead.
GRAM_MIN_RELATIVE_SIGMA = 1e-2


@dataclass(frozen=True)
class Channels:
    """The SVD ``dW = U diag(sigma) V^T`` of an update, channels sorted by decreasing ``sigma``."""

    u: torch.Tensor  # [out, c], orthonormal columns
    sigma: torch.Tensor  # [c], includes the LoRA scale
    v: torch.Tensor  # [in, c], orthonormal columns

    @property
    def count(self) -> int:
        return int(self.sigma.numel())

    def dense(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``U diag(w * sigma) V^T``: the update carried by the channels, each scaled by ``weights`` (default 1)."""
        sigma = self.sigma if weights is None else self.sigma * weights.to(self.sigma)
        return (self.u * sigma) @ self.v.T


@dataclass(frozen=True)
class Anchors:
    """Top-k singular subspaces of a base weight and its whole spectrum. A side a scorer does not use may be left
    out (None) so that it is never read from the cache."""

    u: torch.Tensor | None  # [out, k]
    v: torch.Tensor | None  # [in, k]
    spectrum: torch.Tensor  # [min(out, in)], all singular values of W0, decreasing

    @property
    def k(self) -> int:
        return int((self.u if self.u is not None else self.v).shape[1])


#: A direction of a LoRA factor whose eigenvalue in the factor's column-normalised Gram matrix is below this share
#: of the largest is treated as null (columns that are zero or dependent to within 0.3%): the Gram matrix is
#: formed in float32, whose rounding (about 1e-6 of a unit diagonal at LoRA sizes) makes smaller ones noise.
FACTOR_NULL_RELATIVE_EIGENVALUE = 1e-5


def factor_ranges(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(C, R, kept)`` per matrix of a batch ``[G, n, r]``: ``M @ C`` has orthonormal columns on the range of
    ``M`` and ``M = (M @ C) @ R``, from the eigendecomposition of the small Gram matrix ``M^T M`` (a Cholesky-QR in
    eigen form, Fukaya et al. 2014): matrix products instead of a Householder QR of the tall factor.

    The Gram matrix is formed in float32 (the one pass over the tall factor) and scaled to a unit diagonal before
    its float64 eigendecomposition, so columns of very different norms (a filtered LoRA's) lose no accuracy.
    Directions sorted by decreasing eigenvalue; a null direction (`FACTOR_NULL_RELATIVE_EIGENVALUE`) gets a zero
    column in ``C`` and a zero row in ``R``; ``kept`` [G] counts the others. ``C`` and ``R`` are float64.
    """
    gram = (matrices.transpose(-1, -2) @ matrices).to(torch.float64)
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    values, vectors = torch.linalg.eigh(gram / (norms[..., :, None] * norms[..., None, :]))
    values, vectors = values.flip(-1), vectors.flip(-1)
    floor = values[..., :1].clamp_min(0.0) * FACTOR_NULL_RELATIVE_EIGENVALUE
    keep = (values > floor) & (values > 0)
    roots = torch.where(keep, values, torch.ones_like(values)).sqrt()
    coords = torch.where(keep[..., None, :], vectors / roots[..., None, :], torch.zeros_like(vectors))
    ranges = torch.where(keep[..., :, None], roots[..., :, None] * vectors.transpose(-1, -2), torch.zeros_like(vectors))
    return coords / norms[..., :, None], ranges * norms[..., None, :], keep.sum(-1)


def lowrank_channels_batch(ups: torch.Tensor, downs: torch.Tensor, scales: torch.Tensor) -> list[Channels]:
    """`lowrank_channels` of G updates of one shape at once: ``ups`` [G, out, r], ``downs`` [G, r, in], ``scales``
    [G]. Batched decompositions of the small matrices cost one call per shape instead of one per module; the two
    passes over each tall factor run in float32, everything r x r in float64."""
    b = ups.to(torch.float32)
    a = downs.to(torch.float32).transpose(-1, -2)
    if b.shape[-1] != a.shape[-1] or b.shape[0] != a.shape[0]:
        raise ValueError(f"rank mismatch: up is {tuple(ups.shape)}, down is {tuple(downs.shape)}")
    coords_b, range_b, kept_b = factor_ranges(b)
    coords_a, range_a, kept_a = factor_ranges(a)
    core_u, core_s, core_vh = torch.linalg.svd(range_b @ range_a.transpose(-1, -2), full_matrices=False)
    count = min(b.shape[1], a.shape[1], b.shape[2])
    scales = torch.as_tensor(scales, dtype=torch.float64, device=b.device).reshape(-1)
    # Beyond min(kept_b, kept_a) the core's singular values are zero: those channels are null (zero vectors).
    live = (torch.arange(count, device=b.device) < torch.minimum(kept_b, kept_a)[:, None]).to(torch.float64)
    to_u = (coords_b @ core_u[..., :count]) * live[:, None, :]
    to_v = (coords_a @ core_vh.transpose(-1, -2)[..., :count]) * (live * scales.sign()[:, None])[:, None, :]
    u, v = b @ to_u.to(torch.float32), a @ to_v.to(torch.float32)
    sigma = (scales.abs()[:, None] * core_s[..., :count] * live).to(torch.float32)
    return [Channels(u=u[g], sigma=sigma[g], v=v[g]) for g in range(b.shape[0])]


def lowrank_channels(up: torch.Tensor, down: torch.Tensor, scale: float) -> Channels:
    """Channels of ``scale * up @ down`` without forming it: an orthonormal basis of each factor's range from its
    r x r Gram matrix (`factor_ranges`), then the SVD of the small core (elias-gaeros/resize_lora's QR trick, with
    the QR done through the Gram matrix: 10 to 15 times faster on a CPU at LoRA shapes).

    Cost O((out + in) r^2). There are min(out, in, r) channels; null directions of the update (zero or dependent
    columns, a rank above one side's dimension) are channels of gain 0 with zero vectors.
    """
    b = up.reshape(up.shape[0], -1)
    a = down.reshape(down.shape[0], -1)
    if b.shape[1] != a.shape[0]:
        raise ValueError(f"rank mismatch: up is {tuple(up.shape)}, down is {tuple(down.shape)}")
    return lowrank_channels_batch(b[None], a[None], torch.tensor([float(scale)]))[0]


def dense_channels(delta: torch.Tensor, max_channels: int | None = None, rtol: float = 1e-6) -> Channels:
    """Channels of a dense update (LoHa, LoKr, Tucker), dropping those below ``rtol * sigma_max``."""
    matrix = delta.reshape(delta.shape[0], -1).to(torch.float64)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    if max_channels is not None:
        keep = min(keep, max_channels)
    return Channels(u=u[:, :keep].float(), sigma=s[:keep].float(), v=vh[:keep].T.float())


def energy_rank(spectrum: torch.Tensor, energy: float) -> int:
    """Smallest k whose top-k singular values hold ``energy`` of ``||W||_F^2`` (at least 1)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    power = spectrum.to(torch.float64).square()
    total = float(power.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(power, 0) / total
    return max(1, min(int((cumulative < energy - 1e-12).sum()) + 1, int(spectrum.numel())))


def gram_matrix(matrix: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The smaller Gram matrix of a float32 ``matrix`` (``M M^T`` when it has no more rows than columns, else
    ``M^T M``), and whether it holds the left side's products (``M M^T``).

    On the CPU only its upper triangle is formed (`diffmem.lapack.gram_upper`: half the products of a full
    multiplication); elsewhere the full matrix.
    """
    if matrix.device.type != "cpu":
        left = matrix.shape[0] <= matrix.shape[1]
        return (matrix @ matrix.T if left else matrix.T @ matrix), left
    gram, left = gram_upper(matrix.contiguous().numpy())
    return torch.from_numpy(gram), left


def gram_eigen(gram: torch.Tensor, count: Callable[[torch.Tensor], int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every eigenvalue (descending) of a symmetric float32 Gram matrix and the eigenvectors of the leading
    ``count(values)`` of them (on the CPU only its upper triangle is read).

    On the CPU only the kept pairs' vectors are computed (`diffmem.lapack.leading_eigenpairs`), about 3 times
    faster than torch's float64 ``eigh`` of every pair on a 1280 x 1280 matrix; elsewhere torch's ``eigh`` computes
    them all.
    """
    if gram.device.type != "cpu":
        return every_eigenpair(gram, count)
    values, vectors = leading_eigenpairs(gram.numpy(), lambda found: count(torch.from_numpy(found)))
    return torch.from_numpy(values), torch.from_numpy(vectors)


def every_eigenpair(gram: torch.Tensor, count: Callable[[torch.Tensor], int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`gram_eigen` by torch's ``eigh`` of the full symmetric matrix (every pair, then the leading ones kept): the
    way on a GPU, where LAPACK's partial solvers are not at hand."""
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0), vectors.flip(1)
    return values, vectors[:, : max(1, min(count(values), values.numel()))]


def principal_subspace(weight: torch.Tensor, energy: float = 0.5, k: int | None = None) -> Anchors:
    """Top-k left and right singular subspaces of ``weight`` (flattened), k fixed or chosen by ``energy``.

    The spectrum and the smaller side's vectors come from the Gram matrix (Golub & Van Loan, "Matrix
    Computations", sec. 8.6; `gram_matrix`, `gram_eigen`), in float32; the other side is ``M^T u_i / sigma_i``
    (or ``M v_i / sigma_i``). A plain SVD serves when a kept singular value is too small for the division to be
    accurate.
    """
    matrix = weight.reshape(weight.shape[0], -1).to(torch.float32)
    small = min(matrix.shape)

    def rank_of(values: torch.Tensor) -> int:
        return max(1, min(k if k is not None else energy_rank(values.clamp_min(0).sqrt(), energy), small))

    gram, left = gram_matrix(matrix)
    values, vectors = gram_eigen(gram, rank_of)
    spectrum = values.clamp_min(0).sqrt().to(torch.float32)
    rank = vectors.shape[1]
    sigma = spectrum[:rank]
    if float(sigma[-1]) <= GRAM_MIN_RELATIVE_SIGMA * float(sigma[0]):
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        return Anchors(u=u[:, :rank].contiguous(), v=vh[:rank].T.contiguous(), spectrum=spectrum)
    known = vectors.to(torch.float32)
    if matrix.device.type == "cpu":  # numpy's OpenBLAS: a third faster than torch's MKL on this AMD EPYC
        data = matrix.numpy()
        other = torch.from_numpy(data.T @ known.numpy() if left else data @ known.numpy()) / sigma
    else:
        other = (matrix.T @ known if left else matrix @ known) / sigma
    u, v = (known, other) if left else (other, known)
    return Anchors(u=u.contiguous(), v=v.contiguous(), spectrum=spectrum)


def left_alignment(channels: Channels, anchors: Anchors) -> torch.Tensor:
    """``||U0_k^T u_i||^2`` per channel: the share of each output direction inside the base's top-k subspace."""
    if anchors.u is None:
        raise ValueError("these anchors were read without their left (output) side")
    return (anchors.u.T @ channels.u).square().sum(0)


def right_alignment(channels: Channels, anchors: Anchors) -> torch.Tensor:
    """``||V0_k^T v_i||^2`` per channel: the share of each input direction inside the base's top-k subspace."""
    if anchors.v is None:
        raise ValueError("these anchors were read without their right (input) side")
    return (anchors.v.T @ channels.v).square().sum(0)


def chance_alignment(k: int, dim: int) -> float:
    """Expected alignment of a uniformly random unit vector in R^dim with a fixed k-dimensional subspace: k / dim."""
    return min(1.0, k / dim)


SIDES = ("left", "right", "both")  # which singular vectors of a channel are scored against the base's
COMBINES = ("mean", "min", "product")  # how the two side scores of side="both" are merged


def relative_alignment(channels: Channels, anchors: Anchors, side: str = "both", combine: str = "mean") -> torch.Tensor:
    """Alignment per channel divided by its chance level (1 = a random direction; > 1 = anchored in the base).

    ``side`` is "left", "right" or "both"; "both" combines the two relative scores by ``combine``:
    "mean" (arithmetic), "min", or "product" (geometric mean).
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if side != "right":
        left = left_alignment(channels, anchors) / chance_alignment(anchors.k, anchors.u.shape[0])
    if side != "left":
        right = right_alignment(channels, anchors) / chance_alignment(anchors.k, anchors.v.shape[0])
    if side == "left":
        return left
    if side == "right":
        return right
    if combine == "mean":
        return (left + right) / 2
    if combine == "min":
        return torch.minimum(left, right)
    if combine == "product":
        return (left * right).sqrt()
    raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")


def base_gain(channels: Channels, weight: torch.Tensor) -> torch.Tensor:
    """``|u_i^T W0 v_i|`` per channel: how strongly the base already maps along the channel (elias-gaeros/resize_lora)."""
    matrix = weight.reshape(weight.shape[0], -1).to(torch.float32)
    return ((channels.u.T @ matrix) * channels.v.T).sum(1).abs()


def max_cosine_to_base(channels: Channels, weight: torch.Tensor) -> torch.Tensor:
    """``max_j |<u_i, u0_j>|`` over all left singular vectors of W0; low values mark intruder dimensions
    (Shuttleworth et al., arXiv 2410.21228)."""
    matrix = weight.reshape(weight.shape[0], -1).to(torch.float32)
    u0, _, _ = torch.linalg.svd(matrix, full_matrices=False)
    return (u0.T @ channels.u).abs().amax(0)


def rebuild_factors(
    channels: Channels, weights: torch.Tensor, scale: float, rank: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(B, A)`` with ``scale * B @ A == sum_i w_i sigma_i u_i v_i^T``, written straight in ``dtype``.

    With ``rank`` at least the channel count, each channel keeps its column and a dropped channel's column is zero
    (zero columns added up to ``rank``); with a smaller ``rank`` the kept channels are packed first, and with
    ``rank=None`` only they are written (a smaller rank). The square root of each channel's gain is split evenly
    between the factors, as kohya's resize_lora does.
    """
    if scale == 0:
        raise ValueError("a LoRA scale of 0 cannot carry an update")
    gains = channels.sigma * weights.to(channels.sigma)
    kept = gains > 0
    root = torch.where(kept, gains / abs(scale), torch.zeros_like(gains)).sqrt()
    u, v = channels.u, channels.v
    count = int(kept.sum())
    if rank is None or rank < channels.count:
        rank = max(1, count) if rank is None else rank
        if count > rank:
            raise ValueError(f"{count} channels kept but the rank is {rank}")
        chosen = torch.nonzero(kept).flatten()
        u, v, root = u[:, chosen], v[:, chosen], root[chosen]
    up = torch.empty(u.shape[0], rank, dtype=dtype)
    down = torch.empty(rank, v.shape[0], dtype=dtype)
    columns = root.numel()
    up[:, columns:] = 0
    down[columns:] = 0
    torch.mul(u, root, out=up[:, :columns])
    torch.mul(v.T, (root * (1.0 if scale > 0 else -1.0))[:, None], out=down[:columns])
    return up, down


def channel_energy(channels: Channels) -> torch.Tensor:
    """Each channel's share of ``||dW||_F^2`` (``sigma_i^2 / sum sigma^2``)."""
    power = channels.sigma.square()
    total = power.sum()
    return power / total if total > 0 else power
