"""The settings of the Dori attack and of the robustness table, in a module that imports no model library, so
`diffmem attack --help` shows their defaults without loading diffusers. `diffmem.attack.dori` and
`diffmem.attack.table` re-export what they used to define."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from diffmem.evaluation.sampling import SamplingSettings
from diffmem.memcontrol.settings import MemControlTrainConfig
from diffmem.metrics.copy import LUMINANCE_COPY_DISTANCE, CopyConfig

#: Where a Dori search starts (`DoriConfig.start`).
START_KINDS = ("prompt", "random", "unrelated")


@dataclass(frozen=True)
class DoriConfig:
    """How the Dori search runs (Kowalczuk et al. 2025, "Finding Dori", seed 002; the paper's settings as
    summarised in notes/methods.md).

    Args:
        steps: Adam steps. 50, the paper's budget ("about 50 steps"); on the world's example LoRA the loss stops
            falling well before that (see docs/attack.md).
        lr: Adam learning rate, 0.1 as in the paper. Large for a text embedding on purpose: the attack may leave
            the neighbourhood of real prompts, which is what shows that replication triggers are not local.
        batch_size: noisy copies of the target per step, 8 as in the paper. Each copy draws its own noise and
            timestep at every step (the ordinary DDPM loss of Ho et al. 2020), so the embedding must work along
            the whole trajectory instead of fitting one noisy sample.
        start: where the search starts. "prompt" (default, the paper's main setting): the memorized prompt's own
            embedding, i.e. the attack on a prompt a mitigation claims to have fixed. "random": Gaussian tokens with
            the prompt embedding's standard deviation. "unrelated": the embedding of `unrelated_prompt`. The paper
            starts from random and unrelated embeddings too, to show that triggers are spread over embedding space.
        unrelated_prompt: the prompt of start="unrelated"; a photo subject the world's base knows, far from faces.
        start_noise: standard deviation of Gaussian noise added to the start, in units of the start embedding's
            own standard deviation. 0 (default) starts exactly at `start`; the paper's "small perturbations of the
            mitigated prompt's embedding" correspond to values below 1.
        seed: seeds the random start, the start noise, and the noise and timesteps of every step.
    """

    steps: int = 50
    lr: float = 0.1
    batch_size: int = 8
    start: str = "prompt"
    unrelated_prompt: str = "a photo of a brick wall"
    start_noise: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.start not in START_KINDS:
            raise ValueError(f"start must be one of {', '.join(START_KINDS)}, got {self.start!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.start_noise >= 0:
            raise ValueError(f"start_noise must be >= 0, got {self.start_noise}")


@dataclass(frozen=True)
class RobustnessSettings:
    """How every model of a robustness table is attacked and measured.

    Args:
        dori: the Dori search (Kowalczuk et al. 2025; `DoriConfig`'s defaults are the paper's: Adam, lr 0.1,
            batch 8, 50 steps). Its `start` is replaced by each of `starts`; its seed is kept, so every model is
            attacked from the same starts with the same noise.
        starts: where the searches start, one search per start and caption: "prompt" (the memorized caption's own
            embedding: the attack on a prompt a mitigation claims to have fixed, the paper's main setting),
            "random" (random tokens) and "unrelated" (a prompt far from faces): a trigger found far from any
            memorized prompt shows the memorization is not local. All three by default, as in the paper.
        sampling: fresh generations that judge the caption and each Dori embedding (`CheckSettings`: 8 per
            caption, 25 DDIM steps, guidance 3, as `diffmem world check`).
        copy: the copy test (`CopyConfig`: Carlini et al.'s relative tiled-L2 test, as everywhere in diffmem).
        luminance_distance: the second copy test, blind to a global colour cast: a generation within this
            `luminance_tiled_l2` of the caption's image counts as a copy. 0.5, `LUMINANCE_COPY_DISTANCE`
            (calibrated on the world's faces). RGB tiled L2 missed the training face that adversarial fine-tuning
            returns under a colour cast (docs/robustness.md); both tests are reported.
        fid: also compute FID of one generation per held-out caption against the held-out images, in the copy
            embedder's space (`diffmem.bench`'s quality figure). Off, only the held-out denoising loss is reported.
        timesteps_per_image: stratified timesteps per image of the held-out denoising loss (`denoising_loss`).
        progress: show a bar per model (a search and two rounds of sampling per caption and start take minutes).
    """

    dori: DoriConfig = field(default_factory=DoriConfig)
    starts: tuple[str, ...] = START_KINDS
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    copy: CopyConfig = field(default_factory=CopyConfig)
    luminance_distance: float = LUMINANCE_COPY_DISTANCE
    fid: bool = True
    timesteps_per_image: int = 8
    progress: bool = False

    def __post_init__(self) -> None:
        unknown = [s for s in self.starts if s not in START_KINDS]
        if unknown or not self.starts:
            raise ValueError(f"starts must be a non-empty choice of {', '.join(START_KINDS)}, got {self.starts}")

    def to_dict(self) -> dict:
        return {"dori": asdict(self.dori), "starts": list(self.starts), "sampling": asdict(self.sampling),
                "copy": asdict(self.copy), "luminance_distance": self.luminance_distance, "fid": self.fid,
                "timesteps_per_image": self.timesteps_per_image}


#: The fine-tune of the training-time rows when none is given (`diffmem attack table`'s --train-* defaults): full
#: fine-tuning at the example LoRA's budget, 500 steps of 16 images (5 faces x 100 among the 80), at the method's own
#: learning rate. The earlier default, 100 steps of 8, did not memorize (0/8 copies without mitigation,
#: docs/robustness.md), so the mitigations it trained had nothing to remove; a table whose control copies nothing
#: says so in its verdicts.
TRAINING_RECIPE = MemControlTrainConfig(method="full", steps=500, batch_size=16)
