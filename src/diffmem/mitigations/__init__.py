"""Mitigations that remove memorization from a model's weights. One module per method, each a config dataclass,
pure functions for its maths and one library function `<method>_mitigate(unet, memorized_prompts, ...)` returning
(mitigated copy, report, weight masks).

- `nemo`: deactivate memorization neurons of the cross-attention value layers (Hintersdorf et al. 2024);
- `wanda`: prune feed-forward weights that memorized prompts use more than the empty prompt (Chavhan et al. 2024);
- `pruning`: the weight masks both report and apply, their file format, hooks.
"""

from diffmem.mitigations.nemo import NeMoConfig, NeMoResult, nemo_mitigate
from diffmem.mitigations.pruning import WeightMasks, apply_masks, load_masks, masked_count, save_masks
from diffmem.mitigations.wanda import WandaConfig, WandaResult, wanda_mitigate

__all__ = [
    "NeMoConfig", "NeMoResult", "WandaConfig", "WandaResult", "WeightMasks", "apply_masks", "load_masks",
    "masked_count", "nemo_mitigate", "save_masks", "wanda_mitigate",
]
