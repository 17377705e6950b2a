"""Wen et al.'s detector: the pure norm and the sampling driver on diffusers UNets."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from diffmem.metrics.wen import WenConfig, conditional_difference_norms, sample_with_wen_scores, wen_score


def test_norm_and_mean_by_hand():
    eps_u = torch.zeros(2, 1, 1, 2)
    eps_c = torch.tensor([[[[3.0, 4.0]]], [[[0.0, 1.0]]]])
    assert conditional_difference_norms(eps_c, eps_u).tolist() == [5.0, 1.0]
    assert wen_score(torch.tensor([[5.0, 1.0], [1.0, 3.0]])).tolist() == [3.0, 2.0]
    with pytest.raises(ValueError, match="differ"):
        conditional_difference_norms(eps_c, torch.zeros(2, 2))


class ContextEchoUNet(torch.nn.Module):
    """Predicts a constant image whose value is the context's first entry: eps_c - eps_u is known exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.config = SimpleNamespace(in_channels=3, sample_size=4)

    def forward(self, sample, timestep, encoder_hidden_states):
        value = encoder_hidden_states[:, 0, 0].view(-1, 1, 1, 1) + self.anchor
        return SimpleNamespace(sample=value.expand_as(sample) * 0.01)


def test_driver_scores_by_hand():
    prompts = torch.zeros(3, 2, 5)
    prompts[:, 0, 0] = torch.tensor([0.0, 1.0, 2.0])
    empty = torch.zeros(1, 2, 5)
    trace = sample_with_wen_scores(
        ContextEchoUNet(), DDIMScheduler(), prompts, empty,
        WenConfig(num_inference_steps=4, generations=2, batch_size=4), generator=torch.Generator().manual_seed(0),
    )
    assert trace.step_norms.shape == (4, 3, 2)
    assert trace.samples.shape == (3, 2, 3, 4, 4)
    # difference = 0.01 * value on all 3*4*4 = 48 entries -> norm 0.01 * value * sqrt(48) at every step
    expected = [0.01 * v * math.sqrt(48) for v in (0.0, 1.0, 2.0)]
    assert trace.scores.tolist() == pytest.approx(expected)
    assert trace.first_step.tolist() == pytest.approx(expected)


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4,
    ).eval()


def test_real_unet_driver_is_deterministic_and_zero_without_text():
    unet = tiny_unet()
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randn(2, 3, 12, generator=gen)
    empty = torch.randn(1, 3, 12, generator=gen)
    config = WenConfig(num_inference_steps=3, generations=2, batch_size=3)  # batches split across prompts

    def run(p):
        return sample_with_wen_scores(unet, DDIMScheduler(), p, empty, config, torch.Generator().manual_seed(5))

    first, second = run(prompts), run(prompts)
    torch.testing.assert_close(first.step_norms, second.step_norms)
    torch.testing.assert_close(first.samples, second.samples)
    assert torch.all(first.scores > 0)
    # the empty prompt as the condition: the conditional part vanishes, so the score is 0
    same = run(empty.expand(2, -1, -1).clone())
    assert torch.allclose(same.scores, torch.zeros(2, dtype=torch.float64), atol=1e-6)


def test_bad_embeddings_refused():
    with pytest.raises(ValueError, match=r"\[P, L, D\]"):
        sample_with_wen_scores(tiny_unet(), DDIMScheduler(), torch.zeros(2, 12), torch.zeros(1, 3, 12))
    with pytest.raises(ValueError, match="empty_embeds"):
        sample_with_wen_scores(tiny_unet(), DDIMScheduler(), torch.zeros(2, 3, 12), torch.zeros(1, 4, 12))
