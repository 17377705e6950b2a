"""Is memorization local? The experiments behind seed 002's claims (Kowalczuk et al. 2025, "Finding Dori"):
where adversarial text embeddings that trigger a memorized image lie, how their activations differ from the
memorized prompt's, and how much the neurons and weights NeMo and Wanda select agree. See docs/locality.md.

    from diffmem.locality import LocalityConfig, example_lora_inputs, run_locality
    from diffmem.world import load_example_lora
    unet, manifest = load_example_lora()
    results = run_locality(unet, example_lora_inputs(manifest), LocalityConfig(captions=1))
"""

from diffmem.locality.experiment import LocalityConfig, LocalityInputs, example_lora_inputs, run_locality
from diffmem.locality.functional import (
    embedding_distances,
    expected_layered_jaccard,
    expected_random_jaccard,
    jaccard,
    layered_agreement,
    pairwise_embedding_distances,
    selection_agreement,
)
from diffmem.locality.report import markdown, write_results

__all__ = [
    "LocalityConfig", "LocalityInputs", "embedding_distances", "example_lora_inputs", "expected_layered_jaccard",
    "expected_random_jaccard", "jaccard", "layered_agreement", "markdown", "pairwise_embedding_distances",
    "run_locality", "selection_agreement", "write_results",
]
