"""Selection rules that turn channel scores into kept/dropped/scaled channels."""

import pytest
import torch

from diffmem.filters.selection import Selection, channel_weights, select

SCORES = torch.tensor([0.5, 3.0, 1.0, 2.0])
SIGMA = torch.tensor([4.0, 1.0, 2.0, 1.0])  # energies 16, 1, 4, 1 of 22


def weights(**kwargs):
    return channel_weights(SCORES, SIGMA, Selection(**kwargs)).tolist()


def test_threshold_keeps_scores_at_or_above():
    assert weights(rule="threshold", threshold=1.0) == [0, 1, 1, 1]


def test_fraction_keeps_top_share_of_channels():
    assert weights(rule="fraction", keep_fraction=0.5) == [0, 1, 0, 1]
    assert weights(rule="fraction", keep_fraction=0.0) == [0, 0, 0, 0]


def test_energy_keeps_top_scored_channels_until_the_share_is_reached():
    # by score: ch1 (1/22), ch3 (1/22), ch2 (4/22), ch0 (16/22); 25% needs ch1, ch3, ch2 (6/22 = 27%)
    assert weights(rule="energy", keep_fraction=0.25) == [0, 1, 1, 1]
    assert weights(rule="energy", keep_fraction=0.04) == [0, 1, 0, 0]  # 1/22 = 4.5% suffices
    assert weights(rule="energy", keep_fraction=0.05) == [0, 1, 0, 1]  # 4.5% does not; 2/22 does


def test_soft_and_uniform_and_all():
    assert weights(rule="soft", threshold=2.0) == pytest.approx([0.25, 1.0, 0.5, 1.0])
    assert weights(rule="uniform", keep_fraction=0.25) == pytest.approx([0.5] * 4)
    assert weights(rule="all") == [1, 1, 1, 1]


def test_global_scope_ranks_across_modules():
    scores = {"a": torch.tensor([5.0, 4.0]), "b": torch.tensor([1.0, 0.5])}
    sigmas = {"a": torch.ones(2), "b": torch.ones(2)}
    layer = select(scores, sigmas, Selection(rule="fraction", keep_fraction=0.5, scope="layer"))
    assert layer["a"].tolist() == [1, 0] and layer["b"].tolist() == [1, 0]
    glob = select(scores, sigmas, Selection(rule="fraction", keep_fraction=0.5, scope="global"))
    assert glob["a"].tolist() == [1, 1] and glob["b"].tolist() == [0, 0]


def test_bad_selection_is_refused():
    with pytest.raises(ValueError):
        Selection(rule="median")
    with pytest.raises(ValueError):
        Selection(keep_fraction=1.5)
    with pytest.raises(ValueError):
        Selection(scope="model")
