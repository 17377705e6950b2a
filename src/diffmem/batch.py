"""Filter many LoRA files against one base: a local process pool (default) or a Ray cluster.

The machinery is shared with `diffmem scan-many` (`diffmem.scan.batch`): `run_jobs` runs any per-file job in the
pool or on Ray and turns every failure into that file's row, and `write_summary` merges a run's rows with earlier
runs' into summary.json and summary.csv.

Anchors are computed once, in the parent, for every base weight any input touches, and written to the anchor
cache; workers only read them. Resumable: an input whose output already records the same source hash and config is
skipped. One bad file, even one that kills its worker, is a failed row in the summary and does not stop the batch;
workers die with the parent.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import io
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import torch

from diffmem import __version__
from diffmem.anchors import AnchorStore
from diffmem.errors import DiffmemError, one_line
from diffmem.filters import FilterConfig
from diffmem.formats.base import open_base, resolve_lora_targets
from diffmem.formats.files import read_text
from diffmem.formats.lora import PEFT_CONFIG, PEFT_WEIGHTS, read_lora
from diffmem.formats.safetensors_io import SafetensorsFile, sha256_file, write_atomic
from diffmem.pipeline import filter_file, filtered_name, resolve_device
from diffmem.progress import progress_bar

ENGINES = ("process", "ray")


@dataclass
class BatchRow:
    """One input's outcome."""

    input: str
    output: str
    status: str  # "filtered" | "skipped" | "failed"
    error: str = ""
    reason: str = ""  # why a row was skipped
    channels_kept: int = 0
    channels_total: int = 0
    energy_kept: float = 0.0
    anchors_computed: int = 0  # by this file's worker; 0 when the batch's shared anchors covered it
    skipped_unmapped: int = 0  # modules written back unchanged with skip_unmapped
    seconds: float = 0.0


def is_peft_folder(path: Path) -> bool:
    """Whether ``path`` is a native PEFT adapter folder (an input itself, not a folder to search)."""
    return path.is_dir() and (path / PEFT_CONFIG).is_file()


def is_candidate(path: Path) -> bool:
    """Whether a folder entry is a LoRA to filter: a `.safetensors` file (or any non-folder so named, which the worker
    then refuses with a clear reason) or a PEFT adapter folder."""
    if path.suffix == ".safetensors":
        return not path.is_dir()
    return is_peft_folder(path)


def find_inputs(paths: Iterable[str | Path], exclude: Path | None = None, recursive: bool = False) -> list[Path]:
    """LoRA files and PEFT folders named directly or found in the given folders (their subfolders too with
    ``recursive``; a PEFT folder is an input, not searched), sorted.

    ``exclude`` (the batch's output folder) is never read as input, named or found: re-filtering earlier outputs
    would stack ``x.filtered.filtered...`` files on every run.
    """
    excluded = Path(os.path.realpath(exclude)) if exclude is not None else None

    def outside(path: Path) -> bool:
        return excluded is None or not Path(os.path.realpath(path)).is_relative_to(excluded)

    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir() and not is_peft_folder(path):
            if outside(path):
                found.extend(folder_inputs(path, outside, recursive))
        elif outside(path) or not path.exists():
            found.append(path)
    return sorted(dict.fromkeys(found))


def folder_inputs(folder: Path, keep, recursive: bool) -> list[Path]:
    """The candidates in ``folder`` that ``keep(path)`` accepts, descending into subfolders with ``recursive`` (but
    not into PEFT folders, nor through symlinked folders, which could loop)."""
    found = []
    for path in sorted(folder.iterdir()):
        if not keep(path):
            continue
        if is_candidate(path):
            found.append(path)
        elif recursive and path.is_dir() and not path.is_symlink():
            found.extend(folder_inputs(path, keep, recursive))
    return found


def batch_sources(inputs: Sequence[Path], out_dir: Path, recursive: bool = False) -> list[Path]:
    """The LoRAs a batch works on (`find_inputs`, never inside ``out_dir``); none found is one clear error."""
    sources = find_inputs(inputs, exclude=out_dir, recursive=recursive)
    if not sources:
        if any(os.path.realpath(path) == os.path.realpath(out_dir) for path in inputs):
            raise DiffmemError("the input folder is the --out folder; diffmem never reads its own output folder as "
                               "input: write the outputs to a folder of their own", out_dir)
        raise DiffmemError("no LoRA files found in the given inputs")
    return sources


