"""Train the populations of world LoRAs that `diffmem scan`'s verdict is tuned on and judged on (issue 17).

Two populations, disjoint in seeds (so in the images each LoRA duplicates):

- `tune` (8 LoRAs): the scan's thresholds may be chosen on these;
- `eval` (24 LoRAs): kept out of the tuning; docs/scan.md reports the verdict's ROC AUC and TPR at 5% FPR on them.

Each population is half recipes meant to memorize (duplicated training images at several ranks, step counts,
duplication levels, on faces and on photos) and half recipes meant not to (no duplicated image, fewer steps).
A recipe's intent is not its label: the label of a LoRA is measured afterwards, by the copy test against its
own training images (which the scan never reads). Each population also holds one pair of style fine-tunes
(`diffmem.world.data.style_dataset`: the shapes the base knows, in a look it never saw): a style-only LoRA, which
learns a look without repeating any image (the false positive a platform fears most), and a style LoRA that also
memorizes duplicated images. They come after the other recipes (`--match style` trains them first).

Each LoRA is written with its manifest to `--out/<population>/<name>.safetensors` (+ `.json`), skipped when it
exists, so the script resumes. `--labels` then measures each trained LoRA's label into `<name>.label.json`:
memorizing when at least one training caption (all duplicated ones and the first `LABEL_SEEN_ONCE` seen once)
gets a copy of its own training image in at least half of 8 generations (Carlini et al.'s relative tiled-L2
test against the LoRA's whole training set, `diffmem.world.check.own_copy_rate`), with the base's rate on the
same captions beside it. `--evaluate JSON` scans every labelled LoRA (`diffmem.scan.scan_lora`, default settings;
the scan never reads the manifest or the training images) and writes, per population, the verdict risk's ROC AUC
and TPR at 5% FPR against the labels with 95% bootstrap intervals over LoRAs, and for memorizing LoRAs the share
of duplicated training images the kept extraction groups recover (their representatives pass the tiled-L2 copy
test against the LoRA's training set and their nearest training image is a duplicated one). One LoRA takes about 11 CPU-minutes at 500 steps on one thread (docs/world.md);
the 32 take about 5 hours on one core. Run it in the background at low priority:

    nice -n 19 python benchmarks/scan_population.py --out runs/scan-population [--only eval] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from scipy.stats import beta

from diffmem.metrics.copy import copy_decisions
from diffmem.metrics.roc import roc_auc, tpr_at_fpr
from diffmem.scan import scan_lora
from diffmem.scan.score import VERDICTS, ScanConfig, risk_of, verdict_of, wen_evidence
from diffmem.world.check import CheckSettings, manifest_images, own_copy_rate, own_reference_rows
from diffmem.world.data import ImageSet
from diffmem.world.lora import apply_lora
from diffmem.world.model import load_base
from diffmem.world.train import FinetuneConfig, finetune

#: The held-out LoRAs whose scans had been seen when the extraction-led rule (`ScanConfig.wen_weight`) was fixed on
#: 2026-12-06; the eval LoRAs trained after it are "fresh", and their numbers are the rule's honest held-out result.
SEEN_BEFORE_RULE = frozenset({"mem-faces-r32-s500-d5x100-200", "mem-photos-r32-s500-d5x100-201", "ord-faces-r32-s500-250",
                              "ord-photos-r32-s500-251"})
#: The first rule, in which the Wen ratio alone could make a verdict "memorizing" (kept for comparison).
FIRST_RULE = ScanConfig(wen_weight=1.0)

#: Seen-once training captions tested for copies besides the duplicated ones (the only ones an ordinary recipe has).
LABEL_SEEN_ONCE = 10


@dataclass(frozen=True)
class Recipe:
    """One LoRA of a population: its fine-tune and whether the recipe is meant to memorize."""

    name: str
    memorizing_recipe: bool
    config: FinetuneConfig


#: LoRAs per kind (memorizing recipe, ordinary recipe) in each population as designed: 8 and 24 LoRAs, and a style
#: pair each (10 and 26).
DESIGNED_PER_KIND = {"tune": 4, "eval": 12}


def recipes(population: str, per_kind: int | None = None) -> list[Recipe]:
    """The LoRAs of `population` ("tune" or "eval"), memorizing and ordinary recipes alternating (so a population cut
    short still holds both kinds); `per_kind` of each, `DESIGNED_PER_KIND` by default, then the style pair (one of
    each kind). Seeds 100+ for tune, 200+ for eval, one per LoRA; a smaller population is the designed one's first
    LoRAs of each kind and the style pair."""
    first_seed = {"tune": 100, "eval": 200}[population]
    memorizing = [  # (data, rank, steps, duplicate N x K)
        ("faces", 32, 500, (5, 100)), ("photos", 32, 500, (5, 100)), ("faces", 8, 500, (5, 100)),
        ("photos", 8, 400, (5, 100)), ("faces", 32, 300, (3, 150)), ("photos", 16, 500, (8, 60)),
        ("faces", 16, 400, (8, 60)), ("photos", 32, 300, (3, 150)), ("faces", 4, 500, (5, 100)),
        ("photos", 4, 500, (3, 150)), ("faces", 32, 500, (10, 50)), ("photos", 16, 400, (5, 100)),
    ]
    ordinary = [  # no duplicated image: (data, rank, steps)
        ("faces", 32, 500), ("photos", 32, 500), ("faces", 8, 300), ("photos", 8, 300), ("faces", 16, 150),
        ("photos", 16, 150), ("faces", 32, 300), ("photos", 4, 500), ("faces", 4, 300), ("photos", 32, 150),
        ("faces", 16, 500), ("photos", 16, 300),
    ]
    count = DESIGNED_PER_KIND[population] if per_kind is None else per_kind
    if not 1 <= count <= len(memorizing):
        raise ValueError(f"per_kind must be 1 to {len(memorizing)}, got {count}")
    mem, ordinary_recipes = [], []
    for i, (data, rank, steps, duplicate) in enumerate(memorizing[:count]):
        config = FinetuneConfig(data=data, rank=rank, alpha=float(rank), steps=steps, duplicate=duplicate,
                                seed=first_seed + i)
        mem.append(Recipe(f"mem-{data}-r{rank}-s{steps}-d{duplicate[0]}x{duplicate[1]}-{config.seed}", True, config))
    for i, (data, rank, steps) in enumerate(ordinary[:count]):
        config = FinetuneConfig(data=data, rank=rank, alpha=float(rank), steps=steps, duplicate=(0, 1),
                                seed=first_seed + 50 + i)
        ordinary_recipes.append(Recipe(f"ord-{data}-r{rank}-s{steps}-{config.seed}", False, config))
    style = [Recipe(f"mem-style-r16-s400-d5x100-{first_seed + 40}", True,
                    FinetuneConfig(data="style", rank=16, alpha=16.0, steps=400, duplicate=(5, 100),
                                   seed=first_seed + 40)),
             Recipe(f"ord-style-r16-s400-{first_seed + 90}", False,
                    FinetuneConfig(data="style", rank=16, alpha=16.0, steps=400, duplicate=(0, 1),
                                   seed=first_seed + 90))]
    return [recipe for pair in zip(mem, ordinary_recipes) for recipe in pair] + style


def measure_label(lora: Path) -> dict:
    """The measured label of a population LoRA (see the module docstring), JSON-ready."""
    manifest = json.loads(lora.with_suffix(".json").read_text())
    duplicated, seen_once = manifest_images(manifest, "duplicated"), manifest_images(manifest, "seen_once")
    tested = ImageSet.concat([duplicated, seen_once.subset(list(range(min(LABEL_SEEN_ONCE, len(seen_once)))))])
    reference = ImageSet.concat([duplicated, seen_once]).images
    settings = CheckSettings(generations=8, seed=5000)
    base = load_base()
    tuned = own_copy_rate(apply_lora(base, lora), tested, reference, settings)
    control = own_copy_rate(base, tested, reference, settings)
    return {"memorizing": tuned["captions_copied_in_half"] >= 1,
            "captions_copied_in_half": tuned["captions_copied_in_half"], "captions": len(tested),
            "duplicated_captions": len(duplicated), "copy_rate_own": tuned["copy_rate_own"],
            "base_copy_rate_own": control["copy_rate_own"], "per_caption_own_rate": tuned["per_caption_own_rate"],
            "settings": {"generations": settings.generations, "steps": settings.steps,
                         "guidance": settings.guidance, "seed": settings.seed}}


def recovered_share(result, manifest: dict) -> float | None:
    """Share of the LoRA's duplicated training images that a kept extraction group recovers (None without any)."""
    duplicated, seen_once = manifest_images(manifest, "duplicated"), manifest_images(manifest, "seen_once")
    if not len(duplicated):
        return None
    reference = ImageSet.concat([duplicated, seen_once]).images
    representatives = [result.samples[g.prompt][0][g.representative] for g in result.kept_groups]
    if not representatives:
        return 0.0
    decisions = copy_decisions(torch.stack(representatives), reference)
    own_rows = set(own_reference_rows(duplicated.images, reference).tolist())
    found = {int(row) for row, copy in zip(decisions.nearest_index, decisions.is_copy) if copy and int(row) in own_rows}
    return len(found) / len(duplicated)


