"""How a study samples a model: one settings object instead of a copy of the numbers in every command.

The defaults are the embedded world's (`diffmem.world.settings.WORLD_STEPS`, `WORLD_GUIDANCE`); a command on a
pipeline fills in that model's own steps and guidance (`Backend.default_steps`, `default_guidance`), as
`diffmem attack dori` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffmem.world.settings import WORLD_GUIDANCE, WORLD_STEPS


@dataclass(frozen=True)
class SamplingSettings:
    """How a measurement samples.

    Attributes:
        generations: images per caption (different seeds); MemControl uses 50 per prompt on a GPU, 8 keeps the
            world's copy check to a couple of minutes on the CPU while resolving a 50% rate to about +-18% per
            caption.
        steps: sampling steps; 25 DDIM steps is where the world's samples stop changing visibly.
        guidance: classifier-free guidance scale (Ho & Salimans 2022); 3 suits the world's small pixel model
            (Stable Diffusion uses 7.5, Flux 1.0 with its distilled guidance inside the model).
        seed: first seed; caption i uses seeds seed + i * generations ... .
    """

    generations: int = 8
    steps: int = WORLD_STEPS
    guidance: float = WORLD_GUIDANCE
    seed: int = 0


def seeds_for(count: int, settings: SamplingSettings) -> list[int]:
    """Seeds of `settings.generations` generations for each of `count` captions."""
    return [settings.seed + i for i in range(count * settings.generations)]
