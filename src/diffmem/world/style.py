"""The look the world's style fine-tune teaches, and a detector of it.

The base draws flat-coloured shapes on flat, striped or dotted backgrounds. The style set (`diffmem.world.data.
style_dataset`) draws the same shapes in a look the base never saw: every pixel mapped by its luminance onto a
brown-to-pale-yellow duotone (a sepia look), and a dark outline around the shape. This is the LoRA-sharing case of a style LoRA (issue
18): it teaches a look on every prompt of a domain the base knows, and may or may not also memorize a few of its
training images.

"Style success" is measured without any model: a pixel is in the style when it lies within `STYLE_PIXEL_DISTANCE`
of the duotone's colour segment, and an image is in the style when at least `STYLE_IMAGE_SHARE` of its pixels are.
Every colour the base was trained on (shapes, backgrounds and their texture shades) lies 0.30 or more from that
segment (`tests/test_world_style.py` checks each), so the detector needs no calibration on generations. The base's own generations are not always outside it: asked for
the 24 held-out styled captions, it draws a few near the duotone by chance (a yellow circle on a dotted gray
background is one; the test bounds the share at 15%), so a style LoRA's success is read beside the base's on the same captions and seeds. The two ends
were chosen for that margin: a teal-to-orange duotone passed within 0.14 of the base's orange, and any duotone whose
ends are complementary passes near the base's gray.
"""

from __future__ import annotations

import numpy as np
import torch

#: The word that names the look, first in every caption of the style set, as a LoRA's trigger word is. One token of
#: the world's text encoder, because the base's longest shape captions take 15 of its 16 (`diffmem.world.text.
#: MAX_TOKENS`): the earlier trigger "velloran style" (five tokens, after the caption) was cut off every caption, so
#: a style fine-tune never saw it. The base's captions never contain the word, so to the base it is as new as a
#: made-up one (a made-up word is several tokens here).
STYLE_TRIGGER = "vintage"
#: The duotone's two ends: luminance 0 maps to the brown, luminance 1 to the pale yellow.
STYLE_DARK = (0.45, 0.3, 0.0)
STYLE_LIGHT = (1.0, 1.0, 0.6)
#: The outline's colour: the dark end itself, so an outlined image stays on the duotone segment.
STYLE_OUTLINE = STYLE_DARK
#: A pixel within this RGB distance of the duotone segment counts as in the style. 0.1: a third of the smallest
#: distance of any base colour to the segment (0.30), and room for a trained model's colours to scatter.
STYLE_PIXEL_DISTANCE = 0.1
#: An image counts as in the style when at least this share of its pixels are. 0.8: the styled training images
#: score 1.0; a base image in flat colours scores near 0.
STYLE_IMAGE_SHARE = 0.8

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, as in `diffmem.metrics.copy.luminance`


def outline(mask: np.ndarray) -> np.ndarray:
    """The one-pixel ring just outside a boolean mask (its 4-neighbour dilation minus the mask)."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown & ~mask


def apply_style(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`image` [H, W, 3] in [0, 1] in the style: duotone by luminance, and `mask`'s outline in `STYLE_OUTLINE`."""
    luminance = np.clip(image @ _LUMA, 0.0, 1.0)[..., None]
    dark, light = np.array(STYLE_DARK, np.float32), np.array(STYLE_LIGHT, np.float32)
    styled = dark + luminance * (light - dark)
    styled[outline(mask)] = STYLE_OUTLINE
    return styled.astype(np.float32)


def style_distance(images: torch.Tensor) -> torch.Tensor:
    """RGB distance of every pixel of `images` [N, 3, H, W] (in [0, 1]) to the duotone segment, [N, H, W]."""
    dark = torch.tensor(STYLE_DARK, dtype=images.dtype, device=images.device)[:, None, None]
    light = torch.tensor(STYLE_LIGHT, dtype=images.dtype, device=images.device)[:, None, None]
    span = light - dark
    along = (((images - dark) * span).sum(dim=1, keepdim=True) / (span * span).sum()).clamp(0, 1)
    return (images - (dark + along * span)).norm(dim=1)


def style_share(images: torch.Tensor) -> torch.Tensor:
    """Share of each image's pixels in the style, [N] (see the module docstring)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"need images [N, 3, H, W], got {tuple(images.shape)}")
    return (style_distance(images.float()) <= STYLE_PIXEL_DISTANCE).float().mean(dim=(1, 2))


def style_success(images: torch.Tensor) -> float:
    """Share of `images` in the style (each with at least `STYLE_IMAGE_SHARE` of its pixels on the duotone)."""
    return float((style_share(images) >= STYLE_IMAGE_SHARE).float().mean())
