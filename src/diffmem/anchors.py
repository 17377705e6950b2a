"""A file cache of base-weight anchors, keyed by the base's content hash, so the next LoRA on a base reuses them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffmem.cache import default_cache_dir
from diffmem.errors import DiffmemError
from diffmem.formats.safetensors_io import SafetensorsFile, load_file, save_file
from diffmem.spectral import Anchors, principal_subspace

CACHE_VERSION = "2"

#: Subspace bases are stored in half precision: half the disk and read time of float32, and an alignment score
#: moves by about 1e-3 of its chance level. Freshly computed bases are rounded the same way before use, so a cold
#: run and a warm run score every channel identically.
STORAGE_DTYPE = torch.float16

#: `build_anchors` writes the cache after this many new weights (three tensors each), so a whole-model build holds
#: a bounded amount in memory and an interrupted build resumes from what it wrote.
FLUSH_EVERY = 128


def target_id(target) -> str:
    """A stable, readable id of the base rows a target covers, e.g. ``double_blocks.0.img_attn.qkv.weight[0:3072]``."""
    return "+".join(f"{key}[{first}:{end}]" for key, first, end in target.parts)


class AnchorStore:
    """Anchors of one base checkpoint: from memory, else from the cache file, else computed and saved by `flush`.

    One file per (base content hash, anchor rule): ``anchors-<sha256[:16]>-<rule>.safetensors`` under
    ``cache_dir/anchors``, bases in `STORAGE_DTYPE`. A corrupt cache file is ignored and rewritten, never trusted.
    """

    def __init__(
        self,
        base,
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
        device: str | torch.device = "cpu",
        remember: bool = True,
    ) -> None:
        self.base = base
        self.remember = remember  # False: a whole-model build, where holding every anchor would cost gigabytes
        self.device = torch.device(device)
        self.use_cache = use_cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.memory: dict[tuple[str, str], Anchors] = {}
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.files: dict[str, SafetensorsFile | None] = {}
        self.computed = 0
        self.loaded = 0

    def rule_name(self, energy: float, k: int | None) -> str:
        return f"k{k}" if k is not None else f"e{energy:g}"

    def path_for(self, rule: str) -> Path:
        return self.cache_dir / "anchors" / f"anchors-v{CACHE_VERSION}-{self.base.content_hash()[:16]}-{rule}.safetensors"

    def cached_file(self, rule: str) -> SafetensorsFile | None:
        if rule not in self.files:
            path = self.path_for(rule)
            try:
                self.files[rule] = SafetensorsFile(path) if path.exists() else None
            except DiffmemError:
                self.files[rule] = None
        return self.files[rule]

    def get(self, target, energy: float = 0.5, k: int | None = None) -> Anchors:
        """Anchors of the base weight behind ``target``."""
        rule = self.rule_name(energy, k)
        key = target_id(target)
        if (rule, key) in self.memory:
            return self.memory[(rule, key)]
        cached = self.cached_file(rule) if self.use_cache else None
        if cached is not None and f"{key}.u" in cached:
            stored = {part: cached[f"{key}.{part}"] for part in ("u", "v", "spectrum")}
            self.loaded += 1
        else:
            computed = principal_subspace(self.base.weight(target).to(self.device), energy=energy, k=k)
            stored = {"u": computed.u.cpu().to(STORAGE_DTYPE), "v": computed.v.cpu().to(STORAGE_DTYPE),
                      "spectrum": computed.spectrum.cpu().float()}
            self.pending.setdefault(rule, {}).update({f"{key}.{part}": t for part, t in stored.items()})
            self.computed += 1
        anchors = Anchors(u=stored["u"].float(), v=stored["v"].float(), spectrum=stored["spectrum"].float())
        if self.remember:
            self.memory[(rule, key)] = anchors
        return anchors

    def flush(self) -> None:
        """Merge newly computed anchors into their cache files (atomic rewrite; concurrent writers lose nothing
        worse than a recomputation)."""
        if not self.use_cache:
            return
        for rule, tensors in self.pending.items():
            if not tensors:
                continue
            path = self.path_for(rule)
            merged: dict[str, torch.Tensor] = {}
            if path.exists():
                try:
                    merged, _ = load_file(path)
                except DiffmemError:
                    merged = {}
            merged.update(tensors)
            metadata = {"diffmem.base_sha256": self.base.content_hash(), "diffmem.anchor_rule": rule,
                        "diffmem.cache_version": CACHE_VERSION}
            save_file(merged, path, metadata)
            self.files.pop(rule, None)
        self.pending.clear()


@dataclass
class AnchorBuild:
    """What `build_anchors` did: weights seen, anchors computed and read from the cache, where they are."""

    weights: int
    computed: int
    loaded: int
    seconds: float
    cache_file: Path | None

    def summary(self) -> str:
        where = f" in {self.cache_file}" if self.cache_file else ""
        return (f"{self.weights} base weights: {self.computed} anchors computed, {self.loaded} already cached"
                f"{where} ({self.seconds:.1f} s)")


def distinct_targets(base, only: str | None = None) -> list:
    """Every base weight a LoRA can update, once each (aliases of one weight share a `target_id`), optionally only
    those whose module path starts with ``only`` (e.g. ``unet``, ``transformer``, ``text_encoder``)."""
    chosen: dict[str, object] = {}
    for target in base.targets.values():
        if only is None or target.module == only or target.module.startswith(only + "."):
            chosen.setdefault(target_id(target), target)
    return [chosen[key] for key in sorted(chosen)]


def build_anchors(
    base,
    energy: float = 0.5,
    k: int | None = None,
    *,
    only: str | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> AnchorBuild:
    """Fill the anchor cache for every weight of ``base`` a LoRA can update, so that filtering any LoRA on this
    base afterwards reads anchors only (what a platform does once per base before scanning uploads)."""
    from diffmem.formats.base import BaseCheckpoint, open_base

    started = time.perf_counter()
    base = base if isinstance(base, BaseCheckpoint) else open_base(base)
    targets = distinct_targets(base, only)
    if not targets:
        raise DiffmemError(f"has no LoRA-targetable weights{f' under {only!r}' if only else ''}", base.path)
    store = AnchorStore(base, cache_dir=cache_dir, device=device, remember=False)
    for target in tqdm(targets, desc="anchors", unit="weight", disable=not progress):
        store.get(target, energy, k)
        if store.computed and store.computed % FLUSH_EVERY == 0:
            store.flush()  # bounds memory and keeps the work of an interrupted build
    store.flush()
    path = store.path_for(store.rule_name(energy, k))
    return AnchorBuild(weights=len(targets), computed=store.computed, loaded=store.loaded,
                       seconds=time.perf_counter() - started, cache_file=path if path.exists() else None)
