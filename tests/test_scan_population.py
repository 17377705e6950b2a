"""benchmarks/scan_population.py's scoring on synthetic cached scans: the rule is re-applied from the cached evidence,
chosen on the tune population only, and the held-out numbers come with bootstrap intervals."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "scan_population.py"


@pytest.fixture(scope="module")
def population():
    spec = importlib.util.spec_from_file_location("scan_population", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scan_population"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def row(name: str, memorizing: bool, ratio: float, extraction: float) -> dict:
    evidence = {"largest_wen_ratio": ratio, "largest_wen_ratio_prompt": "p", "extraction": extraction,
                "extracted_groups": int(extraction > 0), "groups_base_also_produces": 0}
    return {"lora": name, "memorizing": memorizing, "recovered_share": 0.4 if memorizing else None, "seconds": 1.0,
            "summary": {"evidence": evidence, "verdict": "?", "risk": 0.0}}


def test_recipes_alternate_kinds_and_shrink_to_the_first_of_each(population):
    names = [r.name for r in population.recipes("eval", 3)]
    assert [n[:3] for n in names] == ["mem", "ord"] * 4 and names[-2:] == ["mem-style-r16-s400-d5x100-240",
                                                                          "ord-style-r16-s400-290"]
    assert names[:6] == [r.name for r in population.recipes("eval")][:6]
    assert len(population.recipes("tune")) == 10 and len(population.recipes("eval")) == 26
    style = population.recipes("tune", 1)[-2:]
    assert [(r.config.data, r.config.duplicate, r.memorizing_recipe) for r in style] == [
        ("style", (5, 100), True), ("style", (0, 1), False)]
    with pytest.raises(ValueError, match="per_kind"):
        population.recipes("tune", 0)


def test_the_rule_is_chosen_on_tune_and_rescored_from_the_cached_evidence(population):
    # Memorizing LoRAs at ratios 1.4 and 1.5 are "unsure" under the provisional floor 1.25; floors 1.05 and 1.1 get all four
    # right, and of those the one nearer the provisional floor is chosen.
    tune = [row("m1", True, 1.4, 0.0), row("m2", True, 1.5, 0.0), row("o1", False, 1.0, 0.0),
            row("o2", False, 1.12, 0.0)]
    first = population.FIRST_RULE  # the ratio alone can decide in the first rule only
    chosen, table = population.choose_rule(tune, first)
    assert chosen.ratio_floor == 1.1 and chosen.ratio_full == pytest.approx(1.76) and chosen.wen_weight == 1.0
    assert population.verdict_accuracy(tune, first) == 0.5  # both memorizing ones "unsure"
    # The extraction-led default calls no LoRA "memorizing" on ratios alone, whatever the floor.
    assert population.verdict_accuracy(tune, population.choose_rule(tune)[0]) == 0.5
    assert max(t["accuracy"] for t in table) == 1.0 and len(table) == len(population.RATIO_FLOORS)
    assert population.rescored(tune[3], first) == 0.0  # below the provisional floor
    assert population.rescored(row("x", True, 1.0, 1.0), chosen) == 1.0  # extraction alone
    held_out = [row(f"m{i}", True, 1.2 + i / 10, 0.5) for i in range(4)] + \
        [row(f"o{i}", False, 1.0, 0.0) for i in range(4)]
    scores = population.score_population(held_out, chosen)
    assert scores["roc_auc"] == 1.0 and scores["tpr_at_5pct_fpr"] == 1.0 and scores["memorizing"] == 4
    assert scores["roc_auc_95ci"] == [1.0, 1.0] and scores["recovered_share_mean"] == pytest.approx(0.4)
    assert scores["verdicts"]["memorizing labelled, memorizing"] == 4 and scores["verdict_accuracy"] == 1.0
    assert scores["verdict_accuracy_95ci"] == [0.6306, 1.0]  # 8 of 8: Clopper-Pearson
    json.dumps(scores)
