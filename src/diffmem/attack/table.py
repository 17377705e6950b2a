"""Memorization of model variants (a mitigation each) on memorized captions: as prompted, and under the Dori attack.

`robustness_table` is the measurement behind the robustness table of issue 8 (docs/robustness.md): for each model,
the copy rate of fresh generations from each memorized caption, the copy rate of fresh generations from the
embedding Dori finds for that caption's image (from each start: the caption, random tokens, ...), the loss each
search reached, and quality (held-out denoising loss, FID) beside it. Every model is measured with the same
`RobustnessSettings`, seeds and probe, so rows differ only by the model.

The models come from the mitigation registry (`diffmem.mitigations.registry`): every registered mitigation gets a
row, built by its entry function. `run_robustness_table` is the whole run behind `diffmem attack table`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from diffmem.attack.dori import attack_success, dori_attack
from diffmem.attack.search_loss import final_search_loss
from diffmem.attack.settings import TRAINING_RECIPE, RobustnessSettings  # defined there, without diffusers
from diffmem.bench.evaluate import BenchSettings, Probe, quality_generations
from diffmem.errors import DiffmemError, FileFormatError
from diffmem.formats.safetensors_io import write_atomic
from diffmem.memcontrol.train import MemControlTrainConfig
from diffmem.metrics.features import embed
from diffmem.metrics.fid import fid_from_features
from diffmem.mitigations import registry
from diffmem.mitigations.registry import TABLE_GROUPS, Mitigation, MitigationInputs, trained_model
from diffmem.progress import progress_bar
from diffmem.report import between_markers, markdown_table
from diffmem.world.check import CheckSettings, example_lora_path
from diffmem.world.diffusion import denoising_loss
from diffmem.world.text import encode_prompts


@dataclass(frozen=True)
class RobustnessRow:
    """One model's memorization of the probe's duplicated captions, as prompted and under Dori, with its quality.

    Rates are fractions of all fresh generations (captions x generations) that copy their caption's image;
    `captions_copied_*` counts captions with at least half their generations copies; `dori_loss` is the mean over
    captions of the loss each search reached (mean of its last 10 steps; higher = the model resists denoising
    towards the memorized image); `heldout_loss` the held-out denoising loss (lower = better model of the data);
    `fid` None when not measured. `*_dori` fields are keyed by Dori start. The `*_luminance` fields are the same
    rates by the colour-blind copy test (`luminance_tiled_l2` to the caption's image within
    `RobustnessSettings.luminance_distance`), which counts a training face returned under a global colour cast;
    None in rows measured before it existed.
    """

    model: str
    captions: int
    copy_rate_prompt: float
    copy_rate_dori: dict[str, float]
    captions_copied_prompt: int
    captions_copied_dori: dict[str, int]
    per_caption_prompt: list[float]
    per_caption_dori: dict[str, list[float]]
    dori_loss: dict[str, float]
    heldout_loss: float
    fid: float | None
    seconds: float
    copy_rate_prompt_luminance: float | None = None
    copy_rate_dori_luminance: dict[str, float] | None = None
    per_caption_prompt_luminance: list[float] | None = None
    per_caption_dori_luminance: dict[str, list[float]] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def fid_of(unet: UNet2DConditionModel, probe: Probe, sampling: CheckSettings) -> float:
    """FID of one generation per held-out caption against the held-out images, copy-embedder features (as
    `diffmem.bench`), sampled with `sampling`'s steps and guidance."""
    bench = BenchSettings(quality_generations=1, steps=sampling.steps, guidance=sampling.guidance, seed=sampling.seed)
    generated = quality_generations(unet, probe, bench)
    return round(fid_from_features(probe.heldout_features, embed(probe.embedder, generated)), 3)


def rate_summary(rates: list[float]) -> tuple[float, int, list[float]]:
    """(mean rate, captions copied in at least half their generations, per-caption rates rounded)."""
    return round(sum(rates) / len(rates), 4), sum(rate >= 0.5 for rate in rates), [round(r, 3) for r in rates]


