"""The seed's Table 1 on the world: every fine-tuning method with and without each mitigation, and MemControl's
mask, trained by the same code and measured by `diffmem.bench` (FID, AMD, extracted images, copy rate) plus
Wen's score on the duplicated captions (the denoising-strength heuristic)."""

from __future__ import annotations

import functools
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from diffmem.bench.evaluate import BenchSettings, Probe, measure
from diffmem.errors import DiffmemError
from diffmem.formats.safetensors_io import write_atomic
from diffmem.memcontrol.mask import Mask, derive_mask, load_mask
from diffmem.memcontrol.methods import check_method, scaled_lr
from diffmem.memcontrol.mitigation import MitigationConfig
from diffmem.memcontrol.search import memorization_objective
from diffmem.memcontrol.settings import BASELINES, TABLE_MITIGATIONS
from diffmem.memcontrol.train import (
    QUICK_LR_SCALE,
    QUICK_TRAIN,
    MemControlTrainConfig,
    finetune_with_mask,
    manifest_of,
)
from diffmem.metrics.embedder import load_copy_embedder
from diffmem.mitigations.registry import training_loop_mitigations
from diffmem.report import replace_between_markers
from diffmem.world.data import FINETUNE_SETS
from diffmem.world.diffusion import WORLD_GUIDANCE
from diffmem.world.model import load_base

#: The methods the seed's Table 1 crosses with each mitigation; the others (no fine-tuning, and LoRA, which the seed
#: does not report) get their plain row only.
CROSSED = ("full", "svdiff", "difffit", "attention")
LABELS = {"none": "Freeze (no fine-tuning)", "full": "Full FT", "svdiff": "SV-DIFF", "difffit": "DiffFit",
          "attention": "Attn tuning", "lora": "LoRA"}
#: `BASELINES` and `TABLE_MITIGATIONS` (the mitigations crossed with each method in `CROSSED`) live in
#: `diffmem.memcontrol.settings`.
MITIGATION_LABELS = {"none": "", **{m.name: f" + {m.label}" for m in training_loop_mitigations()}}


@dataclass(frozen=True)
class TableConfig:
    """What the table trains and how it measures.

    Attributes:
        train: the fine-tune every row shares (method and mitigation vary per row). The world recipe is 500 x 16;
            `quick()` runs 200 x 8 on 2 faces x 300 at 10x learning rates (see there).
        wen_steps / wen_generations / guidance: sampling of Wen's score on the duplicated captions, as the
            search's (`SearchConfig`): 10 DDIM steps, 2 generations per caption, the world's guidance 3.
        mitigations: the mitigations crossed with the methods in `CROSSED`.
        methods: the baseline fine-tuning methods ("none" is the seed's "Freeze" row, trained with no mitigation).
        lr_scale: multiplies each method's own learning rate (`default_lr`) when `train.lr` is None, so a short
            run keeps the methods' published ratios (full 1e-4, SV-DIFF and DiffFit 1e-3, attention 1e-4, LoRA
            1e-4) while moving further in few steps.
    """

    train: MemControlTrainConfig = field(default_factory=MemControlTrainConfig)
    wen_steps: int = 10
    wen_generations: int = 2
    guidance: float = WORLD_GUIDANCE
    mitigations: tuple[str, ...] = TABLE_MITIGATIONS
    methods: tuple[str, ...] = BASELINES
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.lr_scale <= 0:
            raise DiffmemError(f"lr_scale must be positive, got {self.lr_scale}")
        for name in self.mitigations:
            MitigationConfig(kind=name)
        for name in self.methods:
            check_method(name)

    @classmethod
    def quick(cls) -> TableConfig:
        """The quick budget (`diffmem.memcontrol.train.QUICK_TRAIN`): 2 faces x 300 plus the other 78 once, 200
        steps of 8 images per row at 10x each method's own learning rate (full fine-tuning 1e-3). Full fine-tuning
        copies its duplicated faces there (docs/memcontrol.md, "The quick budget"); 5 faces x 100 at the same cost
        copied none."""
        return cls(train=QUICK_TRAIN, lr_scale=QUICK_LR_SCALE)


