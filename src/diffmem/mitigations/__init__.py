"""Mitigations that remove memorization from a model's weights. One module per method, each a config dataclass,
pure functions for its maths and one library function `<method>_mitigate(model, memorized_prompts, ...)` returning
(mitigated copy, report, weight masks); `model` is any `diffmem.backends.Backend` or a bare world UNet (for a
pipeline the copy is made only when asked, `apply=True`).

- `nemo`: deactivate memorization neurons of the cross-attention value layers (Hintersdorf et al. 2024);
- `wanda`: prune feed-forward weights that memorized prompts use more than the empty prompt (Chavhan et al. 2024);
- `adversarial`: adversarial fine-tuning against Dori embeddings (Kowalczuk et al. 2025);
- `pruning`: the weight masks both report and apply, their file format, hooks;
- `registry`: every mitigation of diffmem (these, BAF and the training-time ones) by name, behind one entry
  function each (docs/mitigations.md).
"""

from __future__ import annotations

from diffmem.lazy import lazy_names

# Name -> the module that defines it. Imported on first use, so that `diffmem.mitigations.registry` (which lists
# mitigations without running one) does not pull torch in through this package.
LAZY_NAMES = {
    "NeMoConfig": "settings", "NeMoResult": "nemo", "nemo_mitigate": "nemo",
    "WandaConfig": "settings", "WandaResult": "wanda", "wanda_mitigate": "wanda",
    "WeightMasks": "pruning", "apply_masks": "pruning", "load_masks": "pruning", "masked_count": "pruning",
    "save_masks": "pruning",
    "MITIGATIONS": "registry", "Mitigation": "registry", "MitigationInputs": "registry",
    "MitigatedModel": "registry", "get_mitigation": "registry", "register_mitigation": "registry",
}

__all__ = [
    "MITIGATIONS", "MitigatedModel", "Mitigation", "MitigationInputs", "NeMoConfig", "NeMoResult", "WandaConfig",
    "WandaResult", "WeightMasks", "apply_masks", "get_mitigation", "load_masks", "masked_count", "nemo_mitigate",
    "register_mitigation", "save_masks", "wanda_mitigate",
]


__getattr__, __dir__ = lazy_names(__name__, LAZY_NAMES, globals())
