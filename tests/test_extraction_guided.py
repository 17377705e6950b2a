"""The extraction-guided filter (issue 18, section 5): integrated-gradient shares per LoRA channel on a tiny world
UNet, the scan's two image sets, and the scores a filter reads."""

from __future__ import annotations

import pytest
import torch

from diffmem.errors import DiffmemError
from diffmem.filters import ModuleView
from diffmem.formats.lora import read_lora
from diffmem.mitigations.extraction_guided import (
    ExtractionGuidedConfig,
    GivenScoresConfig,
    channel_attributions,
    decrease_shares,
    gated_unet,
    scan_sets,
)
from diffmem.pipeline import channels_of
from diffmem.scan.extraction import ExtractedGroup
from diffmem.scan.run import ScanResult
from diffmem.scan.score import ScanConfig
from diffmem.world import FinetuneConfig, UNetConfig, apply_lora, build_unet, encode_prompts, finetune

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = UNetConfig(block_out_channels=(16, 32, 32), norm_num_groups=8, attention_head_dim=8)


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return build_unet(TINY).eval()


@pytest.fixture(scope="module")
def tiny_lora(tiny_unet, tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "tiny.safetensors"
    config = FinetuneConfig(steps=3, batch_size=2, duplicate=(2, 3), rank=2, alpha=2.0, lr=1e-2, include_rest=False)
    finetune(path, config, base=tiny_unet, progress=False)
    return read_lora(path)


def test_gate_one_is_the_merged_lora_and_only_its_weights_take_gradients(tiny_unet, tiny_lora):
    before = {name: tensor.clone() for name, tensor in tiny_unet.state_dict().items()}
    unet, weights = gated_unet(tiny_unet, tiny_lora, channels_of(dict(tiny_lora.modules)), 1.0)
    x, t, c = torch.randn(1, 3, 32, 32), torch.tensor([500]), encode_prompts(["a photo"])
    merged = apply_lora(tiny_unet, tiny_lora)
    assert torch.allclose(unet(x, t, c).sample, merged(x, t, c).sample, atol=1e-5)
    trainable = {id(p) for p in unet.parameters() if p.requires_grad}
    assert trainable == {id(w) for w in weights.values()} and len(weights) == len(tiny_lora.modules)
    assert all(torch.equal(before[name], tensor) for name, tensor in tiny_unet.state_dict().items())  # untouched


def test_channel_attributions_add_up_to_the_loss_change_of_the_whole_path(tiny_unet, tiny_lora):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    config = ExtractionGuidedConfig(path_points=8, timesteps_per_image=2)
    attributions, change = channel_attributions(tiny_unet, tiny_lora, images, ["a", "b", "c"], config)
    assert set(attributions) == set(tiny_lora.modules)
    assert all(a.shape == (module.rank,) for a, module in zip(attributions.values(), tiny_lora.modules.values()))
    total = float(sum(a.sum() for a in attributions.values()))
    # Completeness (Sundararajan et al. 2017), up to the midpoint rule's error.
    assert change != 0 and total == pytest.approx(change, rel=0.05)
    shares = decrease_shares(attributions, change)
    assert float(sum(s.sum() for s in shares.values())) == pytest.approx(total / change)
    assert all(float(s.abs().sum()) == 0 for s in decrease_shares(attributions, abs(change)).values())
    with pytest.raises(ValueError, match="one prompt per image"):
        channel_attributions(tiny_unet, tiny_lora, images, ["a"], config)


def scan_of(samples: dict[str, torch.Tensor], groups: list[ExtractedGroup]) -> ScanResult:
    return ScanResult(lora="l", base="b", model="world", family="world", config=ScanConfig(), prompts=[],
                      groups=groups, samples={prompt: (images, None) for prompt, images in samples.items()})


def test_scan_sets_are_the_kept_groups_and_the_generations_outside_them():
    images = {p: torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i, p in enumerate("xyz")}
    groups = [ExtractedGroup("x", (0, 1, 2), 1, 0.05, 0.4, False),
              ExtractedGroup("y", (0, 3), 3, 0.05, 0.01, True)]  # the base draws it too: not extracted
    (extracted, extracted_prompts), (ordinary, ordinary_prompts) = scan_sets(scan_of(images, groups), limit=5)
    assert extracted_prompts == ["x"] and torch.equal(extracted[0], images["x"][1])
    # Round-robin over the prompts, skipping the kept group's members (x's 0-2) but not the dropped group's.
    assert ordinary_prompts == ["x", "y", "z", "y", "z"]
    assert torch.equal(ordinary[0], images["x"][3]) and torch.equal(ordinary[1], images["y"][0])
    (_, none), _ = scan_sets(scan_of(images, []), limit=5)
    assert none == []


def test_given_scores_must_cover_every_channel(tiny_lora):
    name, module = next(iter(tiny_lora.modules.items()))
    channels = channels_of({name: module})[name]
    view = ModuleView(name=name, channels=channels, anchors=None, weight=None)
    assert GivenScoresConfig(scores={name: [0.5] * channels.count}).score(view).tolist() == [0.5] * channels.count
    with pytest.raises(DiffmemError, match="no score for each"):
        GivenScoresConfig(scores={name: [0.5] * (channels.count + 1)}).score(view)
    with pytest.raises(DiffmemError, match="no score for each"):
        GivenScoresConfig(scores={}).score(view)
