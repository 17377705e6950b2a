"""MemControl's bi-level search (Dutt et al. 2025, sec. 3.4, Algorithm 1): the outer loop proposes masks with
Optuna's NSGA-II (Deb et al. 2002); the inner loop fine-tunes the world base under each mask on a small proxy set
whose memorized images are known (N pairs duplicated K times) and scores it on two minimised objectives:
memorization (Wen et al.'s score on the duplicated captions) and quality (FID of generations for validation
captions: training-split images the proxy fine-tune did not see). The held-out split stays untouched by the search,
so the table that reports the chosen mask measures FID on images the search never selected on (the seed searches
on a validation set and reports on a test set)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from diffmem.errors import DiffmemError
from diffmem.formats.safetensors_io import write_atomic
from diffmem.memcontrol.mask import Mask, derive_mask, save_mask
from diffmem.memcontrol.settings import SearchConfig
from diffmem.memcontrol.train import finetune_with_mask
from diffmem.world.data import ImageSet

STUDY_FILE = "study.db"


@dataclass(frozen=True)
class TrialResult:
    """One evaluated mask: its bits and both objectives."""

    number: int
    bits: str
    memorization: float
    fid: float
    trainable_parameters: int


def memorization_objective(unet: UNet2DConditionModel, captions: list[str], steps: int, generations: int,
                           guidance: float, seed: int) -> float:
    """Mean Wen score of `captions` (Wen et al. 2024, eq. 6 of the seed), sampled with the world's DDIM."""
    from diffmem.backends.world import WorldDDIMScheduler
    from diffmem.metrics.wen import WenConfig, sample_with_wen_scores
    from diffmem.world.text import encode_prompts

    wen = WenConfig(num_inference_steps=steps, guidance_scale=guidance, generations=generations)
    trace = sample_with_wen_scores(unet, WorldDDIMScheduler(), encode_prompts(captions), encode_prompts([""]), wen,
                                   torch.Generator().manual_seed(seed))
    return float(trace.scores.mean())


def validation_rows(train_size: int, seen: list[int], count: int, seed: int) -> list[int]:
    """`count` training-split rows outside `seen` (the proxy set), drawn with `seed`, sorted: the search's
    validation images."""
    unseen = sorted(set(range(train_size)) - set(seen))
    if count > len(unseen):
        raise DiffmemError(f"the search's FID needs {count} validation images but only {len(unseen)} training images "
                           "are outside the proxy set: lower --rest-share, the duplicated count or validation_size")
    return sorted(np.random.default_rng(seed + 11).choice(unseen, size=count, replace=False).tolist())


def quality_objective(unet: UNet2DConditionModel, validation: ImageSet, config: SearchConfig, embedder=None) -> float:
    """FID of generations for the `validation` captions against the `validation` images (`diffmem.metrics.fid`)."""
    from diffmem.metrics.fid import fid
    from diffmem.world.diffusion import generate

    prompts = [c for c in validation.captions for _ in range(config.quality_generations)]
    seeds = [config.seed + 50_000 + i for i in range(len(prompts))]
    images = generate(unet, prompts, seeds, steps=config.quality_steps, guidance=config.guidance)
    return fid(validation.images, images, embedder)


def evaluate_mask(base: UNet2DConditionModel, mask: Mask, config: SearchConfig, embedder=None) -> tuple[float, float, int]:
    """Inner loop: fine-tune under `mask` on the proxy set, return (memorization, FID, trained parameters)."""
    from diffmem.world.data import FINETUNE_SETS

    inner = config.inner
    result = finetune_with_mask(base, inner, mask, progress=False)
    train_set = FINETUNE_SETS[inner.data]("train")
    captions = train_set.subset(result.duplicated).captions
    validation = train_set.subset(validation_rows(len(train_set), result.duplicated + result.seen_once,
                                                  config.validation_size, config.seed))
    return (memorization_objective(result.unet, list(captions), config.wen_steps, config.wen_generations,
                                   config.guidance, config.seed),
            quality_objective(result.unet, validation, config, embedder), result.trainable_parameters)


