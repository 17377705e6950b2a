"""What the benchmark runs: the grid of world fine-tunes and the filter variants applied to each (issue 5)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from diffmem.filters import (
    FILTERS,
    BAFConfig,
    CaptionReadersConfig,
    FilterConfig,
    InverseBAFConfig,
    KeepAllConfig,
    ScaleConfig,
    Selection,
    UNetBlocksConfig,
)
from diffmem.filters.peft_intruder import peft_intruder_lora
from diffmem.formats.base import BaseCheckpoint
from diffmem.formats.lora import LoraFile
from diffmem.pipeline import filter_lora
from diffmem.world.settings import FinetuneConfig, check_lr_schedule

#: The stages of a fine-tune the grid can take (issue 18, "LoRAs trained the way good LoRAs are"): "final" is
#: the weights after the recipe's steps; "tuned" the step of lowest held-out denoising loss within them; "over-
#: trained" three times the tuned step.
STAGES = ("final", "tuned", "over-trained")

#: How many tuned steps an over-trained fine-tune runs.
OVERTRAIN_FACTOR = 3

#: The held-out loss is measured every this many steps to find the tuned step (25 of 500: a 5% resolution).
HELDOUT_EVERY = 25


@dataclass(frozen=True)
class FinetuneSpec:
    """One world fine-tune of the grid: the settings that vary; everything else is `FinetuneConfig`'s default.

    Args:
        data: "faces" (privacy case), "photos" (copyright case) or "style" (a look the base never saw, on every
            shape: the LoRA-sharing case, see `diffmem.world.style`).
        rank: LoRA rank; alpha equals the rank, so the LoRA scale is 1 at every rank.
        conv: also adapt the convolutions (LoCon).
        duplicate: (images, repeats) of the duplicated training images that the fine-tune should memorize.
        seed: picks the duplicated images and seeds training.
        stage: which weights of the run (`STAGES`): "final" after the recipe's steps; "tuned" at the step of lowest
            held-out loss, measured every `HELDOUT_EVERY` steps of a run of the recipe's steps, the way a careful
            LoRA author stops; "over-trained" trained `OVERTRAIN_FACTOR` times the tuned step (at a constant
            learning rate this continues the tuned run's trajectory; with a cosine schedule it is a run three
            times as long with the same recipe).
        lr_schedule: "constant" (the example LoRA's recipe) or "cosine" (`FinetuneConfig.lr_schedule`); a cosine
            fine-tune's name carries ``-cos``.
        steps: the recipe's optimizer steps (for "tuned", the length of the tracked run the best step is picked
            from; with a cosine schedule also the length its learning rate decays over). `FinetuneConfig`'s
            default (500) unless a setting needs a longer run; any other length is in the name (``-1500steps``).
    """

    data: str = "faces"
    rank: int = 32
    conv: bool = True
    duplicate: tuple[int, int] = (5, 100)
    seed: int = 0
    stage: str = "final"
    lr_schedule: str = "constant"
    steps: int = FinetuneConfig.steps

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        check_lr_schedule(self.lr_schedule)

    @property
    def name(self) -> str:
        """File-name-safe identifier, e.g. ``faces-r32-conv-d5x100-s0`` or ``faces-r32-conv-d5x100-cos-tuned-s0``."""
        return self.named("" if self.stage == "final" else self.stage)

    @property
    def tracked_name(self) -> str:
        """The identifier of the whole run a "tuned" stage is taken from (every step trained, the held-out loss
        tracked), e.g. ``faces-r32-conv-d5x100-tracked-s0``."""
        return self.named("tracked")

    def named(self, stage: str) -> str:
        """The identifier with `stage` ("" for none) between the recipe and the seed."""
        count, repeats = self.duplicate
        stage = f"-{stage}" if stage else ""
        schedule = "-cos" if self.lr_schedule == "cosine" else ""
        steps = "" if self.steps == FinetuneConfig.steps else f"-{self.steps}steps"
        return (f"{self.data}-r{self.rank}-{'conv' if self.conv else 'attn'}-d{count}x{repeats}{steps}{schedule}"
                f"{stage}-s{self.seed}")

    @property
    def setting(self) -> str:
        """The name without the seed: fine-tunes of one setting differ only by seed."""
        return self.name.rsplit("-s", 1)[0]

    def finetune_config(self) -> FinetuneConfig:
        """The full training recipe (of the run whose weights give this stage; an over-trained fine-tune's steps
        are set from its tuned run's best step, `diffmem.bench.run.ensure_finetune`)."""
        return FinetuneConfig(data=self.data, rank=self.rank, alpha=float(self.rank), conv=self.conv,
                              duplicate=self.duplicate, seed=self.seed, lr_schedule=self.lr_schedule,
                              steps=self.steps, heldout_every=HELDOUT_EVERY if self.stage == "tuned" else 0)


#: The central setting (the committed example LoRA is its seed 0): faces, rank 32, LoCon, 5 images x 100.
CORE = FinetuneSpec()

#: Settings varied one at a time around `CORE`, each at one seed unless the grid is extended.
VARIATIONS = (
    replace(CORE, data="photos"),
    replace(CORE, rank=4),
    replace(CORE, rank=64),
    replace(CORE, conv=False),
    replace(CORE, duplicate=(5, 25)),
)


@dataclass(frozen=True)
class Variant:
    """One mitigation applied to a fine-tune: a channel filter (`config`), a function that rewrites the LoRA
    (`transform`), or neither (the base model).

    Args:
        key: unique label used in tables, e.g. ``baf@energy=0.8``.
        method: the filter (a `diffmem.filters.FILTERS` name), a `TRANSFORMS` key, or "base" for the base model
            without the LoRA.
        budget: "default" (the method's own rule), "energy" (keep this share of each module's update energy),
            "fraction" (keep this share of each module's channels) or "none".
        level: the energy or channel share for the "energy" and "fraction" budgets.
        config: the filter config; None for "base" and for a transform.
        transform: ``(lora, base) -> lora`` run instead of a channel filter (a library's own method, e.g. PEFT's
            intruder reduction); None for a channel filter and for "base".
    """

    key: str
    method: str
    budget: str
    level: float | None
    config: FilterConfig | None
    transform: Callable[[LoraFile, BaseCheckpoint], LoraFile] | None = None

    @property
    def is_base(self) -> bool:
        """The base model without the LoRA: nothing to filter or rewrite."""
        return self.config is None and self.transform is None


#: BAF's two-sided score (the paper's reading), spelled out: `BAFConfig`'s default side changed after these runs.
TWO_SIDED = {"side": "both"}

#: Scoring methods whose config the bench fixes beyond `filters.FILTERS`: name -> (config class, fields).
SCORERS = {
    "baf": (BAFConfig, TWO_SIDED),
    "baf-right": (BAFConfig, {"side": "right"}),
    "inverse-baf": (InverseBAFConfig, TWO_SIDED),
}


def budget_variant(method: str, budget: str, level: float) -> Variant:
    """`method` keeping `level` of each module's update energy (budget "energy") or channels ("fraction");
    "scale" turns the whole LoRA down to `level` of its energy."""
    if method == "scale":
        if budget != "energy":
            raise ValueError("scale has only an energy budget")
        return Variant(f"scale@energy={level:g}", "scale", "energy", level,
                       ScaleConfig(selection=Selection(rule="uniform", keep_fraction=level)))
    config_class, fields = SCORERS[method] if method in SCORERS else (FILTERS[method], {})
    config = config_class(selection=Selection(rule=budget, keep_fraction=level), **fields)
    return Variant(f"{method}@{budget}={level:g}", method, budget, level, config)


def reference_variants() -> list[Variant]:
    """The LoRA as trained, the base model, and two-sided BAF with the chance threshold (whose kept channel share
    the fraction-matched baselines copy)."""
    return [
        Variant("lora", "none", "none", None, KeepAllConfig()),
        Variant("base", "base", "none", None, None),
        Variant("baf", "baf", "default", None, BAFConfig(**TWO_SIDED)),
    ]


def baf_rule_variants() -> list[Variant]:
    """BAF's score and rule variants at the default chance-relative threshold of 1."""
    return [
        Variant("baf-left", "baf", "default", None, BAFConfig(side="left")),
        Variant("baf-right", "baf", "default", None, BAFConfig(side="right")),
        Variant("baf-min", "baf", "default", None, BAFConfig(**TWO_SIDED, combine="min")),
        Variant("baf-anchors0.25", "baf", "default", None, BAFConfig(**TWO_SIDED, energy=0.25)),
        Variant("baf-anchors0.75", "baf", "default", None, BAFConfig(**TWO_SIDED, energy=0.75)),
        Variant("baf-soft", "baf", "default", None,
                BAFConfig(**TWO_SIDED, selection=Selection(rule="soft", threshold=1.0))),
    ]


RULE_KEYS = tuple(v.key for v in baf_rule_variants())


#: Extraction-guided scores of the LoRA files measured so far in this process, by path and modification time: each
#: budget of the ``extraction-guided`` transforms reuses its LoRA's scan and scores (minutes each).
EXTRACTION_SCORES: dict[tuple[str, int], dict] = {}


def extraction_guided_at(energy: float) -> Callable[[LoraFile, BaseCheckpoint], LoraFile]:
    """The ``extraction-guided@energy=...`` transform: `diffmem.mitigations.extraction_guided` keeping the
    highest-scoring channels of the whole LoRA that hold `energy` of its update energy. The module is imported when
    the transform runs: it loads diffusers, which the grid's definitions and `diffmem bench --help` do not need."""

    def transform(lora: LoraFile, base: BaseCheckpoint) -> LoraFile:
        from diffmem.mitigations.extraction_guided import (
            ExtractionGuidedConfig,
            extraction_guided_lora,
            scan_and_score,
        )

        config = ExtractionGuidedConfig(selection=Selection(rule="energy", keep_fraction=energy, scope="global"))
        key = (str(lora.path), lora.path.stat().st_mtime_ns if lora.path is not None else 0)
        if key not in EXTRACTION_SCORES:
            EXTRACTION_SCORES[key] = scan_and_score(lora, base, config)
        return extraction_guided_lora(lora, base, config, EXTRACTION_SCORES[key])

    return transform


def extraction_guided_variant(energy: float) -> Variant:
    """`extraction_guided_at(energy)` as a variant of the grid."""
    key = f"extraction-guided@energy={energy:g}"
    return Variant(key, "extraction-guided", "energy", energy, None, transform=extraction_guided_at(energy))


def scaled_after(first: Variant, energy: float) -> Variant:
    """`first`, then the whole result turned down (`scale`) so that it holds `energy` of the input's update energy
    (issue 18, section 5: a channel filter and scale-down together). Turning a LoRA down removes its copies sooner
    than its held-out gain; dropping the channels a data-free score blames could remove what survives the turning
    down. Against `scale` at the same quality this says whether the channels add anything; the same with random
    channels is the control. Keyed ``<first>+scale@energy=<energy>``; a `first` keeping less than `energy` is
    left as it is."""

    def transform(lora: LoraFile, base: BaseCheckpoint) -> LoraFile:
        filtered = (first.transform(lora, base) if first.transform is not None
                    else filter_lora(lora, base, first.config).lora)
        kept, total = filtered.update_energy(), lora.update_energy()
        if kept <= energy * total:
            return filtered
        down = ScaleConfig(selection=Selection(rule="uniform", keep_fraction=energy * total / kept))
        return filter_lora(filtered, base, down).lora

    return Variant(f"{first.key}+scale@energy={energy:g}", f"{first.method}+scale", "energy", energy,
                   None, transform=transform)


#: Methods that rewrite the LoRA by a function of their own, each with its own rule, by key: ``peft-intruder`` is
#: PEFT's ``reduce_intruder_dimension`` with PEFT's defaults, run on every module (`diffmem.filters.peft_intruder`;
#: not our `intruder` channel filter: docs/filter.md); ``extraction-guided@energy=E`` drops the channels the LoRA's
#: own scan-extracted images lean on, keeping E of the update energy (`diffmem.mitigations.extraction_guided`,
#: issue 18).
TRANSFORMS = {
    "peft-intruder": Variant("peft-intruder", "peft-intruder", "default", None, None, transform=peft_intruder_lora),
    **{variant.key: variant for variant in map(extraction_guided_variant, (0.9, 0.8))},
}
#: Channel filters followed by scale-down (`scaled_after`): the extraction-guided filter at 90% of the energy and
#: random channels at the same share (the control), each turned down to 50% and 35% of the LoRA's energy, the
#: budgets around which `scale` met issue 18's goal on the tuned LoRAs.
TRANSFORMS |= {variant.key: variant for first in (TRANSFORMS["extraction-guided@energy=0.9"],
                                                   budget_variant("random", "energy", 0.9))
               for variant in (scaled_after(first, 0.5), scaled_after(first, 0.35))}

#: Dropping the update of every module that reads the caption (the cross-attention keys and values,
#: `diffmem.filters.CaptionReadersConfig`): a filter by module role, with its own rule and no budget. The grid's
#: own-caption copy rate flatters it: the generations go on copying other training images (docs/caption-readers.md).
TRANSFORMS["caption-readers"] = Variant("caption-readers", "caption-readers", "default", None, CaptionReadersConfig())
#: Dropping the update of the first up block (`diffmem.filters.UNetBlocksConfig`'s default): the one per-block rule
#: the layer probe found ahead of `scale`, on over-trained LoRAs only (docs/caption-readers.md); measured here on
#: every fine-tune, the LoRAs the rule was not chosen on included.
TRANSFORMS["first-up-block"] = Variant("first-up-block", "unet-blocks", "default", None, UNetBlocksConfig())

ENERGY_METHODS = ("baf", "baf-right", "inverse-baf", "random", "magnitude", "base-gain", "intruder", "scale")


def matched_variants(levels: tuple[float, ...], default_fraction: float, methods: tuple[str, ...],
                     fraction_methods: tuple[str, ...]) -> list[Variant]:
    """Every method at each energy `level`, plus `fraction_methods` at the channel share BAF's default rule kept."""
    variants = [budget_variant(m, "energy", level) for level in levels for m in methods]
    fraction = round(default_fraction, 3)
    for method in fraction_methods:
        # Keyed "matched", not by the share itself, which differs between fine-tunes.
        matched = budget_variant(method, "fraction", fraction)
        variants.append(replace(matched, key=f"{method}@fraction=matched"))
    return variants


@dataclass(frozen=True)
class VariantPlan:
    """Which variants a run evaluates after the reference ones (`reference_variants`).

    Args:
        rules: keys of the `baf_rule_variants` to include (all by default).
        levels: energy shares of the matched budgets.
        methods: methods run at every energy level.
        fraction_methods: methods run at the channel share BAF's default rule kept.
        scale_levels: further energy shares for "scale" alone (turning the whole LoRA down is the cheapest
            mitigation, so its curve is traced further).
        transforms: keys of the `TRANSFORMS` to include (none by default).
    """

    rules: tuple[str, ...] = RULE_KEYS
    levels: tuple[float, ...] = (0.5, 0.8)
    methods: tuple[str, ...] = ENERGY_METHODS
    fraction_methods: tuple[str, ...] = ("baf", "random", "magnitude")
    scale_levels: tuple[float, ...] = ()
    transforms: tuple[str, ...] = ()

    def variants(self, default_fraction: float) -> list[Variant]:
        """All variants after the reference ones, given the channel share BAF's default rule kept."""
        extra = [v for v in baf_rule_variants() if v.key in self.rules]
        scaled = [budget_variant("scale", "energy", level) for level in self.scale_levels]
        transformed = [TRANSFORMS[key] for key in self.transforms]
        return (extra + matched_variants(self.levels, default_fraction, self.methods, self.fraction_methods)
                + scaled + transformed)


FULL_PLAN = VariantPlan(scale_levels=(0.25, 0.35), transforms=("peft-intruder",))
VARIATION_PLAN = VariantPlan(rules=("baf-right",), levels=(0.8,), scale_levels=(0.25, 0.5),
                             transforms=("peft-intruder",))
QUICK_PLAN = VariantPlan(rules=("baf-right",), levels=(0.8,), methods=("baf", "random", "magnitude", "scale"))


@dataclass(frozen=True)
class GridCell:
    """A fine-tune and the variants measured on it."""

    spec: FinetuneSpec
    plan: VariantPlan


def full_grid(seeds: int = 3, variation_seeds: int = 1) -> list[GridCell]:
    """`CORE` at `seeds` seeds with every variant (`FULL_PLAN`), then each of `VARIATIONS` at `variation_seeds`
    seeds with the baselines at one energy budget (`VARIATION_PLAN`). The run goes in this order, so an interrupted
    run has the most informative cells first."""
    cells = [GridCell(replace(CORE, seed=s), FULL_PLAN) for s in range(seeds)]
    cells += [GridCell(replace(v, seed=s), VARIATION_PLAN) for s in range(variation_seeds) for v in VARIATIONS]
    return cells


#: The settings of the fair test (issue 18): faces stopped at the best held-out step and trained three times as
#: long (5 duplicated images x 100), and a style LoRA stopped at its best held-out step of a 1,500-step run (5 x 20:
#: at x 100 the duplicates are 85% of what it sees and it drew the style on 16% of held-out captions, at x 20 on 46%
#: after 500 steps, whose held-out loss was still falling; over 1,500 steps it was lowest at step 1,225;
#: benchmarks/style_recipe_probe.py, docs/bench.md), all with the learning rate decayed along a cosine: at the
#: example's constant rate the stopped LoRA still gained held-out loss from being turned down, which hands the
#: comparison to `scale` (docs/bench.md, "The training recipe").
EVIDENCE_SETTINGS = (
    replace(CORE, stage="tuned", lr_schedule="cosine"),
    replace(CORE, stage="over-trained", lr_schedule="cosine"),
    replace(CORE, data="style", duplicate=(5, 20), stage="tuned", lr_schedule="cosine", steps=1500),
)


#: The evidence grid's variants: the full plan, the extraction-guided filter at two budgets, it and random
#: channels each followed by scale-down, the caption readers dropped and the first up block dropped (issue 18,
#: section 5).
EVIDENCE_PLAN = replace(FULL_PLAN, transforms=(
    *FULL_PLAN.transforms, "extraction-guided@energy=0.9", "extraction-guided@energy=0.8",
    *(key for key in TRANSFORMS if "+scale@" in key), "caption-readers", "first-up-block"))


def evidence_grid(seeds: int = 5, first_seed: int = 0, only: Sequence[str] = ()) -> list[GridCell]:
    """`EVIDENCE_SETTINGS` at `seeds` seeds each (from `first_seed` on) with every variant (`EVIDENCE_PLAN`), seed by
    seed, so an interrupted run has every setting at the seeds it reached. `only` keeps the settings of these names
    (`FinetuneSpec.setting`), e.g. to give two processes different seeds of one setting."""
    unknown = set(only) - {spec.setting for spec in EVIDENCE_SETTINGS}
    if unknown:
        names = ", ".join(spec.setting for spec in EVIDENCE_SETTINGS)
        raise ValueError(f"not a setting of the evidence grid: {', '.join(sorted(unknown))} (it has {names})")
    settings = [spec for spec in EVIDENCE_SETTINGS if not only or spec.setting in only]
    return [GridCell(replace(spec, seed=s), EVIDENCE_PLAN) for s in range(first_seed, first_seed + seeds)
            for spec in settings]


def quick_grid() -> list[GridCell]:
    """The committed example LoRA (`CORE`, seed 0; nothing to train) with BAF, random, magnitude and scale at one
    energy budget."""
    return [GridCell(CORE, QUICK_PLAN)]
