"""Memorization of model variants (a mitigation each) on memorized captions: as prompted, and under the Dori attack.

`robustness_table` is the measurement behind the robustness table of issue 8 (docs/robustness.md): for each model,
the copy rate of fresh generations from each memorized caption, the copy rate of fresh generations from the
embedding Dori finds for that caption's image (from each start: the caption, random tokens, ...), the loss each
search reached, and quality (held-out denoising loss, FID) beside it. Every model is measured with the same
`RobustnessSettings`, seeds and probe, so rows differ only by the model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

from diffusers import UNet2DConditionModel
from tqdm import tqdm

from diffmem.attack.dori import START_KINDS, DoriConfig, attack_success, dori_attack
from diffmem.bench.evaluate import Probe
from diffmem.errors import DiffmemError
from diffmem.metrics.copy import CopyConfig
from diffmem.world.check import CheckSettings
from diffmem.world.diffusion import denoising_loss
from diffmem.world.text import encode_prompts


@dataclass(frozen=True)
class RobustnessSettings:
    """How every model of a robustness table is attacked and measured.

    Args:
        dori: the Dori search (Kowalczuk et al. 2025; `DoriConfig`'s defaults are the paper's: Adam, lr 0.1,
            batch 8, 50 steps). Its `start` is replaced by each of `starts`; its seed is kept, so every model is
            attacked from the same starts with the same noise.
        starts: where the searches start, one search per start and caption: "prompt" (the memorized caption's own
            embedding: the attack on a prompt a mitigation claims to have fixed, the paper's main setting) and
            "random" (random tokens: a trigger found far from any prompt shows the memorization is not local).
        sampling: fresh generations that judge the caption and each Dori embedding (`CheckSettings`: 8 per
            caption, 25 DDIM steps, guidance 3, as `diffmem world check`).
        copy: the copy test (`CopyConfig`: Carlini et al.'s relative tiled-L2 test, as everywhere in diffmem).
        fid: also compute FID of one generation per held-out caption against the held-out images, in the copy
            embedder's space (`diffmem.bench`'s quality figure). Off, only the held-out denoising loss is reported.
        timesteps_per_image: stratified timesteps per image of the held-out denoising loss (`denoising_loss`).
        progress: show a bar per model (a search and two rounds of sampling per caption and start take minutes).
    """

    dori: DoriConfig = field(default_factory=DoriConfig)
    starts: tuple[str, ...] = ("prompt", "random")
    sampling: CheckSettings = field(default_factory=CheckSettings)
    copy: CopyConfig = field(default_factory=CopyConfig)
    fid: bool = True
    timesteps_per_image: int = 8
    progress: bool = False

    def __post_init__(self) -> None:
        unknown = [s for s in self.starts if s not in START_KINDS]
        if unknown or not self.starts:
            raise ValueError(f"starts must be a non-empty choice of {', '.join(START_KINDS)}, got {self.starts}")

    def to_dict(self) -> dict:
        return {"dori": asdict(self.dori), "starts": list(self.starts), "sampling": asdict(self.sampling),
                "copy": asdict(self.copy), "fid": self.fid, "timesteps_per_image": self.timesteps_per_image}


@dataclass(frozen=True)
class RobustnessRow:
    """One model's memorization of the probe's duplicated captions, as prompted and under Dori, with its quality.

    Rates are fractions of all fresh generations (captions x generations) that copy their caption's image;
    `captions_copied_*` counts captions with at least half their generations copies; `dori_loss` is the mean over
    captions of the loss each search reached (mean of its last 10 steps; higher = the model resists denoising
    towards the memorized image); `heldout_loss` the held-out denoising loss (lower = better model of the data);
    `fid` None when not measured. `*_dori` fields are keyed by Dori start.
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

    def to_dict(self) -> dict:
        return asdict(self)


def final_search_loss(losses: list[float]) -> float:
    """The loss a Dori search reached: the mean of its last 10 steps (the per-step loss is one noisy batch)."""
    tail = losses[-10:]
    return sum(tail) / len(tail)


def fid_of(unet: UNet2DConditionModel, probe: Probe, sampling: CheckSettings) -> float:
    """FID of one generation per held-out caption against the held-out images, copy-embedder features (as
    `diffmem.bench`), sampled with `sampling`'s steps and guidance."""
    from diffmem.bench.evaluate import BenchSettings, quality_generations
    from diffmem.metrics.features import embed
    from diffmem.metrics.fid import fid_from_features

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
    attacked: dict[str, list[float]] = {start: [] for start in settings.starts}
    losses: dict[str, list[float]] = {start: [] for start in settings.starts}
    pairs = list(zip(images.images, images.captions))
    for image, caption in tqdm(pairs, desc=name, unit="caption", disable=not settings.progress, leave=False):
        target = image[None]
        prompted.append(attack_success(unet, encode_prompts([caption]), target, probe.reference, settings.sampling,
                                       settings.copy).rate)
        for start in settings.starts:
            result = dori_attack(unet, target, caption, replace(settings.dori, start=start))
            losses[start].append(final_search_loss(result.losses))
            attacked[start].append(attack_success(unet, result.embedding, target, probe.reference,
                                                  settings.sampling, settings.copy).rate)
    heldout = probe.heldout
    loss = round(denoising_loss(unet, heldout.images, heldout.captions,
                                timesteps_per_image=settings.timesteps_per_image), 5)
    rate, copied, per_caption = rate_summary(prompted)
    dori = {start: rate_summary(rates) for start, rates in attacked.items()}
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
    )


