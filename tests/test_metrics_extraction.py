"""Extraction attack: connected groups of near-identical generations (Carlini et al.; MemControl)."""

from __future__ import annotations

import networkx as nx
import pytest
import torch

from diffmem.metrics.extraction import ExtractionConfig, extraction_attack, largest_component


def test_largest_component_is_transitive_by_hand():
    d = torch.full((5, 5), 9.0)
    for i, j in [(0, 1), (1, 2), (3, 4)]:  # 0-1-2 chained (0 and 2 are far apart), 3-4 a pair
        d[i, j] = d[j, i] = 0.01
    assert largest_component(d, 0.1) == (0, 1, 2)
    assert largest_component(d, 0.001) == (0,)  # no edges: every node alone, lowest index wins the tie
    assert largest_component(d, 10.0) == (0, 1, 2, 3, 4)


@pytest.mark.parametrize("seed", range(5))
def test_largest_component_agrees_with_networkx(seed):
    gen = torch.Generator().manual_seed(seed)
    points = torch.rand(30, 2, generator=gen)
    d = torch.cdist(points, points)
    graph = nx.Graph()
    graph.add_nodes_from(range(30))
    graph.add_edges_from((i, j) for i in range(30) for j in range(i + 1, 30) if d[i, j] < 0.15)
    biggest = max(len(c) for c in nx.connected_components(graph))
    members = largest_component(d, 0.15)
    assert len(members) == biggest
    assert set(members) in [set(c) for c in nx.connected_components(graph)]


def make_generations() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(4, 3, 16, 16, generator=gen)
    memorized = (train[2] + 0.01 * torch.randn(5, 3, 16, 16, generator=gen)).clamp(0, 1)
    varied = torch.rand(5, 3, 16, 16, generator=gen)
    pair = torch.rand(5, 3, 16, 16, generator=gen)
    pair[1] = (pair[0] + 0.01).clamp(0, 1)
    return torch.stack([memorized, varied, pair]), train


def test_memorized_prompt_is_extracted_and_matched():
    generations, train = make_generations()
    result = extraction_attack(generations)
    assert [p.largest_component for p in result.prompts] == [5, 1, 2]
    assert [p.extracted for p in result.prompts] == [True, False, False]
    assert result.extracted_images == 1

    with_train = extraction_attack(generations, train=train)
    assert with_train.prompts[0].matched_train_index == 2
    assert with_train.prompts[0].match_distance < 0.05
    assert with_train.extracted_images == 1


def test_match_requirement_rejects_collapse_onto_unseen_image():
    generations, train = make_generations()
    others = train[[0, 1, 3]]  # the image the prompt collapses onto is not in this training set
    result = extraction_attack(generations, train=others)
    assert result.prompts[0].largest_component == 5
    assert not result.prompts[0].extracted
    assert result.extracted_images == 0


def test_min_component_setting():
    generations, _ = make_generations()
    result = extraction_attack(generations, ExtractionConfig(min_component=2))
    assert [p.extracted for p in result.prompts] == [True, False, True]


def test_bad_shape_refused():
    with pytest.raises(ValueError, match=r"\[P, G, C, H, W\]"):
        extraction_attack(torch.rand(5, 3, 16, 16))