def normalised_mean_choice(values: list[tuple[float, float]], candidates: list[int]) -> int:
    """Index (into `values`) of the candidate with the lowest mean of min-max normalised objectives, normalised over
    all `values` (the seed's scalarisation, sec. 4.2)."""
    columns = list(zip(*values))
    lows, highs = [min(c) for c in columns], [max(c) for c in columns]

    def score(i: int) -> float:
        return sum((v - lo) / (hi - lo) if hi > lo else 0.0 for v, lo, hi in zip(values[i], lows, highs)) / len(lows)

    return min(candidates, key=lambda i: (score(i), i))


def storage_url(out: Path, storage: str | None) -> str:
    """The Optuna storage: any RDB URL given, else SQLite in the output folder."""
    return storage if storage is not None else f"sqlite:///{(out / STUDY_FILE).resolve()}"


def open_study(config: SearchConfig, mask: Mask, out: Path, storage: str | None, study_name: str | None):
    """Create or resume the study; a resumed study must have been run with the same settings."""
    import optuna

    name = study_name or f"memcontrol-{config.method}-{mask.granularity}"
    sampler = optuna.samplers.NSGAIISampler(population_size=config.population_size, seed=config.seed)
    study = optuna.create_study(storage=storage_url(out, storage), study_name=name, sampler=sampler,
                                directions=["minimize", "minimize"], load_if_exists=True)
    # the trial count may grow when a study is resumed; everything else must stay
    settings = json.dumps({k: v for k, v in asdict(config).items() if k != "trials"}, sort_keys=True)
    stored = study.user_attrs.get("settings")
    if stored is None:
        study.set_user_attr("settings", settings)
        study.set_user_attr("entries", [e.name for e in mask.entries])
        study.enqueue_trial({f"m{i}": 1 for i in range(len(mask.entries))})
    elif stored != settings:
        raise DiffmemError(f"study {name!r} in {storage_url(out, storage)} was run with other settings; use another "
                           "--out, --storage or --study-name, or the same settings to resume it")
    return study


def completed(study) -> list[TrialResult]:
    """The study's finished trials as `TrialResult`s, in trial order."""
    import optuna

    return [TrialResult(t.number, t.user_attrs["bits"], t.values[0], t.values[1], t.user_attrs["trainable_parameters"])
            for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])]


def earlier_trial(results: list[TrialResult], bits: str) -> TrialResult | None:
    """The first finished trial that evaluated mask `bits` (NSGA-II proposes a mask again, more so in small spaces:
    5 entries give 32 masks), or None."""
    return next((r for r in results if r.bits == bits), None)


def pareto_front(results: list[TrialResult]) -> list[TrialResult]:
    """Trials no other trial beats on both objectives (ties on both kept once, the earliest)."""
    front = []
    for r in results:
        dominated = any(o.memorization <= r.memorization and o.fid <= r.fid and
                        (o.memorization < r.memorization or o.fid < r.fid) for o in results)
        duplicate = any(f.memorization == r.memorization and f.fid == r.fid for f in front)
        if not dominated and not duplicate:
            front.append(r)
    return sorted(front, key=lambda r: r.memorization)


def front_table(results: list[TrialResult], front: list[TrialResult], chosen: TrialResult, mask: Mask) -> str:
    """Markdown table of the Pareto front, the chosen mask marked."""
    lines = [f"Pareto front of {len(results)} trials; entries: {', '.join(e.name for e in mask.entries)}", "",
             "| trial | mask | memorization (Wen) | FID | trained parameters | chosen |",
             "|---|---|---|---|---|---|"]
    for r in front:
        lines.append(f"| {r.number} | `{r.bits}` | {r.memorization:.3f} | {r.fid:.2f} | {r.trainable_parameters} | "
                     f"{'yes' if r is chosen else ''} |")
    return "\n".join(lines) + "\n"