def table_rows(mask: Mask | None, mask_method: str | None, mitigations: tuple[str, ...],
               methods: tuple[str, ...] = BASELINES) -> list[tuple[str, str, bool]]:
    """(method, mitigation, uses the mask) per row, in the seed's order (methods the seed does not cross with
    mitigations, `CROSSED`, get only their plain row when "none" is among `mitigations`); MemControl rows only with
    a mask."""
    rows = []
    for m in methods:
        rows += [(m, g, False) for g in mitigations if m in CROSSED or g == "none"]
    if mask is not None:
        rows += [(mask_method, g, True) for g in mitigations]
    return rows


def trained_modules(unet, method: str, mask: Mask | None) -> tuple[str, ...] | None:
    """The attention modules a masked method trains (all of them without a mask); None for full/no fine-tuning.
    Two rows with the same method, mitigation and modules train the same model (training is deterministic)."""
    if not check_method(method).masked:
        return None
    return tuple(sorted((mask or derive_mask(unet, "layers")).modules))


def row_label(method: str, mitigation: str, masked: bool) -> str:
    name = f"MemControl ({LABELS[method]} mask)" if masked else LABELS[method]
    return name + MITIGATION_LABELS[mitigation]


def markdown_table(rows: list[dict]) -> str:
    """The rows as the seed's Table 1 columns (plus copy rate, median tiled-L2 distance of a duplicated-caption
    generation to its own face, Wen score, held-out loss, trained parameters and learning rate); a row that
    repeats an earlier row's training says so."""
    lines = ["| FT method + mitigation | FID | AMD | extracted | copy rate | own distance | Wen score | held-out loss | "
             "trained | lr |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = r["label"] + (f" (the {r['same_as']} run: same modules)" if r.get("same_as") else "")
        lr = f"{r['lr']:g}" if r.get("lr") is not None and r["trainable_parameters"] else "-"
        lines.append(f"| {label} | {r['fid']:.2f} | {r['amd']:.3f} | {r['extracted']} | {r['copy_rate']:.3f} | "
                     f"{r['own_distance']:.3f} | {r['wen']:.3f} | {r['heldout_loss']:.4f} | "
                     f"{r['trainable_parameters']} | {lr} |")
    return "\n".join(lines) + "\n"


def row_training(config: TableConfig, method: str, mitigation: str) -> MemControlTrainConfig:
    """The fine-tune of one row: the table's shared training with the row's method, mitigation and learning rate."""
    lr = None if method == "none" else scaled_lr(method, config.train.lr, config.lr_scale)
    return replace(config.train, method=method, lr=lr, mitigation=replace(config.train.mitigation, kind=mitigation))


@functools.cache
def table_base():
    """The world base, loaded once per process: `run_table` and the rows it trains in this process share it (it is
    never changed: each row fine-tunes a copy); each of a table's workers loads its own."""
    return load_base()


@functools.cache
def table_embedder():
    """The copy embedder, loaded once per process that measures rows."""
    return load_copy_embedder()


def train_and_measure(config: TableConfig, method: str, mitigation: str, mask: Mask | None) -> dict:
    """One row's numbers: fine-tune the base with the row's method, mitigation and mask, then measure it by
    `diffmem.bench` plus Wen's score on the duplicated captions. Records wall seconds (`train_s` of training,
    `total_s` with the measuring) and this process's CPU seconds (`train_cpu_s`, `cpu_s`)."""
    base, embedder = table_base(), table_embedder()
    train = row_training(config, method, mitigation)
    began, began_cpu = time.time(), time.process_time()
    result = finetune_with_mask(base, train, mask, progress=False)
    train_cpu = time.process_time() - began_cpu
    probe = Probe.from_manifest(manifest_of(result, train, mask), embedder)
    numbers, _ = measure(result.unet, probe, BenchSettings())
    captions = list(FINETUNE_SETS[train.data]("train").subset(result.duplicated).captions)
    wen = memorization_objective(result.unet, captions, config.wen_steps, config.wen_generations, config.guidance,
                                 train.seed)
    return {"method": method, "mitigation": mitigation, "mask": None if mask is None else mask.bits, "lr": train.lr,
            **numbers, "wen": round(wen, 4), "trainable_parameters": result.trainable_parameters,
            "train_s": round(result.wall_time_s), "total_s": round(time.time() - began),
            "train_cpu_s": round(train_cpu), "cpu_s": round(time.process_time() - began_cpu)}


def expected_cost(method: str, mitigation: str) -> int:
    """A rank of a row's training cost, to start the dearest rows first when rows run side by side: the threshold
    mitigation adds a gradient-free UNet pass per batch, full fine-tuning updates every weight, no fine-tuning
    trains nothing."""
    return 2 * (mitigation == "threshold") + (method == "full") - 3 * (method == "none")


def run_table(out: str | Path, config: TableConfig | None = None, mask_path: str | Path | None = None,
              progress: bool = True, workers: int = 1) -> list[dict]:
    """Train and measure every row; write `rows.json` and `table.md` to `out` as rows finish, in the seed's order
    (a stopped run keeps the rows it finished, and running it again into the same `out` trains only the rest,
    `finished_rows`). `mask_path`: a mask from `diffmem memcontrol search` (its method is read from it). A row
    that would train the same modules with the same method and mitigation as an earlier one (MemControl's row when
    the searched mask is all on) reuses that row's numbers instead of training again, with 0 seconds. `workers` > 1 trains rows side by side in that many processes (each on `config.train.threads`
    threads), dearest first; every row is deterministic, so its numbers do not depend on the worker count."""
    config = config or TableConfig()
    if workers < 1:
        raise DiffmemError(f"workers must be at least 1, got {workers}")
    out = Path(out)
    mask, mask_method = None, None
    if mask_path is not None:
        mask = load_mask(mask_path)
        record = json.loads(Path(mask_path).read_text())
        mask_method = record.get("search", {}).get("method")
        if mask_method is None:
            raise DiffmemError("mask has no `search.method`: pass a mask written by `diffmem memcontrol search`", mask_path)
    planned = table_rows(mask, mask_method, config.mitigations, config.methods)
    if not planned:
        raise DiffmemError("no row to measure: give --methods, or a --mask for the MemControl rows", out)
    out.mkdir(parents=True, exist_ok=True)
    base = table_base()
    # one training per distinct (method, mitigation, trained modules); later rows with the same key repeat it
    keys = [(method, mitigation, trained_modules(base, method, mask if masked else None))
            for method, mitigation, masked in planned]
    first_row = {}
    for index, key in enumerate(keys):
        first_row.setdefault(key, index)
    mask_bits = None if mask is None else mask.bits
    finished = finished_rows(out / "rows.json", config, planned, mask_bits, set(first_row.values()))
    jobs = sorted((i for i in first_row.values() if i not in finished), key=lambda i: -expected_cost(*planned[i][:2]))

    def record(index: int, numbers: dict) -> None:
        finished[index] = {"label": row_label(*planned[index]), **numbers}
        if progress:
            print(json.dumps(finished[index]), flush=True)
        rows = table_so_far(planned, keys, first_row, finished, mask_bits)
        summary = {"settings": asdict(config), "mask_file": None if mask_path is None else str(mask_path), "rows": rows}
        write_atomic((json.dumps(summary, indent=2) + "\n").encode(), out / "rows.json")
        write_atomic(markdown_table(rows).encode(), out / "table.md")

    def job_arguments(index: int) -> tuple:
        method, mitigation, masked = planned[index]
        return config, method, mitigation, mask if masked else None

    if workers == 1:
        for index in sorted(jobs):
            record(index, train_and_measure(*job_arguments(index)))
    else:
        # spawn, not fork: a forked child inherits torch's OpenMP thread pool in a broken state and can hang
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(train_and_measure, *job_arguments(index)): index for index in jobs}
            for future in as_completed(futures):
                if future.exception() is not None:  # stop now, not after every queued row has trained
                    pool.shutdown(wait=False, cancel_futures=True)
                record(futures[future], future.result())
    return table_so_far(planned, keys, first_row, finished, mask_bits)