def output_paths(sources: Sequence[Path], out_dir: Path, inputs: Sequence[Path] = (),
                 name: Callable[[Path], str] = filtered_name) -> dict[Path, Path]:
    """Each source's output in ``out_dir``, at its path relative to the folder the named ``inputs`` share (a named
    folder counts as itself, a named file or PEFT folder as its parent; the sources' own folders without
    ``inputs``): two files of the same name in different folders (``a/x``, ``b/x``) get two outputs (``out/a/x…``,
    ``out/b/x…``), a recursive search keeps its subfolders, and one folder of inputs is written flat. ``name``
    gives an output's file name from its source (the filtered LoRA's by default)."""
    absolute = [Path(os.path.abspath(source)) for source in sources]
    named = [Path(os.path.abspath(path)) for path in inputs]
    folders = [path if path.is_dir() and not is_peft_folder(path) else path.parent
               for path in named] or [path.parent for path in absolute]
    root = Path(os.path.commonpath([str(folder) for folder in folders + [path.parent for path in absolute]]))
    return {source: out_dir / path.parent.relative_to(root) / name(source)
            for source, path in zip(sources, absolute)}


def header_metadata(path: Path) -> dict[str, str] | None:
    """The safetensors metadata of a LoRA file or PEFT folder, or None when it cannot be read."""
    header = path / PEFT_WEIGHTS if path.is_dir() else path
    try:
        return SafetensorsFile(header).metadata
    except DiffmemError:
        return None


def written_by_diffmem(source: Path) -> bool:
    """Whether ``source`` is a file diffmem wrote (a filtered output or an anchor shard: its header has
    ``diffmem.*`` metadata), which a batch never filters again."""
    metadata = header_metadata(source) or {}  # unreadable: the worker reports why
    return any(key.startswith("diffmem.") for key in metadata)


def already_done(source: Path, output: Path, config: FilterConfig) -> bool:
    """Whether ``output`` exists and records this source's hash and this config (so re-running is a no-op)."""
    if not output.exists() or not source.is_file():
        return False
    metadata = header_metadata(output)
    if metadata is None:
        return False
    try:
        source_hash = sha256_file(source)
    except DiffmemError:
        return False
    return (
        metadata.get("diffmem.source_sha256") == source_hash
        and metadata.get("diffmem.config") == json.dumps(config.to_dict(), sort_keys=True)
    )


def warm_anchors(
    inputs: Sequence[Path], base_path: Path, config: FilterConfig, cache_dir: Path | None, device: str = "cpu",
    skip_unmapped: bool = False, progress: bool = False,
) -> None:
    """Compute, once, the anchors of every base weight that any readable input touches, into the cache."""
    energy = getattr(config, "energy", None)
    if energy is None:
        return
    base = open_base(base_path)
    store = AnchorStore(base, cache_dir=cache_dir, device=device)
    for source in progress_bar(inputs, desc="anchors", unit="file", disable=not progress, leave=False):
        try:
            lora = read_lora(source)
            targets = resolve_lora_targets(lora, base, skip_unmapped=skip_unmapped)
        except Exception:  # any bad file is reported by the worker that processes it
            continue
        for target in targets.values():
            store.get(target, energy, getattr(config, "anchor_rank", None))
    store.flush()


def filter_one(source: Path, base: Path, output: Path, config: FilterConfig, options: dict) -> BatchRow:
    """Filter one file; any failure, a bad input or a bug an input triggers, becomes the row's one-line error."""
    started = time.perf_counter()
    try:
        report = filter_file(source, base, output, config, **options)
    except Exception as exc:  # a batch never dies of one file
        error = str(exc) if isinstance(exc, DiffmemError) else f"{source}: unexpected {type(exc).__name__}: {exc}"
        return BatchRow(str(source), str(output), "failed", error=one_line(error),
                        seconds=time.perf_counter() - started)
    return BatchRow(
        str(source), str(output), "filtered", channels_kept=report.channels_kept, channels_total=report.channels_total,
        energy_kept=report.energy_kept, anchors_computed=report.anchors_computed,
        skipped_unmapped=len(report.skipped_unmapped), seconds=time.perf_counter() - started,
    )


