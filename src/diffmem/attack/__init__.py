"""Attacks on memorization mitigations: the Dori embedding search (seed 002) and the test of its success on fresh
generations. See docs/attack.md.

    from diffmem.attack import DoriConfig, attack_success, dori_attack
    result = dori_attack(unet, target_image, "a black and white photo of Bruno Bellamy", DoriConfig(start="unrelated"))
    success = attack_success(unet, result.embedding, target_image, reference=training_images)
"""

from diffmem.attack.dori import (
    START_KINDS,
    AttackSuccess,
    DoriConfig,
    DoriOutcome,
    DoriResult,
    attack_success,
    dori_attack,
    dori_search,
    perturb_embedding,
    random_embedding_like,
    run_dori,
    start_embedding,
)

__all__ = [
    "START_KINDS",
    "AttackSuccess",
    "DoriConfig",
    "DoriOutcome",
    "DoriResult",
    "attack_success",
    "dori_attack",
    "dori_search",
    "perturb_embedding",
    "random_embedding_like",
    "run_dori",
    "start_embedding",
]
