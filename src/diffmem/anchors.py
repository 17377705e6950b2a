"""A file cache of base-weight anchors, keyed by the base's content hash, so the next LoRA on a base reuses them."""

from __future__ import annotations

import hashlib
import math
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from diffmem.cache import default_cache_dir
from diffmem.errors import DiffmemError
from diffmem.formats.safetensors_io import SafetensorsFile, save_file
from diffmem.progress import progress_bar
from diffmem.spectral import Anchors, principal_subspace
from diffmem.threads import one_thread_each

CACHE_VERSION = "3"  # 3: append-only shards instead of one file rewritten by every flush

#: Subspace bases are stored in half precision: half the disk and read time of float32, and an alignment score
#: moves by about 1e-3 of its chance level. Freshly computed bases are rounded the same way before use, so a cold
#: run and a warm run score every channel identically.
STORAGE_DTYPE = torch.float16

#: `AnchorStore.get` writes a shard after this many new anchors, or once they hold this many bytes (SDXL's and
#: Flux's big weights), so a run holds a bounded amount in memory and an interrupted run resumes from what it wrote.
FLUSH_EVERY = 128
FLUSH_BYTES = 64 * 2**20


def target_id(target) -> str:
    """A stable, readable id of the base rows a target covers, e.g. ``double_blocks.0.img_attn.qkv.weight[0:3072]``."""
    return "+".join(f"{key}[{first}:{end}]" for key, first, end in target.parts)