def threads_per_worker(workers: int, cpus: int) -> int:
    """Torch threads for each of ``workers`` processes sharing ``cpus`` cores (at least one)."""
    return max(1, cpus // max(1, workers))


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def start_worker(threads: int, parent: int) -> None:
    """Initialise a pool worker: its share of the cores, and death with the parent.

    A parent killed with SIGKILL runs no clean-up, and its workers would go on filtering for nobody. On Linux the
    kernel kills them (PR_SET_PDEATHSIG); elsewhere a watchdog thread sees the parent change and exits.
    """
    torch.set_num_threads(threads)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="diffmem-parent-watch", daemon=True).start()


WORKER_DIED = ("the worker process died while working on this file (killed by the system, out of memory, or a crash "
               "in a native library)")

#: A per-file job, `job(source=..., output=...) -> row`, called with keywords (picklable: a module-level function
#: or a `functools.partial` of one with its other arguments as keywords), and how a failed file's row is made,
#: `failed_row(source, output, error)`.
Job = Callable[[Path, Path], object]
FailedRow = Callable[[Path, Path, str], object]


def failed_batch_row(source: Path, output: Path, error: str) -> BatchRow:
    """A `filter-many` row for a file that failed outside the filter itself (a dead worker, a lost Ray task)."""
    return BatchRow(str(source), str(output), "failed", error=error)


def run_in_pool(todo: Sequence[tuple[Path, Path]], job: Job, failed_row: FailedRow, workers: int,
                on_row) -> list[tuple[Path, Path]]:
    """Run ``job`` on ``todo`` in a pool of ``workers`` processes, calling ``on_row(source, row)`` for each result;
    return the files whose worker died (a dead worker breaks the whole pool, so these are the ones it was running
    and the ones still queued: innocent files among them are retried, each in a pool of its own)."""
    broken = []
    # spawn, not fork: a forked child inherits torch's OpenMP thread pool in a broken state and can hang.
    # Each worker gets its share of the cores for the job's own threads, so workers do not oversubscribe them.
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=start_worker,
                               initargs=(threads_per_worker(workers, os.cpu_count() or 1), os.getpid()))
    try:
        futures = {pool.submit(job, source=source, output=output): (source, output) for source, output in todo}
        for future in as_completed(futures):
            source, output = futures[future]
            try:
                on_row(source, future.result())
            except BrokenProcessPool:
                broken.append((source, output))
            except Exception as exc:  # a result that cannot come back, say: still one row
                on_row(source, failed_row(source, output, f"{source}: {type(exc).__name__}: {one_line(str(exc))}"))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return sorted(broken)


