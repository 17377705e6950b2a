"""The project's copy-detection embedder: losses, augmentations, a short training run, pinned loading."""

from __future__ import annotations

import math

import pytest
import torch

from diffmem.errors import BadWeightsError, DiffmemError
from diffmem.metrics.embedder import (
    CopyDetectionNet,
    EmbedderConfig,
    info_nce,
    koleo,
    load_copy_embedder,
    random_augment,
    train_copy_embedder,
)
from diffmem.metrics.train_embedder import copy_detection_quality, save_embedder


def test_info_nce_by_hand():
    # Two pairs of orthogonal unit vectors, each view identical to its partner.
    a = torch.eye(2)
    logits_row = torch.tensor([0.0, 1.0, 0.0]) / 0.5  # row 0 sees: a1 (0), b0 (1), b1 (0)
    expected = -torch.log_softmax(logits_row, 0)[1]
    assert info_nce(a, a.clone(), 0.5).item() == pytest.approx(expected.item(), rel=1e-6)


def test_koleo_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # nearest distances: sqrt2, sqrt2, sqrt2 -> -log sqrt2
    assert koleo(z).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-5)


def test_augment_keeps_range_and_changes_images():
    images = torch.rand(8, 3, 32, 32)
    out = random_augment(images, torch.Generator().manual_seed(0), (0.4, 1.0))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert (out - images).abs().mean() > 0.05
    again = random_augment(images, torch.Generator().manual_seed(0), (0.4, 1.0))
    assert torch.equal(out, again)


def test_net_outputs_unit_vectors():
    net = CopyDetectionNet()
    z = net(torch.rand(3, 3, 32, 32))
    assert z.shape == (3, EmbedderConfig.dim)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))


def test_short_training_learns_copies_and_round_trips(tmp_path):
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    # Smooth random images (upsampled noise), so crops of one image resemble each other.
    images = torch.nn.functional.interpolate(torch.rand(48, 3, 4, 4, generator=gen), size=32, mode="bilinear")
    config = EmbedderConfig(widths=(8, 16, 16, 16), dim=16, steps=40, batch_size=32, lr=3e-3)
    net, losses = train_copy_embedder(images, config)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    path = tmp_path / "emb.safetensors"
    digest = save_embedder(net, config, path, {"test": True})
    embedder = load_copy_embedder(path, expected_sha256=digest)
    quality = copy_detection_quality(embedder, images[:16])
    assert quality["mean_copy_cosine"] > quality["mean_other_cosine"]
    with torch.no_grad():
        torch.testing.assert_close(embedder(images[:4]), net.half().float()(images[:4]), atol=2e-3, rtol=0)
    with pytest.raises(BadWeightsError, match="sha256"):
        load_copy_embedder(path, expected_sha256="0" * 64)
    with pytest.raises(DiffmemError, match="no embedder weights"):
        load_copy_embedder(tmp_path / "missing.safetensors")


def test_committed_embedder_is_pinned_and_detects_copies_of_unseen_faces():
    from diffmem.world.data import faces_dataset

    embedder = load_copy_embedder()
    assert embedder.name == "diffmem-copy-v1"
    quality = copy_detection_quality(embedder, faces_dataset("heldout").images)
    # measured on these 20 faces: recall 0.85, false copies 0.08 (faces resemble each other more than the mixed
    # held-out set of `python -m diffmem.metrics.train_embedder --evaluate-only` does: 0.98 and 0.009)
    assert quality["copy_recall"] >= 0.75
    assert quality["false_copy_rate"] <= 0.15
    assert quality["mean_copy_cosine"] > quality["mean_other_cosine"] + 0.3