def bootstrap(statistic, risks: torch.Tensor, labels: torch.Tensor, resamples: int = 1000) -> list[float] | None:
    """95% percentile interval of `statistic(risks, labels)` over LoRAs resampled with replacement (resamples
    with one class only are skipped); None with fewer than 2 of each class."""
    if int(labels.sum()) < 2 or int((~labels).sum()) < 2:
        return None
    generator = torch.Generator().manual_seed(0)
    values = []
    for _ in range(resamples):
        rows = torch.randint(0, len(labels), (len(labels),), generator=generator)
        if labels[rows].any() and not labels[rows].all():
            values.append(statistic(risks[rows], labels[rows]))
    values.sort()
    return [round(values[int(0.025 * len(values))], 4), round(values[int(0.975 * len(values)) - 1], 4)]


def scan_row(lora: Path) -> dict:
    """Scan one labelled LoRA with the default settings (cached in `<name>.scan.json`, so evaluation resumes and
    workers share it): the scan's summary, its label, and the recovered share of its duplicated images."""
    cache = lora.with_suffix(".scan.json")
    if cache.is_file():
        return json.loads(cache.read_text())
    label = json.loads(lora.with_suffix(".label.json").read_text())
    manifest = json.loads(lora.with_suffix(".json").read_text())
    began = time.time()
    result = scan_lora(lora, base="world")
    row = {"lora": lora.stem, "memorizing": label["memorizing"], "recovered_share": recovered_share(result, manifest),
           "seconds": round(time.time() - began, 1), "summary": result.summary()}
    cache.write_text(json.dumps(row, indent=2) + "\n")
    return row