class AnchorStore:
    """Anchors of one base checkpoint: read from the cache, else computed and written by `flush`.

    The cache of one (base content hash, anchor rule) is a set of shard files
    ``anchors-v<CACHE_VERSION>-<sha256[:16]>-<rule>-<shard>.safetensors`` under ``cache_dir/anchors``, bases in
    `STORAGE_DTYPE`. Each flush writes a new shard, named by the hash of the anchors it holds, and never rewrites
    another: memory stays bounded by what is not yet flushed, an interrupted build keeps what it wrote, and two
    processes writing at once cannot lose each other's work. A corrupt shard is deleted and its anchors are
    computed again, never trusted.
    """

    PARTS = ("u", "v", "spectrum")
    #: What `get` reads of a cached entry for each scored side (a one-sided score never reads the other side).
    SIDE_PARTS: ClassVar[dict[str, tuple[str, ...]]] = {"left": ("u", "spectrum"), "right": ("v", "spectrum"),
                                                        "both": PARTS}

    def __init__(
        self, base, cache_dir: str | Path | None = None, use_cache: bool = True, device: str | torch.device = "cpu"
    ) -> None:
        self.base = base
        self.device = torch.device(device)
        self.use_cache = use_cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.shards: dict[str, dict[str, SafetensorsFile]] = {}  # rule -> target id -> the shard holding it
        self.computed = 0
        self.loaded = 0
        # Filters score modules on several threads: the lock guards the shard index, the pending anchors and the
        # counters; reading a tensor from a shard (a positioned read) and computing anchors happen outside it.
        self.lock = threading.RLock()
        self.flushing = threading.Lock()  # held while a shard is written (outside `lock`)

    @property
    def folder(self) -> Path:
        return self.cache_dir / "anchors"

    def rule_name(self, energy: float, k: int | None) -> str:
        return f"k{k}" if k is not None else f"e{energy:g}"

    def shard_prefix(self, rule: str) -> str:
        return f"anchors-v{CACHE_VERSION}-{self.base.content_hash()[:16]}-{rule}-"

    def index(self, rule: str) -> dict[str, SafetensorsFile]:
        """Target id -> shard, over every readable shard of this base and rule (read from headers only, once)."""
        if rule not in self.shards:
            found: dict[str, SafetensorsFile] = {}
            for path in sorted(self.folder.glob(f"{self.shard_prefix(rule)}*.safetensors")):
                try:
                    shard = SafetensorsFile(path)
                except DiffmemError:
                    path.unlink(missing_ok=True)
                    continue
                found.update({name.rsplit(".", 1)[0]: shard for name in shard})
            self.shards[rule] = found
        return self.shards[rule]

    def read(self, rule: str, key: str, parts: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
        with self.lock:
            shard = self.index(rule).get(key)
        if shard is None:
            return None
        try:
            # Unchecked: the filter checks the scores computed from these instead, and calls `discard` when they
            # are not finite (one pass over every anchor less).
            return {part: shard.get(f"{key}.{part}", torch.float32, check=False) for part in parts}
        except (DiffmemError, KeyError):
            self.drop(rule, shard)
            return None

    def drop(self, rule: str, shard: SafetensorsFile) -> None:
        """Delete a corrupt shard; its anchors are computed again when next asked for."""
        with self.lock:
            shard.path.unlink(missing_ok=True)
            self.shards[rule] = {k: s for k, s in self.shards[rule].items() if s is not shard}

    def discard(self, target, energy: float = 0.5, k: int | None = None) -> bool:
        """Delete the shard holding ``target``'s anchors (they gave non-finite scores: the file is corrupt), so the
        next `get` computes them again. False when no shard held them."""
        rule = self.rule_name(energy, k)
        with self.lock:
            shard = self.index(rule).get(target_id(target))
        if shard is None:
            return False
        self.drop(rule, shard)
        return True

    def get(self, target, energy: float = 0.5, k: int | None = None, side: str = "both") -> Anchors:
        """Anchors of the base weight behind ``target``; with ``side`` "left" or "right" a cached entry is read
        without the other side's vectors (half the reading for a one-sided score)."""
        rule = self.rule_name(energy, k)
        key = target_id(target)
        parts = self.SIDE_PARTS[side]
        with self.lock:  # computed earlier in this run, not yet written
            pending = self.pending.get(rule, {})
            stored = {part: pending[f"{key}.{part}"] for part in parts} if f"{key}.u" in pending else None
        if stored is None and self.use_cache and (stored := self.read(rule, key, parts)) is not None:
            with self.lock:
                self.loaded += 1
        if stored is None:
            computed = principal_subspace(self.base.weight(target).to(self.device), energy=energy, k=k)
            stored = {"u": computed.u.cpu().to(STORAGE_DTYPE), "v": computed.v.cpu().to(STORAGE_DTYPE),
                      "spectrum": computed.spectrum.cpu().float()}
            with self.lock:
                self.computed += 1
                full = False
                if self.use_cache:
                    self.pending.setdefault(rule, {}).update({f"{key}.{part}": t for part, t in stored.items()})
                    full = self.unflushed() >= FLUSH_EVERY or self.unflushed_bytes() >= FLUSH_BYTES
            if full:
                self.flush(wait=False)  # bounds memory, and an interrupted run keeps what it wrote
        return Anchors(u=stored["u"].float() if "u" in parts else None, v=stored["v"].float() if "v" in parts else None,
                       spectrum=stored["spectrum"].float())  # no-ops for anchors read from a shard

    def unflushed(self) -> int:
        """Anchors computed but not yet written."""
        return sum(len(tensors) for tensors in self.pending.values()) // len(self.PARTS)

    def unflushed_bytes(self) -> int:
        """Bytes of the anchors computed but not yet written."""
        return sum(t.numel() * t.element_size() for tensors in self.pending.values() for t in tensors.values())

    def flush(self, wait: bool = True) -> None:
        """Write the anchors computed since the last flush as new shards (atomic writes). `get` flushes by itself
        every `FLUSH_EVERY` new anchors (without ``wait``: skipped while another thread writes one); call this once
        at the end.

        The anchors to write are taken from `pending` under the lock and written outside it, so threads computing
        anchors go on while a shard is written; one shard is written at a time, so memory holds at most one shard
        being written and one filling. Until its shard is indexed, an entry being written is recomputed if asked for
        (never read half-written).
        """
        if not self.flushing.acquire(blocking=wait):
            return  # another thread is writing a shard: these anchors wait for the next flush
        try:
            self.write_pending()
        finally:
            self.flushing.release()

    def write_pending(self) -> None:
        """Write what `pending` holds now as shards (`flush` calls it, one thread at a time)."""
        with self.lock:
            taken, self.pending = self.pending, {}
        for rule, tensors in taken.items():
            if not tensors:
                continue
            digest = hashlib.sha256("\n".join(sorted(tensors)).encode()).hexdigest()[:16]
            path = self.folder / f"{self.shard_prefix(rule)}{digest}.safetensors"
            metadata = {"diffmem.base_sha256": self.base.content_hash(), "diffmem.anchor_rule": rule,
                        "diffmem.cache_version": CACHE_VERSION}
            try:
                save_file(tensors, path, metadata)
            except DiffmemError as exc:  # a full or read-only cache disk costs time, never the result
                warnings.warn(f"anchors not cached ({exc}); they will be computed again", stacklevel=2)
                continue
            shard = SafetensorsFile(path)
            with self.lock:
                self.index(rule).update({name.rsplit(".", 1)[0]: shard for name in shard})


@dataclass
class AnchorBuild:
    """What `build_anchors` did: weights seen, anchors computed and read from the cache, where they are."""

    weights: int
    computed: int
    loaded: int
    seconds: float
    cache_folder: Path

    def summary(self) -> str:
        where = f" in {self.cache_folder}"
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
    # Largest first: the last weights a worker takes are then small, and no core waits long for the other.
    targets = sorted(distinct_targets(base, only), key=lambda target: -math.prod(target.shape))
    if not targets:
        raise DiffmemError(f"has no LoRA-targetable weights{f' under {only!r}' if only else ''}", base.path)
    store = AnchorStore(base, cache_dir=cache_dir, device=device)
    # One weight per core: an eigendecomposition is mostly sequential work that its own threads barely speed up.
    with one_thread_each(device) as run:
        done = run(lambda target: store.get(target, energy, k, side="right"), targets)
        # Taking every result waits for every weight, raises the first worker's error here, and moves the bar.
        for _ in progress_bar(done, total=len(targets), desc="anchors", unit="weight", disable=not progress):
            pass
    store.flush()
    return AnchorBuild(weights=len(targets), computed=store.computed, loaded=store.loaded,
                       seconds=time.perf_counter() - started, cache_folder=store.folder)