def run_jobs(todo: Sequence[tuple[Path, Path]], job: Job, failed_row: FailedRow, on_row, engine: str = "process",
             workers: int | None = None) -> None:
    """Run ``job`` on every (source, output) of ``todo`` with ``engine`` ("process": a local pool of ``workers``,
    one per core by default; "ray": a Ray cluster), calling ``on_row(source, row)`` as each file finishes. A file
    whose worker dies is retried alone, and fails alone."""
    if engine not in ENGINES:
        raise DiffmemError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "ray":
        run_on_ray(todo, job, failed_row, workers, on_row)
        return
    broken = run_in_pool(todo, job, failed_row, workers or os.cpu_count() or 1, on_row)
    for source, output in broken:  # alone, so a file that kills its worker fails only itself
        if run_in_pool([(source, output)], job, failed_row, 1, on_row):
            on_row(source, failed_row(source, output, f"{source}: {WORKER_DIED}"))


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
    skip_unmapped: bool = False,
    recursive: bool = False,
) -> list[BatchRow]:
    """Filter every input into ``out_dir`` and write ``summary.csv`` and ``summary.json`` there.

    ``skip_unmapped`` is `filter_lora`'s: modules no base weight matches are written back unchanged (counted in the
    row's ``skipped_unmapped``) instead of failing the file.

    Every per-file failure, of any kind, is a ``failed`` row and the batch goes on; the summary is written even when
    the batch is interrupted (files not reached are ``failed`` rows saying so). Files diffmem wrote and ``out_dir``
    itself are never read as input; no output is ever written over an input.
    """
    if engine not in ENGINES:
        raise DiffmemError(f"engine must be one of {ENGINES}, got {engine!r}")
    resolve_device(device)  # a missing GPU is a clear error before any work, not a traceback in a worker
    base, out_dir = Path(base), Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    inputs = [Path(path) for path in inputs]
    sources = batch_sources(inputs, out_dir, recursive)
    outputs = output_paths(sources, out_dir, inputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[Path, BatchRow] = {}
    todo = []
    for source in sources:
        output = outputs[source]
        if written_by_diffmem(source):
            rows[source] = BatchRow(str(source), str(output), "skipped",
                                    reason="written by diffmem (a filtered output), not filtered again")
        elif already_done(source, output, config):
            rows[source] = BatchRow(str(source), str(output), "skipped", reason="already done (same file and config)")
        else:
            todo.append((source, output))
    options = {"reduce_rank": reduce_rank, "cache_dir": cache_dir, "device": device, "skip_unmapped": skip_unmapped}
    bar = progress_bar(total=len(todo), desc="filtering", unit="file", disable=not progress)

    def on_row(source: Path, row: BatchRow) -> None:
        rows[source] = row
        bar.update()

    try:
        warm_anchors([source for source, _ in todo], base, config, cache_dir, device, skip_unmapped, progress)
        # `filter_one` is looked up now, not at import, so a test can replace it.
        job = partial(filter_one, base=base, config=config, options=options)
        run_jobs(todo, job, failed_batch_row, on_row, engine, workers)
    finally:
        bar.close()
        ordered = [rows.get(source) or BatchRow(str(source), str(outputs[source]), "failed",
                                                error=f"{source}: not filtered: the batch stopped before it")
                   for source in sources]
        write_summary(ordered, out_dir)
    return ordered


def call_job(job: Job, source: Path, output: Path):
    """``job(source=source, output=output)``: what a Ray task runs (Ray's remote functions are module-level
    functions)."""
    return job(source=source, output=output)


def run_on_ray(todo: Sequence[tuple[Path, Path]], job: Job, failed_row: FailedRow, workers: int | None,
               on_row) -> None:
    """The same work as remote Ray tasks, on the cluster ``ray.init()`` connects to (or a local one); ``on_row`` is
    called as each file finishes, so progress moves with the cluster."""
    try:
        import ray  # optional: only --engine ray needs it
    except ImportError:
        raise DiffmemError("--engine ray needs Ray: pip install 'diffmem[ray]'") from None
    if not ray.is_initialized():
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(call_job)
    pending = {remote.remote(job, source, output): (source, output) for source, output in todo}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        source, output = pending.pop(done[0])
        try:
            row = ray.get(done[0])
        except Exception as exc:  # a worker lost with its node, say: that file's row, not the batch
            row = failed_row(source, output, f"{source}: the Ray task failed: {type(exc).__name__}")
        on_row(source, row)


SUMMARY_SCHEMA = 1  # version of summary.json's shape (and of `filter-many --json`)
FILTER_STATUSES = ("filtered", "skipped", "failed")


def summary_document(rows: Sequence, statuses: Sequence[str] = FILTER_STATUSES) -> dict:
    """What `filter-many --json` prints and summary.json holds: versions, counts by status, one record per input
    (rows: dataclasses with `input` and `status` fields, `BatchRow` or `diffmem.scan.batch.ScanRow`)."""
    counts = {status: sum(row.status == status for row in rows) for status in statuses}
    return {"diffmem_version": __version__, "schema_version": SUMMARY_SCHEMA, "counts": counts,
            "files": [asdict(row) for row in rows]}


def earlier_rows(out_dir: Path, row_type: type = BatchRow) -> list:
    """The rows of the summary.json an earlier run left in ``out_dir`` (none if absent or of another shape)."""
    try:
        document = json.loads(read_text(out_dir / "summary.json"))
        names = {f.name for f in fields(row_type)}
        return [row_type(**{k: v for k, v in record.items() if k in names}) for record in document["files"]]
    except (DiffmemError, ValueError, TypeError, KeyError, AttributeError):
        return []


def write_summary(rows: Sequence, out_dir: Path, row_type: type = BatchRow,
                  statuses: Sequence[str] = FILTER_STATUSES) -> list:
    """``summary.json`` and ``summary.csv``: this run's rows, and the rows of earlier runs into ``out_dir`` for
    inputs this run did not see (so an earlier failure does not vanish when a later run covers other files).
    Returns the merged rows."""
    merged = {row.input: row for row in earlier_rows(out_dir, row_type)}
    merged.update((row.input, row) for row in rows)
    ordered = sorted(merged.values(), key=lambda row: row.input)
    write_atomic((json.dumps(summary_document(ordered, statuses), indent=2) + "\n").encode(), out_dir / "summary.json")
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=[f.name for f in fields(row_type)])
    writer.writeheader()
    writer.writerows(asdict(row) for row in ordered)
    write_atomic(table.getvalue().encode(), out_dir / "summary.csv")
    return ordered