def robustness_row(name: str, unet: UNet2DConditionModel, probe: Probe,
                   settings: RobustnessSettings | None = None) -> RobustnessRow:
    """Copy rates of `unet` on each duplicated caption of `probe` (its own image the target, the probe's training
    images the reference of the relative copy test), from the caption's embedding and from Dori's embedding for its
    image from each start, with the held-out loss (and FID) of the model."""
    settings = settings or RobustnessSettings()
    began = time.time()
    images = probe.duplicated
    prompted: list[float] = []
    prompted_luminance: list[float] = []
    attacked: dict[str, list[float]] = {start: [] for start in settings.starts}
    attacked_luminance: dict[str, list[float]] = {start: [] for start in settings.starts}
    losses: dict[str, list[float]] = {start: [] for start in settings.starts}
    pairs = list(zip(images.images, images.captions))
    for image, caption in progress_bar(pairs, desc=name, unit="caption", disable=not settings.progress, leave=False):
        target = image[None]
        success = attack_success(unet, encode_prompts([caption]), target, probe.reference, settings.sampling,
                                 settings.copy)
        prompted.append(success.rate)
        prompted_luminance.append(success.luminance_rate(settings.luminance_distance))
        for start in settings.starts:
            result = dori_attack(unet, target, caption, replace(settings.dori, start=start))
            losses[start].append(final_search_loss(result.losses))
            success = attack_success(unet, result.embedding, target, probe.reference, settings.sampling,
                                     settings.copy)
            attacked[start].append(success.rate)
            attacked_luminance[start].append(success.luminance_rate(settings.luminance_distance))
    heldout = probe.heldout
    loss = round(denoising_loss(unet, heldout.images, heldout.captions,
                                timesteps_per_image=settings.timesteps_per_image), 5)
    rate, copied, per_caption = rate_summary(prompted)
    dori = {start: rate_summary(rates) for start, rates in attacked.items()}
    luminance_rate, _, luminance_per_caption = rate_summary(prompted_luminance)
    dori_luminance = {start: rate_summary(rates) for start, rates in attacked_luminance.items()}
    return RobustnessRow(
        model=name,
        captions=len(images),
        copy_rate_prompt=rate,
        copy_rate_dori={start: summary[0] for start, summary in dori.items()},
        captions_copied_prompt=copied,
        captions_copied_dori={start: summary[1] for start, summary in dori.items()},
        per_caption_prompt=per_caption,
        per_caption_dori={start: summary[2] for start, summary in dori.items()},
        dori_loss={start: round(sum(v) / len(v), 5) for start, v in losses.items()},
        heldout_loss=loss,
        fid=fid_of(unet, probe, settings.sampling) if settings.fid else None,
        seconds=round(time.time() - began, 1),
        copy_rate_prompt_luminance=luminance_rate,
        copy_rate_dori_luminance={start: summary[0] for start, summary in dori_luminance.items()},
        per_caption_prompt_luminance=luminance_per_caption,
        per_caption_dori_luminance={start: summary[2] for start, summary in dori_luminance.items()},
    )


def robustness_table(models: Mapping[str, UNet2DConditionModel], probe: Probe,
                     settings: RobustnessSettings | None = None) -> list[RobustnessRow]:
    """`robustness_row` for every named model, on the same probe, seeds and search settings."""
    return [robustness_row(name, unet, probe, settings) for name, unet in models.items()]


START_LABELS = {"prompt": "from the caption", "random": "from random tokens", "unrelated": "from an unrelated prompt"}


def luminance_rates(row: RobustnessRow) -> str:
    """The row's copy rates by the luminance test, "captions / Dori per start", or "" when not measured."""
    if row.copy_rate_prompt_luminance is None or row.copy_rate_dori_luminance is None:
        return ""
    return " / ".join(f"{rate:.1%}" for rate in [row.copy_rate_prompt_luminance,
                                                 *row.copy_rate_dori_luminance.values()])


