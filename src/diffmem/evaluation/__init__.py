"""What every study shares when it samples a model to measure it: `SamplingSettings` (how many generations, how
many steps, which guidance, which seeds)."""

from diffmem.evaluation.sampling import SamplingSettings, seeds_for

__all__ = ["SamplingSettings", "seeds_for"]
