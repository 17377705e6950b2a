"""MemControl's settings: the names of its methods, granularities and mitigations, and the configs of its
fine-tunes and searches, in a module that imports neither torch nor a model library, so `diffmem memcontrol --help`
shows their defaults at once. The modules that used to define them (`mask`, `methods`, `mitigation`, `train`,
`search`, `table`) re-export them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from diffmem.errors import DiffmemError
from diffmem.mitigations.registry import training_loop_mitigations
from diffmem.world.settings import WORLD_GUIDANCE, check_finetune_data

#: How finely a mask switches the attention modules (`diffmem.memcontrol.mask.derive_mask`).
GRANULARITIES = ("blocks", "layers")
#: The fine-tuning methods of `diffmem.memcontrol.methods.METHODS`, in its order (tests/test_memcontrol.py checks
#: they agree), and those that train under a mask.
METHOD_NAMES = ("svdiff", "difffit", "attention", "lora", "full", "none")
MASKED_METHODS = ("svdiff", "difffit", "attention", "lora")
#: The training-time mitigations a fine-tune can run with (`MitigationConfig.kind`).
MITIGATIONS = ("none", "rwa", "threshold")
#: The methods of the table, in the MemControl paper's order (its Table 1).
BASELINES = ("none", "full", "svdiff", "difffit", "attention", "lora")
#: The mitigations crossed with each method in `diffmem.memcontrol.table.CROSSED`: none, then every registered
#: mitigation that acts inside the training loop (`diffmem.mitigations.registry`: random word addition, Wen's
#: threshold), in registration order. Read from the registry once, at import: each must also be a
#: `MitigationConfig` kind, which the training runs.
TABLE_MITIGATIONS = ("none", *(m.name for m in training_loop_mitigations()))


def check_method_name(name: str) -> str:
    """`name` when it is a fine-tuning method, or a clear error listing the known ones."""
    if name not in METHOD_NAMES:
        raise DiffmemError(f"unknown fine-tuning method {name!r}; choose one of {', '.join(METHOD_NAMES)}")
    return name


@dataclass(frozen=True)
class MitigationConfig:
    """A training-time mitigation and its setting.

    Attributes:
        kind: "none", "rwa" (random word addition) or "threshold" (Wen's threshold mitigation).
        rwa_probability: chance of inserting a random word at each gap of a caption, 0.1 as MemControl's RWA
            baseline (seed 001, sec. 4.1; Somepalli et al. 2023 add random words to training captions).
        threshold: drop a sample from the loss when ||eps(x_t, c) - eps(x_t, empty)||_2 at its training timestep
            reaches this. Wen et al. use 2 for SD's 4 x 64 x 64 latents; the world's 3 x 32 x 32 pixels give other
            norms: 5.0 is the 90th percentile of the committed base's norms on the training faces at uniform
            timesteps (5% to 20% of samples dropped depending on the model). Measured there: the norm depends far
            more on the timestep than on whether a face is memorized, so this threshold drops mostly samples at
            small t (docs/memcontrol.md).
    """

    kind: str = "none"
    rwa_probability: float = 0.1
    threshold: float = 5.0

    def __post_init__(self) -> None:
        if self.kind not in MITIGATIONS:
            raise DiffmemError(f"unknown mitigation {self.kind!r}; choose one of {', '.join(MITIGATIONS)}")
        if not 0.0 <= self.rwa_probability <= 1.0:
            raise DiffmemError(f"rwa_probability must be in [0, 1], got {self.rwa_probability}")
        if self.threshold <= 0:
            raise DiffmemError(f"threshold must be positive, got {self.threshold}")


#: The data sets MemControl's experiments fine-tune on: the private domain (seed Table 1) and the transfer
#: experiment (seed Table 2). The style set is left out: no MemControl experiment uses it.
MEMCONTROL_DATA = ("faces", "photos")


@dataclass(frozen=True)
class MemControlTrainConfig:
    """A masked fine-tune of the world base (MemControl's inner loop, and its retraining on the full data).

    Attributes:
        method: "svdiff", "difffit", "attention", "lora" (masked PEFT), "full" or "none" (no fine-tuning).
        data: "faces" (the private domain) or "photos" (the transfer experiment, seed Table 2).
        duplicate: (N, K): N training images repeated K times each, the known memorization set (MemControl
            duplicates 100 pairs 50 times; the world's 80 training faces take 5 x 100, as the example LoRA).
        rest_share: share of the other training images seen once. 1.0 for a full fine-tune; MemControl's search
            proxy uses 1% of MIMIC, which on 80 faces is nothing, so the search defaults to 0.1 (`SearchConfig`).
        lr: AdamW learning rate; None takes the method's own default (`diffmem.memcontrol.methods.default_lr`).
        steps / batch_size: the world recipe is 500 x 16 (about 15 CPU minutes); MemControl runs here use less.
        caption_dropout / noise_offset: as `diffmem.world.train.FinetuneConfig` (0.1 and 0.1).
        mitigation: random word addition or Wen's threshold (`MitigationConfig`), or none.
        seed: picks the duplicated and once-seen images and seeds the training.
        threads: torch CPU threads.
    """

    method: str = "svdiff"
    data: str = "faces"
    duplicate: tuple[int, int] = (5, 100)
    rest_share: float = 1.0
    lr: float | None = None
    steps: int = 500
    batch_size: int = 16
    caption_dropout: float = 0.1
    noise_offset: float = 0.1
    mitigation: MitigationConfig = field(default_factory=MitigationConfig)
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        check_method_name(self.method)
        check_finetune_data(self.data)
        if not 0.0 <= self.rest_share <= 1.0:
            raise DiffmemError(f"rest_share must be in [0, 1], got {self.rest_share}")
        count, repeats = self.duplicate
        if count < 0 or repeats < 1:
            raise DiffmemError(f"duplicate must be N:K with N >= 0 images and K >= 1 repeats, got {count}:{repeats}")

    @property
    def learning_rate(self) -> float:
        from diffmem.memcontrol.methods import scaled_lr

        return scaled_lr(self.method, self.lr, 1.0)


#: The quick budget that `memcontrol table --quick` and `memcontrol search --quick` share: 2 faces x 300 plus the
#: other 78 training faces once, 200 steps of 8 images (about 2.5 CPU minutes of full fine-tuning on one thread).
#: Measured with docs/memcontrol/budget_probe.py: at 10x its own rate, full fine-tuning copies a third of its
#: duplicated-caption generations there; with 5 faces x 100 it copied none at 200 steps (docs/memcontrol.md).
QUICK_TRAIN = MemControlTrainConfig(duplicate=(2, 300), steps=200, batch_size=8)
#: Every method's own learning rate times this in the quick budget (full fine-tuning 1e-3, SV-DIFF 1e-2).
QUICK_LR_SCALE = 10.0


@dataclass(frozen=True)
class SearchConfig:
    """One MemControl search over the masks of one PEFT method.

    Attributes:
        method: the PEFT method whose search space is searched ("svdiff", "difffit", "attention", "lora").
        granularity: "blocks" or "layers"; None takes the seed's: layers for attention tuning, blocks otherwise.
        trials: total trials of the study (a resumed study runs only the missing ones). The first trial is the
            all-on mask, the method as published, so the front is compared with it.
        population_size: NSGA-II population per generation (Optuna's default 50 suits hundreds of trials; MemControl
            on the world affords tens).
        train: the inner fine-tune on the proxy set: MemControl uses 1% of the data plus 100 pairs x 50; the
            world's 80 training faces give 10% of the other faces (7) plus 5 faces x 20, 60 steps of 8 images.
        wen_steps / wen_generations / guidance: Wen's score on the duplicated captions (Wen et al. use DDIM 50 steps,
            4 generations, guidance 7.5 on SD; the world samples with guidance 3 and few steps here for speed).
        validation_size: training-split images the proxy fine-tune does not see that serve as the FID's
            reference and captions (20, as many as the world's held-out faces; the held-out split itself is kept
            for the reported table).
        quality_generations: generations per validation caption for the FID.
        quality_steps: DDIM steps of those generations.
        lr_scale: multiplies the method's own learning rate when `train.lr` is None (as `TableConfig.lr_scale`).
        seed: seeds the sampler, the proxy set and the training.
    """

    method: str = "svdiff"
    granularity: str | None = None
    trials: int = 12
    population_size: int = 6
    train: MemControlTrainConfig = field(default_factory=lambda: MemControlTrainConfig(
        duplicate=(5, 20), rest_share=0.1, steps=60, batch_size=8))
    wen_steps: int = 10
    wen_generations: int = 2
    guidance: float = WORLD_GUIDANCE
    validation_size: int = 20
    quality_generations: int = 2
    quality_steps: int = 10
    lr_scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if check_method_name(self.method) not in MASKED_METHODS:
            raise DiffmemError(f"method {self.method!r} has no mask to search; choose svdiff, difffit, attention or lora")
        if self.trials < 1 or self.population_size < 2:
            raise DiffmemError("a search needs trials >= 1 and population_size >= 2")
        if self.lr_scale <= 0:
            raise DiffmemError(f"lr_scale must be positive, got {self.lr_scale}")
        if self.validation_size < 2:
            raise DiffmemError(f"the search's FID needs validation_size >= 2 images, got {self.validation_size}")

    @classmethod
    def quick(cls, method: str = "svdiff", trials: int = 12, population_size: int = 6) -> SearchConfig:
        """The proxy fine-tune at the table's quick budget (`QUICK_TRAIN`, `QUICK_LR_SCALE`), so that the proxy
        memorizes as the quick table's rows do: the same 2 faces x 300 and 200 steps of 8, with 10% of the other
        faces seen once (the seed's proxy is 1% of the data plus the memorization set)."""
        return cls(method=method, trials=trials, population_size=population_size,
                   train=replace(QUICK_TRAIN, rest_share=0.1), lr_scale=QUICK_LR_SCALE)

    @property
    def mask_granularity(self) -> str:
        return self.granularity or ("layers" if self.method == "attention" else "blocks")

    @property
    def inner(self) -> MemControlTrainConfig:
        from diffmem.memcontrol.methods import scaled_lr

        return replace(self.train, method=self.method, seed=self.seed,
                       lr=scaled_lr(self.method, self.train.lr, self.lr_scale))
