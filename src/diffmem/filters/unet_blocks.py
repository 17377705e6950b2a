"""Turn down whole UNet blocks of a LoRA (issue 18, section 5: "soft scaling tuned per layer").

`benchmarks/layer_scale_probe.py` turned the world's LoRAs down one UNet block at a time (docs/caption-readers.md,
"Where the copying sits"). On the tuned LoRAs no block beat turning the whole LoRA down, but on the over-trained
ones dropping the first up block (the lowest-resolution decoder block, whose cross-attention sees the caption at the
coarsest scale: the layout of the image) removed most copies of any training image while keeping most of the
held-out gain, where `scale` at the same quality kept most copies. This filter makes that rule a data-free filter
that `diffmem bench` can measure over many LoRAs: it needs only the module names.

Blocks are named as diffusers names the UNet's children: ``down_blocks.N``, ``mid_block``, ``up_blocks.N``. The same
name is not the same role in every UNet: SDXL's and the world's ``up_blocks.0`` is a cross-attention block at the
lowest resolution, SD1's is attention-free (its first cross-attention up block is ``up_blocks.1``), so a LoRA that
updates no module of the named blocks is refused, not returned unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from diffmem.errors import DiffmemError
from diffmem.filters.core import FilterConfig, ModuleView
from diffmem.filters.selection import Selection

#: A UNet module's block, from its base module path in diffusers naming ("unet.up_blocks.0.attentions.1.proj_in").
#: Anchored at the UNet's root so that no text-encoder or transformer module is taken for a block.
UNET_BLOCK = re.compile(r"^(?:unet\.)?((?:down_blocks|up_blocks)\.\d+|mid_block)\.")
BLOCK_NAME = re.compile(r"^((?:down_blocks|up_blocks)\.\d+|mid_block)$")


def unet_block(module: str) -> str | None:
    """The UNet block (``up_blocks.0``, ``mid_block``, ...) that the base module `module` (diffusers naming) sits
    in, or None for a module outside the UNet's blocks (the input and output convolutions, the time embedding, a
    text encoder, an MMDiT)."""
    match = UNET_BLOCK.match(module)
    return match.group(1) if match else None


@dataclass
class UNetBlocksConfig(FilterConfig):
    """Multiply the update of every module in the UNet blocks `blocks` by `factor`; keep the others.

    Args:
        blocks: the blocks, in diffusers naming (``up_blocks.0``, ``mid_block``, ``down_blocks.2``). The default,
            the first up block, is the rule the layer probe suggested (docs/caption-readers.md): on SDXL and the
            world's UNet it is the lowest-resolution cross-attention block; on SD1, whose ``up_blocks.0`` has no
            attention, the same role is ``up_blocks.1``.
        factor: what those blocks' updates are multiplied by. 0 (default) drops them, as the probe did.
        selection: "soft" at threshold 1, so a channel's weight is its score: `factor` in the named blocks, 1
            elsewhere. Under an "energy" or "fraction" rule the named blocks' channels go first.
    """

    name: str = field(default="unet-blocks", init=False)
    blocks: tuple[str, ...] = ("up_blocks.0",)
    factor: float = 0.0
    selection: Selection = field(default_factory=lambda: Selection(rule="soft", threshold=1.0))

    def __post_init__(self) -> None:
        self.blocks = tuple(self.blocks)
        if not self.blocks:
            raise ValueError("blocks must name at least one UNet block")
        wrong = [block for block in self.blocks if not BLOCK_NAME.match(block)]
        if wrong:
            raise ValueError(f"blocks must be UNet blocks in diffusers naming (up_blocks.0, mid_block, "
                             f"down_blocks.2), got {', '.join(wrong)}")
        if not 0.0 <= self.factor <= 1.0:
            raise ValueError(f"factor must be in [0, 1], got {self.factor}")

    def check_modules(self, modules: list[str]) -> None:
        """Refuse a LoRA that updates no module of the named blocks: the filter would return it unchanged."""
        updated = {unet_block(module) for module in modules} - {None}
        if not updated & set(self.blocks):
            found = ", ".join(sorted(updated)) or "none (not a UNet LoRA)"
            raise DiffmemError(f"updates no module of {', '.join(self.blocks)} (the UNet blocks it updates: "
                               f"{found}): the unet-blocks filter would leave it unchanged")

    def score(self, view: ModuleView) -> torch.Tensor:
        """`factor` for every channel of a module in the named blocks, 1 for every other channel."""
        inside = unet_block(view.module) in self.blocks
        return torch.full((view.channels.count,), self.factor if inside else 1.0)
