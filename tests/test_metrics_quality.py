"""Held-out denoising loss and CLIP score."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from builders_metrics import tiny_clip_folder
from diffmem.metrics.quality import ClipScorer, clip_score_from_features, denoising_loss, evaluation_timesteps


def test_evaluation_timesteps_by_hand():
    # strata of width 5 over [0, 10); sample 1 is shifted by half a stratum
    assert evaluation_timesteps(2, 2, 10).tolist() == [[0, 5], [2, 7]]
    grid = evaluation_timesteps(16, 4, 1000)
    assert grid.min() >= 0 and grid.max() <= 999
    assert len(set(grid.flatten().tolist())) == 64


class ZeroUNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, sample, timestep, encoder_hidden_states):
        return SimpleNamespace(sample=torch.zeros_like(sample) + self.anchor)


class OracleUNet(ZeroUNet):
    """Knows the clean images, so it can invert the forward process exactly: a perfect denoiser."""

    def __init__(self, scheduler, clean):
        super().__init__()
        self.scheduler, self.clean = scheduler, clean

    def forward(self, sample, timestep, encoder_hidden_states):
        alpha_bar = self.scheduler.alphas_cumprod[timestep].view(-1, 1, 1, 1)
        index = encoder_hidden_states[:, 0, 0].long()  # the test puts each sample's index in its context
        eps = (sample - alpha_bar.sqrt() * self.clean[index]) / (1 - alpha_bar).sqrt()
        return SimpleNamespace(sample=eps)


def test_loss_of_zero_prediction_is_noise_power():
    samples = torch.rand(5, 3, 4, 4) * 2 - 1
    embeds = torch.zeros(5, 2, 6)
    scheduler = DDPMScheduler(num_train_timesteps=100)
    loss = denoising_loss(ZeroUNet(), scheduler, samples, embeds, timesteps_per_sample=3, seed=7, batch_size=4)
    noise = torch.randn((15, 3, 4, 4), generator=torch.Generator().manual_seed(7))
    assert loss == pytest.approx(float(noise.pow(2).mean()), rel=1e-6)


def test_loss_of_v_prediction_target_by_hand():
    samples = torch.rand(2, 3, 4, 4)
    scheduler = DDPMScheduler(num_train_timesteps=10, prediction_type="v_prediction")
    loss = denoising_loss(ZeroUNet(), scheduler, samples, torch.zeros(2, 1, 3), timesteps_per_sample=1, seed=0)
    noise = torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    a = scheduler.alphas_cumprod[torch.tensor([0, 5])].view(-1, 1, 1, 1)
    v = a.sqrt() * noise - (1 - a).sqrt() * samples
    assert loss == pytest.approx(float(v.pow(2).mean()), rel=1e-5)


def test_perfect_denoiser_scores_zero():
    samples = torch.rand(4, 3, 4, 4) * 2 - 1
    embeds = torch.zeros(4, 1, 2)
    embeds[:, 0, 0] = torch.arange(4)
    scheduler = DDPMScheduler(num_train_timesteps=50)
    assert denoising_loss(OracleUNet(scheduler, samples), scheduler, samples, embeds, 5) == pytest.approx(0, abs=1e-8)


def test_clip_score_from_features_by_hand():
    images = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    texts = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    # cosines 1, -1/sqrt(2) (clamped to 0), 1/sqrt(2)
    assert clip_score_from_features(images, texts) == pytest.approx(100 * (1 + 0 + 1 / math.sqrt(2)) / 3)
    assert clip_score_from_features(images, texts, scale=2.5) == pytest.approx(2.5 * (1 + 1 / math.sqrt(2)) / 3)
    with pytest.raises(ValueError, match="one caption per image"):
        clip_score_from_features(images, texts[:2])


def test_clip_scorer_on_a_tiny_local_clip(tmp_path):
    model = tiny_clip_folder(tmp_path)
    scorer = ClipScorer(tmp_path)
    images = torch.rand(2, 3, 16, 16)
    captions = ["a red cat", "blue sky"]
    with torch.no_grad():
        tokens = scorer.tokenizer(captions, padding=True, return_tensors="pt")
        text = model.get_text_features(**tokens).pooler_output
        image = model.get_image_features(pixel_values=(images - 0.5) / 0.25).pooler_output
    expected = float((100 * torch.nn.functional.cosine_similarity(image, text).clamp_min(0)).mean())
    assert scorer(images, captions) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="captions"):
        scorer(images, ["one"])
