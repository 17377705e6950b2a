"""One registry of diffmem's memorization mitigations (PEFT-style: a name maps to everything needed to run it).

Each `Mitigation` names a method, says whether it acts on a trained model ("post-hoc") or changes the fine-tune
itself ("training"), cites its paper, names its config dataclass and gives ONE entry function with the same
signature for every method:

    apply(inputs: MitigationInputs, config=None) -> MitigatedModel

`config` None runs the method with its defaults (the settings every table of diffmem measures). The robustness table
(`diffmem.attack.table`, docs/robustness.md) and MemControl's Table 1 (`diffmem.memcontrol.table`) take their rows
from `MITIGATIONS`, so a mitigation registered here with `register_mitigation` gets its row in each table it fits.
docs/mitigations.md lists the entries.

This module imports nothing heavy, so listing mitigations costs no torch start-up: config classes are named by import
path (`Mitigation.config_class` resolves them on use) and each entry function imports the modules it runs when it
runs. Those function-level imports are deliberate, the one kind this package accepts.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

    from diffmem.memcontrol.train import MemControlTrainConfig

#: When a mitigation acts: on a trained model, or on the fine-tune that makes it.
KINDS = ("post-hoc", "training")
#: The groups of the robustness table (`diffmem attack table --groups`), in the order it builds and measures them:
#: the cheap post-hoc mitigations of the LoRA, adversarial fine-tuning of it (minutes of training), and the
#: training-time mitigations (a fine-tune each).
TABLE_GROUPS = ("posthoc", "adversarial", "training")


@dataclass
class MitigationInputs:
    """What a mitigation works on, the same for every entry (an entry ignores the fields it does not use).

    Attributes:
        lora: the world LoRA a post-hoc mitigation mitigates (any format diffmem reads).
        base: world UNet file the LoRA was trained on; None: the committed world base.
        manifest: the fine-tune's manifest (`diffmem world finetune` writes it beside the LoRA): NeMo and Wanda take
            their memorized, ordinary and calibration captions from it.
        files: mitigation name -> a file an earlier run of it wrote, used instead of running it again: a mask file
            for NeMo and Wanda (`diffmem mitigate nemo|wanda --out`), a world UNet file with its manifest beside it
            for adversarial fine-tuning and the training-time mitigations (`diffmem mitigate adversarial --out`,
            `diffmem memcontrol train`).
        work: folder for the models trained on the way (`adversarial.safetensors`, `train-<name>.safetensors`).
        recipe: the fine-tune (`diffmem.memcontrol.train.MemControlTrainConfig`) the training-time mitigations
            change; None: its defaults.
        memcontrol_mask: the mask MemControl trains under (`diffmem memcontrol search`); None: every attention block.
        command: the command line recorded in the manifests of the models trained here.
        log: called with one line before each long step ("NeMo ...").
        progress: show training progress bars.
    """

    lora: str | Path | None = None
    base: str | Path | None = None
    manifest: Mapping | None = None
    files: Mapping[str, str | Path | None] = field(default_factory=dict)
    work: str | Path = Path("runs/robustness")
    recipe: MemControlTrainConfig | None = None
    memcontrol_mask: str | Path | None = None
    command: str | None = None
    log: Callable[[str], None] = lambda message: None
    progress: bool = False
    # The loaded models, kept so the post-hoc entries of one table load the base and merge the LoRA once.
    _world_base: UNet2DConditionModel | None = field(default=None, init=False, repr=False)
    _tuned: UNet2DConditionModel | None = field(default=None, init=False, repr=False)

    def world_base(self) -> UNet2DConditionModel:
        """The world base (`base`, or the committed one), loaded once."""
        if self._world_base is None:
            from diffmem.mitigations.run import load_world_model

            self._world_base = load_world_model(self.base, None)
        return self._world_base

    def tuned(self) -> UNet2DConditionModel:
        """The world base with `lora` merged in, merged once: the model the post-hoc mitigations mitigate."""
        if self._tuned is None:
            from diffmem.world.lora import apply_lora

            self._tuned = apply_lora(self.world_base(), self.required("lora"))
        return self._tuned

    def required(self, name: str) -> Any:
        """The field `name`, or a clear error when it is not given."""
        value = getattr(self, name)
        if value is None:
            from diffmem.errors import DiffmemError

            raise DiffmemError(f"this mitigation needs MitigationInputs.{name}, which was not given")
        return value


@dataclass
class MitigatedModel:
    """A mitigation's result: the mitigated UNet, where it comes from (one line: the function and config that made
    it, or the file it was read from) and, for models trained into a file, that world UNet file (its manifest
    beside it)."""

    unet: UNet2DConditionModel
    source: str
    path: Path | None = None


#: The uniform signature of every entry function.
MitigationFn = Callable[[MitigationInputs, Any], MitigatedModel]


@dataclass(frozen=True)
class Mitigation:
    """One registered mitigation.

    Attributes:
        name: its key in `MITIGATIONS`, also its spelling in configs and files ("rwa" is
            `MitigationConfig.kind`'s spelling of random word addition).
        kind: "post-hoc" (acts on a trained model) or "training" (changes the fine-tune).
        description: one line: what it does, and the paper.
        config: import path ("module:Class") of its config dataclass; `config_class` resolves it.
        apply: its entry function, `apply(inputs, config=None) -> MitigatedModel`.
        label: its short name in tables ("NeMo", "RWA").
        row: its row name in the robustness table (docs/robustness.md; kept stable, rows of earlier runs are merged
            by name).
        table_group: which group of the robustness table builds it (`TABLE_GROUPS`); default "posthoc" for a
            post-hoc mitigation, "training" for a training-time one.
        in_training_loop: it changes the captions or the loss of any fine-tune (`MitigationConfig.kind`), so
            MemControl's Table 1 crosses it with every fine-tuning method.
        config_defaults: fields its default config sets ({"kind": "rwa"}); `default_config()` applies them.
        file_option / file_help: the `diffmem attack table` option that gives a file of an earlier run instead of
            running it (`MitigationInputs.files`), and its help; no option when `file_option` is empty.
    """

    name: str
    kind: str
    description: str
    config: str
    apply: MitigationFn
    label: str
    row: str
    table_group: str = ""
    in_training_loop: bool = False
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    file_option: str = ""
    file_help: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"mitigation {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.table_group:  # frozen: the default group follows from the kind
            object.__setattr__(self, "table_group", "posthoc" if self.kind == "post-hoc" else "training")
        if self.table_group not in TABLE_GROUPS:
            raise ValueError(f"mitigation {self.name!r}: table_group must be one of {', '.join(TABLE_GROUPS)}, "
                             f"got {self.table_group!r}")
        if self.in_training_loop and self.kind != "training":
            raise ValueError(f"mitigation {self.name!r}: only a training-time mitigation acts in the training loop")

    @property
    def config_class(self) -> type:
        """Its config dataclass (imports the module that defines it)."""
        module, _, name = self.config.partition(":")
        return getattr(importlib.import_module(module), name)

    def default_config(self) -> Any:
        """Its config with the settings `apply(inputs)` uses when given none."""
        return self.config_class(**self.config_defaults)


#: Every registered mitigation by name, in registration order (the order of the tables' rows).
MITIGATIONS: dict[str, Mitigation] = {}


def register_mitigation(mitigation: Mitigation, replace_existing: bool = False) -> Mitigation:
    """Add `mitigation` to `MITIGATIONS` (a name already registered is an error unless `replace_existing`)."""
    if mitigation.name in MITIGATIONS and not replace_existing:
        raise ValueError(f"a mitigation named {mitigation.name!r} is already registered")
    MITIGATIONS[mitigation.name] = mitigation
    return mitigation


def get_mitigation(name: str) -> Mitigation:
    """The mitigation registered as `name`; an unknown name is an error that lists the known ones."""
    try:
        return MITIGATIONS[name]
    except KeyError:
        from diffmem.errors import DiffmemError

        raise DiffmemError(f"unknown mitigation {name!r}; known mitigations: {', '.join(MITIGATIONS)}") from None


def registered(kind: str | None = None, table_group: str | None = None) -> list[Mitigation]:
    """The registered mitigations of `kind` and/or `table_group` (all when None), in registration order."""
    return [m for m in MITIGATIONS.values()
            if (kind is None or m.kind == kind) and (table_group is None or m.table_group == table_group)]


def training_loop_mitigations() -> list[Mitigation]:
    """The mitigations MemControl's Table 1 crosses with every fine-tuning method (`Mitigation.in_training_loop`)."""
    return [m for m in MITIGATIONS.values() if m.in_training_loop]


# ------------------------------------------------------------------------------------------------ entry functions
def config_text(config: Any, default: Any) -> str:
    """How a source line names a config: "NeMoConfig()" for the defaults, the full repr otherwise."""
    return f"{type(config).__name__}()" if config == default else repr(config)


def masked_model(inputs: MitigationInputs, path: str | Path, method: str) -> MitigatedModel:
    """The LoRA's model with the mask file `path` of `method` (written by `diffmem mitigate <method> --out` for this
    LoRA) applied, instead of running the method's search again."""
    from diffmem.errors import DiffmemError
    from diffmem.mitigations.pruning import apply_masks, check_masks_fit, load_masks, masked_count

    masks, written_by, report = load_masks(path)
    if written_by != method:
        raise DiffmemError(f"is a {written_by} mask, not a {method} one", path)
    tuned = inputs.tuned()
    check_masks_fit(tuned, masks, path)
    return MitigatedModel(apply_masks(tuned, masks), f"mask file {path} ({masked_count(masks)} weights zeroed; "
                                                     f"config {json.dumps(report.get('config', {}), sort_keys=True)})")


def pruned_model(inputs: MitigationInputs, method: str, label: str, config: Any, default: Any,
                 run: Callable[..., tuple]) -> MitigatedModel:
    """A pruning mitigation of the LoRA's model: its earlier mask file when given, else `run(model, prompts,
    config)` on the manifest's prompts (`(pruned, report, masks)`, as `nemo_mitigate` and `wanda_mitigate`)."""
    from diffmem.mitigations.pruning import masked_count
    from diffmem.mitigations.run import manifest_prompts

    if inputs.files.get(method) is not None:
        return masked_model(inputs, inputs.files[method], method)
    config = config or default
    prompts = manifest_prompts(inputs.required("manifest"))
    inputs.log(f"{label} ...")
    pruned, _, masks = run(inputs.tuned(), prompts, config)
    return MitigatedModel(pruned, f"{method}_mitigate, {config_text(config, default)}: {masked_count(masks)} "
                                  "weights zeroed")


def apply_nemo(inputs: MitigationInputs, config: Any = None) -> MitigatedModel:
    """NeMo on the LoRA's model, memorized prompts = the manifest's duplicated captions (`nemo_mitigate`)."""
    from diffmem.mitigations.nemo import NeMoConfig, nemo_mitigate

    return pruned_model(inputs, "nemo", "NeMo", config, NeMoConfig(), lambda model, prompts, config: nemo_mitigate(
        model, prompts.memorized, prompts.ordinary, prompts.calibration or None, config=config))


def apply_wanda(inputs: MitigationInputs, config: Any = None) -> MitigatedModel:
    """Wanda-style pruning of the LoRA's model for the manifest's duplicated captions (`wanda_mitigate`)."""
    from diffmem.mitigations.wanda import WandaConfig, wanda_mitigate

    return pruned_model(inputs, "wanda", "Wanda", config, WandaConfig(),
                        lambda model, prompts, config: wanda_mitigate(model, prompts.memorized, config=config))


def filtered_model(inputs: MitigationInputs, config: Any, label: str) -> MitigatedModel:
    """The LoRA filtered by the channel filter `config` against its base (`diffmem.pipeline.filter_lora`), merged
    into the base."""
    from diffmem.pipeline import filter_lora
    from diffmem.world.lora import apply_lora
    from diffmem.world.model import BASE_FILE, assets_dir

    inputs.log(f"{label} ...")
    # No anchor cache: the world base is small, and a table run should not depend on what an earlier run cached.
    filtered = filter_lora(inputs.required("lora"), inputs.base or assets_dir() / BASE_FILE, config,
                           use_cache=False).lora
    return MitigatedModel(apply_lora(inputs.world_base(), filtered),
                          f"diffmem.pipeline.filter_lora, {config_text(config, type(config)())}")


def register_channel_filter(name: str, label: str, row: str, description: str, config: str) -> None:
    """Register a post-hoc channel filter whose config dataclass is `config` ("module:Class"). Its entry function
    filters the LoRA against its base with the config it is given, or the entry's `Mitigation.default_config`, and
    merges the result into the base (`filtered_model`). Data-free: BAF reads the base, the module-role filters only
    the module names."""

    def apply(inputs: MitigationInputs, config: Any = None) -> MitigatedModel:
        return filtered_model(inputs, config or MITIGATIONS[name].default_config(), label)

    register_mitigation(Mitigation(name=name, kind="post-hoc", label=label, row=row, description=description,
                                   config=config, apply=apply))


def apply_extraction_guided(inputs: MitigationInputs, config: Any = None) -> MitigatedModel:
    """The LoRA without the channels its own scan's extracted images lean on (`extraction_guided_lora`: a scan of the
    LoRA file, then integrated gradients per channel), merged into the base. Data-free: the manifest is not read."""
    from diffmem.formats.base import open_base
    from diffmem.formats.lora import read_lora
    from diffmem.mitigations.extraction_guided import ExtractionGuidedConfig, extraction_guided_lora
    from diffmem.world.lora import apply_lora
    from diffmem.world.model import BASE_FILE, assets_dir

    config = config or ExtractionGuidedConfig()
    inputs.log("extraction-guided filter (a scan, then the channels' attributions) ...")
    filtered = extraction_guided_lora(read_lora(inputs.required("lora")),
                                      open_base(inputs.base or assets_dir() / BASE_FILE), config)
    return MitigatedModel(apply_lora(inputs.world_base(), filtered),
                          f"diffmem.mitigations.extraction_guided, {config_text(config, ExtractionGuidedConfig())}")


def apply_adversarial(inputs: MitigationInputs, config: Any = None) -> MitigatedModel:
    """Adversarial fine-tuning of the LoRA's model (`adversarial_finetune_files`), written to
    `<work>/adversarial.safetensors`; or the model file `files["adversarial"]` of an earlier run."""
    from diffmem.mitigations.adversarial import adversarial_finetune_files
    from diffmem.world.model import load_unet_file

    path = inputs.files.get("adversarial")
    if path is None:
        path = Path(inputs.work) / "adversarial.safetensors"
        inputs.log(f"adversarial fine-tuning -> {path} ...")
        adversarial_finetune_files(path, lora=inputs.lora, base=inputs.base, config=config,
                                   progress=inputs.progress, command=inputs.command)
    return MitigatedModel(load_unet_file(path), str(path), Path(path))


def trained_model(inputs: MitigationInputs, key: str, what: str, config: MemControlTrainConfig,
                  mask_path: str | Path | None = None) -> MitigatedModel:
    """A fine-tune of the world base on the recipe's data: the file `files[key]`, or trained now with `config` (under
    the MemControl mask `mask_path`) into `<work>/train-<key>.safetensors` with its manifest beside it. The source
    line names the training settings its manifest records."""
    from diffmem.memcontrol.mask import load_mask
    from diffmem.memcontrol.train import train_masked
    from diffmem.world.model import load_unet_file

    path = inputs.files.get(key)
    if path is None:
        path = Path(inputs.work) / f"train-{key}.safetensors"
        mask = load_mask(mask_path) if mask_path is not None else None
        inputs.log(f"training {what} -> {path} ...")
        train_masked(path, config, mask, progress=inputs.progress, command=inputs.command)
    record_path = Path(path).with_suffix(".json")
    source = str(path)
    if record_path.is_file():
        settings = json.loads(record_path.read_text()).get("settings", {})
        source = (f"{path} ({settings.get('method')}, {settings.get('steps')} x {settings.get('batch_size')}, "
                  f"lr {settings.get('lr')})")
    return MitigatedModel(load_unet_file(path), source, Path(path))


def training_recipe(inputs: MitigationInputs) -> MemControlTrainConfig:
    """The fine-tune the training-time mitigations change: `inputs.recipe`, or its defaults."""
    from diffmem.memcontrol.train import MemControlTrainConfig

    return inputs.recipe if inputs.recipe is not None else MemControlTrainConfig()


def apply_memcontrol(inputs: MitigationInputs, config: Any = None) -> MitigatedModel:
    """MemControl: SV-DIFF (its default method) trained under `inputs.memcontrol_mask` with the recipe's data,
    steps and batch, at SV-DIFF's own learning rate; `config` (a `MemControlTrainConfig`) replaces that fine-tune."""
    config = config or replace(training_recipe(inputs), method="svdiff", lr=None)
    return trained_model(inputs, "memcontrol", get_mitigation("memcontrol").row, config, inputs.memcontrol_mask)


def training_loop_entry(name: str) -> MitigationFn:
    """The entry function of the training-loop mitigation `name` ("rwa", "threshold"): the recipe's fine-tune with
    that mitigation (`MitigationConfig(kind=name)`, or `config`, which must be of that kind)."""

    def apply(inputs: MitigationInputs, config: Any = None) -> MitigatedModel:
        from diffmem.errors import DiffmemError
        from diffmem.memcontrol.mitigation import MitigationConfig

        config = config or MitigationConfig(kind=name)
        if config.kind != name:
            raise DiffmemError(f"the {name} mitigation takes a MitigationConfig of kind {name!r}, got {config.kind!r}")
        recipe = replace(training_recipe(inputs), mitigation=config)
        return trained_model(inputs, name, get_mitigation(name).row, recipe)

    apply.__name__ = apply.__qualname__ = f"apply_{name}"
    return apply


# ----------------------------------------------------------------------------------------------------- the entries
# Registration order is the order of the tables' rows (docs/robustness.md, docs/memcontrol.md): keep it.
register_mitigation(Mitigation(
    name="nemo", kind="post-hoc", label="NeMo", row="NeMo (default)",
    description="deactivate the memorization neurons of the cross-attention value layers (Hintersdorf et al. 2024, "
                "\"Finding NeMo\")",
    config="diffmem.mitigations.nemo:NeMoConfig", apply=apply_nemo, file_option="nemo-masks",
    file_help="NeMo mask file for this LoRA (`diffmem mitigate nemo --out`) instead of running NeMo's search"))
register_mitigation(Mitigation(
    name="wanda", kind="post-hoc", label="Wanda", row="Wanda (default)",
    description="prune the feed-forward weights memorized prompts use more than the empty prompt (Chavhan et al. "
                "2024, Wanda-style pruning)",
    config="diffmem.mitigations.wanda:WandaConfig", apply=apply_wanda, file_option="wanda-masks",
    file_help="Wanda mask file for this LoRA (`diffmem mitigate wanda --out`) instead of running Wanda"))
register_channel_filter(
    name="baf", label="BAF", row="BAF (default)",
    description="drop the LoRA's spectral channels weakly aligned with the base's principal subspace (Base-Anchored "
                "Filtering, arXiv 2605.10439)",
    config="diffmem.filters.baf:BAFConfig")
register_mitigation(Mitigation(
    name="extraction-guided", kind="post-hoc", label="extraction-guided", row="extraction-guided filter (default)",
    description="drop the LoRA channels that the images its own scan extracts lean on, by integrated gradients "
                "(Sundararajan et al. 2017) on the scan's output (FineXtract, Wu et al. 2025); a research candidate, "
                "docs/extraction-guided.md",
    config="diffmem.mitigations.extraction_guided:ExtractionGuidedConfig", apply=apply_extraction_guided))
register_channel_filter(
    name="caption-readers", label="caption-readers", row="caption-readers filter (default)",
    description="drop the LoRA's cross-attention keys and values, the modules that read the caption (where Finding "
                "NeMo, Hintersdorf et al. 2024, locates memorization neurons); a research candidate that unbinds "
                "memorized images from their captions more than it removes them, docs/caption-readers.md",
    config="diffmem.filters.caption_readers:CaptionReadersConfig")
register_channel_filter(
    name="unet-blocks", label="first up block", row="first-up-block filter (default)",
    description="drop the LoRA's update in the UNet's first up block, the lowest-resolution decoder block (the one "
                "per-block rule diffmem's layer probe found, 2026); a research candidate, ahead of turning down "
                "on over-trained world LoRAs only, docs/unet-blocks.md",
    config="diffmem.filters.unet_blocks:UNetBlocksConfig")
register_mitigation(Mitigation(
    name="adversarial", kind="post-hoc", label="adversarial fine-tuning", row="adversarial fine-tuning",
    table_group="adversarial",
    description="fine-tune every weight so that Dori's adversarial embeddings denoise to surrogate images "
                "(Kowalczuk et al. 2025, \"Finding Dori\")",
    config="diffmem.mitigations.adversarial:AdversarialFinetuneConfig", apply=apply_adversarial,
    file_option="adversarial",
    file_help="an adversarially fine-tuned model (`diffmem mitigate adversarial --out`); default: train one now "
              "with the --adv-* settings"))
register_mitigation(Mitigation(
    name="memcontrol", kind="training", label="MemControl", row="MemControl (SV-DIFF under a mask)",
    description="fine-tune only the parameters a searched mask selects, with a PEFT method (Dutt et al. 2025, "
                "\"MemControl\")",
    config="diffmem.memcontrol.train:MemControlTrainConfig", apply=apply_memcontrol, file_option="memcontrol",
    file_help="world UNet file of a MemControl-trained model (`diffmem memcontrol train --mask`), manifest beside "
              "it; default: train it with --train-*"))
register_mitigation(Mitigation(
    name="rwa", kind="training", label="RWA", row="random word addition (training)", in_training_loop=True,
    description="insert random words into the training captions (Somepalli et al. 2023, \"Understanding and "
                "Mitigating Copying in Diffusion Models\")",
    config="diffmem.memcontrol.mitigation:MitigationConfig", config_defaults={"kind": "rwa"},
    apply=training_loop_entry("rwa"), file_option="rwa",
    file_help="world UNet file of a fine-tune with random word addition (`memcontrol train --mitigation rwa`), "
              "manifest beside it; default: train it with --train-*"))
register_mitigation(Mitigation(
    name="threshold", kind="training", label="Threshold", row="threshold mitigation (training)",
    in_training_loop=True,
    description="drop training samples whose text-conditional noise difference reaches a threshold (Wen et al. "
                "2024, \"Detecting, Explaining, and Mitigating Memorization in Diffusion Models\")",
    config="diffmem.memcontrol.mitigation:MitigationConfig", config_defaults={"kind": "threshold"},
    apply=training_loop_entry("threshold"), file_option="threshold",
    file_help="world UNet file of a fine-tune with Wen's threshold (`memcontrol train --mitigation threshold`), "
              "manifest beside it; default: train it with --train-*"))
