"""Filter many LoRA files against one base: a local process pool (default) or a Ray cluster.

Anchors are computed once, in the parent, for every base weight any input touches, and written to the anchor
cache; workers only read them. Resumable: an input whose output already records the same source hash and config is
skipped. One bad file is reported in the summary and does not stop the batch.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from diffmem.anchors import AnchorStore
from diffmem.errors import DiffmemError
from diffmem.filters import FilterConfig
from diffmem.formats.base import open_base, resolve_targets
from diffmem.formats.lora import read_lora
from diffmem.formats.safetensors_io import SafetensorsFile, sha256_file, write_atomic
from diffmem.pipeline import filter_file, resolve_device

ENGINES = ("process", "ray")


@dataclass
class BatchRow:
    """One input's outcome."""

    input: str
    output: str
    status: str  # "filtered" | "skipped" | "failed"
    error: str = ""
    channels_kept: int = 0
    channels_total: int = 0
    energy_kept: float = 0.0
    anchors_computed: int = 0  # by this file's worker; 0 when the batch's shared anchors covered it
    seconds: float = 0.0


def find_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """LoRA files and PEFT folders named directly or found (non-recursively) in the given folders, sorted."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir() and not (path / "adapter_config.json").exists():
            found.extend(sorted(p for p in path.iterdir() if p.suffix == ".safetensors" or (p / "adapter_config.json").exists()))
        else:
            found.append(path)
    return sorted(dict.fromkeys(found))


def output_path(source: Path, out_dir: Path) -> Path:
    """``<out_dir>/<name>.filtered.safetensors`` (a PEFT folder keeps being a folder: ``<name>.filtered``)."""
    if source.is_dir():
        return out_dir / f"{source.name}.filtered"
    return out_dir / f"{source.stem}.filtered{source.suffix or '.safetensors'}"


def already_done(source: Path, output: Path, config: FilterConfig) -> bool:
    """Whether ``output`` exists and records this source's hash and this config (so re-running is a no-op)."""
    header = output / "adapter_model.safetensors" if output.is_dir() else output
    if not header.is_file() or not source.is_file():
        return False
    try:
        metadata = SafetensorsFile(header).metadata
    except DiffmemError:
        return False
    return (
        metadata.get("diffmem.source_sha256") == sha256_file(source)
        and metadata.get("diffmem.config") == json.dumps(config.to_dict(), sort_keys=True)
    )


def warm_anchors(
    inputs: Sequence[Path], base_path: Path, config: FilterConfig, cache_dir: Path | None, device: str = "cpu"
) -> None:
    """Compute, once, the anchors of every base weight that any readable input touches, into the cache."""
    energy = getattr(config, "energy", None)
    if energy is None:
        return
    base = open_base(base_path)
    store = AnchorStore(base, cache_dir=cache_dir, device=device)
    for source in inputs:
        try:
            lora = read_lora(source)
            lookups = {name: (m.lookup, tuple(m.weight_shape)) for name, m in lora.modules.items()}
            targets = resolve_targets(lookups, base, lora.path, metadata=lora.metadata)
        except DiffmemError:
            continue  # reported by the worker that processes this file
        for target in targets.values():
            store.get(target, energy, getattr(config, "anchor_rank", None))
    store.flush()


def filter_one(source: Path, base: Path, output: Path, config: FilterConfig, options: dict) -> BatchRow:
    """Filter one file, catching a user-input error into the row (a bug still raises)."""
    started = time.perf_counter()
    try:
        report = filter_file(source, base, output, config, **options)
    except DiffmemError as exc:
        return BatchRow(str(source), str(output), "failed", error=str(exc), seconds=time.perf_counter() - started)
    return BatchRow(
        str(source), str(output), "filtered", channels_kept=report.channels_kept, channels_total=report.channels_total,
        energy_kept=report.energy_kept, anchors_computed=report.anchors_computed, seconds=time.perf_counter() - started,
    )


def threads_per_worker(workers: int, cpus: int) -> int:
    """Torch threads for each of ``workers`` processes sharing ``cpus`` cores (at least one)."""
    return max(1, cpus // max(1, workers))


def filter_many(
    inputs: Iterable[str | Path],
    base: str | Path,
    out_dir: str | Path,
    config: FilterConfig,
    *,
    engine: str = "process",
    workers: int | None = None,
    reduce_rank: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    device: str = "cpu",
) -> list[BatchRow]:
    """Filter every input into ``out_dir`` and write ``summary.csv`` and ``summary.json`` there."""
    if engine not in ENGINES:
        raise DiffmemError(f"engine must be one of {ENGINES}, got {engine!r}")
    resolve_device(device)  # a missing GPU is a clear error before any work, not a traceback in a worker
    base, out_dir = Path(base), Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    sources = find_inputs(inputs)
    if not sources:
        raise DiffmemError("no LoRA files found in the given inputs")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[Path, BatchRow] = {}
    todo = []
    for source in sources:
        output = output_path(source, out_dir)
        if already_done(source, output, config):
            rows[source] = BatchRow(str(source), str(output), "skipped")
        else:
            todo.append((source, output))
    warm_anchors([source for source, _ in todo], base, config, cache_dir, device)
    options = {"reduce_rank": reduce_rank, "cache_dir": cache_dir, "device": device}
    bar = tqdm(total=len(todo), desc="filtering", unit="file", disable=not progress)
    if engine == "ray":
        results = run_on_ray(todo, base, config, options, workers)
        for (source, _), row in zip(todo, results):
            rows[source] = row
            bar.update()
    else:
        # spawn, not fork: a forked child inherits torch's OpenMP thread pool in a broken state and can hang.
        # Each worker gets its share of the cores for the filter's own threads, so workers do not oversubscribe them.
        count = workers or os.cpu_count() or 1
        with ProcessPoolExecutor(max_workers=count, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads,
                                 initargs=(threads_per_worker(count, os.cpu_count() or 1),)) as pool:
            futures = {pool.submit(filter_one, source, base, output, config, options): source for source, output in todo}
            for future in as_completed(futures):
                rows[futures[future]] = future.result()
                bar.update()
    bar.close()
    ordered = [rows[source] for source in sources]
    write_summary(ordered, out_dir)
    return ordered


def run_on_ray(todo, base: Path, config: FilterConfig, options: dict, workers: int | None) -> list[BatchRow]:
    """The same work as remote Ray tasks, on the cluster ``ray.init()`` connects to (or a local one)."""
    try:
        import ray
    except ImportError:
        raise DiffmemError("--engine ray needs Ray: pip install 'diffmem[ray]'") from None
    if not ray.is_initialized():
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(filter_one)
    return ray.get([remote.remote(source, base, output, config, options) for source, output in todo])


def write_summary(rows: Sequence[BatchRow], out_dir: Path) -> None:
    """``summary.csv`` and ``summary.json`` with one row per input."""
    records = [asdict(row) for row in rows]
    write_atomic(json.dumps(records, indent=2).encode(), out_dir / "summary.json")
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(BatchRow.__dataclass_fields__))
    writer.writeheader()
    writer.writerows(records)
    write_atomic(table.getvalue().encode(), out_dir / "summary.csv")
