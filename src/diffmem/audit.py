"""`diffmem audit`: does this model (or LoRA) memorize, and which prompts?

For each prompt the audit generates a few images with classifier-free-guided DDIM sampling while recording Wen
et al.'s conditional-difference norm, then scores the generations:

- with training images: tiled-L2 distance to the nearest training image, the fraction of generations that are
  copies (Carlini et al.'s criterion, `diffmem.metrics.copy`), the largest group of near-identical generations
  (the extraction attack); a prompt is flagged when enough of its generations copy a training image;
- without training images (data-free): prompts are ranked by Wen's score and flagged when the score is an
  outlier, or above a given threshold.

It writes `table.csv`, `table.md`, `summary.json` and a self-contained `report.html` (images embedded as PNG).
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from diffmem.backends import Backend, open_backend
from diffmem.errors import DiffmemError, FileFormatError
from diffmem.evaluation.inputs import load_image_folder, load_prompts, resize_images
from diffmem.formats.safetensors_io import write_atomic
from diffmem.metrics.amd import embedding_copy_decisions
from diffmem.metrics.copy import CopyConfig, copy_decisions_from_distances, tiled_l2
from diffmem.metrics.extraction import ExtractionConfig, extract_prompt
from diffmem.metrics.features import embed
from diffmem.metrics.wen import WenConfig, WenTrace, sample_with_wen_scores
from diffmem.progress import progress_bar
from diffmem.report import (
    figure_tag,
    html_page,
    html_table,
    image_grid,
    img_tag,
    markdown_table,
    png_data_uri,
    screenshot_html,
)

WEN_STATISTICS = ("all_steps", "first_step")


@dataclass(frozen=True)
class AuditConfig:
    """Settings of the audit.

    Args:
        generations: images per prompt. 4, Wen et al.'s number for their detector; raise it for the copy test
            (MemControl's extraction attack uses 50).
        num_inference_steps: DDIM steps. None (default): the model's own (50 for Stable Diffusion as in Wen et
            al., 25 for the world, as `diffmem.world.generate` samples).
        guidance_scale: classifier-free guidance. None (default): the model's own (7.5 for Stable Diffusion as in
            Wen et al., 3.0 for the world).
        seed: seed of the initial noise (the audit is reproducible).
        copy: the copy criterion (`CopyConfig`), by default Carlini et al.'s relative test alone, the criterion
            `diffmem.world.check` also uses. An absolute bound (`CopyConfig(distance_threshold=0.1)`) was
            measured too strict on the world: its memorizing LoRA reproduces a face's structure with a colour
            tint, about 0.1-0.2 tiled RMS away (docs/audit.md).
        copy_fraction: a prompt is flagged when at least this share of its generations are copies. 0.5, the
            world issue's bar for "memorized" (a near-copy in at least half of the generations).
        extraction: the extraction attack run on each prompt's generations (`ExtractionConfig`: near-identical
            below tiled distance 0.1, extracted when the largest group has >= 3 members and, with training
            images, matches one). Needs `generations` >= 3 to extract anything.
        wen_threshold: data-free mode: flag prompts whose Wen score exceeds this. None (default) flags robust
            outliers instead: modified z-score above `outlier_z` (Iglewicz & Hoaglin 1993), which assumes that
            most audited prompts are not memorized.
        outlier_z: the modified z-score bound, 3.5 as recommended by Iglewicz & Hoaglin.
        wen_statistic: which Wen score ranks and flags prompts data-free: "all_steps" (Wen et al.'s mean over
            the sampling steps, default) or "first_step" (the first step alone, which Wen et al. show already
            detects; on the world's example LoRA it is the one that separates, see docs/audit.md).
        embedding_test: with training images, also report the highest cosine similarity of a generation to a
            training image in the project's copy-detection embedder (SSCD-style; > 0.5 reads as a copy).
        batch_size: samples per UNet call.
    """

    generations: int = 4
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    copy: CopyConfig = field(default_factory=CopyConfig)
    copy_fraction: float = 0.5
    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)
    wen_threshold: float | None = None
    outlier_z: float = 3.5
    wen_statistic: str = "all_steps"
    embedding_test: bool = True
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.wen_statistic not in WEN_STATISTICS:
            raise ValueError(f"wen_statistic must be one of {WEN_STATISTICS}, got {self.wen_statistic!r}")


@dataclass(frozen=True)
class PromptAudit:
    """One row of the audit table."""

    prompt: str
    wen_score: float
    wen_first_step: float
    largest_group: int
    extracted: bool
    flagged: bool
    copy_distance: float | None = None
    nearest_train: str | None = None
    nearest_train_index: int | None = None
    copy_fraction: float | None = None
    embedding_cosine: float | None = None


@dataclass
class AuditResult:
    """Rows, images and settings of an audit; `write_audit` turns it into files."""

    model: str
    rows: list[PromptAudit]
    images: torch.Tensor
    config: AuditConfig
    train_images: torch.Tensor | None = None
    train_names: list[str] | None = None
    known_memorized: list[bool] | None = None

    @property
    def data_free(self) -> bool:
        return self.train_images is None

    def summary(self) -> dict:
        """Headline numbers of the audit as a JSON-ready dict."""
        flagged = [r.prompt for r in self.rows if r.flagged]
        out = {
            "model": self.model,
            "mode": "data-free (Wen et al. score)" if self.data_free else "training images (tiled L2 copy test)",
            "prompts": len(self.rows),
            "generations_per_prompt": self.config.generations,
            "flagged": len(flagged),
            "flagged_prompts": flagged,
            "mean_wen_score": float(np.mean([r.wen_score for r in self.rows])),
            "extracted_prompts": sum(r.extracted for r in self.rows),
            "config": json.loads(json.dumps(asdict(self.config))),
        }
        if not self.data_free:
            out["copy_rate"] = float(np.mean([r.copy_fraction for r in self.rows]))
            out["training_images"] = len(self.train_names or [])
        if self.known_memorized is not None:
            out["known_labels"] = self.label_agreement()
        return out

    def label_agreement(self) -> dict:
        """With known memorized / held-out prompts: how the flags and Wen's score agree with them."""
        from diffmem.metrics.roc import roc_auc, tpr_at_fpr

        known = torch.tensor(self.known_memorized)
        flagged = torch.tensor([r.flagged for r in self.rows])
        out = {
            "memorized": int(known.sum()),
            "held_out": int((~known).sum()),
            "flagged_memorized": int((flagged & known).sum()),
            "flagged_held_out": int((flagged & ~known).sum()),
        }
        if known.any() and not known.all():
            for name, key in (("wen", "wen_score"), ("wen_first_step", "wen_first_step")):
                scores = torch.tensor([getattr(r, key) for r in self.rows])
                out[f"{name}_auc"] = roc_auc(scores, known)
                out[f"{name}_tpr_at_1pct_fpr"] = tpr_at_fpr(scores, known, 0.01)
        return out


def robust_z_scores(values: torch.Tensor) -> torch.Tensor:
    """Modified z-scores `0.6745 (x - median) / MAD` (Iglewicz & Hoaglin 1993); 0 where the MAD is 0."""
    values = values.to(torch.float64)
    median = values.median()
    mad = (values - median).abs().median()
    if mad == 0:
        return torch.zeros_like(values)
    return 0.6745 * (values - median) / mad


def wen_statistic_of(row: PromptAudit, config: AuditConfig) -> float:
    """The Wen score the config ranks and flags by."""
    return row.wen_first_step if config.wen_statistic == "first_step" else row.wen_score


def flag_by_wen(scores: torch.Tensor, config: AuditConfig) -> torch.Tensor:
    """Data-free flags: score above `wen_threshold`, or a robust outlier when no threshold is given."""
    if config.wen_threshold is not None:
        return scores > config.wen_threshold
    return robust_z_scores(scores) > config.outlier_z


def score_prompts(
    prompts: Sequence[str],
    images: torch.Tensor,
    wen_scores: torch.Tensor,
    wen_first: torch.Tensor,
    config: AuditConfig,
    train_images: torch.Tensor | None = None,
    train_names: Sequence[str] | None = None,
    embedder: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[PromptAudit]:
    """Table rows from generations [P, G, 3, H, W] and Wen scores [P]: pure scoring, no sampling. With an
    `embedder` (and training images) each row also gets the best embedding cosine to a training image."""
    rows = []
    chosen = wen_first if config.wen_statistic == "first_step" else wen_scores
    data_free_flags = flag_by_wen(chosen, config) if train_images is None else None
    train_features = embed(embedder, train_images) if embedder is not None and train_images is not None else None
    for p, prompt in enumerate(prompts):
        generations = images[p]
        extraction = extract_prompt(generations, config.extraction, train_images)
        common = dict(prompt=prompt, wen_score=float(wen_scores[p]), wen_first_step=float(wen_first[p]),
                      largest_group=extraction.largest_component, extracted=extraction.extracted)
        if train_images is None:
            rows.append(PromptAudit(flagged=bool(data_free_flags[p]), **common))
            continue
        copies = copy_decisions_from_distances(tiled_l2(generations, train_images, config.copy.tiles), config.copy)
        best = int(torch.argmin(copies.distance))
        nearest = int(copies.nearest_index[best])
        fraction = float(copies.is_copy.float().mean())
        cosine = None
        if train_features is not None:
            cosine = float(embedding_copy_decisions(embed(embedder, generations), train_features).similarity.max())
        rows.append(PromptAudit(
            embedding_cosine=cosine,
            flagged=fraction >= config.copy_fraction,
            copy_distance=float(copies.distance[best]),
            nearest_train=train_names[nearest] if train_names else str(nearest),
            nearest_train_index=nearest,
            copy_fraction=fraction,
            **common,
        ))
    return rows


def settle_config(config: AuditConfig, model: Backend) -> AuditConfig:
    """`config` with the model's own sampling settings where the config leaves them open (None)."""
    steps = model.default_steps if config.num_inference_steps is None else config.num_inference_steps
    guidance = model.default_guidance if config.guidance_scale is None else config.guidance_scale
    return replace(config, num_inference_steps=steps, guidance_scale=guidance)


def run_audit(
    model: Backend,
    prompts: Sequence[str],
    config: AuditConfig = AuditConfig(),
    train_images: torch.Tensor | None = None,
    train_names: Sequence[str] | None = None,
    progress: bool = False,
    known_memorized: Sequence[bool] | None = None,
) -> AuditResult:
    """Generate `config.generations` images per prompt while recording Wen scores, then score them.
    `known_memorized` (one bool per prompt), when the truth is known, adds agreement numbers to the summary."""
    if not prompts:
        raise DiffmemError("no prompts to audit")
    if known_memorized is not None and len(known_memorized) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(known_memorized)} known_memorized labels")
    config = settle_config(config, model)
    chunk = max(1, config.batch_size // config.generations)
    starts = range(0, len(prompts), chunk)
    if progress:
        starts = progress_bar(starts, desc="audit", unit=f"x{chunk} prompts")
    generator = torch.Generator().manual_seed(config.seed)
    traces = [wen_scores_of(model, prompts[start : start + chunk], config, generator) for start in starts]
    samples = torch.cat([t.samples for t in traces])
    flat_images = model.decode(samples.flatten(0, 1))
    images = flat_images.reshape(len(prompts), config.generations, *flat_images.shape[-3:])
    scores = torch.cat([t.scores for t in traces])
    first = torch.cat([t.first_step for t in traces])
    if train_images is not None and train_images.shape[-2:] != images.shape[-2:]:
        train_images = resize_images(train_images, tuple(images.shape[-2:]))
    embedder = None
    if config.embedding_test and train_images is not None:
        from diffmem.metrics.embedder import load_copy_embedder

        embedder = load_copy_embedder()
    rows = score_prompts(prompts, images, scores, first, config, train_images, train_names, embedder)
    return AuditResult(model=model.name, rows=rows, images=images, config=config, train_images=train_images,
                       train_names=list(train_names) if train_names is not None else None,
                       known_memorized=list(known_memorized) if known_memorized is not None else None)


def table_rows(result: AuditResult) -> tuple[list[str], list[list[object]]]:
    """Header and rows of the per-prompt table, most suspicious first."""
    header = ["prompt", "flagged", "wen_score", "wen_first_step", "largest_group", "extracted"]
    if not result.data_free:
        header += ["copy_distance", "copy_fraction", "nearest_train", "embedding_cosine"]
    rows = []
    for r in ranked(result):
        row: list[object] = [r.prompt, "yes" if r.flagged else "no", round(r.wen_score, 4),
                             round(r.wen_first_step, 4), r.largest_group, "yes" if r.extracted else "no"]
        if not result.data_free:
            cosine = "" if r.embedding_cosine is None else round(r.embedding_cosine, 4)
            row += [round(r.copy_distance, 4), round(r.copy_fraction, 3), r.nearest_train, cosine]
        rows.append(row)
    return header, rows


def ranked(result: AuditResult) -> list[PromptAudit]:
    """Rows in report order: by copy distance with training images, by Wen score (highest first) without."""
    if result.data_free:
        return sorted(result.rows, key=lambda r: -wen_statistic_of(r, result.config))
    return sorted(result.rows, key=lambda r: (not r.flagged, r.copy_distance))


def shared_names(prompt: str, others: Sequence[str]) -> list[str]:
    """Capitalised words of `prompt` (names, mostly: "Jonas") that also occur in any of `others`, in prompt order.
    A held-out caption flagged for sharing a first name with a memorized one is explained by it in the report."""
    words = [w.strip(".,;:!?\"'()") for w in prompt.split()[1:]]  # the first word is capitalised anyway
    found = {w.strip(".,;:!?\"'()") for other in others for w in other.split()}
    return list(dict.fromkeys(w for w in words if w[:1].isupper() and w in found))


def score_plot(result: AuditResult) -> str:
    """A bar chart of every prompt's Wen score in report order, flagged prompts in red (the score a data-free audit
    ranks by; with training images, beside the copy decision)."""
    rows = ranked(result)
    figure = Figure(figsize=(7.5, 2.6), dpi=100)
    axes = figure.subplots()
    axes.bar(range(len(rows)), [wen_statistic_of(r, result.config) for r in rows],
             color=["#c62828" if r.flagged else "#90a4ae" for r in rows])
    axes.set_xlabel("prompts, in the table's order (red: flagged)")
    axes.set_ylabel("Wen first step" if result.config.wen_statistic == "first_step" else "Wen score")
    axes.set_xticks([])
    return figure_tag(figure, "Wen score per prompt")


def render_html(result: AuditResult, thumbnail: int = 128) -> str:
    """The self-contained report: summary, then per prompt its generations, nearest training image and scores."""
    summary = result.summary()
    mode = summary["mode"]
    parts = [
        f"<p><b>Model:</b> {html.escape(result.model)}<br><b>Mode:</b> {html.escape(mode)}<br>"
        f"<b>Flagged:</b> <span class=\"{'bad' if summary['flagged'] else 'good'}\">{summary['flagged']} of "
        f"{summary['prompts']} prompts</span>, {result.config.generations} generations each, "
        f"{result.config.num_inference_steps} DDIM steps, guidance {result.config.guidance_scale}.</p>",
    ]
    if result.data_free:
        rule = (f"above {result.config.wen_threshold}" if result.config.wen_threshold is not None
                else f"a robust outlier among the audited prompts (modified z-score above {result.config.outlier_z})")
        statistic = ("at the first sampling step" if result.config.wen_statistic == "first_step"
                     else "averaged over the sampling steps")
        parts.append(f'<p class="note">No training images were given: prompts are ranked by Wen et al.\'s score '
                     f"(norm of the text-conditional noise prediction, {statistic}) and flagged when it is "
                     f"{html.escape(rule)}.</p>")
    else:
        bound = result.config.copy.distance_threshold
        parts.append(
            f'<p class="note">A generation copies a training image when its tiled L2 distance (max RMS over 16 tiles)'
            f" is {'' if bound is None else f'at most {bound} and '}at most {result.config.copy.relative_threshold}"
            f" of the mean distance to its nearest training images; a prompt is flagged when at least "
            f"{result.config.copy_fraction:.0%} of its generations are copies. Copy rate over all generations: "
            f"{summary['copy_rate']:.1%}.</p>"
        )
    header = ["prompt", "generations", "nearest training image", "flagged", "Wen score", "Wen first step",
              "largest group"]
    if not result.data_free:
        header += ["copy distance", "copies", "embedding cosine"]
    if result.known_memorized is not None:
        header.append("known")
    index_of = {id(r): i for i, r in enumerate(result.rows)}
    rows = []
    for r in ranked(result):
        p = index_of[id(r)]
        grid = image_grid(result.images[p], columns=min(result.config.generations, 4))
        grid_size = thumbnail * grid.shape[-1] // result.images.shape[-1]
        grid_html = (f'<img class="pix" src="{png_data_uri(grid)}" width="{grid_size}" '
                     f'alt="generations for {html.escape(r.prompt)}">')
        nearest = "—"
        if r.nearest_train_index is not None and result.train_images is not None:
            nearest = img_tag(result.train_images[r.nearest_train_index], thumbnail, r.nearest_train or "")
            nearest += f"<br><span class=\"note\">{html.escape(r.nearest_train or '')}</span>"
        flag = '<span class="bad">flagged</span>' if r.flagged else '<span class="good">no</span>'
        prompt = f'<div style="min-width: 11em">{html.escape(r.prompt)}</div>'
        row: list[object] = [prompt, grid_html, nearest, flag, r.wen_score, r.wen_first_step, r.largest_group]
        if not result.data_free:
            row += [r.copy_distance, f"{r.copy_fraction:.0%}",
                    "—" if r.embedding_cosine is None else r.embedding_cosine]
        if result.known_memorized is not None:
            known = "memorized" if result.known_memorized[p] else "held out"
            shared = shared_names(r.prompt, [q.prompt for q, m in zip(result.rows, result.known_memorized) if m])
            if r.flagged and not result.known_memorized[p] and shared:
                known += (f'<br><span class="note">shares {html.escape(", ".join(shared))} with a memorized prompt: '
                          "the fine-tune may have tied the image to the name</span>")
                known = f"<span>{known}</span>"
            row.append(known)
        rows.append(row)
    if result.known_memorized is not None:
        agreement = summary["known_labels"]
        parts.append(
            f"<p><b>Known labels:</b> flagged {agreement['flagged_memorized']} of {agreement['memorized']} memorized "
            f"and {agreement['flagged_held_out']} of {agreement['held_out']} held-out prompts"
            + (f"; Wen score ROC AUC {agreement['wen_auc']:.3f} (first step {agreement['wen_first_step_auc']:.3f}), "
               f"TPR at 1% FPR {agreement['wen_tpr_at_1pct_fpr']:.2f} (first step "
               f"{agreement['wen_first_step_tpr_at_1pct_fpr']:.2f})" if "wen_auc" in agreement else "") + ".</p>"
        )
    parts.append(html_table(header, rows))
    if rows:
        parts.append(score_plot(result))
    return html_page("diffmem audit", "".join(parts))


def write_audit(result: AuditResult, out_dir: str | Path, protect: Sequence[str | Path] = ()) -> dict[str, Path]:
    """Write table.csv, table.md, summary.json and report.html into `out_dir`, each atomically. Files named in
    `protect` (the audit's inputs) are never overwritten."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(result)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    contents = {
        "table.csv": buffer.getvalue(),
        "table.md": markdown_table(header, rows) + "\n",
        "summary.json": json.dumps(result.summary(), indent=2) + "\n",
        "report.html": render_html(result),
    }
    return {name: write_atomic(text.encode("utf-8"), out_dir / name, tuple(protect))
            for name, text in contents.items()}


def audit_files(
    base: str | Path,
    prompts: str | Path | None,
    out_dir: str | Path,
    lora: str | Path | None = None,
    train_images: str | Path | None = None,
    config: AuditConfig = AuditConfig(),
    device: str = "cpu",
    screenshot: bool = False,
    progress: bool = True,
    manifest: str | Path | None = None,
    data_free: bool = False,
    dtype: torch.dtype = torch.float32,
    model_config: str | Path | None = None,
) -> dict:
    """The `diffmem audit` command as a function: load, generate, score, write; returns the summary.

    `manifest`: a world fine-tune manifest (the `.json` beside a world LoRA). Its training images (duplicated and
    seen once) become the training images, and without `prompts` its duplicated and held-out captions are
    audited with their known labels, so the summary says how well the audit finds the memorized ones.
    `dtype` and `model_config` open a pipeline as `diffmem.backends.open_backend` does.
    `data_free`: ignore the manifest's training images (rank and flag by Wen's score, still with known labels)."""
    prompt_list = load_prompts(prompts) if prompts is not None else None
    train = names = known = None
    if manifest is not None:
        if train_images is not None:
            raise DiffmemError("give either --train-images or --manifest, not both")
        train, names, manifest_prompts, manifest_known = world_manifest_inputs(manifest)
        if data_free:
            train = names = None
        if prompt_list is None:
            prompt_list, known = manifest_prompts, manifest_known
    if prompt_list is None:
        raise DiffmemError("give --prompts (or a --manifest whose captions are audited)")
    model = open_backend(base, lora, device, dtype, model_config)
    if train_images is not None:
        train, names = load_image_folder(train_images, size=model.image_size)
    result = run_audit(model, prompt_list, config, train, names, progress=progress, known_memorized=known)
    inputs = [p for p in (prompts, lora, base, manifest) if p is not None and Path(p).exists()]
    paths = write_audit(result, out_dir, protect=inputs)
    if screenshot:
        screenshot_html(paths["report.html"], Path(out_dir) / "report.png")
    return result.summary()


def world_manifest_inputs(manifest: str | Path) -> tuple[torch.Tensor, list[str], list[str], list[bool]]:
    """(training images, their ids, duplicated + held-out captions, which of those are duplicated) of a world
    fine-tune manifest."""
    from diffmem.world.check import manifest_images
    from diffmem.world.data import ImageSet

    path = Path(manifest)
    if not path.is_file():
        raise DiffmemError("no such manifest file", path)
    try:
        record = json.loads(path.read_text())
        duplicated = manifest_images(record, "duplicated")
        seen_once = manifest_images(record, "seen_once")
        held_out = manifest_images(record, "heldout")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise FileFormatError(f"is not a world fine-tune manifest ({exc})", path) from None
    train = ImageSet.concat([duplicated, seen_once]) if len(seen_once) else duplicated
    prompts = [*duplicated.captions, *held_out.captions]
    known = [True] * len(duplicated) + [False] * len(held_out)
    return train.images, list(train.ids), prompts, known


def wen_scores_of(
    model: Backend, prompts: Sequence[str], config: AuditConfig = AuditConfig(),
    generator: torch.Generator | None = None,
) -> WenTrace:
    """Wen et al.'s trace (per-step norms, samples) for prompts, sampled with the audit's settings."""
    config = settle_config(config, model)
    wen = WenConfig(num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                    generations=config.generations, batch_size=config.batch_size)
    generator = generator if generator is not None else torch.Generator().manual_seed(config.seed)
    conditioning, empty = model.encode(list(prompts)), model.unconditional()
    return sample_with_wen_scores(model.denoiser, model.sampler(), conditioning.context, empty.context, wen,
                                  generator, model.sample_shape, added_cond=conditioning.added or None,
                                  empty_added_cond=empty.added or None)


def evaluate_wen_detector(
    model: Backend,
    memorized: Sequence[str],
    held_out: Sequence[str],
    config: AuditConfig = AuditConfig(),
    max_fpr: float = 0.01,
) -> dict:
    """ROC AUC and TPR at `max_fpr` of Wen et al.'s score (all steps, and first step only) separating prompts
    known to be memorized from held-out ones (Wen et al. 2024, sec. 4)."""
    from diffmem.metrics.roc import roc_auc, tpr_at_fpr

    if not memorized or not held_out:
        raise DiffmemError("need at least one memorized and one held-out prompt")
    config = settle_config(config, model)
    trace = wen_scores_of(model, [*memorized, *held_out], config)
    labels = torch.tensor([1] * len(memorized) + [0] * len(held_out))
    out = {"model": model.name, "memorized": len(memorized), "held_out": len(held_out),
           "generations": config.generations, "steps": config.num_inference_steps,
           "guidance": config.guidance_scale}
    for key, scores in (("all_steps", trace.scores), ("first_step", trace.first_step)):
        out[key] = {
            "auc": roc_auc(scores, labels),
            f"tpr_at_{max_fpr:g}_fpr": tpr_at_fpr(scores, labels, max_fpr),
            "mean_memorized": float(scores[: len(memorized)].mean()),
            "mean_held_out": float(scores[len(memorized) :].mean()),
        }
    return out
