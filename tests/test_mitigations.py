"""NeMo and Wanda-style pruning: the maths on hand-made tensors, and on a tiny UNet that applying a method changes
exactly the weights it reports and leaves its input alone."""

from __future__ import annotations

import zlib

import pytest
import torch

from diffmem.errors import BaseMismatchError, DiffmemError, FileFormatError
from diffmem.formats.safetensors_io import save_file
from diffmem.mitigations.nemo import (
    NeMoConfig,
    NeuronSearch,
    activation_statistics,
    first_step_noise,
    first_step_signal,
    initial_selection,
    memorization_threshold,
    nemo_mitigate,
    neuron_activations,
    neuron_masks,
    out_of_distribution_neurons,
    refine_selection,
    value_layers,
    z_scores,
)
from diffmem.mitigations.pruning import (
    apply_masks,
    load_masks,
    masked_count,
    random_like,
    random_masks,
    save_masks,
)
from diffmem.mitigations.wanda import (
    WandaConfig,
    feed_forward_outputs,
    input_feature_norms,
    memorization_weights,
    per_row_count,
    top_fraction_per_row,
    wanda_mitigate,
    wanda_scores,
)
from diffmem.world.model import build_unet
from test_world import TINY


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return build_unet(TINY).eval().requires_grad_(False)


def fake_encode(prompts: list[str]) -> torch.Tensor:
    """Deterministic text states per prompt [N, 16, 384] (the empty prompt gets small ones, as a real encoder's)."""
    states = []
    for prompt in prompts:
        generator = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
        scale = 0.1 if prompt == "" else 1.0
        states.append(scale * torch.randn(16, 384, generator=generator))
    return torch.stack(states)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_changes_only_masked(before: dict[str, torch.Tensor], after: torch.nn.Module, masks: dict) -> None:
    """Every parameter of `after` equals `before` except masked entries, which are zero."""
    for name, parameter in after.named_parameters():
        mask = masks.get(name, torch.zeros_like(parameter, dtype=torch.bool))
        assert torch.equal(parameter[~mask], before[name][~mask]), name
        assert bool((parameter[mask] == 0).all()), name


# ---------------------------------------------------------------------------------------------------- NeMo maths
def test_neuron_activation_is_mean_absolute_value_over_tokens():
    values = torch.tensor([[[1.0, -2.0], [-3.0, 0.0]]])  # [1 prompt, 2 tokens, 2 neurons]
    assert torch.equal(neuron_activations(values), torch.tensor([[2.0, 1.0]]))


def test_z_scores_standardise_against_ordinary_prompts():
    ordinary = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    mean, std = activation_statistics(ordinary)
    assert torch.allclose(mean, torch.tensor([2.0, 5.0]))
    z = z_scores(torch.tensor([[2.0 + 3 * 2**0.5, 5.0]]), mean, std)
    assert torch.allclose(z[0, 0], torch.tensor(3.0))
    assert z[0, 1] == 0  # a neuron that never varies is not an outlier when it does not move
    with pytest.raises(ValueError, match="at least 2"):
        activation_statistics(ordinary[:1])


def test_out_of_distribution_neurons_take_threshold_and_top_k():
    z = torch.tensor([0.5, 6.0, -7.0, 2.0, 4.9])
    assert out_of_distribution_neurons(z, 5.0) == [1]  # one-sided: a strongly negative z is not selected
    assert out_of_distribution_neurons(z, 4.75) == [1, 4]
    assert out_of_distribution_neurons(z, 5.0, top_k=3) == [1, 3, 4]


def test_memorization_threshold_is_mean_plus_stds():
    signals = torch.tensor([1.0, 2.0, 3.0])
    assert memorization_threshold(signals, 2.0) == pytest.approx(4.0)


class ScriptedSearch:
    """A stand-in for `NeuronSearch` whose signal is low only while all `needed` neurons are deactivated."""

    def __init__(self, needed: set[tuple[str, int]]):
        self.needed = needed
        self.evaluations = 0

    def signal(self, neurons):
        self.evaluations += 1
        blocked = {(path, n) for path, indices in neurons.items() for n in indices}
        return 0.5 if self.needed <= blocked else 2.0


def test_initial_selection_lowers_theta_until_signal_falls():
    z = {"a": torch.tensor([6.0, 3.0, 0.0]), "b": torch.tensor([2.6, 0.0])}
    search = ScriptedSearch({("a", 1), ("b", 0)})
    neurons, theta, signal = initial_selection(search, z, 1.0, NeMoConfig(top_k_step=0))
    assert theta == 2.5 and signal == 0.5
    assert neurons == {"a": [0, 1], "b": [0]}
    assert search.evaluations == 11  # theta 5, 4.75, ..., 2.5


