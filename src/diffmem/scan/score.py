"""The scan's settings, Wen et al.'s first-step statistic, and the PROVISIONAL risk rule.

The rule turns two kinds of evidence into a risk in [0, 1] and a verdict. It is provisional: its constants were set
by looking at one memorizing LoRA (the committed world example) against two controls (the world base with a LoRA of
zeros, and the example LoRA scaled to 10%), nothing more. Issue 17 asks for a population of >= 24 world LoRAs,
half memorizing, kept out of the rule's tuning, on which the rule is chosen on one part and its ROC AUC and TPR at
5% FPR reported on the other; until then every verdict says `"rule": "provisional"`. A first population of 6
(benchmarks/scan_population.py, docs/scan.md) kept the constants (every ratio floor tried fitted the 2 tune LoRAs)
and found the rule right for 3 of 4 held-out LoRAs: the error was the Wen evidence alone, on a LoRA that learned
new caption words and copied nothing, while the extraction evidence separated all six.

So the rule is now extraction-led (`wen_weight`, set on 2026-12-06 before the next held-out LoRAs were trained): the
Wen ratio alone can raise "unsure" but no longer "memorizing"; an extracted image the base does not draw is needed
for that. `ScanConfig(wen_weight=1.0)` gives the first rule back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffmem.backends import Backend
from diffmem.metrics.wen import conditional_difference_norms

#: Every verdict and summary carries this name until the rule is calibrated on a held-out population (issue 17).
RULE = "provisional"
VERDICTS = ("memorizing", "not memorizing", "unsure")


@dataclass(frozen=True)
class ScanConfig:
    """Settings of `diffmem scan`.

    Candidate prompts:
        max_prompts: at most this many prompts from the LoRA's metadata (`diffmem.scan.prompts.candidate_prompts`),
            plus the empty prompt, plus any prompts the caller gives. 16: a kohya header names a handful of
            folders and trigger tags; the generic prompts fill in the rest.
        generic_prompts: fill in with generic prompts of fine-tunes (faces, portraits, styles) when the metadata
            names fewer than `max_prompts`.

    Wen et al.'s statistic (ICLR 2024, "Detecting, explaining, and mitigating memorization in diffusion models"):
        wen_draws: starting noises the first-step norm `||eps(x_T, c) - eps(x_T, empty)||` is averaged over. 4,
            Wen et al.'s number of generations per prompt. The first step alone is used: the audit measured it at
            ROC AUC 1.00 on the world's example LoRA against 0.79 for the mean over all steps (docs/audit.md), and it
            costs two denoiser calls per draw instead of a whole trajectory.

    Model-guided extraction (FineXtract; Wu et al., ICML 2025):
        extract_prompts: the extraction samples only the candidates with the highest Wen ratio (tuned / base), this
            many, plus the empty prompt (a memorizing LoRA often returns its images unprompted; Somepalli et al.
            2023). 4 keeps one world scan within about 3 minutes on 2 CPU cores (benchmarks/scan_speed.py): the
            ratio is cheap, the extraction costs `generations` trajectories of three denoiser passes per prompt.
        generations: samples per extracted prompt. 8 (FineXtract and Carlini et al. draw hundreds on a GPU; 8 suffice
            on the world, where a memorized caption puts all of them in one group, and resolve a group of 3).
        steps, guidance: sampling steps and classifier-free guidance `s`; None: the model's own (25 and 3.0 on the
            world, 50 and 7.5 on Stable Diffusion, 28 and 1.0 on Flux).
        model_guidance: `lam`, the strength of the push along `eps_ft(x, c) - eps_base(x, c)` (`diffmem.scan.
            extraction`). 1.0: on the world's example LoRA it halves the median tiled distance between the
            generations of a memorized caption (0.13 -> 0.06) and brings them closer to the training image, while the
            held-out captions still form no group at `group_threshold` (lam = 3 makes small groups appear for the
            empty and generic prompts too). 0 is ordinary sampling of the fine-tune. FineXtract tunes its own scale
            per model; re-tune for other model families.
        group_threshold: two generations are near-identical below this tiled RMS distance (images in [0, 1]); the
            same bound decides whether the base's own generation matches a group. 0.1,
            `diffmem.metrics.extraction.ExtractionConfig`'s default (Carlini et al. 2023 tuned theirs per model).
        min_group: a group of at least this many near-identical generations is a candidate extraction. 3,
            MemControl's value (Dutt et al. 2024).
        tiles: tiles per side of the tiled L2 distance, 4 as in Carlini et al. 2023.
        seed: generation `g` of every prompt starts from seed `seed + g` (the base's generations use the same seeds);
            Wen's draws use the same first `wen_draws` seeds.
        batch_size: samples per denoiser call.

    The provisional risk rule (`risk_of`; see the module docstring for why it is provisional):
        wen_weight: how far the Wen evidence alone can raise the risk: risk = 1 - (1 - b)(1 - wen_weight * a). 0.45,
            below `risk_memorizing`, so a high ratio with nothing extracted is "unsure" at most: on the first
            held-out population a LoRA that learned new caption words (no duplicated image, no copy) had ratios of
            1.6-3.0 on every caption, while the extraction evidence separated all six LoRAs. With one kept group of 3
            of 8 generations (b = 0.375) a full Wen evidence makes the verdict "memorizing" (risk 0.66). 1.0 is the
            first rule's noisy-or, in which either evidence alone could decide.
        ratio_floor, ratio_full: the Wen evidence is 0 at a largest ratio <= `ratio_floor` and 1 at >= `ratio_full`,
            log-linear between. 1.25 and 2.0, from docs/scan.json: the zero LoRA gives 1.00 by construction, the
            example scaled to 10% at most 0.86; the example itself 1.18-2.10 on its five duplicated captions and up
            to 1.19 on the other candidates (generic prompts, folder and output names), hence the floor above 1.19.
        risk_memorizing, risk_clear: verdict "memorizing" at risk >= `risk_memorizing`, "not memorizing" at risk
            < `risk_clear`, "unsure" between. 0.5 and 0.2: one kept group of 3 of 8 generations alone (evidence 0.375)
            is "unsure", a prompt whose generations all fall in kept groups is "memorizing".
    """

    max_prompts: int = 16
    generic_prompts: bool = True
    wen_draws: int = 4
    extract_prompts: int = 4
    generations: int = 8
    steps: int | None = None
    guidance: float | None = None
    model_guidance: float = 1.0
    group_threshold: float = 0.1
    min_group: int = 3
    tiles: int = 4
    seed: int = 0
    batch_size: int = 16
    wen_weight: float = 0.45
    ratio_floor: float = 1.25
    ratio_full: float = 2.0
    risk_memorizing: float = 0.5
    risk_clear: float = 0.2

    def __post_init__(self) -> None:
        positive = {"max_prompts": self.max_prompts, "wen_draws": self.wen_draws, "generations": self.generations,
                    "min_group": self.min_group, "tiles": self.tiles, "batch_size": self.batch_size}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.extract_prompts < 0:
            raise ValueError(f"extract_prompts must be at least 0, got {self.extract_prompts}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.guidance is not None and self.guidance == 0:
            raise ValueError("guidance must be non-zero (model guidance is mixed through it)")
        if self.group_threshold <= 0:
            raise ValueError(f"group_threshold must be positive, got {self.group_threshold}")
        if not 0 <= self.wen_weight <= 1:
            raise ValueError(f"wen_weight must be in [0, 1], got {self.wen_weight}")
        if not 0 < self.ratio_floor < self.ratio_full:
            raise ValueError(f"need 0 < ratio_floor < ratio_full, got {self.ratio_floor} and {self.ratio_full}")
        if not 0 <= self.risk_clear <= self.risk_memorizing <= 1:
            raise ValueError(f"need 0 <= risk_clear <= risk_memorizing <= 1, got {self.risk_clear} and "
                             f"{self.risk_memorizing}")


@torch.no_grad()
def first_step_norms(model: Backend, prompts: Sequence[str], seeds: Sequence[int], steps: int,
                     batch_size: int = 16) -> torch.Tensor:
    """Wen et al.'s first-step statistic per prompt, [P]: `||eps(x_T, c) - eps(x_T, empty)||` at the sampler's first
    timestep, averaged over the starting noises of `seeds` (Wen et al. 2024, fig. 2). A memorized prompt pulls the
    very first prediction towards its image, so the text-conditional part is unusually large. The empty prompt
    gives 0 by definition."""
    prompts, seeds = list(prompts), list(seeds)
    if not prompts:
        return torch.zeros(0, dtype=torch.float64)
    sampler = model.sampler()
    sampler.set_timesteps(steps, device=model.device)
    t = sampler.timesteps[0]
    x = sampler.scale_model_input(model.initial_noise(seeds).to(model.device, model.dtype) * sampler.init_noise_sigma,
                                  t)
    draws = len(seeds)
    conditioning = model.encode(prompts).repeat_interleave(draws)
    empty = model.unconditional()
    noise = x.repeat(len(prompts), *([1] * (x.ndim - 1)))
    norms = []
    for start in range(0, len(noise), batch_size):
        chunk = noise[start:start + batch_size]
        timesteps = t.reshape(1).expand(len(chunk))
        cond = model.predict(chunk, timesteps, conditioning.rows(start, start + len(chunk)))
        uncond = model.predict(chunk, timesteps, empty.expand(len(chunk)))
        norms.append(conditional_difference_norms(cond, uncond).cpu())
    return torch.cat(norms).reshape(len(prompts), draws).mean(dim=1)


def wen_evidence(largest_ratio: float | None, config: ScanConfig) -> float:
    """(a) The Wen evidence in [0, 1] from the largest tuned/base ratio over the candidate prompts: 0 at or below
    `ratio_floor`, 1 at or above `ratio_full`, log-linear between (a ratio is a factor; PROVISIONAL constants)."""
    if largest_ratio is None or math.isnan(largest_ratio):
        return 0.0
    if largest_ratio >= config.ratio_full:
        return 1.0
    if largest_ratio <= config.ratio_floor:
        return 0.0
    return math.log(largest_ratio / config.ratio_floor) / math.log(config.ratio_full / config.ratio_floor)


def extraction_evidence(kept_members: Sequence[int], generations: int) -> float:
    """(b) The extraction evidence in [0, 1]: the largest share of one prompt's generations that fall into kept
    groups (groups the base does not produce); `kept_members` holds that count per extracted prompt. A prompt
    whose every generation is one of a few repeated images scores 1 (PROVISIONAL)."""
    return max((min(count, generations) / generations for count in kept_members), default=0.0)


def risk_of(wen: float, extraction: float, wen_weight: float = 1.0) -> float:
    """The PROVISIONAL risk in [0, 1]: `1 - (1 - w a)(1 - b)` of the Wen evidence `a` and the extraction evidence `b`,
    a noisy-or in which the Wen evidence counts with weight `w` (`ScanConfig.wen_weight`): each evidence alone raises
    the risk, both together raise it more, and with `w` below the "memorizing" threshold only an extracted image can
    make the verdict "memorizing"."""
    return 1.0 - (1.0 - wen_weight * wen) * (1.0 - extraction)


def verdict_of(risk: float, config: ScanConfig) -> str:
    """"memorizing" at risk >= `risk_memorizing`, "not memorizing" below `risk_clear`, else "unsure" (PROVISIONAL
    thresholds, issue 17)."""
    if risk >= config.risk_memorizing:
        return "memorizing"
    return "not memorizing" if risk < config.risk_clear else "unsure"
