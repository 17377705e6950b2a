"""Run the benchmark: train (or reuse) each fine-tune of the grid, apply every variant, measure, append a row.

Rows go to ``<work>/results.jsonl`` one per (fine-tune, variant, settings), written as soon as measured, so a run
that stops resumes where it was and a longer grid extends a shorter one. A cell measured again (to add a measurement
that its row lacks, `run_bench(fill_missing=...)`) appends a new row, and the last row of a cell is the one that
counts (`current_rows`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from diffmem.bench.evaluate import BenchSettings, Probe, measure
from diffmem.bench.grid import OVERTRAIN_FACTOR, FinetuneSpec, GridCell, Variant, reference_variants
from diffmem.errors import DiffmemError
from diffmem.formats.base import BaseCheckpoint, open_base
from diffmem.formats.lora import LoraFile, read_lora
from diffmem.formats.safetensors_io import write_atomic
from diffmem.pipeline import FilterReport, filter_lora
from diffmem.progress import progress_bar
from diffmem.report import image_grid, save_png
from diffmem.world.check import EXAMPLE_LORA_SHA256, example_lora_path
from diffmem.world.lora import apply_lora
from diffmem.world.model import BASE_FILE, assets_dir, load_base
from diffmem.world.train import FinetuneConfig, finetune

RESULTS_FILE = "results.jsonl"


def settings_id(settings: BenchSettings) -> str:
    """Short hash of the measurement settings: rows measured differently are never mixed."""
    return hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:10]


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a results file; a torn last line (a run killed mid-write) is ignored, any other bad line is an
    error naming the file."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise DiffmemError(f"line {number} is not JSON: the results file is damaged", path) from None
    return rows


def current_rows(path: str | Path, settings: BenchSettings) -> list[dict]:
    """The rows of a results file measured with `settings`, the last of each (fine-tune, variant) only, in the order
    the cells were first measured."""
    sid = settings_id(settings)
    latest: dict[tuple[str, str], dict] = {}
    for row in read_rows(path):
        if row.get("settings_id") == sid:
            latest[row["finetune"], row["variant"]] = row
    return list(latest.values())


def append_row(path: Path, row: dict) -> None:
    """Append one row and push it to disk before the next measurement starts."""
    with open(path, "a") as handle:
        handle.write(json.dumps(row, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def add_probe_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """The options every benchmark probe takes: where its rows go (`out` by default), its torch threads, and
    `--collect FOLDER [--json FILE]` to gather a folder's rows instead of measuring (`collect_probe`)."""
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--collect", type=Path, default=None, help="only gather the rows of this folder")
    parser.add_argument("--json", type=Path, default=None, help="with --collect: write the rows here")


def collect_probe(folder: Path, json_out: Path | None = None, extra: dict | None = None) -> list[dict]:
    """The rows a benchmark probe appended to `folder`/rows.jsonl. With `json_out` they are also written there as
    one JSON file: the commands that made them, the bench's measurement settings, `extra`, the rows, and the held-out
    curve each tracked run recorded (its ``*-final.json`` manifest), so a doc's table can be derived again.

    Rows already in `json_out` that no row of the folder repeats (the same fields, the seconds aside) are kept
    before the folder's, and so are curves of runs the folder does not hold: a later session's folder holds only
    its own runs, and the doc's table keeps the earlier ones. Returns the rows written (the folder's alone without
    `json_out`)."""
    rows = read_rows(folder / "rows.jsonl")
    if json_out is None:
        return rows
    curves = {path.stem: json.loads(path.read_text())["heldout_loss"] for path in sorted(folder.glob("*-final.json"))}
    if json_out.exists():
        earlier = json.loads(json_out.read_text())
        def measured(row: dict) -> str:
            return json.dumps({k: v for k, v in row.items() if k != "seconds"}, sort_keys=True)

        mine = set(map(measured, rows))
        rows = [r for r in earlier["rows"] if measured(r) not in mine] + rows
        curves = {stem: curve for stem, curve in earlier["heldout_curves"].items() if stem not in curves} | curves
    record = {"commands": sorted({r["command"] for r in rows}), "settings": asdict(BenchSettings()),
              **(extra or {}), "rows": rows, "heldout_curves": curves}
    write_atomic((json.dumps(record, indent=2) + "\n").encode(), json_out)
    return rows