def front_plot(results: list[TrialResult], front: list[TrialResult], chosen: TrialResult, path: Path, title: str) -> None:
    """Scatter of every trial, the Pareto front joined, the all-on mask and the chosen one marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 4), dpi=120)
    axes.scatter([r.fid for r in results], [r.memorization for r in results], s=14, c="0.6", label="trials")
    axes.plot([r.fid for r in front], [r.memorization for r in front], "o-", c="C0", ms=5, label="Pareto front")
    published = [r for r in results if set(r.bits) == {"1"}]
    if published:
        axes.scatter([published[0].fid], [published[0].memorization], marker="s", c="C3", label="all on (published)")
    axes.scatter([chosen.fid], [chosen.memorization], marker="*", s=160, c="C1", label="chosen")
    axes.set_xlabel("FID (lower is better)")
    axes.set_ylabel("Wen memorization score (lower is better)")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(path)


def search(out: str | Path, config: SearchConfig | None = None, storage: str | None = None,
           study_name: str | None = None, base: UNet2DConditionModel | None = None, progress: bool = True) -> dict:
    """Run (or resume) a MemControl search and write to `out`: the study (SQLite unless `storage` is an Optuna RDB
    URL), `pareto.md`, `pareto.png`, `trials.json` and `mask.json` (the chosen mask, which `diffmem memcontrol
    train --mask` accepts). Returns the summary written to `trials.json`."""
    import optuna

    from diffmem.metrics.embedder import load_copy_embedder
    from diffmem.world.model import load_base

    config = config or SearchConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = base if base is not None else load_base()
    template = derive_mask(base, config.mask_granularity)
    study = open_study(config, template, out, storage, study_name)
    embedder = load_copy_embedder()
    if not progress:
        optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial) -> tuple[float, float]:
        bits = "".join(str(trial.suggest_int(f"m{i}", 0, 1)) for i in range(len(template.entries)))
        trial.set_user_attr("bits", bits)
        earlier = earlier_trial(completed(study), bits)
        if earlier is not None:
            # the inner fine-tune is deterministic: training the same mask again would repeat these numbers
            trial.set_user_attr("trainable_parameters", earlier.trainable_parameters)
            trial.set_user_attr("same_as", earlier.number)
            if progress:
                print(f"trial {trial.number} mask {bits}: as trial {earlier.number}", flush=True)
            return earlier.memorization, earlier.fid
        began = time.time()
        memorization, quality, trained = evaluate_mask(base, template.with_train([b == "1" for b in bits]), config,
                                                       embedder)
        trial.set_user_attr("trainable_parameters", trained)
        trial.set_user_attr("wall_time_s", round(time.time() - began, 1))
        if progress:
            print(f"trial {trial.number} mask {bits}: memorization {memorization:.3f} FID {quality:.2f} "
                  f"({trained} parameters, {time.time() - began:.0f} s)", flush=True)
        return memorization, quality

    remaining = config.trials - len(completed(study))
    if remaining > 0:
        study.optimize(objective, n_trials=remaining)
    results = completed(study)
    if not results:
        raise DiffmemError("the study has no completed trial", out)
    front = pareto_front(results)
    values = [(r.memorization, r.fid) for r in results]
    chosen = results[normalised_mean_choice(values, [results.index(r) for r in front])]
    mask = template.with_train([b == "1" for b in chosen.bits])
    save_mask(mask, out / "mask.json", {"search": {"study": study.study_name, "trial": chosen.number,
                                                   "memorization": chosen.memorization, "fid": chosen.fid,
                                                   "method": config.method}})
    write_atomic(front_table(results, front, chosen, mask).encode(), out / "pareto.md")
    front_plot(results, front, chosen, out / "pareto.png",
               f"MemControl {config.method} ({mask.granularity}), {len(results)} trials")
    summary = {"study": study.study_name, "storage": storage_url(out, storage), "settings": asdict(config),
               "entries": [e.name for e in mask.entries], "chosen": asdict(chosen),
               "front": [asdict(r) for r in front], "trials": [asdict(r) for r in results]}
    write_atomic((json.dumps(summary, indent=2) + "\n").encode(), out / "trials.json")
    return summary