def rescored(row: dict, config: ScanConfig) -> float:
    """The risk of a cached scan under another rule: the Wen evidence from the largest ratio under `config`'s
    ratio bounds, the extraction evidence (which no rule constant changes) as scanned."""
    evidence = row["summary"]["evidence"]
    return risk_of(wen_evidence(evidence["largest_wen_ratio"], config), evidence["extraction"], config.wen_weight)


def verdict_accuracy(rows: list[dict], config: ScanConfig) -> float:
    """Share of `rows` whose verdict under `config` is their label ("unsure" counts as wrong either way)."""
    right = 0
    for row in rows:
        verdict = verdict_of(rescored(row, config), config)
        right += verdict == ("memorizing" if row["memorizing"] else "not memorizing")
    return right / len(rows) if rows else 0.0


#: The rules `choose_rule` may pick from: the Wen ratio's floor (the ceiling is 1.6 x the floor, as 2.0 / 1.25);
#: the verdict thresholds stay at their provisional 0.5 and 0.2.
RATIO_FLOORS = (1.05, 1.1, 1.15, 1.2, 1.25, 1.3, 1.4, 1.5, 1.75, 2.0)


def choose_rule(tune: list[dict], provisional: ScanConfig | None = None) -> tuple[ScanConfig, list[dict]]:
    """The rule with the best verdict accuracy on the tune population among `provisional` (default `ScanConfig()`)
    with each ratio floor of `RATIO_FLOORS` (ties: the floor nearest the provisional one), and the accuracy of every
    candidate, for the record."""
    provisional = provisional or ScanConfig()
    candidates = [replace(provisional, ratio_floor=floor, ratio_full=round(1.6 * floor, 4)) for floor in RATIO_FLOORS]
    table = [{"ratio_floor": c.ratio_floor, "ratio_full": c.ratio_full, "accuracy": round(verdict_accuracy(tune, c), 4)}
             for c in candidates]
    best = max(zip(candidates, table),
               key=lambda pair: (pair[1]["accuracy"], -abs(pair[0].ratio_floor - provisional.ratio_floor)))[0]
    return best, table


