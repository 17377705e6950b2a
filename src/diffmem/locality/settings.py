"""The settings of the locality experiments, in a module that imports no model library, so `diffmem locality
--help` shows their defaults without loading diffusers. `diffmem.locality.experiment` re-exports `LocalityConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffmem.attack.settings import START_KINDS, DoriConfig
from diffmem.evaluation.sampling import SamplingSettings
from diffmem.mitigations.settings import NeMoConfig, WandaConfig


@dataclass(frozen=True)
class LocalityConfig:
    """Settings of the locality experiments (seed 002, Kowalczuk et al. 2025, sec. 4; methods in notes/methods.md).

    Args:
        captions: how many of the memorized captions to study, first ones first; None (default) takes all.
        starts: the Dori searches per caption, one per entry: "prompt" (the memorized caption's own embedding),
            "random" (Gaussian tokens), "unrelated" (another prompt's embedding), as in the seed. An entry may
            repeat; search j uses seed `dori.seed + j`, so two "random" entries start from different tokens and
            show whether searches from different places converge to one region.
        dori: the search itself; the paper's settings (Adam, lr 0.1, batch 8, 50 steps) by default.
        check: how fresh generations judge whether an embedding triggers the memorized image; 8 generations of
            25 DDIM steps with guidance 3 as `diffmem world check` and `diffmem attack`.
        top_share: share of a layer's neurons (or channels) counted as its "most active" ones; 0.1, so a layer of
            64 neurons has 7, and two random top sets overlap by chance with Jaccard of about 0.05.
        timesteps: noise levels at which the activations that depend on the image (feed-forward neurons,
            transformer-block outputs) are recorded, on noisy copies of the memorized image: the regime the Dori
            loss optimises. Four levels from pure noise to almost clean.
        noise_draws: noise draws per timestep for those activations (2, so 8 noisy inputs in all).
        baseline_ordinary: ordinary (non-memorized) captions whose activations are compared with the memorized
            prompt's as a scale: how different two real prompts' activations are. 4 by default.
        nemo: NeMo's search (`diffmem.mitigations.nemo`), its defaults as docs/pruning.md measured them.
        wanda: Wanda-style scores (`diffmem.mitigations.wanda`), the top 1% per row as Chavhan et al.
        relocalise_start: run NeMo and Wanda again on the adversarial embedding from the first search of this kind
            and compare with their selections for the prompt (do different triggers of one image use the same
            weights?). None skips it.
        relocalise_nemo: include NeMo in that re-run (True); it costs one more NeMo search per caption, the
            dearest part of the experiment, so a small budget may keep Wanda's (cheap) re-run alone.
        judge_on_nemo: also judge the adversarial embeddings on the NeMo-pruned model (does the trigger survive
            the mitigation that fixed the prompt?).
        seed: seed of the noisy inputs and of the random-mask controls.
    """

    captions: int | None = None
    starts: tuple[str, ...] = ("prompt", "random", "random", "unrelated")
    dori: DoriConfig = field(default_factory=DoriConfig)
    check: SamplingSettings = field(default_factory=SamplingSettings)
    top_share: float = 0.1
    timesteps: tuple[int, ...] = (999, 700, 400, 100)
    noise_draws: int = 2
    baseline_ordinary: int = 4
    nemo: NeMoConfig = field(default_factory=NeMoConfig)
    wanda: WandaConfig = field(default_factory=WandaConfig)
    relocalise_start: str | None = "random"
    relocalise_nemo: bool = True
    judge_on_nemo: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.starts or any(kind not in START_KINDS for kind in self.starts):
            raise ValueError(f"starts must be a non-empty tuple of {', '.join(START_KINDS)}, got {self.starts}")
        if self.relocalise_start is not None and self.relocalise_start not in self.starts:
            raise ValueError(f"relocalise_start {self.relocalise_start!r} is not among the starts {self.starts}")
        if not 0 < self.top_share <= 1:
            raise ValueError(f"top_share must lie in (0, 1], got {self.top_share}")
        if not self.timesteps or self.noise_draws < 1 or self.baseline_ordinary < 0:
            raise ValueError("need at least one timestep, one noise draw and baseline_ordinary >= 0")
        if self.captions is not None and self.captions < 1:
            raise ValueError(f"captions must be >= 1 or None, got {self.captions}")
