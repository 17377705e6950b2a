"""The seed's Table 1 on the world: every fine-tuning method with and without each mitigation, and MemControl's
mask, trained by the same code and measured by `diffmem.bench` (FID, AMD, extracted images, copy rate) plus
Wen's score on the duplicated captions (the denoising-strength heuristic)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from diffmem.errors import DiffmemError
from diffmem.formats.safetensors_io import write_atomic
from diffmem.memcontrol.mask import Mask, load_mask
from diffmem.memcontrol.methods import check_method
from diffmem.memcontrol.mitigation import MITIGATIONS, MitigationConfig
from diffmem.memcontrol.search import memorization_objective
from diffmem.memcontrol.train import MemControlTrainConfig, finetune_with_mask, manifest_of

BASELINES = ("none", "full", "svdiff", "difffit", "attention")
LABELS = {"none": "Freeze (no fine-tuning)", "full": "Full FT", "svdiff": "SV-DIFF", "difffit": "DiffFit",
          "attention": "Attn tuning", "lora": "LoRA"}
MITIGATION_LABELS = {"none": "", "rwa": " + RWA", "threshold": " + Threshold"}


@dataclass(frozen=True)
class TableConfig:
    """What the table trains and how it measures.

    Attributes:
        train: the fine-tune every row shares (method and mitigation vary per row). The world recipe is 500 x 16;
            `quick()` runs 100 x 8, which memorizes less (see docs/memcontrol.md).
        wen_steps / wen_generations / guidance: sampling of Wen's score on the duplicated captions, as the
            search's (`SearchConfig`): 10 DDIM steps, 2 generations per caption, the world's guidance 3.
        mitigations: the mitigations crossed with every method.
        methods: the baseline fine-tuning methods ("none" is the seed's "Freeze" row, trained with no mitigation).
    """

    train: MemControlTrainConfig = field(default_factory=MemControlTrainConfig)
    wen_steps: int = 10
    wen_generations: int = 2
    guidance: float = 3.0
    mitigations: tuple[str, ...] = MITIGATIONS
    methods: tuple[str, ...] = BASELINES

    def __post_init__(self) -> None:
        for name in self.mitigations:
            MitigationConfig(kind=name)
        for name in self.methods:
            check_method(name)

    @classmethod
    def quick(cls) -> TableConfig:
        """100 steps of 8 images per row: the whole table in about half an hour on one contended CPU thread."""
        return cls(train=MemControlTrainConfig(steps=100, batch_size=8))


def table_rows(mask: Mask | None, mask_method: str | None, mitigations: tuple[str, ...],
               methods: tuple[str, ...] = BASELINES) -> list[tuple[str, str, bool]]:
    """(method, mitigation, uses the mask) per row, in the seed's order; MemControl rows only with a mask."""
    rows = [("none", "none", False)] if "none" in methods else []
    rows += [(m, g, False) for m in methods if m != "none" for g in mitigations]
    if mask is not None:
        rows += [(mask_method, g, True) for g in mitigations]
    return rows


def row_label(method: str, mitigation: str, masked: bool) -> str:
    name = f"MemControl ({LABELS[method]} mask)" if masked else LABELS[method]
    return name + MITIGATION_LABELS[mitigation]


def markdown_table(rows: list[dict]) -> str:
    """The rows as the seed's Table 1 columns (plus copy rate, Wen score and trained parameters)."""
    lines = ["| FT method + mitigation | FID | AMD | extracted | copy rate | Wen score | held-out loss | trained |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['fid']:.2f} | {r['amd']:.3f} | {r['extracted']} | {r['copy_rate']:.3f} | "
                     f"{r['wen']:.3f} | {r['heldout_loss']:.4f} | {r['trainable_parameters']} |")
    return "\n".join(lines) + "\n"


def run_table(out: str | Path, config: TableConfig | None = None, mask_path: str | Path | None = None,
              progress: bool = True) -> list[dict]:
    """Train and measure every row; write `rows.json` and `table.md` to `out` after each row (a stopped run keeps
    the rows it finished). `mask_path`: a mask from `diffmem memcontrol search` (its method is read from it)."""
    from diffmem.bench.evaluate import BenchSettings, Probe, measure
    from diffmem.metrics.embedder import load_copy_embedder
    from diffmem.world.data import FINETUNE_SETS
    from diffmem.world.model import load_base

    config = config or TableConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mask, mask_method = None, None
    if mask_path is not None:
        mask = load_mask(mask_path)
        record = json.loads(Path(mask_path).read_text())
        mask_method = record.get("search", {}).get("method")
        if mask_method is None:
            raise DiffmemError("mask has no `search.method`: pass a mask written by `diffmem memcontrol search`", mask_path)
    base = load_base()
    embedder = load_copy_embedder()
    probe = None
    rows: list[dict] = []
    for method, mitigation, masked in table_rows(mask, mask_method, config.mitigations, config.methods):
        train = replace(config.train, method=method, mitigation=replace(config.train.mitigation, kind=mitigation))
        began = time.time()
        result = finetune_with_mask(base, train, mask if masked else None, progress=False)
        manifest = manifest_of(result, train, mask if masked else None)
        probe = probe or Probe.from_manifest(manifest, embedder)
        numbers, _ = measure(result.unet, probe, BenchSettings())
        captions = list(FINETUNE_SETS[train.data]("train").subset(result.duplicated).captions)
        row = {"label": row_label(method, mitigation, masked), "method": method, "mitigation": mitigation,
               "mask": mask.bits if masked else None, **numbers,
               "wen": round(memorization_objective(result.unet, captions, config.wen_steps, config.wen_generations,
                                                   config.guidance, train.seed), 4),
               "trainable_parameters": result.trainable_parameters,
               "train_s": round(result.wall_time_s), "total_s": round(time.time() - began)}
        rows.append(row)
        if progress:
            print(json.dumps(row), flush=True)
        summary = {"settings": asdict(config), "mask_file": None if mask_path is None else str(mask_path), "rows": rows}
        write_atomic((json.dumps(summary, indent=2) + "\n").encode(), out / "rows.json")
        write_atomic(markdown_table(rows).encode(), out / "table.md")
    return rows