def clopper_pearson(successes: int, trials: int) -> list[float]:
    """The exact 95% interval of a binomial proportion (Clopper & Pearson 1934). With few LoRAs, all classified
    right, the bootstrap's interval collapses to [1, 1]; this one says how little a handful shows (4 of 4: the true
    accuracy could be as low as 0.40)."""
    lower = 0.0 if successes == 0 else float(beta.ppf(0.025, successes, trials - successes + 1))
    upper = 1.0 if successes == trials else float(beta.ppf(0.975, successes + 1, trials - successes))
    return [round(lower, 4), round(upper, 4)]


def score_population(rows: list[dict], config: ScanConfig) -> dict:
    """ROC AUC and TPR at 5% FPR of the risk under `config` against the labels, with bootstrap intervals, the
    verdicts' confusion counts and the mean recovered share of the memorizing LoRAs."""
    risks = torch.tensor([rescored(row, config) for row in rows])
    labels = torch.tensor([bool(row["memorizing"]) for row in rows])
    verdicts = [verdict_of(float(r), config) for r in risks]
    accuracy = verdict_accuracy(rows, config)
    summary: dict = {"loras": len(rows), "memorizing": int(labels.sum()),
                     "verdicts": {f"{'memorizing' if y else 'not memorizing'} labelled, {v}":
                                  sum(1 for yy, vv in zip(labels.tolist(), verdicts) if yy == y and vv == v)
                                  for y in (True, False) for v in VERDICTS},
                     "verdict_accuracy": round(accuracy, 4),
                     "verdict_accuracy_95ci": clopper_pearson(round(accuracy * len(rows)), len(rows))}
    if labels.any() and not labels.all():
        tpr5 = lambda r, y: tpr_at_fpr(r, y, 0.05)  # noqa: E731 - a statistic for `bootstrap`
        summary |= {"roc_auc": round(roc_auc(risks, labels), 4), "roc_auc_95ci": bootstrap(roc_auc, risks, labels),
                    "tpr_at_5pct_fpr": round(tpr5(risks, labels), 4),
                    "tpr_at_5pct_fpr_95ci": bootstrap(tpr5, risks, labels)}
    shares = [row["recovered_share"] for row in rows if row["memorizing"] and row["recovered_share"] is not None]
    summary["recovered_share_mean"] = round(sum(shares) / len(shares), 4) if shares else None
    summary["rows"] = [{"lora": row["lora"], "memorizing": row["memorizing"], "risk": round(float(risk), 4),
                        "verdict": verdict, "largest_wen_ratio": row["summary"]["evidence"]["largest_wen_ratio"],
                        "largest_wen_ratio_prompt": row["summary"]["evidence"]["largest_wen_ratio_prompt"],
                        "extraction_evidence": row["summary"]["evidence"]["extraction"],
                        "extracted_groups": row["summary"]["evidence"]["extracted_groups"],
                        "groups_base_also_produces": row["summary"]["evidence"]["groups_base_also_produces"],
                        "recovered_share": row["recovered_share"], "scan_seconds": row["seconds"],
                        "label": row.get("label")}
                       for row, risk, verdict in zip(rows, risks.tolist(), verdicts)]
    return summary


def evaluate(folder: Path) -> dict:
    """Scan every labelled LoRA under `folder`/<population>/ (cached), choose the rule on the tune population and
    score both the provisional and the chosen rule on both populations (the eval population's numbers are the
    held-out result)."""
    rows: dict[str, list[dict]] = {"tune": [], "eval": []}
    for population in rows:
        # From the labels, so the committed caches (labels, manifests, scans; not the 3 MB LoRAs) re-evaluate alone.
        for label_path in sorted((folder / population).glob("*.label.json")):
            lora = label_path.with_name(label_path.name.removesuffix(".label.json") + ".safetensors")
            if lora.with_suffix(".scan.json").is_file() or lora.is_file():
                label = json.loads(label_path.read_text())
                manifest = json.loads(lora.with_suffix(".json").read_text())
                recipe = {key: manifest["settings"][key] for key in ("data", "rank", "steps", "duplicate")
                          if key in manifest.get("settings", {})}
                rows[population].append({**scan_row(lora), "label": {
                    "captions_copied_in_half": label["captions_copied_in_half"], "captions": label["captions"],
                    "copy_rate_own": label["copy_rate_own"], "base_copy_rate_own": label["base_copy_rate_own"],
                    "recipe": recipe}})
    chosen, table = choose_rule(rows["tune"])
    report: dict = {"command": f"python benchmarks/scan_population.py --out {folder} --evaluate docs/scan-population.json "
                                "--markdown docs/scan-population.md",
                    "label_rule": f"memorizing when >= 1 tested training caption is copied (own tiled-L2 copy) in at "
                                  f"least half of 8 generations (duplicated captions and {LABEL_SEEN_ONCE} seen once)",
                    "chosen_on_tune": {"ratio_floor": chosen.ratio_floor, "ratio_full": chosen.ratio_full,
                                       "risk_memorizing": chosen.risk_memorizing, "risk_clear": chosen.risk_clear,
                                       "candidates": table},
                    "populations": {}}
    fresh = [row for row in rows["eval"] if row["lora"] not in SEEN_BEFORE_RULE]
    for population, population_rows in (*rows.items(), ("eval_fresh", fresh)):
        if population_rows:
            report["populations"][population] = {"provisional_rule": score_population(population_rows, ScanConfig()),
                                                 "chosen_rule": score_population(population_rows, chosen),
                                                 "first_rule": score_population(population_rows, FIRST_RULE)}
    return report


