"""The spectral maths of the filter, checked against dense linear algebra and hand-computed cases."""

import math

import pytest
import torch

from diffmem.spectral import (
    Anchors,
    Channels,
    base_gain,
    chance_alignment,
    channel_energy,
    dense_channels,
    energy_rank,
    every_eigenpair,
    gram_eigen,
    gram_matrix,
    left_alignment,
    lowrank_channels,
    lowrank_channels_batch,
    max_cosine_to_base,
    principal_subspace,
    rebuild_factors,
    relative_alignment,
    right_alignment,
)


def factors(out=24, inner=40, rank=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=g), torch.randn(rank, inner, generator=g)


@pytest.mark.parametrize("scale", [0.5, 1.0, -2.0])
def test_lowrank_channels_match_dense_svd(scale):
    up, down = factors()
    dense = scale * up @ down
    channels = lowrank_channels(up, down, scale)
    expected = torch.linalg.svdvals(dense)[: channels.count]
    torch.testing.assert_close(channels.sigma, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(channels.dense(), dense, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(channels.u.T @ channels.u, torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(channels.v.T @ channels.v, torch.eye(6), atol=1e-5, rtol=0)
    assert torch.all(channels.sigma[:-1] >= channels.sigma[1:])


def test_lowrank_channels_of_conv_factors_flatten_the_kernel():
    g = torch.Generator().manual_seed(1)
    down = torch.randn(4, 3, 3, 3, generator=g)  # [r, in, kh, kw]
    up = torch.randn(8, 4, 1, 1, generator=g)  # [out, r, 1, 1]
    dense = (up.flatten(1) @ down.flatten(1)) * 0.25
    torch.testing.assert_close(lowrank_channels(up, down, 0.25).dense(), dense, rtol=1e-4, atol=1e-5)


def test_lowrank_channels_of_a_zero_padded_or_wide_update_have_null_channels():
    up, down = factors()
    up[:, 4:] = 0  # a filtered LoRA written at its old rank: two zero columns
    channels = lowrank_channels(up, down, 0.5)
    assert channels.count == 6 and torch.all(channels.sigma[4:] == 0)
    assert torch.all(channels.u[:, 4:] == 0) and torch.all(channels.v[:, 4:] == 0)
    torch.testing.assert_close(channels.u[:, :4].T @ channels.u[:, :4], torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(channels.dense(), 0.5 * up @ down, rtol=1e-4, atol=1e-5)
    wide_up, wide_down = factors(out=4, inner=10, rank=8)  # rank above both dimensions
    wide = lowrank_channels(wide_up, wide_down, 1.0)
    assert wide.count == 4
    torch.testing.assert_close(wide.dense(), wide_up @ wide_down, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(wide.sigma, torch.linalg.svdvals(wide_up @ wide_down)[:4], rtol=1e-5, atol=1e-5)
    empty = lowrank_channels(torch.zeros(5, 3), torch.randn(3, 7), 1.0)
    assert empty.count == 3 and torch.all(empty.sigma == 0) and torch.all(empty.dense() == 0)


def test_lowrank_channels_rejects_mismatched_ranks():
    with pytest.raises(ValueError, match="rank mismatch"):
        lowrank_channels(torch.randn(5, 3), torch.randn(4, 7), 1.0)


def test_dense_channels_drop_null_directions():
    up, down = factors(rank=3)
    channels = dense_channels(up @ down)
    assert channels.count == 3
    torch.testing.assert_close(channels.dense(), up @ down, rtol=1e-4, atol=1e-4)
    assert dense_channels(up @ down, max_channels=2).count == 2
    assert dense_channels(torch.zeros(4, 5)).count == 0


@pytest.mark.parametrize("scale", [1.0, 0.125, -1.0])
def test_rebuild_with_all_channels_reproduces_the_update(scale):
    up, down = factors()
    channels = lowrank_channels(up, down, scale)
    new_up, new_down = rebuild_factors(channels, torch.ones(channels.count), scale, rank=6)
    torch.testing.assert_close(scale * new_up @ new_down, scale * up @ down, rtol=1e-4, atol=1e-4)


def test_rebuild_keeps_exactly_the_sum_of_kept_channels_and_pads_the_rank():
    up, down = factors()
    channels = lowrank_channels(up, down, 0.5)
    weights = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.0])
    new_up, new_down = rebuild_factors(channels, weights, 0.5, rank=6)
    assert new_up.shape == (24, 6) and new_down.shape == (6, 40)
    kept = sum(w * s * torch.outer(channels.u[:, i], channels.v[:, i])
               for i, (w, s) in enumerate(zip(weights, channels.sigma)))
    torch.testing.assert_close(0.5 * new_up @ new_down, kept, rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(new_up.abs().sum(0)) == 3  # three kept channels, three zero columns
    smaller_up, smaller_down = rebuild_factors(channels, weights, 0.5, rank=None)
    assert smaller_up.shape == (24, 3)
    torch.testing.assert_close(0.5 * smaller_up @ smaller_down, kept, rtol=1e-4, atol=1e-5)


def test_rebuild_refuses_a_rank_smaller_than_the_kept_channels():
    channels = lowrank_channels(*factors(), 1.0)
    with pytest.raises(ValueError, match="channels kept"):
        rebuild_factors(channels, torch.ones(6), 1.0, rank=4)


def test_energy_rank_by_hand():
    spectrum = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0])  # energies 9, 4, 1, 1, 1 of 16
    assert energy_rank(spectrum, 0.5) == 1  # 9/16 = 0.5625
    assert energy_rank(spectrum, 0.6) == 2  # 13/16 = 0.8125
    assert energy_rank(spectrum, 0.9) == 4  # 15/16
    assert energy_rank(spectrum, 1.0) == 5
    with pytest.raises(ValueError):
        energy_rank(spectrum, 0.0)


def known_weight(out=30, inner=20, seed=0):
    """A weight with singular values 10, 9, ..., and its singular vectors."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, inner, generator=g))
    v, _ = torch.linalg.qr(torch.randn(inner, inner, generator=g))
    s = torch.linspace(10, 0.5, inner)
    return (u * s) @ v.T, u, s, v


def test_principal_subspace_spans_the_top_singular_vectors():
    weight, u, s, _ = known_weight()
    anchors = principal_subspace(weight, k=4)
    assert anchors.k == 4
    projector = anchors.u @ anchors.u.T
    torch.testing.assert_close(projector @ u[:, :4], u[:, :4], atol=1e-4, rtol=0)
    torch.testing.assert_close(anchors.spectrum, s, rtol=1e-4, atol=1e-4)
    by_energy = principal_subspace(weight, energy=0.5)
    assert by_energy.k == energy_rank(s, 0.5)


def test_fixed_rank_anchors_of_a_large_matrix_are_its_top_subspace():
    g = torch.Generator().manual_seed(3)
    left, _ = torch.linalg.qr(torch.randn(1100, 60, generator=g))
    right, _ = torch.linalg.qr(torch.randn(1030, 60, generator=g))
    s = torch.cat([torch.linspace(50, 20, 10), torch.linspace(1, 0.1, 50)])
    weight = (left * s) @ right.T
    anchors = principal_subspace(weight, k=10)  # only the 10 leading eigenpairs are computed
    projector = anchors.u @ anchors.u.T
    assert torch.linalg.matrix_norm(projector @ left[:, :10] - left[:, :10]) < 1e-3
    torch.testing.assert_close(anchors.spectrum[:10], s[:10], rtol=1e-4, atol=1e-4)


def test_the_gpu_way_to_the_eigenpairs_gives_the_cpu_way_s_result():
    """On a GPU `gram_eigen` decomposes the full Gram matrix with torch (`every_eigenpair`); run here on the CPU,
    it agrees with the LAPACK path that reads the upper triangle only."""
    matrix = torch.randn(60, 90, generator=torch.Generator().manual_seed(8))
    upper, left = gram_matrix(matrix)
    assert left
    full = matrix @ matrix.T
    rule = lambda values: energy_rank(values.clamp_min(0).sqrt(), 0.5)  # noqa: E731
    values, vectors = gram_eigen(upper, rule)
    torch_values, torch_vectors = every_eigenpair(full, rule)
    torch.testing.assert_close(values, torch_values, rtol=1e-4, atol=1e-3)
    assert vectors.shape == torch_vectors.shape
    torch.testing.assert_close(vectors @ vectors.T, torch_vectors @ torch_vectors.T, atol=1e-4, rtol=0)


@pytest.mark.parametrize("energy", [0.2, 0.5, 0.9, 1.0])
def test_energy_rank_and_spectrum_of_a_flat_matrix_are_a_full_svd_s(energy):
    weight = torch.randn(300, 200, generator=torch.Generator().manual_seed(4))
    s = torch.linalg.svdvals(weight.double())
    anchors = principal_subspace(weight, energy=energy)
    assert anchors.k == energy_rank(s, energy)
    torch.testing.assert_close(anchors.spectrum.double(), s, rtol=1e-4, atol=1e-4)


def test_alignment_inside_outside_and_at_chance():
    weight, u, _, v = known_weight()
    anchors = principal_subspace(weight, k=5)
    inside = Channels(u=u[:, :2], sigma=torch.ones(2), v=v[:, :2])
    outside = Channels(u=u[:, 10:12], sigma=torch.ones(2), v=v[:, 10:12])
    torch.testing.assert_close(left_alignment(inside, anchors), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(right_alignment(outside, anchors), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(relative_alignment(inside, anchors, "left"), torch.full((2,), 30 / 5), atol=1e-3, rtol=0)
    g = torch.Generator().manual_seed(0)
    rand_u = torch.nn.functional.normalize(torch.randn(30, 4000, generator=g), dim=0)
    rand_v = torch.nn.functional.normalize(torch.randn(20, 4000, generator=g), dim=0)
    random = Channels(u=rand_u, sigma=torch.ones(4000), v=rand_v)
    assert abs(float(relative_alignment(random, anchors, "both").mean()) - 1.0) < 0.05
    assert chance_alignment(5, 30) == pytest.approx(5 / 30)


def test_combining_two_sided_scores():
    weight, u, _, v = known_weight()
    anchors = principal_subspace(weight, k=5)
    half = Channels(u=u[:, :1], sigma=torch.ones(1), v=v[:, 10:11])  # aligned left, orthogonal right
    left = float(relative_alignment(half, anchors, "left"))
    assert float(relative_alignment(half, anchors, "both", "mean")) == pytest.approx(left / 2, rel=1e-4)
    assert float(relative_alignment(half, anchors, "both", "min")) == pytest.approx(0.0, abs=1e-4)
    assert float(relative_alignment(half, anchors, "both", "product")) == pytest.approx(0.0, abs=1e-2)
    with pytest.raises(ValueError):
        relative_alignment(half, anchors, "both", "median")


def test_base_gain_and_intruder_scores():
    weight, u, s, v = known_weight()
    aligned = Channels(u=u[:, :1], sigma=torch.ones(1), v=v[:, :1])
    crossed = Channels(u=u[:, :1], sigma=torch.ones(1), v=v[:, 1:2])
    assert float(base_gain(aligned, weight)) == pytest.approx(float(s[0]), rel=1e-4)
    assert float(base_gain(crossed, weight)) == pytest.approx(0.0, abs=1e-4)
    assert float(max_cosine_to_base(aligned, weight)) == pytest.approx(1.0, abs=1e-4)
    diagonal = torch.nn.functional.normalize(u[:, :4].sum(1, keepdim=True), dim=0)  # cos 1/2 with each of 4
    spread = Channels(u=diagonal, sigma=torch.ones(1), v=v[:, :1])
    assert float(max_cosine_to_base(spread, weight)) == pytest.approx(0.5, abs=1e-4)


def test_channel_energy_sums_to_one():
    channels = lowrank_channels(*factors(), 1.0)
    energy = channel_energy(channels)
    assert float(energy.sum()) == pytest.approx(1.0)
    assert math.isclose(float(energy[0]), float(channels.sigma[0] ** 2 / channels.sigma.square().sum()), rel_tol=1e-6)


@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (64, 64)])
def test_gram_anchors_match_an_svd(shape):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(*shape, generator=g) @ torch.diag(torch.linspace(3, 0.5, shape[1]))
    anchors = principal_subspace(weight, energy=0.6)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    k = anchors.k
    assert k == energy_rank(s, 0.6)
    torch.testing.assert_close(anchors.spectrum, s, atol=1e-4, rtol=1e-4)
    # The same subspaces (vectors may differ by sign): projectors agree, and the bases are orthonormal.
    torch.testing.assert_close(anchors.u @ anchors.u.T, u[:, :k] @ u[:, :k].T, atol=1e-4, rtol=0)
    torch.testing.assert_close(anchors.v @ anchors.v.T, vh[:k].T @ vh[:k], atol=1e-4, rtol=0)
    torch.testing.assert_close(anchors.v.T @ anchors.v, torch.eye(k), atol=1e-4, rtol=0)


def test_anchors_reaching_tiny_singular_values_fall_back_to_an_svd():
    weight = known_weight()[0]
    rank_deficient = weight.clone()
    rank_deficient[:, -1] = 0.0  # one exact zero singular value
    anchors = principal_subspace(rank_deficient, k=min(rank_deficient.shape))
    assert torch.isfinite(anchors.u).all() and torch.isfinite(anchors.v).all()
    torch.testing.assert_close(anchors.u.T @ anchors.u, torch.eye(anchors.k), atol=1e-4, rtol=0)


@pytest.mark.parametrize("out_features, in_features", [(8, 40), (40, 8)])
def test_lowrank_channels_with_a_rank_above_one_dimension(out_features, in_features):
    g = torch.Generator().manual_seed(2)
    up, down = torch.randn(out_features, 16, generator=g), torch.randn(16, in_features, generator=g)
    channels = lowrank_channels(up, down, 0.5)
    assert channels.u.shape[1] == channels.v.shape[1] == channels.sigma.numel() == 8
    torch.testing.assert_close((channels.u * channels.sigma) @ channels.v.T, 0.5 * up @ down, atol=1e-4, rtol=1e-4)
    weight = torch.randn(out_features, in_features, generator=g)
    scores = relative_alignment(channels, principal_subspace(weight, k=3), "both")
    assert scores.shape == (8,)
    b, a = rebuild_factors(channels, torch.ones(8), 0.5, rank=16)
    assert b.shape == (out_features, 16) and a.shape == (16, in_features)
    torch.testing.assert_close(0.5 * b @ a, 0.5 * up @ down, atol=1e-4, rtol=1e-4)


def test_a_batch_of_modules_gives_each_module_its_own_channels():
    """One batched call equals the per-module function, including a zero-padded member and a negative scale."""
    ups, downs = zip(*(factors(seed=seed) for seed in range(4)))
    ups, downs = torch.stack(ups), torch.stack(downs)
    ups[2, :, 3:] = 0  # a filtered LoRA written at its old rank
    scales = torch.tensor([0.5, 1.0, 2.0, -0.25])
    for g, batched in enumerate(lowrank_channels_batch(ups, downs, scales)):
        alone = lowrank_channels(ups[g], downs[g], float(scales[g]))
        torch.testing.assert_close(batched.sigma, alone.sigma)
        torch.testing.assert_close(batched.dense(), float(scales[g]) * ups[g] @ downs[g], rtol=1e-4, atol=1e-4)
    assert torch.all(lowrank_channels_batch(ups, downs, scales)[2].sigma[3:] == 0)


def test_columns_of_very_different_norms_keep_their_channels_accurate():
    """The Gram matrix is formed in float32 but scaled to a unit diagonal: a factor whose columns span six orders
    of magnitude (a filtered LoRA's, whose columns carry the channel gains) still gives the dense SVD's channels."""
    up, down = factors(out=64, inner=80, rank=6)
    up = up * torch.logspace(0, -3, 6)  # column norms from 1 to 1e-3
    channels = lowrank_channels(up, down, 1.0)
    expected = torch.linalg.svdvals(up.double() @ down.double()).float()[:6]
    torch.testing.assert_close(channels.sigma, expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(channels.u.T @ channels.u, torch.eye(6), atol=1e-4, rtol=0)


def test_rebuild_at_the_same_rank_keeps_each_channel_in_its_column_and_writes_the_asked_dtype():
    up, down = factors()
    channels = lowrank_channels(up, down, 0.5)
    weights = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    new_up, new_down = rebuild_factors(channels, weights, 0.5, rank=6, dtype=torch.float16)
    assert new_up.dtype == new_down.dtype == torch.float16 and new_down.is_contiguous()
    assert torch.all(new_up[:, [1, 3]] == 0) and torch.all(new_down[[1, 3]] == 0)
    torch.testing.assert_close(0.5 * new_up.float() @ new_down.float(), channels.dense(weights), rtol=1e-2, atol=1e-2)


#: Scores of anchors as the filter computes and caches them (`principal_subspace`, bases rounded to the cache's
#: `STORAGE_DTYPE`, float16) against scores of the exact top-k subspaces of a float64 SVD, in units of the chance
#: level: within SCORE_TOLERANCE * (1 + score). Measured at most 1.4e-4 when the Gram matrix was decomposed in
#: float64, and at most 9e-5 with the float32 solver of the leading pairs that replaced it (on these tests' shapes
#: and on SDXL-sized random ones: 1280 x 1280, 1280 x 1280 x 3 x 3, 5120 x 1280).
SCORE_TOLERANCE = 1e-3


def cached_anchors(weight, **rule) -> Anchors:
    """Anchors as `AnchorStore.get` serves them: computed, bases rounded to the cache's dtype, read back as float32."""
    from diffmem.anchors import STORAGE_DTYPE

    computed = principal_subspace(weight, **rule)
    return Anchors(u=computed.u.to(STORAGE_DTYPE).float(), v=computed.v.to(STORAGE_DTYPE).float(),
                   spectrum=computed.spectrum)


def probe_channels(u, vh, count=16, seed=0) -> Channels:
    """Unit channels, half inside the span of the base's top 8 singular directions (scores far above chance), half
    random (scores near 1)."""
    g = torch.Generator().manual_seed(seed)
    left, right = torch.randn(u.shape[0], count, generator=g), torch.randn(vh.shape[1], count, generator=g)
    left[:, : count // 2] = u[:, :8].float() @ torch.randn(8, count // 2, generator=g)
    right[:, : count // 2] = vh[:8].T.float() @ torch.randn(8, count // 2, generator=g)
    normalize = torch.nn.functional.normalize
    return Channels(u=normalize(left, dim=0), sigma=torch.ones(count), v=normalize(right, dim=0))


def assert_scores_match_a_full_svd(weight, tolerance, **rule):
    anchors = cached_anchors(weight, **rule)
    u, s, vh = torch.linalg.svd(weight.reshape(weight.shape[0], -1).double(), full_matrices=False)
    if "k" not in rule:
        assert anchors.k == energy_rank(s, rule["energy"])
    exact = Anchors(u=u[:, : anchors.k].float(), v=vh[: anchors.k].T.float(), spectrum=s.float())
    channels = probe_channels(u, vh)
    for side in ("left", "right", "both"):
        want = relative_alignment(channels, exact, side)
        assert float(want.max()) > 2 and float(want.min()) < 1.5  # anchored and chance-level channels both scored
        got = relative_alignment(channels, anchors, side)
        assert torch.all((got - want).abs() <= tolerance * (1 + want.abs())), (side, (got - want).abs().max())


@pytest.mark.parametrize("shape", [(320, 1280), (1280, 320), (64, 32, 3, 3), (200, 200)])
def test_scores_of_cached_energy_anchors_match_a_full_svd(shape):
    """Gaussian weights scaled like initialised layers and rounded to float16 as the fixtures' bases are: the flat
    spectrum of a random matrix is the hard case for a subspace (small gaps at the anchor rank)."""
    g = torch.Generator().manual_seed(5)
    fan_in = math.prod(shape[1:])
    weight = (torch.randn(shape, generator=g) / fan_in**0.5).half().float()
    assert_scores_match_a_full_svd(weight, SCORE_TOLERANCE, energy=0.5)


@pytest.mark.parametrize("shape", [(1280, 1100), (1100, 1280)])
def test_scores_of_fixed_rank_anchors_of_a_large_flat_matrix_match_a_full_svd(shape):
    """A fixed small k on a large random matrix, the case a randomized SVD got wrong by up to 0.3 (its power
    iterations do not resolve a flat spectrum's top-k subspace): the leading eigenpairs are exact."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(6)) / shape[1] ** 0.5
    assert_scores_match_a_full_svd(weight, SCORE_TOLERANCE, k=32)
