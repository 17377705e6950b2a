"""`scan-many`: scan every LoRA of a folder (or a list) against one base, with `filter-many`'s batch machinery.

Each LoRA's scan goes to `OUT/<name>/` (summary.json and report.html, as `diffmem scan --out` writes them; filtered
LoRAs are scanned like any other), and one row per LoRA to OUT/summary.json and summary.csv, merged with earlier runs' rows. Resumable: a LoRA whose folder
already holds a summary of the same file (sha256) with the same requested settings is skipped. One bad file, even
one that kills its worker, is a failed row; the batch goes on (`diffmem.batch.run_jobs`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from diffmem.batch import batch_sources, output_paths, run_jobs, write_summary
from diffmem.errors import DiffmemError, one_line
from diffmem.formats.files import read_text
from diffmem.progress import progress_bar
from diffmem.scan.run import lora_digest, scan_lora, write_scan
from diffmem.scan.score import ScanConfig

SCAN_STATUSES = ("scanned", "skipped", "failed")


@dataclass
class ScanRow:
    """One LoRA's outcome in `scan-many`: where its scan went, and the verdict with what it rests on."""

    input: str
    output: str
    status: str  # "scanned" | "skipped" | "failed"
    error: str = ""
    reason: str = ""
    verdict: str = ""
    risk: float | None = None
    largest_wen_ratio: float | None = None
    extracted_groups: int = 0
    seconds: float = 0.0


def scan_row(source: Path, output: Path, status: str, summary: dict, seconds: float = 0.0, reason: str = "") -> ScanRow:
    """A row from a scan's summary."""
    evidence = summary["evidence"]
    return ScanRow(str(source), str(output), status, reason=reason, verdict=summary["verdict"], risk=summary["risk"],
                   largest_wen_ratio=evidence["largest_wen_ratio"], extracted_groups=evidence["extracted_groups"],
                   seconds=seconds)


def failed_scan_row(source: Path, output: Path, error: str) -> ScanRow:
    """The row of a LoRA that could not be scanned."""
    return ScanRow(str(source), str(output), "failed", error=one_line(error))


def scan_folder_name(source: Path) -> str:
    """The folder a LoRA's scan goes to: its file name without the extension (a PEFT folder's own name)."""
    return source.name if source.is_dir() else source.stem


def earlier_scan(source: Path, output: Path, config: ScanConfig) -> dict | None:
    """The summary in ``output`` when it is a scan of this very file with these requested settings (settings left
    to the model, steps and guidance at None, match what the model chose), else None."""
    try:
        summary = json.loads(read_text(output / "summary.json"))
        if summary.get("lora_sha256") != lora_digest(source):
            return None
        done = summary["settings"]
    except (DiffmemError, OSError, ValueError, KeyError, TypeError):
        return None
    wanted = {key: value for key, value in asdict(config).items() if value is not None}
    return summary if all(done.get(key) == value for key, value in wanted.items()) else None


def scan_one(source: Path, output: Path, base: str, config: ScanConfig, options: dict) -> ScanRow:
    """Scan one LoRA into ``output``; any failure, a bad input or a bug an input triggers, is the row's one line."""
    started = time.perf_counter()
    try:
        result = scan_lora(source, base, config, **options)
        write_scan(result, output, protect=[source])
    except Exception as exc:  # a batch never dies of one file
        error = str(exc) if isinstance(exc, DiffmemError) else f"{source}: unexpected {type(exc).__name__}: {exc}"
        return ScanRow(str(source), str(output), "failed", error=one_line(error), seconds=time.perf_counter() - started)
    return scan_row(source, output, "scanned", result.summary(), time.perf_counter() - started)


def scan_many(
    inputs: Iterable[str | Path],
    base: str | Path,
    out_dir: str | Path,
    config: ScanConfig | None = None,
    *,
    engine: str = "process",
    workers: int | None = 1,
    recursive: bool = False,
    progress: bool = True,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    model_config: str | Path | None = None,
) -> list[ScanRow]:
    """Scan every LoRA of ``inputs`` (files, PEFT folders, folders of them) against ``base`` into ``out_dir``.

    ``workers``: scans side by side (1 by default: each scan holds the fine-tune and the base in memory, which for
    SDXL is two UNets; raise it for the world or a small model). Returns every row, this run's and earlier runs'
    for other files, as summary.json lists them."""
    config = config or ScanConfig()
    out_dir = Path(out_dir)
    inputs = [Path(path) for path in inputs]
    sources = batch_sources(inputs, out_dir, recursive)
    outputs = output_paths(sources, out_dir, inputs, name=scan_folder_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[Path, ScanRow] = {}
    todo = []
    for source in sources:
        output = outputs[source]
        earlier = earlier_scan(source, output, config)
        if earlier is not None:
            rows[source] = scan_row(source, output, "skipped", earlier, reason="already scanned (same file and "
                                    "settings)")
        else:
            todo.append((source, output))
    options = {"device": device, "dtype": dtype, "model_config": model_config}
    bar = progress_bar(total=len(todo), desc="scanning", unit="LoRA", disable=not progress)

    def on_row(source: Path, row: ScanRow) -> None:
        rows[source] = row
        bar.update()

    try:
        job = partial(scan_one, base=str(base), config=config, options=options)
        run_jobs(todo, job, failed_scan_row, on_row, engine, workers or os.cpu_count() or 1)
    finally:
        bar.close()
        ordered = [rows.get(source) or failed_scan_row(source, outputs[source],
                                                      f"{source}: not scanned: the batch stopped before it")
                   for source in sources]
        write_summary(ordered, out_dir, ScanRow, SCAN_STATUSES)
    return ordered