def recipe_text(recipe: dict) -> str:
    """A row's recipe in words: "faces, rank 32, 500 steps, 5 images x 100" (or "no duplicates")."""
    count, repeats = recipe.get("duplicate", (0, 1))
    copies = f"{count} images x {repeats}" if count else "no duplicates"
    return f"{recipe.get('data', '?')}, rank {recipe.get('rank', '?')}, {recipe.get('steps', '?')} steps, {copies}"


def interval(value: float | None, bounds: list[float] | None, digits: int = 2) -> str:
    """`value [low, high]`, or "n/a" without a value."""
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" + ("" if bounds is None else f" [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]")


def markdown(report: dict) -> str:
    """docs/scan-population.md from the evaluation JSON: every LoRA's label, verdict and evidence under the current
    (extraction-led) rule, then each population's scores under the current, the chosen and the first rule."""
    lines = ["# The scan's population of world LoRAs",
             "",
             f"Generated by `{report['command']}` from the committed caches in benchmarks/scan-population/ "
             "(docs/scan.md reads it). Label: " + report["label_rule"] + ". \"fresh\": trained after the "
             "extraction-led rule was fixed.",
             "",
             "| population | LoRA | recipe | label: captions copied | verdict | risk | largest Wen ratio | "
             "extraction evidence (groups) | duplicated images recovered |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    fresh = {row["lora"] for row in report["populations"].get("eval_fresh", {}).get("provisional_rule", {}).get(
        "rows", [])}
    for population in ("tune", "eval"):
        for row in report["populations"].get(population, {}).get("provisional_rule", {}).get("rows", []):
            label = row["label"]
            kind = "memorizing" if row["memorizing"] else "not"
            share = row["recovered_share"]
            duplicated = label["recipe"].get("duplicate", [0, 1])[0]
            recovered = "—" if share is None else f"{round(share * duplicated)} of {duplicated}"
            name = row["lora"] + (" (fresh)" if row["lora"] in fresh else "")
            lines.append(f"| {population} | {name} | {recipe_text(label['recipe'])} | {kind}: "
                         f"{label['captions_copied_in_half']} of {label['captions']} | {row['verdict']} | "
                         f"{row['risk']:.2f} | {row['largest_wen_ratio']} | {row['extraction_evidence']:.2f} "
                         f"({row['extracted_groups']}) | {recovered} |")
    lines += ["", "| population | rule | LoRAs (memorizing) | verdict right [exact 95% CI] | ROC AUC [bootstrap 95%] | "
              "TPR at 5% FPR [bootstrap 95%] | recovered share (memorizing LoRAs) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    names = {"provisional_rule": "extraction-led (current)", "chosen_rule": "chosen on tune",
             "first_rule": "first (ratio alone can decide)"}
    for population, rules in report["populations"].items():
        for key, title in names.items():
            scores = rules.get(key)
            if scores is None:
                continue
            recovered = scores["recovered_share_mean"]
            lines.append(f"| {population} | {title} | {scores['loras']} ({scores['memorizing']}) | "
                         f"{interval(scores['verdict_accuracy'], scores['verdict_accuracy_95ci'])} | "
                         f"{interval(scores.get('roc_auc'), scores.get('roc_auc_95ci'))} | "
                         f"{interval(scores.get('tpr_at_5pct_fpr'), scores.get('tpr_at_5pct_fpr_95ci'))} | "
                         f"{'n/a' if recovered is None else f'{recovered:.0%}'} |")
    return "\n".join(lines) + "\n"


