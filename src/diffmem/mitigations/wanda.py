"""Wanda-style pruning of memorization weights in the feed-forward layers (Chavhan et al. 2024, "Memorized Images
in Diffusion Models share a Subspace that can be Located and Deleted", arXiv 2406.18566), scoring weights as
Wanda does (Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language Models", ICLR).

For the second linear layer of every transformer block's feed-forward network (`ff.net.2`, weight W [out, in]):

- S_ij = |W_ij| * ||X_j||, with ||X_j|| the L2 norm of input feature j over all tokens, sampling steps,
  generations and memorized prompts;
- the same score with the activations the empty prompt gives at the same noisy inputs;
- pruned: the top 1% of each output row by the memorized-prompt score where it beats the empty-prompt score
  (weights that memorized prompts use more than unconditional generation does).

Activations are recorded along the guided sampling trajectories of the memorized prompts, with the backend's own
sampler (the world's DDIM, SD's DDIM, Flux's flow-matching Euler steps), noise and conditioning: at every step the
denoiser is called once with the prompt and once with the empty prompt on the same x_t, so the two norms are
comparable. Every function takes a `Backend` (`diffmem.backends`) or a bare world UNet; the layers are the
backend's `feed_forward_layers()` (for Flux the image stream's `ff.net.2` of its joint-attention blocks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from diffusers import UNet2DConditionModel

from diffmem.backends import Backend, Conditioning, as_backend
from diffmem.errors import DiffmemError
from diffmem.mitigations.pruning import (
    WeightMasks,
    conditioning_of,
    forward_hooks,
    mitigated_output,
    mitigation_backend,
)
from diffmem.mitigations.settings import WandaConfig  # defined there, without diffusers

Model = Backend | UNet2DConditionModel
States = Conditioning | torch.Tensor


def feed_forward_outputs(model: Model) -> dict[str, torch.nn.Linear]:
    """The second feed-forward linear (`...transformer_blocks.M.ff.net.2`) of every transformer block
    (`Backend.feed_forward_layers`), in model order."""
    backend = as_backend(model)
    layers = backend.feed_forward_layers()
    if not layers:
        raise DiffmemError(f"the {backend.family} model has no transformer feed-forward layer "
                           "(transformer_blocks.N.ff.net.2)")
    return layers


def resolved_config(model: Model, config: WandaConfig) -> WandaConfig:
    """`config` with the guidance it leaves to the model filled in (what the result reports)."""
    if config.guidance is not None:
        return config
    return replace(config, guidance=as_backend(model).default_guidance)


def input_feature_norms(square_sums: torch.Tensor) -> torch.Tensor:
    """||X_j||_2 from the per-feature sums of squared inputs (Sun et al. 2024, eq. 1)."""
    return square_sums.clamp_min(0).sqrt()


def wanda_scores(weight: torch.Tensor, feature_norms: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| * ||X_j|| for a weight [out, in] and input norms [in] (Sun et al. 2024, eq. 1)."""
    if weight.ndim != 2 or feature_norms.shape != (weight.shape[1],):
        raise ValueError(f"need weight [out, in] and norms [in], got {tuple(weight.shape)} and "
                         f"{tuple(feature_norms.shape)}")
    return weight.abs() * feature_norms[None, :]


def per_row_count(in_features: int, fraction: float) -> int:
    """Weights per output row in the top `fraction`: ceil(fraction * in), at least 1."""
    return min(in_features, max(1, math.ceil(fraction * in_features - 1e-9)))