def finished_rows(path: Path, config: TableConfig, planned: list[tuple[str, str, bool]], mask_bits: str | None,
                  trained: set[int]) -> dict[int, dict]:
    """The rows an earlier run into the same folder finished (its `rows.json`), by their index in `planned`, so that
    a stopped table resumes where it stopped. Only rows that train here (`trained`: not a repeat of an earlier row)
    are taken, only from a run with the same settings (rows included) and the same mask bits for the MemControl rows;
    a `rows.json` written otherwise is refused rather than mixed into this table."""
    if not path.exists():
        return {}
    run = read_table_run(path)
    if run["settings"] != json.loads(json.dumps(asdict(config))):
        # resuming would rewrite this file with this run's rows only: another table belongs in another folder
        raise DiffmemError("written by a table with other settings or rows; pass another --out (`diffmem memcontrol "
                           "collect` merges tables)", path)
    labels = {row_label(*planned[i]): i for i in trained}
    finished = {}
    for row in run["rows"]:
        index = labels.get(row["label"])
        if index is None or "same_as" in row:
            continue
        if planned[index][2] and row.get("mask") != mask_bits:
            raise DiffmemError(f"its {row['label']} row was trained with mask {row.get('mask')}, not {mask_bits}; "
                               "pass another --out", path)
        finished[index] = row
    return finished