def train_one(recipe: Recipe, folder: Path, population: str, args: argparse.Namespace) -> Path:
    """Fine-tune `recipe` into `folder` with its manifest, unless both exist."""
    path = folder / f"{recipe.name}.safetensors"
    if path.is_file() and path.with_suffix(".json").is_file():
        return path
    began = time.time()
    config = replace(recipe.config, threads=args.threads)
    manifest = finetune(path, config, progress=False,
                        command=f"python benchmarks/scan_population.py --out {args.out} ({population})")
    manifest["population"] = {"name": population, "memorizing_recipe": recipe.memorizing_recipe}
    path.with_suffix(".json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{population}/{recipe.name}: trained in {time.time() - began:.0f} s", flush=True)
    return path


def label_one(lora: Path) -> dict:
    """The LoRA's measured label, cached in `<name>.label.json`."""
    label_path = lora.with_suffix(".label.json")
    if label_path.is_file():
        return json.loads(label_path.read_text())
    label = measure_label(lora)
    label_path.write_text(json.dumps(label, indent=2) + "\n")
    print(f"{lora.parent.name}/{lora.stem}: memorizing {label['memorizing']} "
          f"({label['captions_copied_in_half']}/{label['captions']} captions copied)", flush=True)
    return label


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/scan-population"))
    parser.add_argument("--only", choices=("tune", "eval"), default=None, help="train one population only")
    parser.add_argument("--per-kind", default=None, metavar="TUNE,EVAL",
                        help="LoRAs per kind (memorizing / ordinary recipe) in tune and eval, e.g. 2,6 "
                             f"(default {DESIGNED_PER_KIND['tune']},{DESIGNED_PER_KIND['eval']}: the designed sizes)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per fine-tune (default 1)")
    parser.add_argument("--worker", default="0/1", metavar="I/N",
                        help="train, label and scan the I-th of N shares of the LoRAs, each share holding both kinds (run N "
                             "workers side by side, one per core; default 0/1: all)")
    parser.add_argument("--match", default=None, metavar="TEXT",
                        help="only the LoRAs whose name contains TEXT (e.g. style)")
    parser.add_argument("--labels", action="store_true",
                        help="train nothing: measure the label of every trained LoRA without one (<name>.label.json)")
    parser.add_argument("--evaluate", type=Path, default=None, metavar="JSON",
                        help="train nothing: scan every labelled LoRA and write the verdicts' accuracy to JSON")
    parser.add_argument("--markdown", type=Path, default=None, metavar="MD",
                        help="with --evaluate: also write the tables of docs/scan-population.md to MD")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.evaluate is not None:
        report = evaluate(args.out)
        args.evaluate.write_text(json.dumps(report, indent=2) + "\n")
        if args.markdown is not None:
            args.markdown.write_text(markdown(report))
        return 0
    if args.labels:
        for lora in sorted(args.out.glob("*/*.safetensors")):
            if lora.with_suffix(".json").is_file():
                label_one(lora)
        return 0
    sizes = dict(DESIGNED_PER_KIND)
    if args.per_kind:
        sizes = dict(zip(("tune", "eval"), (int(n) for n in args.per_kind.split(","))))
    index, workers = (int(n) for n in args.worker.split("/"))
    jobs = [(population, recipe) for population in ([args.only] if args.only else ["tune", "eval"])
            for recipe in recipes(population, sizes[population]) if args.match is None or args.match in recipe.name]
    # Worker I takes the pairs' members in turn (memorizing recipe of pair 0, ordinary of pair 1, ...), so every
    # worker trains both kinds and a run stopped early leaves both classes about equally grown.
    mine = [job for i, job in enumerate(jobs) if (i // 2 + i % 2) % workers == index]
    for population, recipe in mine:
        folder = args.out / population
        folder.mkdir(parents=True, exist_ok=True)
        done = folder / f"{recipe.name}.scan.json"
        if done.is_file() and done.with_name(f"{recipe.name}.label.json").is_file():
            continue  # labelled and scanned (the committed caches need no LoRA file): nothing left to do
        lora = train_one(recipe, folder, population, args)
        label_one(lora)
        row = scan_row(lora)
        print(f"{population}/{lora.stem}: scan {row['summary']['verdict']} ({row['summary']['risk']:.2f}) in "
              f"{row['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