def robustness_table(models: Mapping[str, UNet2DConditionModel], probe: Probe,
                     settings: RobustnessSettings | None = None) -> list[RobustnessRow]:
    """`robustness_row` for every named model, on the same probe, seeds and search settings."""
    return [robustness_row(name, unet, probe, settings) for name, unet in models.items()]


START_LABELS = {"prompt": "from the caption", "random": "from random tokens", "unrelated": "from an unrelated prompt"}


def markdown_rows(rows: list[RobustnessRow], notes: Mapping[str, str] | None = None) -> str:
    """The table as markdown: one line per model; `notes` (model -> why) adds lines for models not measured."""
    from diffmem.report import markdown_table

    starts = list(rows[0].copy_rate_dori) if rows else ["prompt"]
    header = ["model", "copy rate, captions",
              *[f"copy rate, Dori {START_LABELS[s]}" for s in starts],
              f"captions copied (caption / {' / '.join('Dori ' + s for s in starts)})",
              f"Dori loss reached ({' / '.join(starts)})", "held-out denoising loss", "FID"]
    lines = [[r.model, f"{r.copy_rate_prompt:.1%}", *[f"{r.copy_rate_dori[s]:.1%}" for s in starts],
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
    `REMOVED_SHARE` of the reference's."""
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
    from pathlib import Path

    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------ the toolkit's models
#: Name of the unmitigated model every post-hoc mitigation is compared with.
NO_MITIGATION = "none (the LoRA as trained)"
#: Name of the unmitigated same-recipe fine-tune the training-time mitigations are compared with.
TRAINING_CONTROL = "fine-tune without mitigation (same recipe)"
#: Rows of the post-hoc mitigations `posthoc_models` builds, and of the adversarial fine-tuning `add_adversarial` adds.
POSTHOC = (NO_MITIGATION, "NeMo (default)", "Wanda (default)", "BAF (default)")
ADVERSARIAL = "adversarial fine-tuning"
#: The training-time mitigations: option name -> row name.
TRAINING_TIME = {"memcontrol": "MemControl (SV-DIFF under a mask)", "rwa": "random word addition (training)",
                 "threshold": "threshold mitigation (training)"}


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


def posthoc_models(lora, base: str | None, manifest: dict, nemo_masks=None, wanda_masks=None,
                   log=print) -> ToolkitModels:
    """The LoRA as trained and the mitigations applied to it afterwards with default settings: NeMo, Wanda and BAF
    (`diffmem.pipeline.filter_lora`). NeMo and Wanda run their searches, or apply the mask files `nemo_masks` /
    `wanda_masks` that `diffmem mitigate nemo|wanda --out` wrote for this LoRA (NeMo's search takes tens of CPU
    minutes). Adversarial fine-tuning is added by `add_adversarial`."""
    from diffmem.filters import BAFConfig
    from diffmem.mitigations.nemo import nemo_mitigate
    from diffmem.mitigations.pruning import apply_masks, check_masks_fit, load_masks, masked_count
    from diffmem.mitigations.run import load_world_model, manifest_prompts
    from diffmem.mitigations.wanda import wanda_mitigate
    from diffmem.pipeline import filter_lora
    from diffmem.world.lora import apply_lora
    from diffmem.world.model import BASE_FILE, assets_dir

    def from_file(path, method: str):
        masks, written_by, report = load_masks(path)
        if written_by != method:
            raise DiffmemError(f"is a {written_by} mask, not a {method} one", path)
        check_masks_fit(tuned, masks, path)
        return apply_masks(tuned, masks), (f"mask file {path} ({masked_count(masks)} weights zeroed; config "
                                           f"{json.dumps(report.get('config', {}), sort_keys=True)})")

    toolkit = ToolkitModels()
    plain = load_world_model(base, None)
    tuned = apply_lora(plain, lora)
    toolkit.add(NO_MITIGATION, tuned, NO_MITIGATION, shown_path(lora))
    prompts = manifest_prompts(manifest)
    if nemo_masks is not None:
        pruned, source = from_file(nemo_masks, "nemo")
        toolkit.add(POSTHOC[1], pruned, NO_MITIGATION, source)
    else:
        log("NeMo ...")
        pruned, _, masks = nemo_mitigate(tuned, prompts.memorized, prompts.ordinary, prompts.calibration or None)
        toolkit.add(POSTHOC[1], pruned, NO_MITIGATION, f"nemo_mitigate, NeMoConfig(): {masked_count(masks)} "
                    "weights zeroed")
    if wanda_masks is not None:
        pruned, source = from_file(wanda_masks, "wanda")
        toolkit.add(POSTHOC[2], pruned, NO_MITIGATION, source)
    else:
        log("Wanda ...")
        pruned, _, masks = wanda_mitigate(tuned, prompts.memorized)
        toolkit.add(POSTHOC[2], pruned, NO_MITIGATION, f"wanda_mitigate, WandaConfig(): {masked_count(masks)} "
                    "weights zeroed")
    log("BAF ...")
    filtered = filter_lora(lora, base or assets_dir() / BASE_FILE, BAFConfig(), use_cache=False).lora
    toolkit.add(POSTHOC[3], apply_lora(plain, filtered), NO_MITIGATION, "diffmem.pipeline.filter_lora, BAFConfig()")
    return toolkit


def add_adversarial(toolkit: ToolkitModels, lora, base: str | None, path=None, config=None, work=None,
                    log=print) -> None:
    """Add adversarial fine-tuning of the LoRA to `toolkit`: the model file `path` (`diffmem mitigate adversarial
    --out`), or trained now with `config` and written to `<work>/adversarial.safetensors`."""
    from pathlib import Path

    from diffmem.world.model import load_unet_file

    if path is None:
        from diffmem.mitigations.adversarial import adversarial_finetune_files

        path = Path(work or "runs/robustness") / "adversarial.safetensors"
        log(f"adversarial fine-tuning -> {path} ...")
        adversarial_finetune_files(path, lora=lora, base=base, config=config, progress=False)
    toolkit.add(ADVERSARIAL, load_unet_file(path), NO_MITIGATION, str(path))


def training_time_models(toolkit: ToolkitModels, manifest: dict, recipe, files: Mapping[str, str | None],
                         memcontrol_mask: str | None = None, work=None, log=print, train_missing: bool = True) -> None:
    """Add the training-time mitigations to `toolkit`: each is a fine-tune of the base on the LoRA's data (its
    duplicated faces must be the manifest's), from the file given in `files` ("control", "memcontrol", "rwa",
    "threshold" -> world UNet path) or trained now with `recipe` (a `MemControlTrainConfig`) and written under
    `work`. MemControl trains SV-DIFF under `memcontrol_mask` (a `diffmem memcontrol search` mask; all attention
    blocks when None) with the same steps, batch and data; a file whose duplicated faces differ is noted, not
    measured, and so is a missing file when `train_missing` is off."""
    from pathlib import Path

    from diffmem.memcontrol.mask import load_mask
    from diffmem.memcontrol.mitigation import MitigationConfig
    from diffmem.memcontrol.train import train_masked
    from diffmem.world.model import load_unet_file

    wanted = [entry["id"] for entry in manifest["duplicated"]]
    for key, name in {"control": TRAINING_CONTROL, **TRAINING_TIME}.items():
        path = files.get(key)
        if path is None and not train_missing:
            toolkit.notes[name] = "no model file given to this run"
            continue
        if path is None:
            path = Path(work or "runs/robustness") / f"train-{key}.safetensors"
            mask = load_mask(memcontrol_mask) if key == "memcontrol" and memcontrol_mask else None
            config = replace(recipe, method="svdiff", lr=None) if key == "memcontrol" else recipe
            if key in ("rwa", "threshold"):
                config = replace(config, mitigation=MitigationConfig(kind=key))
            log(f"training {name} -> {path} ...")
            train_masked(path, config, mask, progress=False)
        record_path = Path(path).with_suffix(".json")
        if not record_path.is_file():
            toolkit.notes[name] = f"no manifest beside {path}: cannot tell which faces it memorized"
            continue
        record = json.loads(record_path.read_text())
        if [entry["id"] for entry in record.get("duplicated", [])] != wanted:
            toolkit.notes[name] = f"{path} duplicated other faces than the LoRA's manifest"
            continue
        settings = record.get("settings", {})
        toolkit.add(name, load_unet_file(path), TRAINING_CONTROL,
                    f"{path} ({settings.get('method')}, {settings.get('steps')} x {settings.get('batch_size')}, "
                    f"lr {settings.get('lr')})")


# ------------------------------------------------------------------------------------------------------ the page
#: Markers of the hand-written part of the page, kept when the page is regenerated.
NOTES_START, NOTES_END = "<!-- NOTES START (kept when the page is regenerated) -->", "<!-- NOTES END -->"


def kept_notes(previous: str | None) -> str:
    """The hand-written block between `NOTES_START` and `NOTES_END` of a previous page (with its markers)."""
    from diffmem.report import between_markers

    notes = between_markers(previous, NOTES_START, NOTES_END)
    return f"{NOTES_START}{notes}{NOTES_END}" if notes is not None else f"{NOTES_START}\n{NOTES_END}"


def robustness_page(rows: list[RobustnessRow], toolkit: ToolkitModels, settings: RobustnessSettings,
                    commands: list[str], budget: str, previous: str | None = None) -> str:
    """docs/robustness.md: what was measured and how (`commands`: the command that wrote the page, then those that
    measured rows it merged), the table with a verdict per mitigation, each model's source, per-caption rates,
    the models that could not be measured and why, and the hand-written notes of `previous` (the page being
    replaced)."""
    from pathlib import Path

    from diffmem.report import markdown_table

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
                    f"{row.seconds:.0f}"] for row in rows]
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
        "nearest (`diffmem.metrics.copy`); the search loss never decides.",
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
        markdown_table(["model", "captions", *[f"Dori {START_LABELS[s]}" for s in settings.starts], "seconds"],
                       per_caption),
        "",
        "## Notes",
        "",
        kept_notes(previous),
        "",
    ])
