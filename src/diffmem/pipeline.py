"""Filter a LoRA against its base checkpoint: files -> channels -> scores -> kept channels -> file.

This is the library behind ``diffmem filter`` and ``diffmem inspect``; the maths lives in `diffmem.spectral` and
`diffmem.filters`, the file formats in `diffmem.formats`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from diffmem import __version__
from diffmem.anchors import AnchorStore
from diffmem.errors import BadWeightsError, DiffmemError
from diffmem.filters import BAFConfig, FilterConfig, ModuleView, select
from diffmem.formats.base import BaseCheckpoint, open_base, resolve_lora_targets
from diffmem.formats.lora import LoraFile, LoraModule, read_lora, replace_factors, write_lora
from diffmem.formats.safetensors_io import extremes_finite, refuse_overwriting, sha256_file
from diffmem.progress import progress_bar
from diffmem.spectral import Anchors, Channels, dense_channels, lowrank_channels_batch, rebuild_factors
from diffmem.threads import one_thread_each


@dataclass
class ModuleReport:
    """What the filter did to one module."""

    name: str
    module: str
    kind: str
    rank: int
    channels: int
    kept: int
    energy_kept: float
    anchor_rank: int | None
    sigma: list[float]
    scores: list[float]
    weights: list[float]


REPORT_SCHEMA = 1  # version of FilterReport.to_dict()'s shape


@dataclass(repr=False)  # the generated repr prints every score of every module: hundreds of kilobytes
class FilterReport:
    """What the filter did to a whole LoRA: per-module reports and totals."""

    lora: str
    base: str
    base_family: str
    base_sha256: str
    method: str
    config: dict
    modules: list[ModuleReport] = field(default_factory=list)
    anchors_computed: int = 0
    anchors_cached: int = 0
    seconds: float = 0.0
    # Modules that name no base weight, written back unchanged (only with skip_unmapped=True).
    skipped_unmapped: list[str] = field(default_factory=list)

    @property
    def channels_total(self) -> int:
        return sum(m.channels for m in self.modules)

    @property
    def channels_kept(self) -> int:
        return sum(m.kept for m in self.modules)

    @property
    def energy_kept(self) -> float:
        """Share of the LoRA's total update energy (sum over modules of ||dW||_F^2) that the output keeps."""
        total = sum(sum(s * s for s in m.sigma) for m in self.modules)
        kept = sum(sum((s * w) ** 2 for s, w in zip(m.sigma, m.weights)) for m in self.modules)
        return kept / total if total > 0 else 1.0

    def to_dict(self) -> dict:
        """The report as JSON-ready data (what `filter --json` and `inspect --json` print), with the versions of
        diffmem and of this shape, so a platform parsing it can tell."""
        data = {"diffmem_version": __version__, "schema_version": REPORT_SCHEMA, **asdict(self)}
        data.update(channels_total=self.channels_total, channels_kept=self.channels_kept, energy_kept=self.energy_kept,
                    skipped_unmapped_count=len(self.skipped_unmapped))
        return data

    def __repr__(self) -> str:
        return (f"FilterReport(method={self.method!r}, lora={Path(self.lora).name!r}, base_family={self.base_family!r}, "
                f"channels_kept={self.channels_kept}/{self.channels_total}, modules={len(self.modules)})")

    def summary(self) -> str:
        """A few human-readable lines."""
        return (
            f"{self.method}: kept {self.channels_kept} of {self.channels_total} channels "
            f"({self.energy_kept:.1%} of the update energy) in {len(self.modules)} modules; "
            f"base {Path(self.base).name} ({self.base_family}); anchors computed {self.anchors_computed}, "
            f"from cache {self.anchors_cached}; {self.seconds:.2f} s"
            + (f"; {len(self.skipped_unmapped)} modules with no base weight written back unchanged"
               if self.skipped_unmapped else "")
        )


