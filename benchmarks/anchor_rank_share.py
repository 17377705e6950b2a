"""How large BAF's anchors are: the energy-0.5 anchor rank as a share of each weight's smaller dimension, on the
embedded world's trained base and on a random matrix (the random-valued bases of `filter_speed.py`).

    python benchmarks/anchor_rank_share.py
"""

from __future__ import annotations

import torch

from diffmem.filters import BAFConfig
from diffmem.spectral import principal_subspace
from diffmem.world.model import load_base


def rank_share(weight: torch.Tensor, energy: float) -> float:
    matrix = weight.reshape(weight.shape[0], -1)
    return principal_subspace(matrix, energy=energy).k / min(matrix.shape)


def main() -> None:
    torch.set_num_threads(1)
    energy = BAFConfig.energy
    shares = torch.tensor([rank_share(p.detach(), energy) for p in load_base().parameters()
                           if p.ndim >= 2 and min(p.shape[0], p[0].numel()) >= 32])
    print(f"world base, {len(shares)} weights: anchor rank / smaller dimension, median {shares.median():.2f}, "
          f"mean {shares.mean():.2f}")
    generator = torch.Generator().manual_seed(0)
    print(f"random 1280 x 1280: {rank_share(torch.randn(1280, 1280, generator=generator), energy):.2f}")


if __name__ == "__main__":
    main()