def markdown_rows(rows: list[RobustnessRow], notes: Mapping[str, str] | None = None) -> str:
    """The table as markdown: one line per model; `notes` (model -> why) adds lines for models not measured."""
    starts = list(rows[0].copy_rate_dori) if rows else ["prompt"]
    header = ["model", "copy rate, captions",
              *[f"copy rate, Dori {START_LABELS[s]}" for s in starts],
              f"luminance test (captions / {' / '.join('Dori ' + s for s in starts)})",
              f"captions copied (caption / {' / '.join('Dori ' + s for s in starts)})",
              f"Dori loss reached ({' / '.join(starts)})", "held-out denoising loss", "FID"]
    lines = [[r.model, f"{r.copy_rate_prompt:.1%}", *[f"{r.copy_rate_dori[s]:.1%}" for s in starts],
              luminance_rates(r),
              " / ".join([str(r.captions_copied_prompt), *[str(r.captions_copied_dori[s]) for s in starts]])
              + f" of {r.captions}",
              " / ".join(f"{r.dori_loss[s]:.4f}" for s in starts), f"{r.heldout_loss:.5f}",
              "" if r.fid is None else f"{r.fid:.2f}"]
             for r in rows]
    for model, why in (notes or {}).items():
        lines.append([model, f"not measured: {why}", *[""] * (len(header) - 2)])
    return markdown_table(header, lines)


#: Share of the unmitigated model's copy rate under which a rate counts as "removed" in `verdict`.
REMOVED_SHARE = 0.25


def verdict(row: RobustnessRow, reference: RobustnessRow) -> str:
    """One plain sentence on `row` against the unmitigated `reference`: did the mitigation lower the copies from the
    captions, and do they stay low under every Dori start? A rate counts as removed when it is at most
    `REMOVED_SHARE` of the reference's. Judged by the RGB copy test; when the luminance test counts copies the RGB
    test calls removed, the sentence says so (`luminance_caveat`)."""
    return rgb_verdict(row, reference) + luminance_caveat(row, reference)


def luminance_caveat(row: RobustnessRow, reference: RobustnessRow) -> str:
    """"" unless the luminance test finds copies under Dori (or from the captions) on `row` above `REMOVED_SHARE`
    of the reference's, where the RGB test found them removed: then a clause naming the rate."""
    if row is reference or row.copy_rate_dori_luminance is None or reference.copy_rate_dori_luminance is None:
        return ""
    rates = {"from the captions": (row.copy_rate_prompt, row.copy_rate_prompt_luminance,
                                   reference.copy_rate_prompt, reference.copy_rate_prompt_luminance)}
    for start in row.copy_rate_dori:
        rates[f"under Dori {START_LABELS[start]}"] = (
            row.copy_rate_dori[start], row.copy_rate_dori_luminance[start],
            max(reference.copy_rate_dori.values()), max(reference.copy_rate_dori_luminance.values()))
    missed = [(where, luminance) for where, (rgb, luminance, reference_rgb, reference_luminance) in rates.items()
              if rgb <= REMOVED_SHARE * reference_rgb and luminance > REMOVED_SHARE * reference_luminance]
    if not missed:
        return ""
    where, luminance = max(missed, key=lambda item: item[1])
    return (f"; but the luminance test counts {luminance:.0%} copies {where} (the image returns under a colour "
            "cast that RGB tiled L2 misses)")


def rgb_verdict(row: RobustnessRow, reference: RobustnessRow) -> str:
    """`verdict` by the RGB copy test alone."""
    if row is reference:
        return "no mitigation: the reference"
    worst_start = max(row.copy_rate_dori, key=row.copy_rate_dori.get)
    worst = row.copy_rate_dori[worst_start]
    reference_worst = max(reference.copy_rate_dori.values())
    if reference.copy_rate_prompt == 0 and reference_worst == 0:
        return "the reference copies nothing: nothing to mitigate"
    prompt_removed = row.copy_rate_prompt <= REMOVED_SHARE * reference.copy_rate_prompt
    dori_removed = worst <= REMOVED_SHARE * reference_worst
    if prompt_removed and dori_removed:
        return ("survives Dori at this budget, as the copy test counts: copies stay low from the captions and "
                "under every start")
    if dori_removed:
        return (f"copies stay low under Dori ({worst:.0%}) but not from the captions ({row.copy_rate_prompt:.0%}, "
                f"reference {reference.copy_rate_prompt:.0%})")
    if row.copy_rate_prompt < reference.copy_rate_prompt:
        return (f"does not survive Dori: copies from the captions fall to {row.copy_rate_prompt:.0%} (reference "
                f"{reference.copy_rate_prompt:.0%}), Dori {START_LABELS[worst_start]} brings back {worst:.0%}")
    return (f"does not lower the copies: {row.copy_rate_prompt:.0%} from the captions (reference "
            f"{reference.copy_rate_prompt:.0%}), {worst:.0%} under Dori")