def test_initial_selection_stops_at_theta_min_when_signal_stays_high():
    search = ScriptedSearch({("a", 2)})
    neurons, theta, signal = initial_selection(search, {"a": torch.tensor([6.0, 3.0, -1.0])}, 1.0,
                                               NeMoConfig(top_k_step=0))
    assert theta == 1.0 and signal == 2.0 and neurons == {"a": [0, 1]}


def test_refinement_keeps_exactly_the_needed_neurons():
    search = ScriptedSearch({("a", 1), ("c", 4)})
    candidates = {"a": [0, 1, 2], "b": [3], "c": [4, 5]}
    kept, signal = refine_selection(search, candidates, limit=1.0)
    assert kept == {"a": [1], "c": [4]} and signal == 0.5


# ---------------------------------------------------------------------------------------------------- Wanda maths
def test_wanda_score_is_weight_magnitude_times_input_norm():
    weight = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    norms = input_feature_norms(torch.tensor([9.0, 4.0]))
    assert torch.equal(norms, torch.tensor([3.0, 2.0]))
    assert torch.equal(wanda_scores(weight, norms), torch.tensor([[3.0, 4.0], [1.5, 0.0]]))


def test_top_fraction_is_per_row():
    scores = torch.tensor([[1.0, 5.0, 3.0, 2.0], [9.0, 0.0, 8.0, 7.0]])
    assert per_row_count(4, 0.5) == 2 and per_row_count(256, 0.01) == 3 and per_row_count(100, 0.01) == 1
    expected = torch.tensor([[False, True, True, False], [True, False, True, False]])
    assert torch.equal(top_fraction_per_row(scores, 0.5), expected)


def test_memorization_weights_must_beat_the_empty_prompt():
    weight = torch.tensor([[1.0, 1.0, 1.0, 0.1]])
    prompt_norms = torch.tensor([4.0, 3.0, 1.0, 100.0])
    empty_norms = torch.tensor([1.0, 5.0, 1.0, 1.0])
    # top 2 by the prompt score: features 0 (4.0) and 3 (10.0); feature 3 beats the empty prompt, so does 0
    assert memorization_weights(weight, prompt_norms, empty_norms, 0.5).tolist() == [[True, False, False, True]]
    # the empty prompt uses feature 0 more: only feature 3 stays
    empty_norms[0] = 10.0
    assert memorization_weights(weight, prompt_norms, empty_norms, 0.5).tolist() == [[False, False, False, True]]


# ---------------------------------------------------------------------------------------------------- masks
def test_masks_round_trip_and_refuse_other_files(tmp_path, tiny_unet):
    path = next(iter(value_layers(tiny_unet, ("down_blocks", "mid_block", "up_blocks"))))
    masks = neuron_masks(tiny_unet, {path: [0, 3]})
    assert masked_count(masks) == 2 * 384
    written = save_masks(masks, tmp_path / "m.safetensors", "nemo", {"neurons": {path: [0, 3]}})
    loaded, method, report = load_masks(written)
    assert method == "nemo" and report == {"neurons": {path: [0, 3]}}
    assert all(torch.equal(loaded[k], masks[k]) for k in masks)
    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(FileFormatError, match="not a pruning mask"):
        load_masks(tmp_path / "other.safetensors")
    with pytest.raises(BaseMismatchError, match="another model"):
        apply_masks(tiny_unet, {f"{path}.weight": torch.zeros(3, 3, dtype=torch.bool)})
    with pytest.raises(BaseMismatchError, match="does not have"):
        apply_masks(tiny_unet, {"nope.weight": torch.zeros(3, dtype=torch.bool)})


def test_random_control_keeps_the_structure_of_a_mask():
    generator = torch.Generator().manual_seed(0)
    rows = torch.zeros(50, 8, dtype=torch.bool)
    rows[[3, 7, 9]] = True  # NeMo: whole neurons
    control = random_like(rows, generator)
    assert int(control.all(dim=1).sum()) == 3 and int(control.sum()) == 3 * 8
    assert not torch.equal(control, rows)
    entries = torch.zeros(4, 100, dtype=torch.bool)
    entries[0, :2] = entries[2, 5] = True  # Wanda: a few weights per row
    control = random_like(entries, generator)
    assert control.sum(dim=1).tolist() == [2, 0, 1, 0] and not torch.equal(control, entries)
    masks = {"a.weight": rows, "a.bias": rows[:, 0].clone()}
    randomized = random_masks(masks, seed=1)
    assert torch.equal(randomized["a.weight"][:, 0], randomized["a.bias"])  # a neuron's weight row and its bias


