"""`diffmem scan`: does this LoRA memorize? A data-free verdict from the LoRA and its base alone (issue 17).

- `prompts`: candidate prompts from the LoRA's own metadata (kohya's `ss_tag_frequency`, modelspec, ...);
- `extraction`: model-guided extraction (FineXtract, Wu et al. 2025) and the groups of near-identical generations
  the base does not produce;
- `score`: `ScanConfig`, Wen et al.'s first-step statistic, and the PROVISIONAL risk rule and verdict;
- `run`: `scan_lora` and `write_scan` (summary.json, report.html); `report`: the HTML; `commands`: the CLI.

The verdict's rule is provisional until it is calibrated on a held-out population of LoRAs (docs/scan.md).
"""

from diffmem.scan.extraction import ExtractedGroup, candidate_groups, model_guided_generate
from diffmem.scan.prompts import CandidatePrompt, candidate_prompts
from diffmem.scan.run import ScanResult, scan_lora, write_scan
from diffmem.scan.score import RULE, ScanConfig, first_step_norms

__all__ = [
    "RULE",
    "CandidatePrompt",
    "ExtractedGroup",
    "ScanConfig",
    "ScanResult",
    "candidate_groups",
    "candidate_prompts",
    "first_step_norms",
    "model_guided_generate",
    "scan_lora",
    "write_scan",
]
