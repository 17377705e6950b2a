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
from tqdm import tqdm

from diffmem import __version__
from diffmem.anchors import AnchorStore
from diffmem.errors import DiffmemError
from diffmem.filters import BAFConfig, FilterConfig, ModuleView, select
from diffmem.formats.base import BaseCheckpoint, open_base, resolve_targets
from diffmem.formats.lora import LoraFile, LoraModule, read_lora, replace_factors, write_lora
from diffmem.formats.safetensors_io import refuse_overwriting, sha256_file
from diffmem.spectral import Anchors, Channels, dense_channels, lowrank_channels, rebuild_factors


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


@dataclass
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
        data = asdict(self)
        data.update(channels_total=self.channels_total, channels_kept=self.channels_kept, energy_kept=self.energy_kept)
        return data

    def summary(self) -> str:
        """A few human-readable lines."""
        return (
            f"{self.method}: kept {self.channels_kept} of {self.channels_total} channels "
            f"({self.energy_kept:.1%} of the update energy) in {len(self.modules)} modules; "
            f"base {Path(self.base).name} ({self.base_family}); anchors computed {self.anchors_computed}, "
            f"from cache {self.anchors_cached}; {self.seconds:.2f} s"
        )


@dataclass
class FilterResult:
    lora: LoraFile
    report: FilterReport


def module_channels(module: LoraModule, device: torch.device | str = "cpu") -> Channels:
    """Spectral channels of one module: the QR trick for factored updates, a dense SVD for LoHa/LoKr/Tucker.
    Computed on ``device``, returned on the CPU."""
    if module.kind in ("lora", "locon"):
        up, down = module.factors()
        channels = lowrank_channels(up.to(device), down.to(device), module.scale)
    else:
        channels = dense_channels(module.delta().to(device))
    return Channels(u=channels.u.cpu(), sigma=channels.sigma.cpu(), v=channels.v.cpu())


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
) -> FilterResult:
    """Filter every module of ``lora`` against ``base`` with ``config`` (default: `BAFConfig()`).

    Returns the filtered LoRA (in the input's own format, not yet written) and a report. With ``reduce_rank`` each
    module keeps only its kept channels (a smaller rank, alpha rescaled so the scale is unchanged); otherwise the
    rank is unchanged and dropped channels become zero columns, so every front-end sees the same shapes.
    ``device`` runs the decompositions (channels, anchors) there, e.g. "cuda"; everything else stays on the CPU.
    """
    started = time.perf_counter()
    device = resolve_device(device)
    config = config or BAFConfig()
    lora = lora if isinstance(lora, LoraFile) else read_lora(lora)
    base = base if isinstance(base, BaseCheckpoint) else open_base(base)
    lookups = {name: (module.lookup, tuple(module.weight_shape)) for name, module in lora.modules.items()}
    targets = resolve_targets(lookups, base, lora.path, metadata=lora.metadata)
    # Each module's anchors serve its own scores only: holding all of them would cost gigabytes on SDXL.
    store = AnchorStore(base, cache_dir=cache_dir, use_cache=use_cache, device=device)

    channels: dict[str, Channels] = {}
    scores: dict[str, torch.Tensor] = {}
    anchor_ranks: dict[str, int] = {}
    names = list(lora.modules)
    for name in tqdm(names, desc="scoring channels", unit="module", disable=not progress, leave=False):
        target = targets[name]
        channels[name] = module_channels(lora.modules[name], device)
        module_anchors: dict[tuple, Anchors] = {}

        def anchors(energy: float, k: int | None, side: str = "both", target=target, name=name,
                    seen=module_anchors) -> Anchors:
            if (energy, k, side) not in seen:
                seen[(energy, k, side)] = store.get(target, energy, k, side)
                anchor_ranks[name] = seen[(energy, k, side)].k
            return seen[(energy, k, side)]

        view = ModuleView(
            name=name,
            channels=channels[name],
            anchors=anchors,
            weight=lambda target=target: base.weight(target).reshape(target.shape[0], -1),
        )
        scores[name] = config.score(view).float()
    store.flush()
    weights = select(scores, {name: channels[name].sigma for name in names}, config.selection)

    new_factors = {}
    modules = []
    for name in names:
        module, chans, w = lora.modules[name], channels[name], weights[name]
        kept = int((w > 0).sum())
        rank = None if reduce_rank or module.kind not in ("lora", "locon") else max(module.rank, kept)
        new_factors[name] = rebuild_factors(chans, w, module.scale, rank=rank)
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
                sigma=[round(float(s), 6) for s in chans.sigma],
                scores=[round(float(s), 6) for s in scores[name]],
                weights=[round(float(x), 6) for x in w],
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
    if source is not None and Path(source).is_file():
        keys["diffmem.source_sha256"] = sha256_file(source)
    return keys


def filter_file(
    lora_path: str | Path,
    base_path: str | Path | BaseCheckpoint,
    output: str | Path,
    config: FilterConfig | None = None,
    **options,
) -> FilterReport:
    """Filter the LoRA file at ``lora_path`` and write the result to ``output`` (atomic; never the input)."""
    lora_path, output = Path(lora_path), Path(output)
    refuse_overwriting(output, (lora_path,))  # before the work, not after it
    result = filter_lora(lora_path, base_path, config, **options)
    write_lora(result.lora, output, provenance=provenance(result.report, lora_path), protect=(lora_path,))
    return result.report


def inspect_lora(
    lora: LoraFile | str | Path, base: BaseCheckpoint | str | Path, config: FilterConfig | None = None, **options
) -> FilterReport:
    """Score every channel and report what ``config`` would keep, without writing anything."""
    return filter_lora(lora, base, config, **options).report