# ---------------------------------------------------------------------------------------------------- tiny UNet
def test_blocking_hooks_match_the_applied_masks(tiny_unet):
    config = NeMoConfig(generations=2)
    layers = value_layers(tiny_unet, config.blocks)
    neurons = {path: [1, 5, 7] for path in list(layers)[:2]}
    prompt, empty = fake_encode(["a memorized caption"]), fake_encode([""])
    noise = first_step_noise(tiny_unet, config)
    search = NeuronSearch(tiny_unet, layers, prompt, empty, noise, config.timestep)
    pruned = apply_masks(tiny_unet, neuron_masks(tiny_unet, neurons))
    applied = float(first_step_signal(pruned, prompt, empty, noise, config.timestep)[0])
    assert search.signal(neurons) == pytest.approx(applied, rel=1e-5)
    assert search.signal({}) != pytest.approx(applied, rel=1e-3)


def test_nemo_changes_only_the_reported_value_rows(tiny_unet):
    before = snapshot(tiny_unet)
    config = NeMoConfig(generations=2, theta_start=2.0, theta_min=1.0, theta_step=0.5,
                        blocks=("down_blocks", "mid_block", "up_blocks"))
    ordinary = [f"an ordinary caption number {i}" for i in range(12)]
    memorized = ["a memorized caption"]
    signal = float(first_step_signal(tiny_unet, fake_encode(memorized), fake_encode([""]),
                                     first_step_noise(tiny_unet, config), config.timestep)[0])
    pruned, result, masks = nemo_mitigate(tiny_unet, memorized, ordinary, config=config, threshold=0.9 * signal,
                                          encode=fake_encode)
    assert result.prompts[0].signal_before == pytest.approx(signal, rel=1e-5)
    neurons = result.neurons
    assert neurons, "the search should deactivate some neurons"
    assert set(masks) == {f"{path}.weight" for path in neurons}  # the tiny UNet's to_v has no bias
    assert masked_count(masks) == sum(len(v) for v in neurons.values()) * 384
    assert_changes_only_masked(before, pruned, masks)
    assert all(torch.equal(p, before[n]) for n, p in tiny_unet.named_parameters())  # input untouched
    assert result.prompts[0].signal_after <= result.prompts[0].signal_before
    report = result.report()
    assert report["neuron_count"] == sum(len(v) for v in neurons.values())
    with pytest.raises(DiffmemError, match="at least 2 ordinary"):
        nemo_mitigate(tiny_unet, memorized, ordinary[:1], config=config, encode=fake_encode)


def test_wanda_changes_only_the_reported_feed_forward_weights(tiny_unet):
    before = snapshot(tiny_unet)
    config = WandaConfig(fraction=0.05, generations=2, steps=2)
    pruned, result, masks = wanda_mitigate(tiny_unet, ["a memorized caption", "another one"], config=config,
                                           encode=fake_encode)
    layers = feed_forward_outputs(tiny_unet)
    assert set(masks) == {f"{path}.weight" for path in layers}
    assert masked_count(masks) == result.report()["pruned_count"] > 0
    for path, layer in layers.items():
        per_row = masks[f"{path}.weight"].sum(dim=1)
        assert int(per_row.max()) <= per_row_count(layer.in_features, config.fraction)
    assert_changes_only_masked(before, pruned, masks)
    assert all(torch.equal(p, before[n]) for n, p in tiny_unet.named_parameters())


# ---------------------------------------------------------------------------------------------------- command line
def test_wanda_command_writes_mask_and_pruned_unet(tmp_path, tiny_unet):
    from diffmem.cli import main
    from diffmem.world.model import load_unet_file, unet_metadata, unet_tensors

    base = save_file(unet_tensors(tiny_unet, torch.float32), tmp_path / "tiny.safetensors", unet_metadata(TINY))
    prompts = tmp_path / "memorized.txt"
    prompts.write_text("a black and white photo of Bruno Bellamy\n# a comment\n")
    masks_path, unet_path = tmp_path / "wanda.safetensors", tmp_path / "pruned.safetensors"
    options = ["--base", str(base), "--prompts", str(prompts), "--steps", "1", "--generations", "1"]
    assert main(["mitigate", "wanda", *options, "--out", str(masks_path), "--unet-out", str(unet_path)]) == 0
    masks, method, report = load_masks(masks_path)
    assert method == "wanda" and report["prompts"] == ["a black and white photo of Bruno Bellamy"]
    assert report["pruned_weights"] == masked_count(masks) > 0
    original = load_unet_file(base)
    assert_changes_only_masked(snapshot(original), load_unet_file(unet_path), masks)
    applied = tmp_path / "applied.safetensors"
    assert main(["mitigate", "apply", "--masks", str(masks_path), "--base", str(base), "--out", str(applied)]) == 0
    assert applied.read_bytes() == unet_path.read_bytes()
    # never over an input, never a partial output
    assert main(["mitigate", "wanda", *options, "--out", str(base)]) == 1
    assert load_unet_file(base) is not None and not list(tmp_path.glob(".*.tmp"))
