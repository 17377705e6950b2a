"""Turn down the modules through which the denoiser reads the caption (issue 18, section 5).

In a text-to-image UNet the caption enters only through the cross-attention keys and values (`attn2.to_k`,
`attn2.to_v`: the text encoder's tokens are their input); in a diffusers MMDiT (SD3, Flux's double-stream blocks)
through the text stream's own projections (`attn.add_k_proj`, `attn.add_v_proj`). A LoRA that copies a training
image for its caption has to tie the caption to the image somewhere, and these are the modules that see it; what it
learned of the images in general (faces, a look) the other modules can carry. `benchmarks/layer_scale_probe.py`
measured the world's LoRAs module group by module group (docs/caption-readers.md), and the Finding NeMo paper
(Hintersdorf et al., NeurIPS 2024) locates memorization neurons in the cross-attention value layers of Stable
Diffusion. Data-free: it needs only the module names. A research candidate: on the world it unbinds memorized
images from their captions more than it removes them (docs/caption-readers.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from diffmem.errors import DiffmemError
from diffmem.filters.core import FilterConfig, ModuleView
from diffmem.filters.selection import Selection

#: Base modules (diffusers naming) whose input is the caption's token embeddings. BFL's fused `txt_attn.qkv`
#: (a Flux LoRA in the original layout) holds the text stream's queries too, and single-stream blocks share one
#: projection between text and image: neither can be turned down apart from what does not read the caption.
CAPTION_READER = re.compile(r"(\.attn2\.to_[kv]|\.attn\.add_[kv]_proj)$")


def reads_caption(module: str) -> bool:
    """Whether the base module `module` (diffusers naming) takes the caption's token embeddings as its input."""
    return CAPTION_READER.search(module) is not None


@dataclass
class CaptionReadersConfig(FilterConfig):
    """Multiply the update of every module that reads the caption (`reads_caption`) by `factor`; keep the others.

    Args:
        factor: what the caption readers' updates are multiplied by. 0 (default) drops them. On the world's faces
            LoRAs that removed most copies of each caption's own image and kept most of the held-out gain, but the
            generations still copied other training images (one face for every caption on an over-trained
            LoRA): it unbinds memorized images from their captions more than it removes them
            (docs/caption-readers.md).
        selection: "soft" at threshold 1, so a channel's weight is its score: `factor` for a caption reader's
            channels, 1 for the rest. Under an "energy" or "fraction" rule the caption readers' channels go first.
    """

    name: str = field(default="caption-readers", init=False)
    factor: float = 0.0
    selection: Selection = field(default_factory=lambda: Selection(rule="soft", threshold=1.0))

    def __post_init__(self) -> None:
        if not 0.0 <= self.factor <= 1.0:
            raise ValueError(f"factor must be in [0, 1], got {self.factor}")

    def check_modules(self, modules: list[str]) -> None:
        """Refuse a LoRA that updates no caption reader: the filter would return it unchanged."""
        if not any(map(reads_caption, modules)):
            raise DiffmemError("updates no module that reads the caption (cross-attention keys and values): the "
                               "caption-readers filter would leave it unchanged")

    def score(self, view: ModuleView) -> torch.Tensor:
        """`factor` for every channel of a caption reader, 1 for every other channel."""
        return torch.full((view.channels.count,), self.factor if reads_caption(view.module) else 1.0)
