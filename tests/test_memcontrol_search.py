"""MemControl's search: Pareto front, choice, and a tiny study end to end (resumed once)."""

from __future__ import annotations

import json

import pytest
import torch

from diffmem.errors import DiffmemError
from diffmem.memcontrol.mask import check_mask_fits, load_mask
from diffmem.memcontrol.search import (
    SearchConfig,
    TrialResult,
    earlier_trial,
    normalised_mean_choice,
    pareto_front,
    search,
    validation_rows,
)
from diffmem.memcontrol.train import MemControlTrainConfig
from diffmem.world.model import build_unet
from test_world import TINY

torch.set_num_threads(1)


def test_pareto_front_and_normalised_mean_choice():
    results = [TrialResult(0, "11", 5.0, 10.0, 9), TrialResult(1, "10", 1.0, 30.0, 4),
               TrialResult(2, "01", 3.0, 12.0, 5), TrialResult(3, "00", 6.0, 40.0, 0)]
    front = pareto_front(results)
    assert [r.number for r in front] == [1, 2, 0]
    values = [(r.memorization, r.fid) for r in results]
    # normalised: trial 0 (0.8, 0), trial 1 (0, 0.667), trial 2 (0.4, 0.067) -> trial 2 has the lowest mean
    assert normalised_mean_choice(values, [0, 1, 2]) == 2
    assert normalised_mean_choice([(1.0, 1.0), (1.0, 1.0)], [0, 1]) == 0
    again = [*results, TrialResult(4, "10", 1.0, 30.0, 4)]
    assert earlier_trial(again, "10").number == 1 and earlier_trial(again, "00").number == 3
    assert earlier_trial(results, "111") is None


def test_validation_rows_avoid_the_proxy_set():
    seen = [0, 3, 5, 7]
    rows = validation_rows(12, seen, 6, seed=0)
    assert len(rows) == 6 == len(set(rows)) and not set(rows) & set(seen) and rows == sorted(rows)
    assert rows == validation_rows(12, seen, 6, seed=0)
    assert sorted(validation_rows(12, seen, 8, seed=1)) == [r for r in range(12) if r not in seen]
    with pytest.raises(DiffmemError, match="only 8 training images"):
        validation_rows(12, seen, 9, seed=0)


def test_search_settings_are_checked():
    with pytest.raises(DiffmemError, match="no mask to search"):
        SearchConfig(method="full")
    with pytest.raises(DiffmemError, match="validation_size"):
        SearchConfig(validation_size=1)
    assert SearchConfig(method="attention").mask_granularity == "layers"
    assert SearchConfig(method="svdiff").mask_granularity == "blocks"


@pytest.mark.slow
def test_two_trial_search_end_to_end_and_resume(tmp_path):
    torch.manual_seed(0)
    base = build_unet(TINY).eval()
    train = MemControlTrainConfig(duplicate=(2, 2), rest_share=0.0, steps=1, batch_size=2)
    config = SearchConfig(method="svdiff", trials=2, population_size=2, train=train, wen_steps=2,
                          wen_generations=1, quality_generations=1, quality_steps=2)
    summary = search(tmp_path / "s", config, base=base, progress=False)
    assert len(summary["trials"]) == 2
    assert summary["trials"][0]["bits"] == "11111"  # the published method goes first
    assert all(t["memorization"] >= 0 and t["fid"] >= 0 for t in summary["trials"])
    mask = load_mask(tmp_path / "s" / "mask.json")
    check_mask_fits(mask, base)
    assert mask.bits == summary["chosen"]["bits"]
    assert summary["chosen"]["number"] in {t["number"] for t in summary["front"]}
    assert (tmp_path / "s" / "pareto.png").stat().st_size > 0
    assert "| trial | mask |" in (tmp_path / "s" / "pareto.md").read_text()

    resumed = search(tmp_path / "s", SearchConfig(**{**config.__dict__, "trials": 3}), base=base, progress=False)
    assert len(resumed["trials"]) == 3
    assert resumed["trials"][:2] == summary["trials"]
    record = json.loads((tmp_path / "s" / "mask.json").read_text())
    assert record["search"]["method"] == "svdiff"


def test_quick_search_trains_the_proxy_at_the_quick_tables_budget():
    from dataclasses import replace

    from diffmem.memcontrol.methods import default_lr
    from diffmem.memcontrol.table import TableConfig

    table, quick = TableConfig.quick(), SearchConfig.quick("difffit", trials=3, population_size=2)
    assert (quick.train.duplicate, quick.train.steps, quick.train.batch_size) == \
        (table.train.duplicate, table.train.steps, table.train.batch_size)
    assert quick.train.rest_share < table.train.rest_share and quick.trials == 3
    assert quick.inner.lr == pytest.approx(table.lr_scale * default_lr("difffit")) and quick.inner.method == "difffit"
    assert SearchConfig(method="difffit").inner.lr == default_lr("difffit")
    assert replace(quick, train=replace(quick.train, lr=0.5)).inner.lr == 0.5  # an explicit rate is not scaled
    with pytest.raises(DiffmemError, match="lr_scale"):
        SearchConfig(lr_scale=0.0)
