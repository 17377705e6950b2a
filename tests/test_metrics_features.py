"""Embedders, AMD, embedding copy test and FID."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.metrics.pairwise import cosine_distances

from diffmem.errors import DiffmemError, FileFormatError
from diffmem.metrics.amd import amd, amd_images, embedding_copy_decisions
from diffmem.metrics.features import ImageEmbedder, PixelEmbedder, embed, load_embedder
from diffmem.metrics.fid import feature_statistics, fid, fid_from_features, frechet_distance


class TinyCNN(torch.nn.Module):
    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, dim, 3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(2)
        self.num_features = dim * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pool(self.conv(x.float())).flatten(1))


def test_pixel_embedder_and_batching():
    images = torch.rand(7, 3, 8, 8)
    embedder = PixelEmbedder(size=2)
    assert isinstance(embedder, ImageEmbedder)
    assert embedder.name == "pixels2"
    features = embed(embedder, images, batch_size=3)
    assert features.shape == (7, 12)
    torch.testing.assert_close(features[:, 0], images[:, 0, :4, :4].mean(dim=(1, 2)))


def test_torchscript_and_export_embedders(tmp_path):
    module = TinyCNN().eval()
    images = torch.rand(5, 3, 16, 16)
    scripted = tmp_path / "net.pt"
    torch.jit.trace(module, images[:1]).save(str(scripted))
    loaded = load_embedder(scripted)
    assert loaded.name == "net"
    torch.testing.assert_close(embed(loaded, images), module(images).detach())

    exported = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(module, (images[:2],)), str(exported))
    torch.testing.assert_close(embed(load_embedder(exported), images[:2]), module(images[:2]).detach())


def test_state_dict_and_unknown_files_refused(tmp_path):
    state = tmp_path / "weights.pt"
    torch.save(TinyCNN().state_dict(), state)
    with pytest.raises(FileFormatError, match="not a TorchScript file"):
        load_embedder(state)
    other = tmp_path / "net.onnx"
    other.write_bytes(b"x")
    with pytest.raises(FileFormatError, match="unknown embedder format"):
        load_embedder(other)
    with pytest.raises(FileFormatError, match=r"config\.json"):
        load_embedder(tmp_path)
    with pytest.raises(DiffmemError, match="no such"):
        load_embedder(tmp_path / "missing.pt")


def test_huggingface_folder_embedder(tmp_path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32)
    model = ViTModel(config).eval()
    model.save_pretrained(tmp_path)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 16, "width": 16}, "image_mean": mean, "image_std": std, "do_normalize": True}))
    embedder = load_embedder(tmp_path, name="vit")
    images = torch.rand(3, 3, 32, 32)
    features = embed(embedder, images)
    resized = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", antialias=True)
    pixel_values = (resized - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).pooler_output
    torch.testing.assert_close(features, expected)


def test_amd_by_hand_and_against_sklearn():
    generated = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    train = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    # sample 0 coincides in direction with train 0 (distance 0); sample 1 is 45 degrees from train 1
    assert amd(generated, train) == pytest.approx((0.0 + (1 - 1 / math.sqrt(2))) / 2)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(9, 5, generator=gen), torch.randn(13, 5, generator=gen)
    assert amd(a, b) == pytest.approx(float(cosine_distances(a.numpy(), b.numpy()).min(axis=1).mean()))


def test_amd_images_is_zero_for_copies():
    train = torch.rand(4, 3, 8, 8)
    assert amd_images(train[[1, 3]], train, PixelEmbedder()) == pytest.approx(0.0, abs=1e-12)
    assert amd_images(torch.rand(4, 3, 8, 8), train, PixelEmbedder()) > 0.01


def test_embedding_copy_threshold():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    generated = torch.tensor([[1.0, 0.9], [-1.0, 0.1], [0.3, 1.0]])
    result = embedding_copy_decisions(generated, train)
    # cosines: 1/sqrt(1.81) = 0.743 (train 0); max(-0.995, 0.0995) = 0.0995 (train 1); 1/sqrt(1.09) = 0.958 (train 1)
    assert result.similarity.tolist() == pytest.approx([1 / math.sqrt(1.81), 0.1 / math.sqrt(1.01), 1 / math.sqrt(1.09)],
                                                       rel=1e-6)
    assert result.nearest_index.tolist() == [0, 1, 1]
    assert result.is_copy.tolist() == [True, False, True]
    assert embedding_copy_decisions(generated, train, threshold=0.8).is_copy.tolist() == [False, False, True]


def test_frechet_distance_of_one_dimensional_gaussians():
    # For 1-D Gaussians the Fréchet distance is (m1 - m2)^2 + (s1 - s2)^2.
    value = frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([3.0]), torch.tensor([[9.0]]))
    assert value == pytest.approx((1 - 3) ** 2 + (2 - 3) ** 2)


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_against_scipy_sqrtm_and_stats():
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(200, 4, generator=gen)
    fake = torch.randn(150, 4, generator=gen) * 1.5 + 0.3
    _, cov = feature_statistics(real)
    np.testing.assert_allclose(cov.numpy(), np.cov(real.numpy(), rowvar=False), rtol=1e-10)
    reference = scipy_frechet(*(t.numpy() for t in (*feature_statistics(real), *feature_statistics(fake))))
    assert fid_from_features(real, fake) == pytest.approx(reference, rel=1e-8)
    assert fid_from_features(real, real) == pytest.approx(0.0, abs=1e-9)


def test_fid_rank_deficient_is_finite():
    gen = torch.Generator().manual_seed(2)
    value = fid_from_features(torch.randn(5, 32, generator=gen), torch.randn(6, 32, generator=gen))
    assert math.isfinite(value) and value > 0


def test_fid_matches_torchmetrics_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = TinyCNN()
    gen = torch.Generator().manual_seed(3)
    real = torch.rand(64, 3, 16, 16, generator=gen)
    fake = torch.rand(64, 3, 16, 16, generator=gen) * 0.4
    metric = FrechetInceptionDistance(feature=net, normalize=True, input_img_size=(3, 16, 16))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected = float(metric.compute())
    ours = fid(real, fake, lambda x: net(x).detach())
    assert expected > 0.01
    assert ours == pytest.approx(expected, rel=1e-4)


def test_default_feature_network_is_the_project_embedder():
    from diffmem.metrics.embedder import load_copy_embedder

    gen = torch.Generator().manual_seed(4)
    real = torch.rand(20, 3, 32, 32, generator=gen)
    fake = torch.rand(20, 3, 32, 32, generator=gen) * 0.5
    embedder = load_copy_embedder()
    assert fid(real, fake) == pytest.approx(fid(real, fake, embedder))
    assert amd_images(fake, real) == pytest.approx(amd_images(fake, real, embedder))
    assert amd_images(real[:5], real) == pytest.approx(0.0, abs=1e-6)
