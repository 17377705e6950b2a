"""Attacks on memorization mitigations: the Dori embedding search (seed 002) and the test of its success on fresh
generations. See docs/attack.md.

    from diffmem.attack import DoriConfig, attack_success, dori_attack
    result = dori_attack(unet, target_image, "a black and white photo of Bruno Bellamy", DoriConfig(start="unrelated"))
    success = attack_success(unet, result.embedding, target_image, reference=training_images)
"""

from diffmem.lazy import lazy_names

# The names below come from `diffmem.attack.dori` (the search needs torch and the model backends) or, for the
# settings, `diffmem.attack.settings`; each module is imported when a name of it is first used, so importing a light
# module of this package (`diffmem.attack.settings`, which `diffmem attack --help` reads) does not load the attack.
MODULE_OF = {
    "START_KINDS": "settings", "DoriConfig": "settings",
    **dict.fromkeys(("AttackSuccess", "DoriOutcome", "DoriResult", "attack_success", "dori_attack", "dori_search",
                     "perturb_embedding", "random_embedding_like", "run_dori", "start_embedding"), "dori"),
}


__getattr__, __dir__ = lazy_names(__name__, MODULE_OF, globals())


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