def finetune_path(spec: FinetuneSpec, work: Path) -> Path:
    """Where the grid keeps a fine-tune's LoRA (its manifest sits beside it)."""
    return work / "finetunes" / f"{spec.name}.safetensors"


def ensure_finetune(spec: FinetuneSpec, work: Path, progress: bool = True) -> Path:
    """The fine-tune's LoRA file: already in `work`, copied from the committed example (same recipe), or trained
    now (about 15 minutes on one CPU thread).

    A "tuned" stage trains the recipe's steps with the held-out loss tracked and keeps the best step's weights
    (the full run is kept too, as the "final" stage of the same recipe with tracking); an "over-trained" stage
    trains `OVERTRAIN_FACTOR` times its tuned stage's best step (the tuned stage is made first if missing)."""
    path = finetune_path(spec, work)
    if path.exists() and path.with_suffix(".json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if spec.stage == "tuned":
        tracked = path.with_name(f"{spec.tracked_name}.safetensors")
        finetune(tracked, spec.finetune_config(), progress=progress, best_out=path)
        return path
    if spec.stage == "over-trained":
        tuned = json.loads(ensure_finetune(replace(spec, stage="tuned"), work, progress).with_suffix(".json")
                           .read_text())
        config = replace(spec.finetune_config(), steps=OVERTRAIN_FACTOR * tuned["trained_steps"])
        finetune(path, config, progress=progress)
        return path
    if spec.finetune_config() == FinetuneConfig():
        example = example_lora_path()
        from diffmem.formats.safetensors_io import sha256_file

        if sha256_file(example) != EXAMPLE_LORA_SHA256:
            raise DiffmemError("the committed example LoRA does not match its pinned sha256", example)
        shutil.copyfile(example.with_suffix(".json"), path.with_suffix(".json.partial"))
        shutil.copyfile(example, path)
        os.replace(path.with_suffix(".json.partial"), path.with_suffix(".json"))
        return path
    finetune(path, spec.finetune_config(), progress=progress)
    return path


def variant_lora(
    variant: Variant,
    lora: LoraFile | str | Path,
    base: BaseCheckpoint | str | Path,
    *,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> tuple[LoraFile, FilterReport | None, dict]:
    """The LoRA of a variant that is not the base model, the channel filter's report (None for a transform), and
    what its row records of what was kept: channels and energy for a channel filter; for a transform
    (`Variant.transform`, run on the CPU) the share of the input's update energy that its output holds
    (`LoraFile.update_energy`), and no channels."""
    if variant.transform is None:
        result = filter_lora(lora, base, variant.config, cache_dir=cache_dir, device=device)
        report = result.report
        return result.lora, report, {"channels_kept": report.channels_kept, "channels_total": report.channels_total,
                                     "energy_kept": round(report.energy_kept, 4)}
    lora = lora if isinstance(lora, LoraFile) else read_lora(lora)
    out = variant.transform(lora, base if isinstance(base, BaseCheckpoint) else open_base(base))
    total = lora.update_energy()
    return out, None, {"energy_kept": round(out.update_energy() / total, 4) if total > 0 else 1.0}


def variant_row(spec: FinetuneSpec, variant: Variant, kept: dict, numbers: dict, settings: BenchSettings,
                seconds: float) -> dict:
    """One results row: what was run, what the variant kept (`variant_lora`'s; empty for the base), what was
    measured."""
    row = {
        "finetune": spec.name, "setting": spec.setting, "data": spec.data, "rank": spec.rank, "conv": spec.conv,
        "duplicate": list(spec.duplicate), "seed": spec.seed, "stage": spec.stage,
        "variant": variant.key, "method": variant.method, "budget": variant.budget, "level": variant.level,
        "settings_id": settings_id(settings), "settings": asdict(settings), "seconds": round(seconds, 1),
    }
    return row | kept | numbers


#: How far a LoRA file's own measurement may move and still count as the weights its earlier rows measured: the
#: training is seeded but not bit-for-bit the same on another machine (float rounding in the kernels), which moves
#: the numbers of the same weights by about 1e-6 in held-out loss and 1e-4 in AMD; a fine-tune stopped at another
#: step (its held-out curve's minimum moved) differs by far more.
SAME_WEIGHTS = {"copy_rate": 0.0, "heldout_loss": 5e-5, "amd": 5e-3}


def other_weights(earlier: list[dict], sha256: str, lora_numbers: Callable[[], dict]) -> str | None:
    """Why a fine-tune's new rows would measure other weights than its `earlier` rows did, or None when they would
    not. Rows that record the file's sha256 are compared by it; older rows without one, by measuring the file's
    LoRA again (`lora_numbers()`, only then) against their ``lora`` row within `SAME_WEIGHTS`: a fine-tune trained
    again in a later session (its file is not committed) may have stopped at another step."""
    if not earlier:
        return None
    recorded = {r["lora_sha256"] for r in earlier if "lora_sha256" in r}
    if recorded:
        return None if recorded == {sha256} else f"its earlier rows measured another file (sha256 {sorted(recorded)})"
    lora_row = next((r for r in earlier if r["variant"] == "lora"), None)
    if lora_row is None:
        return None
    now = lora_numbers()
    moved = {k: (lora_row[k], now[k]) for k, tolerance in SAME_WEIGHTS.items() if abs(now[k] - lora_row[k]) > tolerance}
    if moved:
        return ("the LoRA file does not reproduce its earlier rows' measurement (" +
                ", ".join(f"{k} {old} then, {new} now" for k, (old, new) in moved.items()) + ")")
    return None


def run_bench(
    work: str | Path,
    cells: Iterable[GridCell],
    settings: BenchSettings | None = None,
    threads: int = 1,
    progress: bool = True,
    train_missing: bool = True,
    fill_missing: Sequence[str] = (),
) -> list[dict]:
    """Measure every cell's variants on its fine-tune (training missing fine-tunes), skipping rows already in
    ``<work>/results.jsonl``. Returns the file's rows measured with `settings` (default `BenchSettings()`),
    `current_rows`. Without `train_missing`, cells whose fine-tune is not in `work` yet are skipped (e.g. while
    another process trains them). A row that lacks one of the `fill_missing` fields (a measurement added to
    `measure` after it was made, e.g. ``any_copy_rate``) does not count as done: its cell is measured again and the
    new row replaces it, provided the fine-tune's file reproduces the earlier rows (`other_weights`)."""
    settings = settings or BenchSettings()
    torch.set_num_threads(threads)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    results = work / RESULTS_FILE
    done = {(r["finetune"], r["variant"]) for r in current_rows(results, settings)
            if all(field in r for field in fill_missing)}
    base_path = assets_dir() / BASE_FILE
    base_unet = load_base()
    for cell in cells:
        spec = cell.spec
        if not train_missing and not finetune_path(spec, work).with_suffix(".json").exists():
            continue
        lora_path = ensure_finetune(spec, work, progress)
        default = filter_lora(lora_path, base_path, reference_variants()[2].config, cache_dir=work / "anchors")
        default_fraction = default.report.channels_kept / default.report.channels_total
        variants = reference_variants() + cell.plan.variants(default_fraction)
        todo = [v for v in variants if (spec.name, v.key) not in done]
        if not todo:
            continue
        manifest = json.loads(lora_path.with_suffix(".json").read_text())
        probe = Probe.from_manifest(manifest)
        earlier = [r for r in current_rows(results, settings) if r["finetune"] == spec.name]
        problem = other_weights(earlier, manifest["sha256"],
                                lambda path=lora_path, probe=probe: measure(apply_lora(base_unet, path), probe,
                                                                           settings)[0])
        if problem is not None:
            warnings.warn(f"{spec.name}: {problem}; its new variants are not measured (move its rows aside to "
                          f"measure it afresh)", stacklevel=1)
            continue
        for variant in progress_bar(todo, desc=spec.name, unit="variant", disable=not progress):
            started = time.perf_counter()
            kept = {}
            if variant.is_base:
                unet = base_unet
            else:
                lora, _, kept = variant_lora(variant, lora_path, base_path, cache_dir=work / "anchors")
                unet = apply_lora(base_unet, lora)
            numbers, generated = measure(unet, probe, settings)
            save_png(image_grid(generated[:: settings.generations], columns=len(probe.duplicated)),
                     work / "images" / spec.name / f"{variant.key}.png")
            row = variant_row(spec, variant, kept, numbers, settings, time.perf_counter() - started)
            append_row(results, row | {"lora_sha256": manifest["sha256"]})
            done.add((spec.name, variant.key))
    return current_rows(results, settings)