def top_fraction_per_row(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of the `per_row_count` highest scores of each row (Wanda's per-output comparison group)."""
    count = per_row_count(scores.shape[1], fraction)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter(1, scores.topk(count, dim=1).indices, True)


def memorization_weights(weight: torch.Tensor, prompt_norms: torch.Tensor, empty_norms: torch.Tensor,
                         fraction: float) -> torch.Tensor:
    """Weights to prune: in the top `fraction` of their row by the memorized-prompt score and scoring higher for
    the memorized prompts than for the empty prompt (Chavhan et al. 2024)."""
    prompt_scores = wanda_scores(weight, prompt_norms)
    return top_fraction_per_row(prompt_scores, fraction) & (prompt_scores > wanda_scores(weight, empty_norms))


class InputSquareSums:
    """Forward hooks that add up the squared inputs of each layer per input feature, under the current label."""

    def __init__(self, layers: Mapping[str, torch.nn.Linear]):
        self.layers = layers
        self.label = ""
        self.sums: dict[str, dict[str, torch.Tensor]] = {}

    def hook(self, path: str) -> Callable:
        def record(_module, inputs, _output):
            features = inputs[0].detach().float()
            squares = features.reshape(-1, features.shape[-1]).square().sum(dim=0).cpu()
            per_label = self.sums.setdefault(self.label, {})
            per_label[path] = per_label[path] + squares if path in per_label else squares
        return record

    def recording(self):
        return forward_hooks(self.layers, self.hook)


def trajectory_square_sums(
    model: Model,
    layers: Mapping[str, torch.nn.Linear],
    prompt_states: States,
    empty_states: States,
    noise: torch.Tensor,
    config: WandaConfig,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-feature sums of squared inputs of `layers`, (memorized prompts, empty prompt), over guided trajectories
    of the backend's sampler started from `noise` [P * generations, *sample_shape], with the prompts' whole
    conditioning (SDXL's pooled embedding and time ids, Flux's pooled embedding)."""
    backend = as_backend(model)
    guidance = resolved_config(backend, config).guidance
    prompt = conditioning_of(prompt_states).repeat_interleave(config.generations)
    empty = conditioning_of(empty_states).expand(len(prompt))
    recorder = InputSquareSums(layers)
    sampler = backend.sampler()
    sampler.set_timesteps(config.steps, device=backend.device)
    x = (noise * sampler.init_noise_sigma).to(backend.device, backend.dtype)
    with torch.no_grad(), recorder.recording():
        for t in sampler.timesteps:
            model_in = sampler.scale_model_input(x, t)
            steps = t.expand(x.shape[0])
            # Two calls rather than one batched call, so each recorded activation is known to belong to its context.
            recorder.label = "prompt"
            eps_prompt = backend.predict(model_in, steps, prompt)
            recorder.label = "empty"
            eps_empty = backend.predict(model_in, steps, empty)
            guided = eps_empty + guidance * (eps_prompt - eps_empty)
            x = sampler.step(guided, t, x).prev_sample
    return recorder.sums["prompt"], recorder.sums["empty"]


@dataclass
class WandaResult:
    """Which feed-forward weights were pruned, per layer, and how they were chosen."""

    pruned: dict[str, int]
    candidates: dict[str, int]
    totals: dict[str, int]
    prompts: list[str]
    config: WandaConfig

    def report(self) -> dict:
        """JSON-ready summary: pruned weights per layer (of the top-fraction candidates and of all weights)."""
        return {
            "method": "wanda",
            "config": asdict(self.config),
            "prompts": self.prompts,
            "pruned_count": sum(self.pruned.values()),
            "candidate_count": sum(self.candidates.values()),
            "weight_count": sum(self.totals.values()),
            "layers": {path: {"pruned": self.pruned[path], "candidates": self.candidates[path],
                              "weights": self.totals[path]} for path in self.pruned},
        }


def locate_weights(
    model: Model,
    prompts: Sequence[str],
    prompt_states: States,
    empty_states: States,
    config: WandaConfig = WandaConfig(),
) -> tuple[WeightMasks, WandaResult]:
    """(masks of the `ff.net.2` weights to prune, keyed by the denoiser's parameter names; report) from the
    conditioning (or, for the world and SD 1.x/2.x, text states) of memorized prompts [P rows] and of the empty
    prompt [1 row]. The model is not modified."""
    backend = as_backend(model)
    config = resolved_config(backend, config)
    layers = feed_forward_outputs(backend)
    seeds = [config.seed + i for i in range(len(prompts) * config.generations)]
    noise = backend.initial_noise(seeds)
    prompt_sums, empty_sums = trajectory_square_sums(backend, layers, prompt_states, empty_states, noise, config)
    masks, pruned, candidates, totals = {}, {}, {}, {}
    for path, layer in layers.items():
        weight = layer.weight.detach().float()
        mask = memorization_weights(weight, input_feature_norms(prompt_sums[path]),
                                    input_feature_norms(empty_sums[path]), config.fraction)
        masks[f"{path}.weight"] = mask
        pruned[path] = int(mask.sum())
        candidates[path] = weight.shape[0] * per_row_count(weight.shape[1], config.fraction)
        totals[path] = weight.numel()
    return masks, WandaResult(pruned, candidates, totals, list(prompts), config)


def wanda_mitigate(
    model: Model,
    memorized_prompts: Sequence[str],
    lora=None,
    config: WandaConfig = WandaConfig(),
    encode: Callable[[list[str]], States] | None = None,
    apply: bool | None = None,
) -> tuple[Backend | UNet2DConditionModel | None, WandaResult, WeightMasks]:
    """Wanda-style pruning as a mitigation: (mitigated model, report, the weight masks).

    `model` is a backend or a bare world UNet; `lora` (a file or `LoraFile`, world models only: a pipeline's is
    merged by `open_backend`) is merged into a copy first; `encode` turns prompts into conditioning or text states
    (default: the backend's encoder). The input model is never modified; the mitigated model is a pruned copy as
    `nemo_mitigate` returns it (a pipeline only with `apply=True`, else None: the masks are the result there).
    """
    backend = mitigation_backend(model, lora)
    encode = encode or backend.encode
    if not memorized_prompts:
        raise DiffmemError("Wanda pruning needs at least one memorized prompt")
    masks, result = locate_weights(backend, list(memorized_prompts), encode(list(memorized_prompts)), encode([""]),
                                   config)
    return mitigated_output(model, backend, masks, apply), result, masks