def table_so_far(planned: list[tuple[str, str, bool]], keys: list[tuple], first_row: dict[tuple, int],
                 finished: dict[int, dict], mask_bits: str | None) -> list[dict]:
    """The planned rows whose training has finished, in the planned order; a row repeating an earlier row's training
    gets its numbers, its own label and mask (`mask_bits` for the MemControl rows), `same_as` and 0 seconds."""
    rows = []
    for index, ((method, mitigation, masked), key) in enumerate(zip(planned, keys)):
        source = first_row[key]
        if source not in finished:
            continue
        if source == index:
            rows.append(finished[index])
        else:
            # the same modules trained the same way: a deterministic run would repeat that row to the digit
            rows.append({**finished[source], "label": row_label(method, mitigation, masked),
                         "mask": mask_bits if masked else None,
                         "same_as": finished[source]["label"], "train_s": 0, "total_s": 0, "train_cpu_s": 0,
                         "cpu_s": 0})
    return rows


def table_markers(name: str) -> tuple[str, str]:
    """The comment lines around a generated table called `name` in a markdown document."""
    return f"<!-- memcontrol table {name} start -->", f"<!-- memcontrol table {name} end -->"


def updated_doc(doc: str | Path, name: str, table: str) -> str:
    """`doc`'s text with `table` (markdown) between `name`'s markers; errors name the document."""
    doc = Path(doc)
    try:
        text = doc.read_text()
    except OSError as error:
        raise DiffmemError(f"cannot read the document: {error.strerror}", doc) from None
    try:
        return replace_between_markers(text, *table_markers(name), table)
    except DiffmemError as error:
        raise DiffmemError(error.problem, doc) from None


def write_table_into(doc: str | Path, name: str, table: str) -> None:
    """Put `table` (markdown) between `name`'s markers in `doc` (atomically)."""
    write_atomic(updated_doc(doc, name, table).encode(), Path(doc))


def row_order(row: dict) -> tuple[int, int]:
    """Sort key of a row in the seed's order: methods as `BASELINES`, MemControl last, mitigations as
    `TABLE_MITIGATIONS`."""
    method = len(BASELINES) if row.get("mask") is not None else BASELINES.index(row["method"])
    return method, TABLE_MITIGATIONS.index(row["mitigation"])


