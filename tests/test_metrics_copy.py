"""Copy tests: tiled L2, nearest neighbours, Carlini's relative criterion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.metrics.copy import (
    CopyConfig,
    copy_decisions,
    copy_decisions_from_distances,
    copy_rate,
    nearest_neighbours,
    relative_distance,
    tiled_l2,
)


def loop_tiled_l2(a: np.ndarray, b: np.ndarray, tiles: int) -> np.ndarray:
    """Independent reference: explicit loops over image pairs and tiles, numpy only."""
    _, _, h, w = a.shape
    rows = np.array_split(np.arange(h), tiles)
    cols = np.array_split(np.arange(w), tiles)
    out = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            worst = 0.0
            for r in rows:
                for c in cols:
                    diff = a[i][:, r][:, :, c] - b[j][:, r][:, :, c]
                    worst = max(worst, float(np.sqrt(np.mean(diff**2))))
            out[i, j] = worst
    return out


def test_one_differing_tile_sets_the_distance():
    a = torch.zeros(1, 3, 32, 32)
    b = torch.zeros(1, 3, 32, 32)
    b[:, :, 8:16, 24:32] = 1.0  # exactly one of the 16 8x8 tiles
    assert tiled_l2(a, b).item() == pytest.approx(1.0)
    # The whole-image RMS would be 0.25; the tile maximum does not dilute a local copy/difference.
    assert torch.sqrt(((a - b) ** 2).mean()).item() == pytest.approx(0.25)
    assert tiled_l2(a, b, tiles=1).item() == pytest.approx(0.25)


def test_constant_shift_and_identity():
    a = torch.rand(3, 3, 16, 16) * 0.8
    assert torch.equal(torch.diagonal(tiled_l2(a, a)), torch.zeros(3))
    assert torch.diagonal(tiled_l2(a, a + 0.1)).tolist() == pytest.approx([0.1] * 3, abs=1e-6)


@pytest.mark.parametrize(("size", "tiles"), [(32, 4), (18, 4), (12, 3)])
def test_matches_loop_reference(size, tiles):
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(4, 3, size, size, generator=gen)
    b = torch.rand(5, 3, size, size, generator=gen)
    expected = loop_tiled_l2(a.numpy(), b.numpy(), tiles)
    np.testing.assert_allclose(tiled_l2(a, b, tiles).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_nearest_neighbours_sorted():
    gen = torch.Generator().manual_seed(1)
    train = torch.rand(6, 3, 16, 16, generator=gen)
    query = train[[4, 1]] + 0.01
    values, indices = nearest_neighbours(query, train, k=3)
    assert indices[:, 0].tolist() == [4, 1]
    assert torch.all(values[:, :-1] <= values[:, 1:])
    full = tiled_l2(query, train)
    np.testing.assert_allclose(values.numpy(), np.sort(full.numpy(), axis=1)[:, :3], rtol=1e-6)
    with pytest.raises(ValueError, match="k must be"):
        nearest_neighbours(query, train, k=7)


def test_relative_distance_by_hand():
    distances = torch.tensor([[3.0, 1.0, 2.0, 10.0], [0.0, 0.0, 5.0, 5.0]])
    # row 0: nearest 1, mean of the 3 nearest (1, 2, 3) = 2 -> 0.5; row 1: 0 / (0+0+5)/3 = 0
    assert relative_distance(distances, neighbours=3).tolist() == pytest.approx([0.5, 0.0])
    # neighbours larger than the training set is clipped: mean(1,2,3,10) = 4 -> 0.25
    assert relative_distance(distances[:1], neighbours=50).item() == pytest.approx(0.25)
    # all neighbours at distance zero: counted as a copy (ratio 0), not NaN
    assert relative_distance(torch.zeros(1, 3), neighbours=3).item() == 0.0


def test_copy_decisions_find_the_copied_image():
    gen = torch.Generator().manual_seed(2)
    train = torch.rand(20, 3, 32, 32, generator=gen)
    copy = (train[7] + 0.01 * torch.randn(3, 32, 32, generator=gen)).clamp(0, 1)
    fresh = torch.rand(1, 3, 32, 32, generator=gen)
    result = copy_decisions(torch.stack([copy, fresh[0]]), train)
    assert result.nearest_index[0].item() == 7
    assert result.is_copy.tolist() == [True, False]
    assert result.rate == pytest.approx(0.5)
    assert copy_rate(torch.stack([copy, fresh[0]]), train) == pytest.approx(0.5)
    assert result.distance[0] < 0.05 < result.distance[1]


def test_absolute_threshold_also_required():
    distances = torch.tensor([[0.2, 1.0, 1.0]])
    assert copy_decisions_from_distances(distances, CopyConfig(neighbours=3)).is_copy.item()
    strict = CopyConfig(neighbours=3, distance_threshold=0.1)
    assert not copy_decisions_from_distances(distances, strict).is_copy.item()


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        tiled_l2(torch.rand(3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="shapes differ"):
        tiled_l2(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="float"):
        tiled_l2(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="tiles"):
        tiled_l2(torch.rand(1, 3, 2, 2), torch.rand(1, 3, 2, 2), tiles=4)


def test_luminance_tiled_l2_is_blind_to_a_colour_cast_and_not_to_another_picture():
    from diffmem.metrics.copy import LUMINANCE_COPY_DISTANCE, luminance_tiled_l2, normalized_luminance

    generator = torch.Generator().manual_seed(0)
    grey = torch.rand(2, 1, 16, 16, generator=generator).expand(2, 3, 16, 16)
    cast = (grey * torch.tensor([0.6, 0.9, 1.0]).view(1, 3, 1, 1) + torch.tensor([0.3, 0.05, 0.0]).view(1, 3, 1, 1))
    assert normalized_luminance(grey).shape == (2, 1, 16, 16)
    same = luminance_tiled_l2(cast, grey)
    assert same.diagonal().max() < 1e-5  # an affine map of every channel of a grey image: the same picture
    assert same[0, 1] > LUMINANCE_COPY_DISTANCE and same[1, 0] > LUMINANCE_COPY_DISTANCE
    assert tiled_l2(cast, grey).diagonal().min() > 0.1  # where RGB tiled L2 sees a different image
    with pytest.raises(ValueError, match="shapes differ"):
        luminance_tiled_l2(grey, grey[:, :, :8])
