"""Is memorization local? The experiments behind seed 002's claims (Kowalczuk et al. 2025, "Finding Dori"):
where adversarial text embeddings that trigger a memorized image lie, how their activations differ from the
memorized prompt's, and how much the neurons and weights NeMo and Wanda select agree. See docs/locality.md.

    from diffmem.locality import LocalityConfig, example_lora_inputs, run_locality
    from diffmem.world import load_example_lora
    unet, manifest = load_example_lora()
    results = run_locality(unet, example_lora_inputs(manifest), LocalityConfig(captions=1))
"""

from diffmem.lazy import lazy_names

# The names below come from the package's modules, each imported when a name of it is first used: the experiments
# load the world's model (diffusers), and `diffmem locality --help` imports `diffmem.locality.settings` only.
MODULE_OF = {
    "LocalityConfig": "settings",
    "LocalityInputs": "experiment", "example_lora_inputs": "experiment", "run_locality": "experiment",
    **dict.fromkeys(("embedding_distances", "expected_layered_jaccard", "expected_random_jaccard", "jaccard",
                     "layered_agreement", "pairwise_embedding_distances", "selection_agreement"), "functional"),
    "markdown": "report", "write_results": "report",
}


__getattr__, __dir__ = lazy_names(__name__, MODULE_OF, globals())


__all__ = [
    "LocalityConfig", "LocalityInputs", "embedding_distances", "example_lora_inputs", "expected_layered_jaccard",
    "expected_random_jaccard", "jaccard", "layered_agreement", "markdown", "pairwise_embedding_distances",
    "run_locality", "selection_agreement", "write_results",
]