def shown_path(path) -> str:
    """`path` relative to the working directory when it lies below it (as a page should show it), else as is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------ the toolkit's models
#: Name of the unmitigated model every post-hoc mitigation is compared with.
NO_MITIGATION = "none (the LoRA as trained)"
#: Name of the unmitigated same-recipe fine-tune the training-time mitigations are compared with.
TRAINING_CONTROL = "fine-tune without mitigation (same recipe)"


def judged_against(mitigation: Mitigation) -> str:
    """The row a mitigation is judged against: the LoRA as trained for a post-hoc one, the same recipe without
    mitigation for a training-time one."""
    return NO_MITIGATION if mitigation.kind == "post-hoc" else TRAINING_CONTROL


def planned_rows(groups: Collection[str] = TABLE_GROUPS, done: Collection[str] = ()) -> dict[str, list[str]]:
    """The rows each of `groups` measures, in the order they are built: the group's reference (the LoRA as trained;
    the same-recipe fine-tune without mitigation), then each registered mitigation of the group in registration
    order (`diffmem.mitigations.registry`). Rows in `done` (measured by earlier runs) are left out."""
    rows: dict[str, list[str]] = {"posthoc": [NO_MITIGATION], "adversarial": [], "training": [TRAINING_CONTROL]}
    for mitigation in registry.registered():
        rows[mitigation.table_group].append(mitigation.row)
    return {group: [name for name in rows[group] if name not in done] for group in TABLE_GROUPS if group in groups}


@dataclass
class ToolkitModels:
    """Named models to attack, which unmitigated model each is judged against, and why a mitigation has no model
    (a sentence per name), in the order they were built."""

    models: dict[str, UNet2DConditionModel] = field(default_factory=dict)
    reference_of: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, unet: UNet2DConditionModel, reference: str, source: str) -> None:
        self.models[name], self.reference_of[name], self.sources[name] = unet, reference, source


def add_mitigations(toolkit: ToolkitModels, group: str, inputs: MitigationInputs,
                    configs: Mapping[str, Any] | None = None, rows: Collection[str] | None = None) -> None:
    """Add to `toolkit` every registered mitigation of the table group `group` whose row is in `rows` (all when
    None), each built by its entry function with `configs[name]` (its defaults when absent) and judged against its
    reference (`judged_against`)."""
    for mitigation in registry.registered(table_group=group):
        if rows is None or mitigation.row in rows:
            built = mitigation.apply(inputs, (configs or {}).get(mitigation.name))
            toolkit.add(mitigation.row, built.unet, judged_against(mitigation), built.source)


def posthoc_models(inputs: MitigationInputs, configs: Mapping[str, Any] | None = None,
                   rows: Collection[str] | None = None) -> ToolkitModels:
    """The LoRA as trained (`inputs.lora`) and the registered post-hoc mitigations of the table's "posthoc" group
    applied to it (NeMo, Wanda and BAF by default settings), those in `rows` (all when None). NeMo and Wanda run
    their searches, or apply the mask files `inputs.files["nemo"]` / `["wanda"]` that `diffmem mitigate nemo|wanda
    --out` wrote for this LoRA (NeMo's search takes tens of CPU minutes). Adversarial fine-tuning is added by
    `add_adversarial`."""
    toolkit = ToolkitModels()
    if rows is None or NO_MITIGATION in rows:
        toolkit.add(NO_MITIGATION, inputs.tuned(), NO_MITIGATION, shown_path(inputs.required("lora")))
    add_mitigations(toolkit, "posthoc", inputs, configs, rows)
    return toolkit


def add_adversarial(toolkit: ToolkitModels, inputs: MitigationInputs, configs: Mapping[str, Any] | None = None,
                    rows: Collection[str] | None = None) -> None:
    """Add the table's "adversarial" group to `toolkit`: adversarial fine-tuning of the LoRA, the model file
    `inputs.files["adversarial"]` (`diffmem mitigate adversarial --out`), or trained now with
    `configs["adversarial"]` and written to `<inputs.work>/adversarial.safetensors`."""
    add_mitigations(toolkit, "adversarial", inputs, configs, rows)


def training_time_models(toolkit: ToolkitModels, inputs: MitigationInputs, configs: Mapping[str, Any] | None = None,
                         rows: Collection[str] | None = None, train_missing: bool = True) -> None:
    """Add the same-recipe control and the registered training-time mitigations (MemControl, random word addition,
    threshold) to `toolkit`, those in `rows` (all when None): each is a fine-tune of the base on the LoRA's data (its
    duplicated faces must be `inputs.manifest`'s), from the file `inputs.files[name]` ("control" for the control) or
    trained now with `inputs.recipe` and written under `inputs.work`. MemControl trains SV-DIFF under
    `inputs.memcontrol_mask` (all attention blocks when None) with the same steps, batch and data. A file whose
    duplicated faces differ is noted, not measured, and so is a missing file when `train_missing` is off."""
    wanted = [entry["id"] for entry in inputs.required("manifest")["duplicated"]]
    if inputs.recipe is None:  # the control and the mitigations must share one recipe: this table's default
        inputs = replace(inputs, recipe=TRAINING_RECIPE)

    def control(inputs: MitigationInputs, _config: Any):
        return trained_model(inputs, "control", TRAINING_CONTROL, inputs.recipe)

    builders = [("control", TRAINING_CONTROL, control),
                *((m.name, m.row, m.apply) for m in registry.registered(table_group="training"))]
    for key, name, build in builders:
        if rows is not None and name not in rows:
            continue
        if inputs.files.get(key) is None and not train_missing:
            toolkit.notes[name] = "no model file given to this run"
            continue
        built = build(inputs, (configs or {}).get(key))
        record_path = built.path.with_suffix(".json")
        if not record_path.is_file():
            toolkit.notes[name] = f"no manifest beside {built.path}: cannot tell which faces it memorized"
            continue
        record = json.loads(record_path.read_text())
        if [entry["id"] for entry in record.get("duplicated", [])] != wanted:
            toolkit.notes[name] = f"{built.path} duplicated other faces than the LoRA's manifest"
            continue
        toolkit.add(name, built.unet, TRAINING_CONTROL, built.source)


# ------------------------------------------------------------------------------------------------ the whole run
def merged_rows(paths: Sequence[str | Path], settings: dict):
    """(rows, sources, reference_of, commands) of earlier `attack table --json` files, which must have been
    measured with `settings`; anything else is a clear error naming the file."""
    rows, sources, reference_of, commands = [], {}, {}, []
    for path in map(Path, paths):
        if not path.is_file():
            raise DiffmemError("no such table JSON file", path)
        try:
            record = json.loads(path.read_text())
            found = [RobustnessRow(**row) for row in record["rows"]]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise FileFormatError(f"is not a JSON file written by `diffmem attack table --json` ({error})",
                                  path) from None
        if record.get("settings") != settings:
            raise DiffmemError("was measured with other settings than this run (faces, starts, steps, sampling); "
                               "merge only runs of the same settings", path)
        rows += found
        sources.update({k: v for k, v in record.get("sources", {}).items() if k in {r.model for r in found}})
        reference_of.update({k: v for k, v in record.get("reference_of", {}).items()
                             if k in {r.model for r in found}})
        commands.append(record.get("command", str(path)))
    return rows, sources, reference_of, commands


def lora_manifest(lora: Path) -> dict:
    """The manifest `.json` beside a world LoRA, which must list its training images (duplicated and seen once)."""
    path = lora.with_suffix(".json")
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    if not {"data", "duplicated", "seen_once"} <= set(manifest):
        raise DiffmemError("no manifest .json beside the LoRA listing its training images (written by "
                           "`diffmem world finetune`)", lora)
    return manifest


@dataclass
class RobustnessRun:
    """What `run_robustness_table` measured: the rows (merged ones first) and the models with their references,
    sources and the notes on models not measured; `record` is what it writes to `json_out` (the rows and settings)."""

    rows: list[RobustnessRow]
    toolkit: ToolkitModels
    record: dict = field(default_factory=dict)

    def markdown(self) -> str:
        """The table as markdown (`markdown_rows`), with a line per model not measured."""
        return markdown_rows(self.rows, self.toolkit.notes)


def run_robustness_table(
    settings: RobustnessSettings | None = None,
    lora: str | Path | None = None,
    base: str | Path | None = None,
    *,
    groups: Collection[str] = TABLE_GROUPS,
    faces: int | None = None,
    files: Mapping[str, str | Path | None] | None = None,
    configs: Mapping[str, Any] | None = None,
    recipe: MemControlTrainConfig | None = None,
    memcontrol_mask: str | Path | None = None,
    train_missing: bool = True,
    merge: Sequence[str | Path] = (),
    out: str | Path | None = None,
    json_out: str | Path | None = None,
    work: str | Path = "runs/robustness",
    command: str | None = None,
    log: Callable[[str], None] | None = None,
) -> RobustnessRun:
    """The robustness table of a world LoRA (default: the committed example LoRA) with its manifest beside it: the
    LoRA as trained and every registered mitigation (`diffmem.mitigations.registry`) in `groups` (`TABLE_GROUPS`),
    each prompted with the duplicated captions (the first `faces` of them; all when None) and attacked with Dori
    under `settings`. Post-hoc rows are measured before adversarial fine-tuning is trained, and that before the
    training-time fine-tunes, writing `json_out` and the page `out` (its notes block kept) after each row, so a
    stopped run keeps what it measured.

    `files` maps a mitigation name (or "control", the same-recipe fine-tune without mitigation) to the file of an
    earlier run used instead of running it (`MitigationInputs.files`); `configs` a mitigation name to its config
    (its defaults when absent); `recipe` is the training-time rows' fine-tune (default `TRAINING_RECIPE`), and
    MemControl trains under `memcontrol_mask`. A training-time model without a file is trained into `work` unless
    `train_missing` is off. `merge` takes `json_out` files of earlier runs with the same settings: their rows join
    and are not measured again. `command` is the command line the page and the JSON record; `log` gets a line per
    step."""
    settings = settings or RobustnessSettings()
    files = dict(files or {})
    log = log or (lambda message: None)
    unknown_groups = set(groups) - set(TABLE_GROUPS)
    if unknown_groups:
        raise DiffmemError(f"unknown table groups {', '.join(sorted(unknown_groups))}; the groups are "
                           f"{', '.join(TABLE_GROUPS)}")
    unknown_files = set(files) - {"control", *registry.MITIGATIONS}
    if unknown_files:
        raise DiffmemError(f"files given for unknown models {', '.join(sorted(unknown_files))}; give them for "
                           f"control, {', '.join(registry.MITIGATIONS)}")
    lora = Path(lora) if lora is not None else example_lora_path()
    manifest = lora_manifest(lora)
    recipe = recipe if recipe is not None else TRAINING_RECIPE
    adversarial = (configs or {}).get("adversarial")
    if adversarial is None and "adversarial" in registry.MITIGATIONS:
        adversarial = registry.MITIGATIONS["adversarial"].default_config()
    command = command or "diffmem.attack.table.run_robustness_table"
    out = Path(out) if out is not None else None
    json_out = Path(json_out) if json_out is not None else None
    protect = tuple(p for p in (lora, lora.with_suffix(".json"), base, *files.values(), memcontrol_mask, *merge)
                    if p is not None)
    previous = out.read_text() if out is not None and out.is_file() else None
    began = time.time()
    probe = Probe.from_manifest(manifest)
    if faces is not None:
        probe = replace(probe, duplicated=probe.duplicated.subset(range(min(faces, len(probe.duplicated)))))
    budget = (f"{len(probe.duplicated)} of the LoRA's {len(manifest['duplicated'])} duplicated faces attacked "
              f"(manifest order); {torch.get_num_threads()} torch thread(s); seconds per row in the per-caption "
              "table")
    rows: list[RobustnessRow] = []
    record: dict = {}  # the JSON of the rows so far, written to json_out and returned

    def write_outputs(toolkit: ToolkitModels, planned: list[str]) -> None:
        """The JSON and the page of the rows so far; models not measured yet are named as such."""
        done = {row.model for row in rows}
        pending = {n: "not measured yet (the run stopped before it)" for n in [*toolkit.models, *planned]
                   if n not in done}
        notes = {**{n: why for n, why in toolkit.notes.items() if n not in done}, **pending}
        record.clear()
        record.update({"lora": str(lora), "command": command, "settings": settings.to_dict(),
                       "adversarial": None if adversarial is None else adversarial.to_dict(),
                       "training_recipe": {**asdict(recipe), "duplicate": list(recipe.duplicate)},
                       "reference_of": toolkit.reference_of, "sources": toolkit.sources, "notes": notes,
                       "rows": [row.to_dict() for row in rows], "seconds": round(time.time() - began)})
        if json_out is not None:
            write_atomic((json.dumps(record, indent=2) + "\n").encode(), json_out, protect=protect)
        if out is not None:
            shown = ToolkitModels(toolkit.models, toolkit.reference_of, notes, toolkit.sources)
            page = robustness_page(rows, shown, settings, [command, *merged_commands], budget, previous)
            write_atomic(page.encode(), out, protect=protect)

    def measure_new(toolkit: ToolkitModels, planned: list[str]) -> None:
        """Measure the models not measured yet, writing the outputs after each (a stopped run keeps its rows)."""
        for name, unet in toolkit.models.items():
            if name in {row.model for row in rows}:
                continue
            log(f"measuring {name} ...")
            rows.append(robustness_row(name, unet, probe, settings))
            log(json.dumps(rows[-1].to_dict()))
            write_outputs(toolkit, planned)

    merged, merged_sources, merged_reference_of, merged_commands = merged_rows(merge, settings.to_dict())
    rows.extend(merged)
    done = {row.model for row in rows}
    wanted = planned_rows(groups, done)
    planned = [name for names in wanted.values() for name in names]
    inputs = MitigationInputs(lora=lora, base=base, manifest=manifest, files=files, work=Path(work), recipe=recipe,
                              memcontrol_mask=memcontrol_mask, command=command, log=log)
    toolkit = ToolkitModels(sources=dict(merged_sources), reference_of=dict(merged_reference_of))
    for group, names in planned_rows(TABLE_GROUPS, done).items():
        if group not in groups:
            toolkit.notes.update({name: "left out of this run" for name in names})
    if wanted.get("posthoc"):
        built = posthoc_models(inputs, configs, wanted["posthoc"])
        for name in built.models:
            toolkit.add(name, built.models[name], built.reference_of[name], built.sources[name])
    measure_new(toolkit, planned)
    if wanted.get("adversarial"):
        add_adversarial(toolkit, inputs, configs, wanted["adversarial"])
        measure_new(toolkit, planned)
    if wanted.get("training"):
        training_time_models(toolkit, inputs, configs, wanted["training"], train_missing)
        measure_new(toolkit, planned)
    write_outputs(toolkit, planned)
    return RobustnessRun(rows, toolkit, record)


# ------------------------------------------------------------------------------------------------------ the page
#: Markers of the hand-written part of the page, kept when the page is regenerated.
NOTES_START, NOTES_END = "<!-- NOTES START (kept when the page is regenerated) -->", "<!-- NOTES END -->"


def kept_notes(previous: str | None) -> str:
    """The hand-written block between `NOTES_START` and `NOTES_END` of a previous page (with its markers)."""
    notes = between_markers(previous, NOTES_START, NOTES_END)
    return f"{NOTES_START}{notes}{NOTES_END}" if notes is not None else f"{NOTES_START}\n{NOTES_END}"


def per_caption_luminance(row: RobustnessRow) -> str:
    """The row's per-caption luminance-test rates, captions then each Dori start separated by ";", or ""."""
    if row.per_caption_prompt_luminance is None or row.per_caption_dori_luminance is None:
        return ""
    return "; ".join(" ".join(f"{r:.2f}" for r in rates)
                     for rates in [row.per_caption_prompt_luminance, *row.per_caption_dori_luminance.values()])


def robustness_page(rows: list[RobustnessRow], toolkit: ToolkitModels, settings: RobustnessSettings,
                    commands: list[str], budget: str, previous: str | None = None) -> str:
    """docs/robustness.md: what was measured and how (`commands`: the command that wrote the page, then those that
    measured rows it merged), the table with a verdict per mitigation, each model's source, per-caption rates,
    the models that could not be measured and why, and the hand-written notes of `previous` (the page being
    replaced)."""
    by_name = {row.model: row for row in rows}
    starts = ", ".join(f"{s} ({START_LABELS[s]})" for s in settings.starts)
    verdicts = [[row.model, toolkit.reference_of.get(row.model, ""),
                 verdict(row, by_name[toolkit.reference_of[row.model]])
                 if toolkit.reference_of.get(row.model) in by_name else "its reference was not measured"]
                for row in rows]
    here = str(Path.cwd().resolve()) + "/"
    sources = [[name, source.replace(here, "")] for name, source in toolkit.sources.items()]
    per_caption = [[row.model, " ".join(f"{r:.2f}" for r in row.per_caption_prompt),
                    *[" ".join(f"{r:.2f}" for r in row.per_caption_dori[s]) for s in settings.starts],
                    per_caption_luminance(row), f"{row.seconds:.0f}"] for row in rows]
    return "\n".join([
        "# Robustness: every mitigation under the Dori attack",
        "",
        "<!-- Generated by `diffmem attack table`; edit only the notes block, the rest is rewritten. -->",
        "",
        "Does a mitigation remove memorization, or only the way the memorized caption reaches it? For every "
        "mitigation in diffmem, the copy rate of fresh generations from the memorized captions, the copy rate of "
        "fresh generations from the embedding the Dori attack (Kowalczuk et al. 2025, seed 002; docs/attack.md) "
        "finds for each memorized image on the *mitigated* model, and quality beside it. A copy is Carlini et "
        "al.'s relative tiled-L2 test against the fine-tune's training images with the caption's own image as the "
        "nearest (`diffmem.metrics.copy`); the search loss never decides. A second copy test, blind to a global "
        "colour cast, is reported beside it: tiled L2 of each image's luminance after per-image normalisation "
        "(`luminance_tiled_l2`), a copy within "
        f"{settings.luminance_distance:g} of the caption's image. RGB tiled L2 misses a training face returned "
        "under a colour cast; this test counts it, at the cost of ignoring colour.",
        "",
        "## How it was measured",
        "",
        "- Commands (the first wrote this page; rows it merged were measured by the others, with the same "
        "settings):",
        "",
        "  ```",
        *[f"  {command}" for command in commands],
        "  ```",
        "",
        f"- Budget: {budget}",
        f"- Dori: {settings.dori.steps} Adam steps, lr {settings.dori.lr:g}, batch {settings.dori.batch_size}, "
        f"seed {settings.dori.seed}, one search per caption from each start: {starts}.",
        f"- Judging: {settings.sampling.generations} fresh generations per caption and per Dori embedding, "
        f"{settings.sampling.steps} DDIM steps, guidance {settings.sampling.guidance:g}.",
        "- Quality: held-out denoising loss (20 held-out faces, fixed noise, lower is better)"
        + (" and FID of one generation per held-out caption against the held-out faces (copy-embedder features; "
           "20 images, so differences under about 0.1 are noise)." if settings.fid else "."),
        "- Post-hoc mitigations are judged against the LoRA as trained; training-time mitigations (MemControl, "
        "random word addition, threshold) are fine-tunes of the base on the same data and judged against the same "
        "recipe without mitigation.",
        "",
        "## The table",
        "",
        markdown_rows(rows, toolkit.notes),
        "",
        "## Verdicts (generated from the numbers above)",
        "",
        f"A rate counts as lowered when it is at most {REMOVED_SHARE:.0%} of the reference's. \"Dori\" is the "
        "worst start.",
        "",
        markdown_table(["model", "judged against", "verdict"], verdicts),
        "",
        "## Where each model comes from",
        "",
        markdown_table(["model", "source"], sources),
        "",
        "## Per caption",
        "",
        "Copy rate of each duplicated caption (in manifest order), from the caption and under Dori, and the seconds "
        "each row took.",
        "",
        markdown_table(["model", "captions", *[f"Dori {START_LABELS[s]}" for s in settings.starts],
                        "luminance test (captions; Dori by start)", "seconds"], per_caption),
        "",
        "## Notes",
        "",
        kept_notes(previous),
        "",
    ])