@dataclass
class FilterResult:
    """The filtered LoRA (not yet written) and the report of what the filter did."""

    lora: LoraFile
    report: FilterReport


#: Factored modules of one shape decomposed together (bounds the float32 copies a batch holds).
BATCH_MODULES = 64


def shape_batches(keys: dict[str, tuple], size: int = BATCH_MODULES) -> list[list[str]]:
    """Names grouped by their key (a shape), in batches of at most ``size``, first-seen order."""
    groups: dict[tuple, list[str]] = {}
    for name, key in keys.items():
        groups.setdefault(key, []).append(name)
    return [members[i:i + size] for members in groups.values() for i in range(0, len(members), size)]


def channels_of(
    modules: dict[str, LoraModule], device: torch.device | str = "cpu", path: Path | None = None
) -> dict[str, Channels]:
    """Spectral channels of every module, on the CPU (computed on ``device``): factored (lora/locon) modules by
    the Gram trick, those of one factor shape in one batched call; LoHa/LoKr/Tucker by a dense SVD."""
    channels = {name: None for name in modules}  # keeps the input order
    factored = {}
    for name, module in modules.items():
        if module.kind in ("lora", "locon"):
            up, down = module.tensors["up"], module.tensors["down"]
            factored[name] = (up.shape[0], up.numel() // up.shape[0], down.numel() // down.shape[0])
        else:
            delta = module.delta()
            if not bool(torch.isfinite(delta).all()):
                raise BadWeightsError(f"module {name!r}: its update is not finite in float32 (factor values too "
                                      "large)", path)
            found = dense_channels(delta.to(device))
            channels[name] = Channels(u=found.u.cpu(), sigma=found.sigma.cpu(), v=found.v.cpu())

    def decompose_together(batch: list[str]) -> list[Channels]:
        ups = torch.stack([modules[n].tensors["up"].reshape(factored[n][:2]) for n in batch]).to(device)
        downs = torch.stack([modules[n].tensors["down"].reshape(factored[n][1], -1) for n in batch]).to(device)
        scales = torch.tensor([modules[n].scale for n in batch], dtype=torch.float64)
        found = [Channels(u=c.u.cpu(), sigma=c.sigma.cpu(), v=c.v.cpu())
                 for c in lowrank_channels_batch(ups, downs, scales)]
        if not all(extremes_finite(t) for c in found for t in (c.sigma, c.u, c.v) if t.numel()):
            raise torch.linalg.LinAlgError("non-finite channels")
        return found

    def decompose(batch: list[str]) -> list[Channels]:
        try:
            return decompose_together(batch)
        except torch.linalg.LinAlgError:
            # Finite factors whose Gram matrices overflow float32 (values near 3e38, a corrupted or hostile file):
            # decompose one by one to name the module at fault.
            for name in batch:
                try:
                    decompose_together([name])
                except torch.linalg.LinAlgError:
                    module = modules[name]
                    largest = max(float(t.abs().max()) for t in (module.tensors["up"], module.tensors["down"]))
                    raise BadWeightsError(f"module {name!r}: its update cannot be decomposed (factor values up to "
                                          f"{largest:.3g}, too large for float32 arithmetic)", path) from None
            raise

    batches = shape_batches(factored)
    with one_thread_each(device) as run:
        for batch, found in zip(batches, run(decompose, batches)):
            channels.update(zip(batch, found))
    return channels


def module_channels(module: LoraModule, device: torch.device | str = "cpu") -> Channels:
    """Spectral channels of one module (`channels_of`)."""
    return channels_of({module.name: module}, device)[module.name]


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device, or a clear error when this machine does not have it."""
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise DiffmemError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DiffmemError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU on this machine")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise DiffmemError(f"device {device!r} asked for, but PyTorch sees no Apple GPU on this machine")
    return resolved


def filter_lora(
    lora: LoraFile | str | Path,
    base: BaseCheckpoint | str | Path,
    config: FilterConfig | None = None,
    *,
    reduce_rank: bool = False,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = False,
    device: str | torch.device = "cpu",
    skip_unmapped: bool = False,
) -> FilterResult:
    """Filter every module of ``lora`` against ``base`` with ``config`` (default: `BAFConfig()`).

    Returns the filtered LoRA (in the input's own format, not yet written) and a report. With ``reduce_rank`` each
    module keeps only its kept channels (a smaller rank, alpha rescaled so the scale is unchanged); otherwise the
    rank is unchanged and dropped channels become zero columns, so every front-end sees the same shapes.
    ``device`` runs the decompositions (channels, anchors) there, e.g. "cuda"; everything else stays on the CPU.
    ``skip_unmapped`` filters the modules that map to a base weight and writes the others back unchanged (listed in
    ``report.skipped_unmapped``) instead of refusing the file; it still refuses when none maps or a shape differs.
    """
    started = time.perf_counter()
    device = resolve_device(device)
    config = config or BAFConfig()
    lora = lora if isinstance(lora, LoraFile) else read_lora(lora)
    base = base if isinstance(base, BaseCheckpoint) else open_base(base)
    targets = resolve_lora_targets(lora, base, skip_unmapped=skip_unmapped)
    # Each module's anchors serve its own scores only: holding all of them would cost gigabytes on SDXL.
    store = AnchorStore(base, cache_dir=cache_dir, use_cache=use_cache, device=device)

    names = [name for name in lora.modules if name in targets]  # the others are skipped, unchanged
    try:
        config.check_modules([targets[name].module for name in names])
    except DiffmemError as error:
        raise DiffmemError(error.problem, error.path or lora.path) from None
    channels = channels_of({name: lora.modules[name] for name in names}, device, lora.path)
    anchor_ranks: dict[str, int] = {}

    def score_module(name: str) -> torch.Tensor:
        target = targets[name]
        module_anchors: dict[tuple, Anchors] = {}

        def anchors(energy: float, k: int | None, side: str = "both") -> Anchors:
            if (energy, k, side) not in module_anchors:
                module_anchors[(energy, k, side)] = store.get(target, energy, k, side)
                anchor_ranks[name] = module_anchors[(energy, k, side)].k
            return module_anchors[(energy, k, side)]

        view = ModuleView(name=name, channels=channels[name], anchors=anchors,
                          weight=lambda: base.weight(target).reshape(target.shape[0], -1), module=target.module)
        score = config.score(view).float()
        if not bool(torch.isfinite(score).all()):
            # The LoRA and base tensors were checked when read; cached anchors are checked here, through the scores:
            # a corrupt shard is deleted and the module scored again with anchors computed afresh.
            discarded = [store.discard(target, energy, k) for energy, k, _ in module_anchors]
            module_anchors.clear()
            if any(discarded):
                score = config.score(view).float()
            if not bool(torch.isfinite(score).all()):
                raise DiffmemError(f"module {name}: its channel scores are not finite", lora.path)
        return score

    with one_thread_each(device) as run:
        found = run(score_module, names)
        scores = dict(zip(names, progress_bar(found, total=len(names), desc="scoring channels", unit="module",
                                      disable=not progress, leave=False)))
    store.flush()
    weights = select(scores, {name: channels[name].sigma for name in names}, config.selection)

    def new_rank(name: str) -> int:
        kept = int((channels[name].sigma * weights[name] > 0).sum())
        module = lora.modules[name]
        return max(1, kept) if reduce_rank or module.kind not in ("lora", "locon") else max(module.rank, kept)

    def rebuild(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        module = lora.modules[name]
        return rebuild_factors(channels[name], weights[name], module.scale, new_rank(name), module.dtype)

    with one_thread_each() as run:
        new_factors = dict(zip(names, run(rebuild, names)))
    modules = []
    for name in names:
        module, chans, w = lora.modules[name], channels[name], weights[name]
        kept = int((w > 0).sum())
        power = chans.sigma.double().square()
        modules.append(
            ModuleReport(
                name=name,
                module=targets[name].module,
                kind=module.kind,
                rank=module.rank,
                channels=chans.count,
                kept=kept,
                energy_kept=float((power * w.double().square()).sum() / power.sum()) if power.sum() > 0 else 1.0,
                anchor_rank=anchor_ranks.get(name),
                sigma=[round(s, 6) for s in chans.sigma.tolist()],
                scores=[round(s, 6) for s in scores[name].tolist()],
                weights=[round(x, 6) for x in w.tolist()],
            )
        )
    report = FilterReport(
        lora=str(lora.path) if lora.path else "<memory>",
        base=str(base.path),
        base_family=base.family,
        base_sha256=base.content_hash(),
        method=config.name,
        config=config.to_dict(),
        modules=modules,
        anchors_computed=store.computed,
        anchors_cached=store.loaded,
        seconds=time.perf_counter() - started,
        skipped_unmapped=[name for name in lora.modules if name not in targets],
    )
    # keep_alpha: a smaller rank folds the scale change into the up factor instead of writing per-module alphas,
    # which diffusers (0.42) misreads for kohya attention modules; the update is the same either way.
    shapes = {name: targets[name].shape for name in names}
    return FilterResult(lora=replace_factors(lora, new_factors, weight_shapes=shapes, keep_alpha=True), report=report)


def provenance(report: FilterReport, source: Path | None) -> dict[str, str]:
    """The ``diffmem.*`` metadata keys that record how a filtered file was made (deterministic: no timestamps)."""
    keys = {
        "diffmem.version": __version__,
        "diffmem.method": report.method,
        "diffmem.config": json.dumps(report.config, sort_keys=True),
        "diffmem.base_sha256": report.base_sha256,
        "diffmem.base_family": report.base_family,
        "diffmem.channels_kept": f"{report.channels_kept}/{report.channels_total}",
        "diffmem.kept_per_module": json.dumps({m.name: [m.kept, m.channels] for m in report.modules}, sort_keys=True),
    }
    if report.skipped_unmapped:  # so a reader of the file can tell which modules were left as the trainer wrote them
        keys["diffmem.skipped_unmapped"] = json.dumps(sorted(report.skipped_unmapped))
    if source is not None and Path(source).is_file():
        keys["diffmem.source_sha256"] = sha256_file(source)
    return keys


def filtered_name(source: Path) -> str:
    """The default name of ``source``'s filtered output: ``<name>.filtered.safetensors`` (a PEFT folder stays a
    folder: ``<name>.filtered``)."""
    if source.is_dir():
        return f"{source.name}.filtered"
    return f"{source.stem}.filtered{source.suffix or '.safetensors'}"


def filter_file(
    lora_path: str | Path,
    base_path: str | Path | BaseCheckpoint,
    output: str | Path,
    config: FilterConfig | None = None,
    **options,
) -> FilterReport:
    """Filter the LoRA file at ``lora_path`` and write the result to ``output`` (atomic; never the input)."""
    lora_path, output = Path(lora_path), Path(output)
    base_location = base_path.path if isinstance(base_path, BaseCheckpoint) else Path(base_path)
    # Before the work, not after it: the output is never the LoRA, the base or a file inside a base folder.
    refuse_overwriting(output, (lora_path,), "the LoRA")
    refuse_overwriting(output, (base_location,), "the base checkpoint")
    result = filter_lora(lora_path, base_path, config, **options)
    write_lora(result.lora, output, provenance=provenance(result.report, lora_path), protect=(lora_path, base_location))
    return result.report


def inspect_lora(
    lora: LoraFile | str | Path, base: BaseCheckpoint | str | Path, config: FilterConfig | None = None, **options
) -> FilterReport:
    """Score every channel and report what ``config`` would keep, without writing anything."""
    return filter_lora(lora, base, config, **options).report
