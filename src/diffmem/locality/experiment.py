"""The experiments behind seed 002's locality claims (Kowalczuk et al. 2025, "Finding Dori"), run on a world model
with memorized images: where Dori's adversarial embeddings lie, how their activations differ from the memorized
prompt's, and how much the neurons and weights NeMo and Wanda pick agree.

Everything model-specific is reused: the Dori search and its copy test (`diffmem.attack`), NeMo's localisation and
Wanda's scores (`diffmem.mitigations`), the world's text encoder and noise schedule (`diffmem.world`). The
statistics are the pure functions of `diffmem.locality.functional`; `diffmem.locality.report` writes the results.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from diffusers import UNet2DConditionModel

from diffmem.attack import attack_success, dori_attack
from diffmem.errors import DiffmemError
from diffmem.locality.functional import (
    DISTANCE_KINDS,
    activation_cosine,
    embedding_distances,
    layered_agreement,
    off_diagonal,
    pairwise_embedding_distances,
    spread,
    top_k_mask,
    top_share_count,
)
from diffmem.locality.settings import LocalityConfig  # defined there, without diffusers
from diffmem.mitigations.nemo import (
    calibrate_threshold,
    first_step_noise,
    first_step_signal,
    layer_z_scores,
    localize_neurons,
    neuron_activations,
    neuron_masks,
    value_layers,
    value_outputs,
)
from diffmem.mitigations.pruning import WeightMasks, apply_masks, forward_hooks, random_masks
from diffmem.mitigations.wanda import (
    InputSquareSums,
    WandaConfig,
    feed_forward_outputs,
    input_feature_norms,
    locate_weights,
)
from diffmem.world.diffusion import add_noise, predict_noise, to_model_range
from diffmem.world.text import encode_prompts

Progress = Callable[[str], None]


@dataclass
class LocalityInputs:
    """What the experiments need besides the model.

    `images` [P, 3, H, W] the memorized images and `captions` their P captions; `reference` the training images
    for the copy test (the memorized ones among them); `ordinary` captions the model did not memorize (NeMo's
    activation statistics and the activation baselines); `calibration` non-memorized captions for NeMo's threshold;
    `spread_captions` named sets of real captions whose pairwise distances give the scale of embedding distances.
    """

    images: torch.Tensor
    captions: list[str]
    reference: torch.Tensor
    ordinary: list[str]
    calibration: list[str]
    spread_captions: dict[str, list[str]]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or len(self.captions) != self.images.shape[0] or not self.captions:
            raise DiffmemError(f"need memorized images [P, 3, H, W] with one caption each, got "
                               f"{tuple(self.images.shape)} and {len(self.captions)} captions")
        if len(self.ordinary) < 2 or len(self.calibration) < 2:
            raise DiffmemError("need at least 2 ordinary and 2 calibration captions (NeMo's statistics)")
        if any(len(captions) < 2 for captions in self.spread_captions.values()):
            raise DiffmemError("every set of spread captions needs at least 2 captions")


def example_lora_inputs(manifest: Mapping) -> LocalityInputs:
    """Inputs from a world fine-tune manifest (e.g. the committed example LoRA's): its duplicated images and
    captions, its training images as the copy reference, held-out and seen-once captions as ordinary prompts
    (NeMo's statistics, `manifest_prompts`), and two caption sets for the spread: all of the fine-tune's captions
    (the memorized captions' own template) and captions of the base model's data (shapes and photos)."""
    from diffmem.mitigations.run import manifest_prompts
    from diffmem.world.check import manifest_images
    from diffmem.world.data import BASE_PHOTOS, ImageSet, shapes_dataset

    duplicated = manifest_images(manifest, "duplicated")
    reference = ImageSet.concat([duplicated, manifest_images(manifest, "seen_once")]).images
    prompts = manifest_prompts(manifest)
    fine_tune = list(dict.fromkeys(prompts.memorized + prompts.ordinary))
    base = list(dict.fromkeys(shapes_dataset(40, seed=0).captions + list(BASE_PHOTOS.values())))
    return LocalityInputs(duplicated.images, list(duplicated.captions), reference, prompts.ordinary,
                          prompts.calibration, {"fine-tune captions": fine_tune, "base-model captions": base})


# ------------------------------------------------------------------------------------------------ recording helpers
def noisy_inputs(target: torch.Tensor, timesteps: Sequence[int], draws: int, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t [len(timesteps) * draws, C, H, W], t) noisy copies of one [1, C, H, W] image in [0, 1] at fixed noise."""
    generator = torch.Generator().manual_seed(seed)
    steps = torch.tensor([t for t in timesteps for _ in range(draws)], dtype=torch.long)
    x0 = to_model_range(target.float()).expand(len(steps), -1, -1, -1)
    return add_noise(x0, torch.randn(x0.shape, generator=generator), steps), steps


def feed_forward_activations(unet: torch.nn.Module, x: torch.Tensor, steps: torch.Tensor, context: torch.Tensor
                             ) -> dict[str, torch.Tensor]:
    """{ff.net.2 layer: ||X_j|| [hidden neurons]}: the input norms Wanda weighs (Sun et al. 2024, eq. 1), over the
    noisy inputs `x` at `steps` with one text `context` [1, tokens, dim]."""
    recorder = InputSquareSums(feed_forward_outputs(unet))
    with torch.no_grad(), recorder.recording():
        predict_noise(unet, x, steps, context.expand(len(x), -1, -1))
    return {path: input_feature_norms(sums) for path, sums in recorder.sums[""].items()}


def transformer_blocks(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{path: block} of the UNet's transformer blocks (`...transformer_blocks.N`), whose outputs are the residual
    stream both the cross-attention and the feed-forward layer of the block write into."""
    blocks = {path: module for path, module in unet.named_modules()
              if path.split(".")[-2:-1] == ["transformer_blocks"]}
    if not blocks:
        raise DiffmemError("the UNet has no transformer blocks (...transformer_blocks.N)")
    return blocks


def block_outputs(unet: torch.nn.Module, x: torch.Tensor, steps: torch.Tensor, context: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
    """{transformer block: output hidden states [N, tokens, channels]} for noisy inputs and one text context."""
    outputs: dict[str, torch.Tensor] = {}

    def make_hook(path: str) -> Callable:
        def record(_module, _inputs, output):
            outputs[path] = (output[0] if isinstance(output, tuple) else output).detach().float()
        return record

    with torch.no_grad(), forward_hooks(transformer_blocks(unet), make_hook):
        predict_noise(unet, x, steps, context.expand(len(x), -1, -1))
    return outputs


def channel_effects(reference: Mapping[str, torch.Tensor], changed: Mapping[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """{block: mean |h_changed - h_reference| per channel} over inputs and tokens: where a pruning changes the
    residual stream (the common unit on which NeMo's and Wanda's selections can be compared)."""
    return {path: (changed[path] - reference[path]).abs().mean(dim=(0, 1)) for path in reference}


def top_selections(activations: Mapping[str, torch.Tensor], share: float) -> dict[str, torch.Tensor]:
    """{layer: bool mask of its top `share` units} of per-unit scores [units]."""
    return {path: top_k_mask(values, top_share_count(values.numel(), share)) for path, values in activations.items()}


def neuron_selection(layers: Mapping[str, torch.nn.Linear], neurons: Mapping[str, Sequence[int]]
                     ) -> dict[str, torch.Tensor]:
    """{value layer: bool mask over its output neurons} of a NeMo neuron set (layers without neurons all False)."""
    selection = {}
    for path, layer in layers.items():
        mask = torch.zeros(layer.out_features, dtype=torch.bool)
        mask[torch.tensor(list(neurons.get(path, [])), dtype=torch.long)] = True
        selection[path] = mask
    return selection


def size_matched_top(scores: Mapping[str, torch.Tensor], sizes: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{layer: the top-|sizes[layer]| units by `scores`}: a selection with the same per-layer counts."""
    return {path: top_k_mask(scores[path], int(sizes[path].sum())) for path in scores}


def mean_activation_comparison(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], share: float) -> dict:
    """Per-layer cosine of activation vectors and Jaccard of their top-`share` neurons (with chance), pooled."""
    agreement = layered_agreement(top_selections(a, share), top_selections(b, share))
    cosines = {path: activation_cosine(a[path], b[path]) for path in a}
    return {"cosine_mean": sum(cosines.values()) / len(cosines), "cosine_layers": cosines,
            "top_jaccard": agreement["overall"]["jaccard"], "top_chance": agreement["overall"]["chance"],
            "top_layers": {p: v["jaccard"] for p, v in agreement["layers"].items()}}


def averaged(comparisons: Sequence[dict]) -> dict:
    """Mean of the scalar entries of several `mean_activation_comparison` results (a baseline over prompts)."""
    keys = ("cosine_mean", "top_jaccard", "top_chance")
    return {key: sum(c[key] for c in comparisons) / len(comparisons) for key in keys} | {"prompts": len(comparisons)}


# ---------------------------------------------------------------------------------------------------- the runner
def run_locality(
    unet: UNet2DConditionModel,
    inputs: LocalityInputs,
    config: LocalityConfig = LocalityConfig(),
    progress: Progress | None = None,
    checkpoint: Callable[[dict], None] | None = None,
) -> dict:
    """All three locality experiments on `unet` (not modified); a JSON-ready dict of every measured number.
    `checkpoint`, if given, receives the results of the captions finished so far after each caption."""
    say = progress or (lambda _message: None)
    started = time.monotonic()
    count = len(inputs.captions) if config.captions is None else min(config.captions, len(inputs.captions))
    captions, images = inputs.captions[:count], inputs.images[:count]
    prompt_states = encode_prompts(captions)
    ordinary_states = encode_prompts(inputs.ordinary)
    empty = encode_prompts([""])
    layers = value_layers(unet, config.nemo.blocks)

    spreads = {}
    for name, real in inputs.spread_captions.items():
        matrices = pairwise_embedding_distances(encode_prompts(real))
        spreads[name] = {kind: spread(off_diagonal(matrices[kind])) for kind in DISTANCE_KINDS} | {"captions": len(real)}
    memorized_pairs = pairwise_embedding_distances(prompt_states) if count > 1 else None

    threshold, _ = calibrate_threshold(unet, encode_prompts(inputs.calibration), empty, config.nemo)
    say(f"NeMo threshold {threshold:.4f}; localising the {count} memorized prompts")
    nemo = localize_neurons(unet, captions, prompt_states, ordinary_states, empty, threshold, config.nemo,
                            lambda found: say(f"  NeMo: {found.prompt!r}: {found.count} neurons, signal "
                                              f"{found.signal_before:.3f} -> {found.signal_after:.3f}"))
    nemo_pruned = apply_masks(unet, neuron_masks(unet, nemo.neurons))
    signal_noise = first_step_noise(unet, config.nemo)
    ordinary_values = {p: neuron_activations(v) for p, v in value_outputs(layers, ordinary_states).items()}
    value_all = {p: neuron_activations(v) for p, v in value_outputs(layers, prompt_states).items()}
    z_prompt = layer_z_scores(layers, prompt_states, ordinary_states)

    results: list[dict] = []
    wanda_per_caption: list[dict[str, torch.Tensor]] = []
    nemo_per_caption = [neuron_selection(layers, found.neurons) for found in nemo.prompts]
    for i, caption in enumerate(captions):
        target = images[i : i + 1]
        original = prompt_states[i : i + 1]
        say(f"[{i + 1}/{count}] {caption!r}: {len(config.starts)} Dori searches")
        attacks, embeddings, starts = [], [], []
        for j, kind in enumerate(config.starts):
            dori = replace(config.dori, start=kind, seed=config.dori.seed + j)
            result = dori_attack(unet, target, caption, dori)
            judged = attack_success(unet, result.embedding, target, inputs.reference, config.check)
            entry = {
                "start": kind, "seed": dori.seed, "copy_rate": round(judged.rate, 4),
                "median_distance": round(float(judged.distance.median()), 4),
                "loss_first": round(result.losses[0], 5), "loss_last": round(result.losses[-1], 5),
                "to_original": embedding_distances(result.embedding[0], original[0]),
                "start_to_original": embedding_distances(result.start[0], original[0]),
                "to_start": embedding_distances(result.embedding[0], result.start[0]),
            }
            if config.judge_on_nemo:
                on_nemo = attack_success(nemo_pruned, result.embedding, target, inputs.reference, config.check)
                entry["copy_rate_on_nemo"] = round(on_nemo.rate, 4)
            attacks.append(entry)
            embeddings.append(result.embedding)
            starts.append(result.start)
            say(f"  {kind} (seed {dori.seed}): copy rate {judged.rate:.2f}, cosine to prompt "
                f"{entry['to_original']['cosine_per_token']:.3f}")
        found = torch.cat(embeddings)
        between_found = pairwise_embedding_distances(found)
        between_starts = pairwise_embedding_distances(torch.cat(starts))
        pairs = [(a, b) for a in range(len(found)) for b in range(a + 1, len(found))]
        convergence = [{"starts": [config.starts[a], config.starts[b]], "seeds": [a, b],
                        "found": {k: float(between_found[k][a, b]) for k in DISTANCE_KINDS},
                        "start": {k: float(between_starts[k][a, b]) for k in DISTANCE_KINDS}} for a, b in pairs]
        nearest_memorized = None
        if memorized_pairs is not None:
            nearest_memorized = {k: float(torch.cat([memorized_pairs[k][i, :i], memorized_pairs[k][i, i + 1:]]).min())
                                 for k in DISTANCE_KINDS}

        say("  activations, NeMo and Wanda selections")
        activations = compare_activations(unet, nemo_pruned, layers, i, caption, target, found, config, inputs,
                                          prompt_states, ordinary_states, empty, value_all, ordinary_values, z_prompt,
                                          nemo.prompts[i].neurons, threshold, signal_noise)
        wanda_masks, wanda_result = locate_weights(unet, [caption], original, empty, config.wanda)
        wanda_per_caption.append(mask_selection(wanda_masks))
        localisation = compare_selections(unet, layers, caption, original, target, found, nemo.prompts[i].neurons,
                                          wanda_masks, sum(wanda_result.pruned.values()), ordinary_states, empty,
                                          threshold, config)
        results.append({
            "caption": caption, "attacks": attacks, "convergence": convergence,
            "nearest_other_memorized": nearest_memorized, "activations": activations, "selections": localisation,
        })
        if checkpoint is not None and i + 1 < count:
            checkpoint(assemble(config, captions, threshold, nemo.report(), spreads, results, started))
    final = assemble(config, captions, threshold, nemo.report(), spreads, results, started)
    final["between_captions"] = between_caption_agreement(nemo_per_caption, wanda_per_caption)
    return final


def between_caption_agreement(nemo: Sequence[Mapping[str, torch.Tensor]], wanda: Sequence[Mapping[str, torch.Tensor]]
                              ) -> dict:
    """{"nemo": ..., "wanda": ...} `pairwise_agreement` of each method's selections for the different memorized
    captions (one selection per caption, in the same order)."""
    return {"nemo": pairwise_agreement(nemo), "wanda": pairwise_agreement(wanda)}


def between_captions_of_results(unet: UNet2DConditionModel, results: Mapping) -> dict:
    """`between_caption_agreement` for a finished run's results (`run_locality`'s dict, e.g. from a run made before
    it was measured): NeMo's neurons as the run found them, Wanda's weights recomputed with the run's settings."""
    config = results["config"]
    studied = [entry["caption"] for entry in results["captions"]]
    found = {entry["prompt"]: entry["neurons"] for entry in results["nemo"]["prompts"]}
    layers = value_layers(unet, config["nemo"]["blocks"])
    wanda_config = WandaConfig(**config["wanda"])
    empty = encode_prompts([""])
    wanda = []
    for caption in studied:
        masks, _ = locate_weights(unet, [caption], encode_prompts([caption]), empty, wanda_config)
        wanda.append(mask_selection(masks))
    return between_caption_agreement([neuron_selection(layers, found[caption]) for caption in studied], wanda)


def pairwise_agreement(selections: Sequence[Mapping[str, torch.Tensor]]) -> dict | None:
    """Mean over all pairs of `layered_agreement` (pooled Jaccard and chance) of one method's selections for
    different memorized images: the scale against which its selections for two triggers of one image are read."""
    pairs = [layered_agreement(dict(a), dict(b))["overall"] for a, b in itertools.combinations(selections, 2)]
    if not pairs:
        return None
    return {"pairs": len(pairs), "jaccard": sum(p["jaccard"] for p in pairs) / len(pairs),
            "chance": sum(p["chance"] for p in pairs) / len(pairs)}


def assemble(config: LocalityConfig, captions: list[str], threshold: float, nemo_report: dict, spreads: dict,
             results: list[dict], started: float) -> dict:
    """The JSON-ready results of the captions in `results` (all of them, or those finished so far)."""
    return {
        "config": asdict(config),
        "memorized": captions,
        "studied": [entry["caption"] for entry in results],
        "threshold": threshold,
        "nemo": nemo_report,
        "spread": spreads,
        "captions": results,
        "seconds": round(time.monotonic() - started, 1),
    }


def compare_activations(
    unet: UNet2DConditionModel, nemo_pruned: UNet2DConditionModel, layers: Mapping[str, torch.nn.Linear], index: int,
    caption: str, target: torch.Tensor, found: torch.Tensor, config: LocalityConfig, inputs: LocalityInputs,
    prompt_states: torch.Tensor, ordinary_states: torch.Tensor, empty: torch.Tensor,
    value_all: Mapping[str, torch.Tensor], ordinary_values: Mapping[str, torch.Tensor],
    z_prompt: Mapping[str, torch.Tensor], nemo_neurons: Mapping[str, Sequence[int]], threshold: float,
    signal_noise: torch.Tensor,
) -> dict:
    """Experiment 2 for one memorized caption: value-layer and feed-forward activations of each adversarial
    embedding against the prompt's, against two real-prompt baselines, and NeMo's neurons under each."""
    share = config.top_share
    value_prompt = {p: v[index] for p, v in value_all.items()}
    others = [j for j in range(prompt_states.shape[0]) if j != index]
    baseline_ordinary = list(range(min(config.baseline_ordinary, ordinary_states.shape[0])))
    x, steps = noisy_inputs(target, config.timesteps, config.noise_draws, config.seed)
    ffn_prompt = feed_forward_activations(unet, x, steps, prompt_states[index : index + 1])

    baselines = {
        "value_other_memorized": averaged([mean_activation_comparison(value_prompt, {p: v[j] for p, v in value_all.items()}, share) for j in others]) if others else None,
        "value_ordinary": averaged([mean_activation_comparison(value_prompt, {p: v[j] for p, v in ordinary_values.items()}, share) for j in baseline_ordinary]) if baseline_ordinary else None,
        "ffn_other_memorized": averaged([mean_activation_comparison(ffn_prompt, feed_forward_activations(unet, x, steps, prompt_states[j : j + 1]), share) for j in others]) if others else None,
        "ffn_ordinary": averaged([mean_activation_comparison(ffn_prompt, feed_forward_activations(unet, x, steps, ordinary_states[j : j + 1]), share) for j in baseline_ordinary]) if baseline_ordinary else None,
    }
    nemo_selection = neuron_selection(layers, nemo_neurons)
    nemo_count = sum(int(m.sum()) for m in nemo_selection.values())
    z_original = {p: z[index] for p, z in z_prompt.items()}
    empty_signal = {}
    per_embedding = []
    for j, embedding in enumerate(found):
        embedding = embedding[None]
        value_adv = {p: neuron_activations(v)[0] for p, v in value_outputs(layers, embedding).items()}
        ffn_adv = feed_forward_activations(unet, x, steps, embedding)
        z_adv = {p: z[0] for p, z in layer_z_scores(layers, embedding, ordinary_states).items()}
        entry = {
            "start": config.starts[j],
            "value": mean_activation_comparison(value_prompt, value_adv, share),
            "ffn": mean_activation_comparison(ffn_prompt, ffn_adv, share),
            "signal": float(first_step_signal(unet, embedding, empty, signal_noise, config.nemo.timestep)[0]),
            "signal_on_nemo": float(first_step_signal(nemo_pruned, embedding, empty, signal_noise,
                                                      config.nemo.timestep)[0]),
        }
        if nemo_count:
            chosen = [z_adv[p][m] for p, m in nemo_selection.items() if m.any()]
            entry["nemo_neurons_mean_z"] = float(torch.cat(chosen).mean())
            entry["nemo_neurons_in_top_z"] = layered_agreement(nemo_selection, size_matched_top(z_adv, nemo_selection))["overall"]
        per_embedding.append(entry)
    for name, model in (("unpruned", unet), ("nemo", nemo_pruned)):
        empty_signal[name] = float(first_step_signal(model, prompt_states[index : index + 1], empty, signal_noise,
                                                     config.nemo.timestep)[0])
    prompt_nemo = None
    if nemo_count:
        chosen = [z_original[p][m] for p, m in nemo_selection.items() if m.any()]
        prompt_nemo = {"count": nemo_count, "mean_z": float(torch.cat(chosen).mean()),
                       "in_top_z": layered_agreement(nemo_selection, size_matched_top(z_original, nemo_selection))["overall"]}
    return {"adversarial": per_embedding, "baselines": baselines, "prompt_signal": empty_signal,
            "threshold": threshold, "nemo_neurons_prompt": prompt_nemo}


def mask_selection(masks: WeightMasks, suffix: str = ".weight") -> dict[str, torch.Tensor]:
    """{layer: bool mask} of the weight masks of a pruning, keyed by layer path."""
    return {name[: -len(suffix)]: mask.bool() for name, mask in masks.items() if name.endswith(suffix)}


def compare_selections(
    unet: UNet2DConditionModel, layers: Mapping[str, torch.nn.Linear], caption: str, original: torch.Tensor,
    target: torch.Tensor, found: torch.Tensor, nemo_neurons: Mapping[str, Sequence[int]], wanda_masks: WeightMasks,
    wanda_count: int, ordinary_states: torch.Tensor, empty: torch.Tensor, threshold: float, config: LocalityConfig,
) -> dict:
    """Experiment 3 for one memorized caption: NeMo's neurons against Wanda's weights on a common unit (the
    residual-stream channels of each transformer block that each pruning changes most for the prompt), with
    random-mask controls; and each method's selection for the prompt against its selection for an adversarial
    embedding of the same image."""
    share = config.top_share
    nemo_masks = neuron_masks(unet, nemo_neurons)
    out: dict = {"nemo_neurons": sum(len(v) for v in nemo_neurons.values()), "wanda_weights": wanda_count}
    if nemo_masks and out["wanda_weights"]:
        x, steps = noisy_inputs(target, config.timesteps, config.noise_draws, config.seed)
        before = block_outputs(unet, x, steps, original)
        prunings = {"nemo": nemo_masks, "wanda": wanda_masks,
                    "nemo_random": random_masks(nemo_masks, config.seed),
                    "wanda_random": random_masks(wanda_masks, config.seed)}
        channels = {name: top_selections(channel_effects(before, block_outputs(apply_masks(unet, masks), x, steps,
                                                                                original)), share)
                    for name, masks in prunings.items()}
        out["channels"] = {
            "nemo_vs_wanda": layered_agreement(channels["nemo"], channels["wanda"]),
            "nemo_vs_random_rows": layered_agreement(channels["nemo"], channels["nemo_random"]),
            "wanda_vs_random_weights": layered_agreement(channels["wanda"], channels["wanda_random"]),
            "nemo_random_vs_wanda_random": layered_agreement(channels["nemo_random"], channels["wanda_random"]),
        }
    if config.relocalise_start is not None:
        j = config.starts.index(config.relocalise_start)
        adversarial = found[j : j + 1]
        label = f"{caption} [adversarial, {config.relocalise_start} start]"
        wanda_adv, _ = locate_weights(unet, [label], adversarial, empty, config.wanda)
        out["relocalised"] = {
            "start": config.relocalise_start,
            "wanda": layered_agreement(mask_selection(wanda_masks), mask_selection(wanda_adv)),
        }
        if config.relocalise_nemo:
            nemo_adv = localize_neurons(unet, [label], adversarial, ordinary_states, empty, threshold, config.nemo)
            out["relocalised"] |= {
                "nemo_adversarial_neurons": nemo_adv.prompts[0].count,
                "nemo_adversarial_signal_before": nemo_adv.prompts[0].signal_before,
                "nemo_adversarial_mitigated": nemo_adv.prompts[0].mitigated,
                "nemo": layered_agreement(neuron_selection(layers, nemo_neurons),
                                          neuron_selection(layers, nemo_adv.prompts[0].neurons)),
            }
    return out
