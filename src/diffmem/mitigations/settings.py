"""The settings of NeMo, Wanda and adversarial fine-tuning, in a module that imports no model library, so
`diffmem mitigate --help` shows their defaults without loading diffusers. `diffmem.mitigations.nemo`,
`diffmem.mitigations.wanda` and `diffmem.mitigations.adversarial` re-export what they used to define."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from diffmem.attack.settings import START_KINDS, DoriConfig
from diffmem.world.settings import WORLD_GUIDANCE, WORLD_STEPS


@dataclass(frozen=True)
class NeMoConfig:
    """Settings of NeMo's search (Hintersdorf et al. 2024, sec. 3 and their public code).

    Args:
        theta_start: first z-score threshold of the initial selection, 5 as in the paper.
        theta_step: how much theta is lowered per round, 0.25 as in the paper.
        theta_min: lowest theta tried, 1 as in the authors' code; a prompt whose signal is still over its
            threshold there keeps the neurons of that last round and is reported as not mitigated.
        top_k_step: the authors' code also adds the k highest-z neurons of every layer, k growing by this much per
            round (so a layer with no outlier still contributes); 0 uses the z-threshold alone, as the paper's text.
        blocks: which top-level blocks' value layers are searched; None (default): the backend's `value_blocks`,
            all of them: "down_blocks", "mid_block", "up_blocks" of a UNet (`attn2.to_v`), Flux's joint-attention
            "transformer_blocks" (`attn.add_v_proj`). The authors' code searches only the down and mid blocks of
            SD 1.x; on the world's example LoRA that lowers none of the 5 memorized prompts' signals under the
            threshold even at theta = 1 (most of the world's attention sits in the up blocks; docs/pruning.md), so
            the default adds "up_blocks".
        generations: noise draws over which the first-step signal is averaged; 8 gives a stable mean on the world
            (Wen et al. report that even one draw separates well on SD).
        timestep: the first sampling timestep, at which the signal is measured and the value activations are
            recorded. None (default): the first timestep of the backend's own sampler at its default step count
            (`first_sampling_timestep`), so the signal is the model's real first step: 999 on the world (its DDIM
            has trailing spacing, so at any step count), 981 for SD's DDIM at 50 steps (leading spacing), 1000 on
            Flux (sigma 1). The result's config records the timestep used.
        threshold_stds: when no threshold is given, the memorization threshold is the mean plus this many
            standard deviations of the signal over the calibration prompts (held-out captions): 3 puts it above
            all 20 held-out captions of the world's example LoRA and below all 5 memorized ones.
        refine: run the refinement (layers, then single neurons); off keeps the initial selection.
        seed: seed of the noise draws.
        batch_size: prompts per denoiser call when the calibration signals and the activation statistics are
            computed (the search itself evaluates one prompt at a time); bounds memory on large models, the
            numbers do not depend on it.
    """

    theta_start: float = 5.0
    theta_step: float = 0.25
    theta_min: float = 1.0
    top_k_step: int = 1
    blocks: tuple[str, ...] | None = None
    generations: int = 8
    timestep: int | float | None = None
    threshold_stds: float = 3.0
    refine: bool = True
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.theta_step <= 0 or self.theta_min > self.theta_start:
            raise ValueError(f"need theta_step > 0 and theta_min <= theta_start, got {self}")
        if self.generations < 1 or self.top_k_step < 0 or self.batch_size < 1:
            raise ValueError(f"need generations >= 1, top_k_step >= 0 and batch_size >= 1, got {self}")


@dataclass(frozen=True)
class WandaConfig:
    """Settings of the Wanda-style memorization pruning (Chavhan et al. 2024).

    Args:
        fraction: share of each output row's weights considered for pruning, ranked by the memorized-prompt
            score: 0.01 (the top 1%) as in Chavhan et al.; at least one weight per row is considered.
        generations: noise draws (sampling trajectories) per memorized prompt whose activations are recorded; 4
            as Wen et al.'s detector uses, enough for stable norms over the world's 16 x 16 and 8 x 8 tokens.
        steps: sampling steps of each trajectory (the backend's sampler: the world's own DDIM, DDIM for SD,
            flow-matching Euler for Flux); activations of every step count. 10 as the benchmark samples.
        guidance: classifier-free guidance scale of the trajectories; None (default): the model's own
            (`Backend.default_guidance`): 3.0 as the world samples everywhere, 7.5 for SD, 1.0 for Flux (whose
            distilled guidance is inside the model; the empty-prompt pass is still recorded). The result's config
            records the scale used.
        seed: first noise seed; prompt i uses seeds seed + i * generations ... (`Backend.initial_noise`).
    """

    fraction: float = 0.01
    generations: int = 4
    steps: int = 10
    guidance: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must lie in (0, 1], got {self.fraction}")
        if self.generations < 1 or self.steps < 1:
            raise ValueError(f"need generations >= 1 and steps >= 1, got {self}")


@dataclass(frozen=True)
class AdversarialFinetuneConfig:
    """How adversarial fine-tuning alternates Dori searches and weight updates (Kowalczuk et al. 2025, "Finding
    Dori", seed 002: "bypassing the locality assumption enables more robust mitigation through adversarial
    fine-tuning", full-model updates that map adversarial embeddings to surrogate images, with a utility loss on
    other data; notes/methods.md).

    Args:
        rounds: alternations of (search, fine-tune). 3: the embeddings of round 1 are found on the memorizing model;
            later rounds search the partly mitigated model again, so the update also covers the triggers that are
            left once the first ones are closed (an adversarial-training loop in the sense of Madry et al. 2018).
        starts: Dori starts searched per memorized image and round (`diffmem.attack.START_KINDS`). All three of the
            paper's: the caption's own embedding (the attack on the prompt a mitigation claims to have fixed),
            random tokens and an unrelated prompt (triggers are spread over embedding space, so one start is not
            enough to close them).
        search: the Dori search of every round. The paper's settings (Adam, lr 0.1, batch 8) with 25 steps instead
            of 50: on the world's example LoRA the loss stops falling well before 50 (docs/attack.md), and the
            search runs rounds x starts x images times. Its seed is offset per round and start.
        steps_per_round: fine-tuning steps after each round's searches: 40, so 3 rounds are 120 full-model steps
            of 8, a few CPU minutes. docs/robustness.md measured a lighter setting (2 rounds, 2 starts, 10 search
            steps, 40 steps per round): no copies of the example LoRA's face 0 under a 15-step attack by the copy
            test, but a 50-step attack brings the face back colour-shifted; the defaults spend more searching,
            not yet measured.
        batch_size: images per fine-tuning step (8, the Dori batch).
        adversarial_share: expected share of each batch drawn from the (embedding, surrogate) pairs; the rest is the
            ordinary DDPM loss on other training data. 0.5 weighs removal and utility equally, as the paper's sum
            of the two losses does.
        lr: AdamW learning rate of the full-model update. 5e-4, chosen without a sweep: the world's ordinary
            full fine-tuning rate (1e-4, `diffmem.world.train.FinetuneConfig`) memorizes nothing in a few hundred
            steps (docs/memcontrol.md), and undoing memorization in about a hundred steps needs a rate of the order
            of the one that creates it; the ordinary loss on other data holds quality. AdamW restarts each round
            (one `finetune_loop` call per round).
        caption_dropout / noise_offset: as every world fine-tune (0.1 each, `FinetuneConfig`): dropout keeps the
            unconditional score usable for guidance; the base and the LoRA were trained with offset noise.
        include_captions: also map each memorized caption's own embedding to the surrogate, so the plain prompt
            is mitigated even if no search from it is run.
        surrogate_steps / surrogate_guidance: DDIM steps and guidance of the surrogate generations, the world's
            sampling defaults (25 and 3, `diffmem.world.check.CheckSettings`).
        seed: seeds the surrogates, the searches (offset per round and start) and the fine-tuning.
    """

    rounds: int = 3
    starts: tuple[str, ...] = START_KINDS
    search: DoriConfig = field(default_factory=lambda: DoriConfig(steps=25))
    steps_per_round: int = 40
    batch_size: int = 8
    adversarial_share: float = 0.5
    lr: float = 5e-4
    caption_dropout: float = 0.1
    noise_offset: float = 0.1
    include_captions: bool = True
    surrogate_steps: int = WORLD_STEPS
    surrogate_guidance: float = WORLD_GUIDANCE
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.steps_per_round < 0 or self.batch_size < 1:
            raise ValueError(f"rounds and batch_size must be >= 1 and steps_per_round >= 0, got {self.rounds}, "
                             f"{self.batch_size} and {self.steps_per_round}")
        unknown = [s for s in self.starts if s not in START_KINDS]
        if unknown or not self.starts:
            raise ValueError(f"starts must be a non-empty choice of {', '.join(START_KINDS)}, got {self.starts}")
        if not 0.0 < self.adversarial_share <= 1.0:
            raise ValueError(f"adversarial_share must be in (0, 1], got {self.adversarial_share}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def to_dict(self) -> dict:
        return {**asdict(self), "starts": list(self.starts)}