def read_table_run(path: str | Path) -> dict:
    """A `run_table` output (`rows.json`): its settings and rows; errors name the file."""
    try:
        record = json.loads(Path(path).read_text())
        run = {"settings": dict(record["settings"]), "rows": list(record["rows"])}
        if not all(isinstance(row, dict) and "label" in row for row in run["rows"]):
            raise ValueError("a row without a label")
        return run
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DiffmemError(f"cannot read a table's rows: {error!r}", path) from None


def settings_except(settings: dict, varied: tuple[str, ...], train_varied: tuple[str, ...] = ()) -> dict:
    """`settings` of a table run without the keys that may differ between runs merged or compared."""
    kept = {k: v for k, v in settings.items() if k not in varied}
    kept["train"] = {k: v for k, v in settings["train"].items() if k not in train_varied}
    return kept


def collect_rows(paths: list[str | Path]) -> list[dict]:
    """The rows of several `run_table` outputs (`rows.json`; one table split over processes), in the seed's order.
    The runs must share every setting but the methods and mitigations; a row measured twice is an error."""
    rows: list[dict] = []
    shared = None
    for path in paths:
        run = read_table_run(path)
        settings = settings_except(run["settings"], ("methods", "mitigations"))
        if shared is not None and settings != shared:
            raise DiffmemError("these rows were measured with other settings than the first file's", path)
        shared = settings
        rows += run["rows"]
    labels = [r["label"] for r in rows]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise DiffmemError(f"rows measured more than once: {', '.join(repeated)}")
    return sorted(rows, key=row_order)


#: The measured columns `seed_spread` summarises: key in a row, heading, decimals.
SPREAD_COLUMNS = (("copy_rate", "copy rate", 2), ("own_distance", "own distance", 3), ("amd", "AMD", 3),
                  ("fid", "FID", 2), ("heldout_loss", "held-out loss", 4), ("wen", "Wen score", 2))


def seed_spread(paths: list[str | Path]) -> list[dict]:
    """Per row, the mean, minimum and maximum of each `SPREAD_COLUMNS` column over table runs (one `rows.json`
    each) that differ only in their seed, which picks the duplicated images and seeds the training. Every run must
    have the same rows."""
    runs = [read_table_run(path) for path in paths]
    if len(runs) < 2:
        raise DiffmemError("a spread needs the rows of at least two seeds")
    shared = settings_except(runs[0]["settings"], (), ("seed",))
    seeds = [run["settings"]["train"]["seed"] for run in runs]
    for path, run in zip(paths, runs):
        if settings_except(run["settings"], (), ("seed",)) != shared:
            raise DiffmemError("these rows were measured with other settings than the first file's (only the seed "
                               "may differ)", path)
        if seeds.count(run["settings"]["train"]["seed"]) > 1:
            raise DiffmemError(f"seed {run['settings']['train']['seed']} is given twice", path)
    labels = [r["label"] for r in runs[0]["rows"]]
    for path, run in zip(paths, runs):
        if sorted(r["label"] for r in run["rows"]) != sorted(labels):
            raise DiffmemError("this run's rows are not the first file's rows", path)
    spread = []
    for label in labels:
        measured = [next(r for r in run["rows"] if r["label"] == label) for run in runs]
        row = {"label": label, "seeds": seeds}
        for key, _, _ in SPREAD_COLUMNS:
            values = [float(r[key]) for r in measured]
            row[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
        spread.append(row)
    return spread


def spread_table(spread: list[dict]) -> str:
    """`seed_spread`'s rows as markdown: each cell the mean over the seeds and, in brackets, the lowest and highest."""
    lines = ["| FT method + mitigation | " + " | ".join(heading for _, heading, _ in SPREAD_COLUMNS) + " |",
             "|---" * (len(SPREAD_COLUMNS) + 1) + "|"]
    for row in spread:
        cells = [f"{row[key]['mean']:.{digits}f} ({row[key]['min']:.{digits}f} to {row[key]['max']:.{digits}f})"
                 for key, _, digits in SPREAD_COLUMNS]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
