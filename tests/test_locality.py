"""diffmem.locality: the statistics on hand-built tensors with known answers, the config's checks, and the whole
runner on a tiny world UNet at a tiny budget, writing its JSON and page."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
import torch

from diffmem.attack import DoriConfig
from diffmem.errors import DiffmemError, FileFormatError
from diffmem.locality import LocalityConfig, LocalityInputs, run_locality, write_results
from diffmem.locality.commands import register, render_from_json
from diffmem.locality.experiment import (
    between_captions_of_results,
    channel_effects,
    neuron_selection,
    noisy_inputs,
    pairwise_agreement,
)
from diffmem.locality.functional import (
    DISTANCE_KINDS,
    embedding_distances,
    expected_layered_jaccard,
    expected_random_jaccard,
    jaccard,
    layered_agreement,
    off_diagonal,
    pairwise_embedding_distances,
    selection_agreement,
    top_k_mask,
    top_share_count,
)
from diffmem.locality.report import rounded
from diffmem.mitigations.nemo import NeMoConfig
from diffmem.mitigations.wanda import WandaConfig
from diffmem.world.check import CheckSettings
from diffmem.world.model import build_unet
from test_world import TINY

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mask(units: int, chosen) -> torch.Tensor:
    selection = torch.zeros(units, dtype=torch.bool)
    selection[list(chosen)] = True
    return selection


# ------------------------------------------------------------------------------------------------------- Jaccard
def test_jaccard_of_identical_disjoint_and_partial_selections():
    assert jaccard(mask(10, [1, 2, 3]), mask(10, [1, 2, 3])) == 1.0
    assert jaccard(mask(10, [1, 2]), mask(10, [5, 6, 7])) == 0.0
    assert jaccard(mask(10, [1, 2, 3]), mask(10, [2, 3, 4, 5])) == pytest.approx(2 / 5)
    assert jaccard(mask(4, []), mask(4, [])) == 1.0
    with pytest.raises(ValueError, match="different units"):
        jaccard(mask(4, [1]), mask(5, [1]))


def brute_force_expected_jaccard(units: int, a: int, b: int) -> float:
    first = set(range(a))  # by symmetry one fixed set of size a against every set of size b
    values = [jaccard(mask(units, first), mask(units, other)) for other in itertools.combinations(range(units), b)]
    return sum(values) / len(values)


@pytest.mark.parametrize("units,a,b", [(6, 2, 3), (7, 3, 3), (5, 1, 4), (8, 4, 0)])
def test_expected_random_jaccard_matches_enumeration(units, a, b):
    assert expected_random_jaccard(units, a, b) == pytest.approx(brute_force_expected_jaccard(units, a, b))


def test_expected_random_jaccard_known_cases_and_simulation():
    assert expected_random_jaccard(10, 10, 4) == pytest.approx(0.4)  # A is everything: J = |B| / n
    assert expected_random_jaccard(10, 0, 0) == 1.0
    generator = torch.Generator().manual_seed(0)
    simulated = [jaccard(torch.randperm(500, generator=generator)[:40].bincount(minlength=500).bool(),
                         torch.randperm(500, generator=generator)[:60].bincount(minlength=500).bool())
                 for _ in range(2000)]
    assert expected_random_jaccard(500, 40, 60) == pytest.approx(sum(simulated) / len(simulated), rel=0.05)
    with pytest.raises(ValueError):
        expected_random_jaccard(5, 6, 1)


def test_layered_chance_is_exact_when_one_selection_takes_everything():
    assert expected_layered_jaccard([10, 20], [10, 20], [3, 5]) == pytest.approx(8 / 30)
    assert expected_layered_jaccard([10], [0], [0]) == 1.0


def test_selection_agreement_and_layered_pooling():
    one = selection_agreement(mask(10, [0, 1, 2, 3]), mask(10, [2, 3, 4]))
    assert one["jaccard"] == pytest.approx(2 / 5) and one["overlap"] == 2
    assert one["chance"] == pytest.approx(expected_random_jaccard(10, 4, 3))
    pooled = layered_agreement({"a": mask(10, [0, 1]), "b": mask(4, [0])}, {"a": mask(10, [1, 2]), "b": mask(4, [0])})
    assert pooled["layers"]["a"]["jaccard"] == pytest.approx(1 / 3) and pooled["layers"]["b"]["jaccard"] == 1.0
    assert pooled["overall"]["jaccard"] == pytest.approx(2 / 4)  # overlaps 1 + 1, union 3 + 1
    assert pooled["overall"]["units"] == 14
    with pytest.raises(ValueError, match="different layers"):
        layered_agreement({"a": mask(3, [0])}, {"b": mask(3, [0])})


def test_top_k_mask_and_share_count():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [4.0, 3.0, 2.0, 1.0]])
    assert top_k_mask(scores, 2).tolist() == [[False, True, False, True], [True, True, False, False]]
    assert not top_k_mask(scores, 0).any()
    assert top_share_count(64, 0.1) == 7 and top_share_count(5, 0.01) == 1 and top_share_count(10, 1.0) == 10
    with pytest.raises(ValueError):
        top_share_count(10, 0.0)


# ----------------------------------------------------------------------------------------------------- distances
def test_embedding_distances_on_known_embeddings():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert all(value == pytest.approx(0.0, abs=1e-12) for value in embedding_distances(x, x).values())
    orthogonal = torch.tensor([[0.0, 3.0], [5.0, 0.0]])
    d = embedding_distances(x, orthogonal)
    assert d["cosine_per_token"] == pytest.approx(1.0)
    assert d["l2_per_token"] == pytest.approx((10 ** 0.5 + 29 ** 0.5) / 2)
    assert d["l2_pooled"] == pytest.approx(((0.5 - 2.5) ** 2 + (1.0 - 1.5) ** 2) ** 0.5)
    scaled = embedding_distances(x, 3 * x)
    assert scaled["cosine_per_token"] == pytest.approx(0.0, abs=1e-12) and scaled["cosine_pooled"] == pytest.approx(0.0, abs=1e-12)
    assert scaled["l2_per_token"] == pytest.approx((2 + 4) / 2)
    with pytest.raises(ValueError):
        embedding_distances(x, torch.zeros(3, 2))


def test_pairwise_distances_match_the_pair_functions():
    embeddings = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1))
    matrices = pairwise_embedding_distances(embeddings)
    for kind in DISTANCE_KINDS:
        assert matrices[kind][1, 3] == pytest.approx(embedding_distances(embeddings[1], embeddings[3])[kind])
        assert torch.allclose(matrices[kind], matrices[kind].T)
    assert off_diagonal(matrices["l2_pooled"]).numel() == 6


# ------------------------------------------------------------------------------------------------ model helpers
@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return build_unet(TINY).eval()


def test_noisy_inputs_are_fixed_by_the_seed():
    target = torch.rand(1, 3, 32, 32)
    (x1, t1), (x2, _), (x3, _) = (noisy_inputs(target, (999, 10), 2, seed) for seed in (0, 0, 1))
    assert x1.shape == (4, 3, 32, 32) and t1.tolist() == [999, 999, 10, 10]
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)


def test_pairwise_agreement_averages_over_pairs():
    same = {"l": mask(4, [0, 1])}
    assert pairwise_agreement([same]) is None
    result = pairwise_agreement([same, same, {"l": mask(4, [2, 3])}])
    assert result["pairs"] == 3 and result["jaccard"] == pytest.approx((1 + 0 + 0) / 3)


def test_channel_effects_and_neuron_selection():
    before = {"b": torch.zeros(2, 3, 4)}
    after = {"b": torch.tensor([0.0, 1.0, 0.0, -2.0]).expand(2, 3, 4)}
    assert channel_effects(before, after)["b"].tolist() == [0.0, 1.0, 0.0, 2.0]
    layers = {"l": torch.nn.Linear(3, 5)}
    assert neuron_selection(layers, {"l": [1, 4]})["l"].tolist() == [False, True, False, False, True]
    assert not neuron_selection(layers, {})["l"].any()


def test_config_and_inputs_refuse_bad_settings():
    with pytest.raises(ValueError, match="starts"):
        LocalityConfig(starts=("nearby",))
    with pytest.raises(ValueError, match="relocalise_start"):
        LocalityConfig(starts=("prompt",), relocalise_start="random")
    with pytest.raises(ValueError, match="top_share"):
        LocalityConfig(top_share=0)
    with pytest.raises(DiffmemError, match="one caption each"):
        LocalityInputs(torch.rand(2, 3, 32, 32), ["a"], torch.rand(2, 3, 32, 32), ["x", "y"], ["x", "y"], {})


# ---------------------------------------------------------------------------------------------------- the runner
def tiny_inputs() -> LocalityInputs:
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 32, 32, generator=generator)
    reference = torch.cat([images, torch.rand(3, 3, 32, 32, generator=generator)])
    ordinary = ["a photo of a cat", "a small red circle at the left on a white background",
                "a photo of grass", "a large blue square in the center on a striped pink background"]
    return LocalityInputs(images, ["a black and white photo of Ada Castell", "a black and white photo of Nils Eklund"],
                          reference, ordinary, ordinary[:3], {"tiny captions": ordinary})


TINY_BUDGET = LocalityConfig(
    starts=("prompt", "random", "unrelated"), dori=DoriConfig(steps=2, batch_size=2),
    check=CheckSettings(generations=2, steps=2), timesteps=(999, 400), noise_draws=1, baseline_ordinary=1,
    # A threshold far under every signal, so NeMo selects neurons for every prompt without refining them.
    nemo=NeMoConfig(generations=2, threshold_stds=-50.0, theta_start=1.5, theta_min=1.0, theta_step=0.5, refine=False),
    wanda=WandaConfig(generations=1, steps=2, fraction=0.05),
)


@pytest.mark.slow
def test_runner_end_to_end_writes_json_and_page(tmp_path, tiny_unet):
    before = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    results = run_locality(tiny_unet, tiny_inputs(), TINY_BUDGET)
    assert all(torch.equal(before[k], v) for k, v in tiny_unet.state_dict().items())  # the model is untouched
    assert results["memorized"] == tiny_inputs().captions and len(results["captions"]) == 2
    caption = results["captions"][0]
    assert [a["start"] for a in caption["attacks"]] == ["prompt", "random", "unrelated"]
    for attack in caption["attacks"]:
        assert 0 <= attack["copy_rate"] <= 1 and 0 <= attack["copy_rate_on_nemo"] <= 1
        assert all(value >= 0 for value in attack["to_original"].values())
        assert attack["to_start"]["l2_per_token"] > 0  # the search moved the embedding
    assert caption["attacks"][0]["start_to_original"]["l2_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert len(caption["convergence"]) == 3
    adversarial = caption["activations"]["adversarial"]
    assert len(adversarial) == 3 and all(-1 <= e["value"]["cosine_mean"] <= 1 for e in adversarial)
    assert caption["activations"]["baselines"]["value_other_memorized"]["prompts"] == 1
    selections = caption["selections"]
    assert selections["nemo_neurons"] > 0 and selections["wanda_weights"] > 0
    assert 0 <= selections["channels"]["nemo_vs_wanda"]["overall"]["jaccard"] <= 1
    assert selections["relocalised"]["start"] == "random"
    assert results["spread"]["tiny captions"]["captions"] == 4
    between = results["between_captions"]
    assert between["nemo"]["pairs"] == 1 and between["wanda"]["pairs"] == 1
    assert 0 <= between["wanda"]["jaccard"] <= 1 and 0 <= between["wanda"]["chance"] <= 1

    json_path, page = tmp_path / "locality.json", tmp_path / "locality.md"
    write_results(results | {"command": "diffmem locality --tiny"}, json_path, page)
    assert json.loads(json_path.read_text())["memorized"] == results["memorized"]
    text = page.read_text()
    assert "## 1. Where adversarial embeddings lie" in text and "diffmem locality --tiny" in text
    assert "NeMo vs Wanda" in text and "n/a" not in text.split("## Reading")[1].split("## 1.")[0]


def test_runner_at_the_smallest_budget_writes_its_outputs(tmp_path, tiny_unet):
    config = LocalityConfig(captions=1, starts=("random",), dori=DoriConfig(steps=1, batch_size=1),
                            check=CheckSettings(generations=1, steps=1), timesteps=(999,), noise_draws=1,
                            baseline_ordinary=1, nemo=TINY_BUDGET.nemo, wanda=TINY_BUDGET.wanda,
                            relocalise_start=None, judge_on_nemo=False)
    saved = []
    results = run_locality(tiny_unet, tiny_inputs(), replace(config, captions=2), checkpoint=saved.append)
    assert len(results["captions"]) == 2 and "relocalised" not in results["captions"][0]["selections"]
    assert "copy_rate_on_nemo" not in results["captions"][0]["attacks"][0]
    assert len(saved) == 1 and saved[0]["studied"] == results["studied"][:1]  # after the first of two captions
    assert "between_captions" not in saved[0] and results["between_captions"]["wanda"]["pairs"] == 1
    # A run saved without the between-faces scale gets the same numbers afterwards.
    assert between_captions_of_results(tiny_unet, rounded(results)) == results["between_captions"]
    json_path, page = tmp_path / "out" / "locality.json", tmp_path / "locality.md"
    json_path.parent.mkdir()
    write_results(results | {"command": "diffmem locality --json out.json"}, json_path, page)
    assert json.loads(json_path.read_text())["captions"][0]["caption"] == tiny_inputs().captions[0]
    assert page.read_text().startswith("# Is memorization local?")
    assert "2 of its 2 memorized captions studied" in page.read_text()
    again = tmp_path / "again.md"
    assert render_from_json(json_path, again) == 0 and again.read_text() == page.read_text()
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(FileFormatError, match="not a locality results file"):
        render_from_json(tmp_path / "bad.json", again)


def test_command_refuses_to_overwrite_the_results_it_reads(tmp_path):
    import argparse

    parser = argparse.ArgumentParser(prog="diffmem")
    register(parser.add_subparsers())
    results = tmp_path / "results.json"
    args = parser.parse_args(["locality", "--json", str(results), "--add-between-captions", str(results)])
    with pytest.raises(DiffmemError, match="another file"):
        args.handler(args)
    # The same with the new spelling, and the file's own flag in the message.
    args = parser.parse_args(["locality", "--json-out", str(results), "--add-between-captions", str(results)])
    with pytest.raises(DiffmemError, match="--json-out must name another file"):
        args.handler(args)


def test_command_json_options_and_usage_errors(tmp_path, capsys):
    """`--json-out PATH` names the results file (`--json PATH` is its old spelling, with a note; bare `--json`
    prints the results on stdout); `--from-json [RESULTS_JSON]` reads a run; a value a config refuses exits 2 naming
    the flag, before any model is loaded."""
    from diffmem.cli import main

    bad, page = tmp_path / "bad.json", tmp_path / "page.md"
    bad.write_text("{}")
    assert main(["locality", "--markdown", str(page)]) == 2
    assert "--json-out PATH" in capsys.readouterr().err
    assert main(["locality", "--from-json", str(bad), "--markdown", str(page)]) == 1
    assert "not a locality results file" in capsys.readouterr().err
    assert main(["locality", "--from-json", "--json", str(bad), "--markdown", str(page)]) == 1  # the old spelling
    err = capsys.readouterr().err
    assert "not a locality results file" in err and "old spelling of --json-out" in err
    assert main(["locality", "--from-json", "--markdown", str(page)]) == 2
    assert "--from-json needs the results" in capsys.readouterr().err
    out = ["--json-out", str(tmp_path / "r.json")]
    for argv, message in ((["--top-share", "2"], "--top-share must lie in (0, 1]"),
                          (["--steps", "0"], "--steps and --batch-size must be >= 1"),
                          (["--nemo-generations", "0"], "need --nemo-generations >= 1"),
                          (["--captions", "0"], "--captions must be >= 1"),
                          (["--starts", "prompt", "--relocalise", "random"], "--relocalise 'random' is not among")):
        assert main(["locality", *out, *argv]) == 2, argv
        assert capsys.readouterr().err.startswith(f"diffmem: error: {message}"), argv
    assert not page.exists() and not (tmp_path / "r.json").exists()
