"""`diffmem scan`: does this LoRA memorize? A data-free verdict from the LoRA and its base alone (issue 17; in
progress: `prompts` finds the candidate prompts from the LoRA's own metadata)."""

from diffmem.scan.prompts import CandidatePrompt, candidate_prompts

__all__ = ["CandidatePrompt", "candidate_prompts"]
