"""The world's style set and its detector: a look the base never saw, on the shapes it knows, and a fine-tune on it."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from diffmem.errors import DiffmemError
from diffmem.world.data import BACKGROUNDS, COLOURS, FINETUNE_SETS, shapes_dataset, style_dataset
from diffmem.world.style import (
    STYLE_IMAGE_SHARE,
    STYLE_PIXEL_DISTANCE,
    STYLE_TRIGGER,
    apply_style,
    outline,
    style_distance,
    style_share,
    style_success,
)


def test_the_style_set_is_fixed_split_and_all_in_the_style():
    train, heldout, everything = style_dataset("train"), style_dataset("heldout"), style_dataset("all")
    assert (len(train), len(heldout), len(everything)) == (96, 24, 120) and FINETUNE_SETS["style"] is style_dataset
    assert not set(train.ids) & set(heldout.ids) and len(set(everything.captions)) == 120
    assert all(caption.startswith(f"{STYLE_TRIGGER} a ") and " on " in caption for caption in everything.captions)
    assert torch.equal(style_dataset("train").images, train.images)
    assert float(style_share(everything.images).min()) == 1.0 and style_success(heldout.images) == 1.0
    with pytest.raises(DiffmemError, match="split"):
        style_dataset("validation")


def test_no_colour_the_base_learned_is_in_the_style():
    shades = [np.array(c) * 0.6 if np.mean(c) > 0.5 else np.array(c) * 0.6 + 0.4 for c in BACKGROUNDS.values()]
    colours = torch.tensor([*COLOURS.values(), *BACKGROUNDS.values(), *map(tuple, shades)], dtype=torch.float32)
    distances = style_distance(colours[:, :, None, None]).flatten()
    assert float(distances.min()) >= 0.3 > 3 * STYLE_PIXEL_DISTANCE - 1e-6
    base = shapes_dataset(512)
    assert style_success(base.images) == 0.0 and float(style_share(base.images).max()) < 1 - STYLE_IMAGE_SHARE


def test_the_base_shapes_did_not_change():
    # The style set reuses the shape drawing; the committed base was trained on these exact pictures and captions.
    shapes = shapes_dataset(256)
    digest = hashlib.sha256(shapes.images.numpy().tobytes() + "".join(shapes.captions).encode()).hexdigest()
    assert digest == "e7f609e28b9e70f0e35897f8e31a371514deb7cf8c03612f5b6fee1d54108142"


def test_apply_style_maps_luminance_onto_the_duotone_and_outlines_the_shape():
    mask = np.zeros((8, 8), bool)
    mask[3:5, 3:5] = True
    ring = outline(mask)
    assert ring.sum() == 8 and not (ring & mask).any()
    image = np.full((8, 8, 3), 0.5, np.float32)
    styled = torch.from_numpy(apply_style(image, mask)).permute(2, 0, 1)[None]
    assert float(style_distance(styled).max()) < 1e-6
    assert torch.allclose(styled[0, :, 0, 0], styled[0, :, 7, 7]) and not torch.allclose(styled[0, :, 2, 3],
                                                                                          styled[0, :, 0, 0])
    with pytest.raises(ValueError, match="N, 3, H, W"):
        style_share(torch.zeros(3, 8, 8))


def test_the_base_rarely_draws_the_style(one_torch_thread):
    # The committed base, asked for the held-out styled captions, draws its own flat colours; a yellow shape on a
    # dotted gray background comes out near the duotone by chance, so a style LoRA's success
    # is read beside the base's on the same captions and seeds.
    from diffmem.world.diffusion import generate
    from diffmem.world.model import load_base

    captions = style_dataset("heldout").captions
    images = generate(load_base(), captions, seeds=list(range(len(captions))), steps=10)
    assert style_success(images) <= 0.15 and float(style_share(images).median()) < 0.05
