"""PEFT's own intruder-dimension reduction (``reduce_intruder_dimension``, PEFT >= 0.18; Shuttleworth et al.,
arXiv 2410.21228), run on each module of a LoRA loaded through PEFT into a one-layer model: the library's rule
called as it ships, not a re-implementation of it.

It is not the `intruder` channel filter (`diffmem.filters.IntruderConfig`): PEFT decomposes the merged weight
``W0 + dW`` rather than the update, looks only at its ``top_k`` largest directions, scales the intruder ones by
``mitigation_lambda`` instead of dropping channels, and re-factorises the result at the adapter's rank. Where the
two agree and where they do not: docs/filter.md, "The intruder test and PEFT's".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffmem.errors import DiffmemError
from diffmem.formats.base import BaseCheckpoint, open_base, resolve_lora_targets
from diffmem.formats.lora import LoraFile, read_lora, replace_factors


@dataclass(frozen=True)
class PeftIntruderConfig:
    """The arguments of PEFT's ``reduce_intruder_dimension``, with its defaults.

    Args:
        top_k: how many of the merged weight's largest singular directions are tested.
        threshold: a direction whose largest absolute cosine to every left singular vector of the base weight is
            below this is an intruder (PEFT's ``threshold_epsilon``).
        mitigation_lambda: each intruder component of the merged weight is multiplied by this (0 removes it).
    """

    top_k: int = 10
    threshold: float = 0.5
    mitigation_lambda: float = 0.75


def peft_reducer():
    """PEFT's ``reduce_intruder_dimension``, or a clear error where PEFT is missing or older than 0.18."""
    try:
        from peft.tuners.lora.intruders import reduce_intruder_dimension
    except ImportError:
        raise DiffmemError("PEFT's intruder reduction needs peft >= 0.18 (pip install 'peft>=0.18')") from None
    return reduce_intruder_dimension


def peft_intruder_factors(
    weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scale: float,
    config: PeftIntruderConfig = PeftIntruderConfig(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """New factors ``(B [out, r], A [r, in*kh*kw])`` of one module, float32, after PEFT's intruder reduction of
    the update ``scale * up @ down`` on the base ``weight``; ``scale * B @ A`` is the reduced update.

    The module is loaded as a bias-free ``nn.Linear`` holding ``weight`` flattened to 2-D (a conv's kernel as
    ``out x in*kh*kw``, the matrix every other diffmem score uses), with ``lora_alpha = scale * r`` so that PEFT's
    scaling is the file's ``scale``; PEFT's function is then called on that model as it ships.
    """
    from peft import LoraConfig, get_peft_model

    reduce = peft_reducer()
    matrix = weight.detach().reshape(weight.shape[0], -1).to("cpu", torch.float32)
    b = up.detach().reshape(up.shape[0], -1).to("cpu", torch.float32)
    a = down.detach().reshape(down.shape[0], -1).to("cpu", torch.float32)
    rank = int(b.shape[1])
    if scale == 0:
        return b.clone(), a.clone()  # no update, nothing to reduce (and PEFT's scaling must not be zero)
    layer = torch.nn.Linear(matrix.shape[1], matrix.shape[0], bias=False, device="meta")
    layer.weight = torch.nn.Parameter(matrix, requires_grad=False)
    model = get_peft_model(torch.nn.Sequential(layer),
                           LoraConfig(r=rank, lora_alpha=scale * rank, target_modules=["0"], lora_dropout=0.0))
    loaded = model.base_model.model[0]
    with torch.no_grad():
        loaded.lora_B["default"].weight.copy_(b)
        loaded.lora_A["default"].weight.copy_(a)
        reduce(model, old_adapter_name="default", new_adapter_name="reduced", top_k=config.top_k,
               threshold_epsilon=config.threshold, mitigation_lambda=config.mitigation_lambda, logging_sink=None)
    return loaded.lora_B["reduced"].weight.detach().clone(), loaded.lora_A["reduced"].weight.detach().clone()


def peft_intruder_lora(
    lora: LoraFile | str | Path,
    base: BaseCheckpoint | str | Path,
    config: PeftIntruderConfig = PeftIntruderConfig(),
    *,
    skip_unmapped: bool = False,
) -> LoraFile:
    """``lora`` after PEFT's intruder reduction of every module against ``base`` (in the input's format, rank and
    alphas; not yet written: `diffmem.formats.lora.write_lora`). Plain LoRA and LoCon modules only: PEFT's
    function supports LoRA alone, and DoRA's magnitude would not survive its re-factorisation.
    ``skip_unmapped`` leaves modules that name no base weight unchanged, as in `diffmem.pipeline.filter_lora`.
    """
    lora = lora if isinstance(lora, LoraFile) else read_lora(lora)
    base = base if isinstance(base, BaseCheckpoint) else open_base(base)
    for name, module in lora.modules.items():
        if module.kind not in ("lora", "locon") or "dora_scale" in module.tensors:
            kind = "DoRA" if "dora_scale" in module.tensors else module.kind
            raise DiffmemError(f"module {name}: PEFT's intruder reduction takes plain LoRA factors, not {kind}",
                               lora.path)
    targets = resolve_lora_targets(lora, base, skip_unmapped=skip_unmapped)
    new = {name: peft_intruder_factors(base.weight(target), *lora.modules[name].factors(), lora.modules[name].scale,
                                       config)
           for name, target in targets.items()}
    return replace_factors(lora, new, keep_alpha=True)
