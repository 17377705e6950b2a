"""NeMo: find and deactivate the neurons of the cross-attention value layers that memorized prompts need
(Hintersdorf et al. 2024, "Finding NeMo: Localizing Neurons Responsible For Memorization in Diffusion Models",
NeurIPS, arXiv 2406.02366).

1. Activation of neuron j of a value layer for a prompt: a_j = mean over tokens |v_j|, with v the layer's output
   recorded by a forward hook while the denoiser makes its first sampling step for the prompt
   (`value_activations`). For SD and the world the value layer `attn2.to_v` sees the text-encoder states alone,
   so v = to_v(e) as in the paper; for Flux the layer (`add_v_proj`, the text stream's values of joint attention)
   sees the text stream as modulated inside its block, which only the model's own call produces.
2. z-score against the mean and standard deviation of a_j over many ordinary (not memorized) prompts.
3. Initial selection: deactivate the neurons with z > theta in every value layer (plus, as in the authors' code,
   the k highest-z neurons per layer), lowering theta from 5 in steps of 0.25 and raising k by one until the
   memorization signal of the prompt falls under its threshold.
4. Refinement: re-enable whole layers, then single neurons, whenever the signal stays under the threshold without
   them.

Deactivating neuron j of `to_v` zeroes row j of its weight (and bias, if any): the value vectors lose channel j
for every prompt. The union over all memorized prompts is the mitigation.

The memorization signal is Wen et al.'s data-free score at the first sampling step only (`first_step_signal`):
the norm of eps(x_T, c) - eps(x_T, empty) on pure noise, averaged over a few noise draws, called through the
backend with the prompt's whole conditioning (SDXL's pooled embedding and time ids, Flux's pooled embedding; for
Flux "eps" is its velocity). On the world's example
LoRA the first step alone separates the 5 memorized from the 20 held-out captions perfectly (ROC AUC 1.0, where
Wen's mean over all steps reaches 0.79; docs/audit.md), and it costs one UNet call per evaluation, which matters
because the search evaluates it dozens of times per prompt. NeMo itself used an SSIM of first-step noise
differences, another first-step statistic.

Every function takes a `Backend` (`diffmem.backends`: the world, SD 1.x/2.x, SDXL, Flux) or a bare world UNet,
and text states as a `Conditioning` or, for the world and SD 1.x/2.x, the context tensor alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from diffusers import UNet2DConditionModel

from diffmem.backends import Backend, Conditioning, as_backend
from diffmem.errors import DiffmemError
from diffmem.metrics.wen import conditional_difference_norms
from diffmem.mitigations.pruning import (
    WeightMasks,
    conditioning_of,
    forward_hooks,
    mitigated_output,
    mitigation_backend,
)
from diffmem.mitigations.settings import NeMoConfig  # defined there, without diffusers

Neurons = dict[str, list[int]]
Model = Backend | UNet2DConditionModel
States = Conditioning | torch.Tensor


def first_sampling_timestep(model: Model, steps: int | None = None) -> int | float:
    """The first timestep of the backend's sampler (`backend.sampler()`) at `steps` (default: the model's own
    step count): where sampling from pure noise starts, so where NeMo's first-step signal is measured."""
    backend = as_backend(model)
    sampler = backend.sampler()
    sampler.set_timesteps(steps or backend.default_steps)
    return sampler.timesteps[0].item()


def resolved_config(model: Model, config: NeMoConfig) -> NeMoConfig:
    """`config` with the blocks and the timestep it leaves to the model filled in (what the result reports)."""
    backend = as_backend(model)
    return replace(config, blocks=tuple(config.blocks or backend.value_blocks),
                   timestep=first_sampling_timestep(backend) if config.timestep is None else config.timestep)


def value_layers(model: Model, blocks: Sequence[str] | None = None) -> dict[str, torch.nn.Linear]:
    """NeMo's value layers inside the named top-level blocks (default: the backend's `value_blocks`), in model
    order: cross-attention's `attn2.to_v` for a UNet, the text stream's `attn.add_v_proj` of Flux's joint
    attention (`Backend.value_layers`)."""
    backend = as_backend(model)
    layers = backend.value_layers(blocks)
    if not layers:
        raise DiffmemError(f"the {backend.family} model has no NeMo value layer in the blocks "
                           f"{list(blocks or backend.value_blocks)}")
    return layers


def neuron_activations(values: torch.Tensor) -> torch.Tensor:
    """a_j = mean over tokens of |v_j| for value outputs [N, tokens, neurons] -> [N, neurons] (NeMo, eq. 1)."""
    return values.abs().mean(dim=-2)


def activation_statistics(activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-neuron mean and standard deviation over prompts of activations [N, neurons] (NeMo, sec. 3.1)."""
    if activations.shape[0] < 2:
        raise ValueError(f"need at least 2 ordinary prompts for a standard deviation, got {activations.shape[0]}")
    return activations.mean(dim=0), activations.std(dim=0)


def z_scores(activations: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Standardised activations (a - mean) / std; a neuron that never varies gets std eps (NeMo, eq. 2)."""
    return (activations - mean) / std.clamp_min(eps)


def out_of_distribution_neurons(z: torch.Tensor, theta: float, top_k: int = 0) -> list[int]:
    """Neurons of one layer with z > theta, plus the `top_k` highest-z ones (NeMo's initial selection)."""
    chosen = set((z > theta).nonzero().flatten().tolist())
    if top_k > 0:
        chosen |= set(z.topk(min(top_k, z.numel())).indices.tolist())
    return sorted(chosen)


def memorization_threshold(signals: torch.Tensor, stds: float) -> float:
    """Mean plus `stds` standard deviations of the signal over non-memorized calibration prompts."""
    if signals.numel() < 2:
        raise ValueError(f"need at least 2 calibration prompts, got {signals.numel()}")
    return float(signals.mean() + stds * signals.std())


def value_outputs(layers: Mapping[str, torch.nn.Linear], text_states: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output of every value layer called on text states [N, tokens, dim] directly: what a UNet's `attn2.to_v`
    computes inside the model (it sees only the text), so a shortcut for the world and SD; not Flux's, whose value
    layers see the modulated text stream (`value_activations` records what every model computes)."""
    with torch.no_grad():
        return {path: layer(text_states.to(layer.weight.dtype)).float() for path, layer in layers.items()}


def value_activations(
    model: Model,
    layers: Mapping[str, torch.nn.Linear],
    states: States,
    noise: torch.Tensor,
    timestep: int | float | None = None,
    batch_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """{layer: activations a [N, neurons]} of every row of `states`, from the value layers' outputs recorded with
    forward hooks while the denoiser makes the first sampling step (`timestep`, default the sampler's first) on
    the noise draw `noise` [1, C, H, W], `batch_size` prompts per call (default all).

    One definition for every model: whatever the layer sees inside the model. For a UNet that is the text states,
    so the result equals `neuron_activations(value_outputs(layers, states))`; for Flux it is the text stream
    after the block's modulation (timestep, guidance, pooled embedding) and, past the first block, joint
    attention with the image."""
    backend, conditioning = as_backend(model), conditioning_of(states)
    timestep = first_sampling_timestep(backend) if timestep is None else timestep
    recorded: dict[str, list[torch.Tensor]] = {path: [] for path in layers}

    def record(path: str) -> Callable:
        def hook(_module, _inputs, output):
            recorded[path].append(neuron_activations(output.detach().float()).cpu())
        return hook

    size = batch_size or max(len(conditioning), 1)
    calls = 0
    with torch.no_grad(), forward_hooks(layers, record):
        for start in range(0, len(conditioning), size):
            chunk = conditioning.rows(start, start + size)
            x = noise[:1].repeat(len(chunk), *[1] * (noise.ndim - 1))
            backend.predict(x, torch.full((len(chunk),), timestep), chunk)
            calls += 1
    for path, parts in recorded.items():
        if len(parts) != calls:
            raise DiffmemError(f"the value layer {path!r} ran {len(parts)} times in {calls} denoiser calls; NeMo "
                               "needs layers that run once per call")
    return {path: torch.cat(parts) for path, parts in recorded.items()}


def z_scores_against(prompt: Mapping[str, torch.Tensor], ordinary: Mapping[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """{layer: z-scores [P, neurons]} of prompt activations against the ordinary prompts' statistics."""
    scores = {}
    for path, activations in prompt.items():
        mean, std = activation_statistics(ordinary[path])
        scores[path] = z_scores(activations, mean, std)
    return scores


def layer_z_scores(
    layers: Mapping[str, torch.nn.Linear], prompt_states: torch.Tensor, ordinary_states: torch.Tensor
) -> dict[str, torch.Tensor]:
    """{layer: z-scores [P, neurons]} of the prompts against the ordinary prompts' activation statistics, from
    value layers called on text states directly (`value_outputs`: the world and SD only)."""
    prompt = value_outputs(layers, prompt_states)
    ordinary = value_outputs(layers, ordinary_states)
    return z_scores_against({path: neuron_activations(prompt[path]) for path in layers},
                            {path: neuron_activations(ordinary[path]) for path in layers})


def blocking_hook(indices: torch.Tensor) -> Callable:
    """A forward hook that zeroes output channels `indices` (what zeroed weight rows do to a bias-free layer)."""
    def hook(_module, _inputs, output):
        return output.index_fill(-1, indices.to(output.device), 0)
    return hook


def first_step_signal(
    model: Model,
    prompt_states: States,
    empty_states: States,
    noise: torch.Tensor,
    timestep: int | float | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Wen et al.'s score at the first sampling step: mean over noise draws of ||eps(x_T, c) - eps(x_T, empty)||,
    one value per prompt [P] (Wen et al. 2024, fig. 2), with the prompts' whole conditioning through
    `backend.predict`; `timestep` defaults to the sampler's first, `batch_size` prompts per call (default all)."""
    backend = as_backend(model)
    prompt, empty = conditioning_of(prompt_states), conditioning_of(empty_states)
    timestep = first_sampling_timestep(backend) if timestep is None else timestep
    size = batch_size or max(len(prompt), 1)
    signals = []
    for start in range(0, len(prompt), size):
        chunk = prompt.rows(start, start + size)
        prompts, draws = len(chunk), noise.shape[0]
        x = noise.repeat(prompts, *[1] * (noise.ndim - 1))
        conditioning = Conditioning.cat([chunk.repeat_interleave(draws), empty.expand(prompts * draws)])
        steps = torch.full((2 * prompts * draws,), timestep)
        with torch.no_grad():
            eps_cond, eps_empty = backend.predict(torch.cat([x, x]), steps, conditioning).chunk(2)
        signals.append(conditional_difference_norms(eps_cond, eps_empty).view(prompts, draws).mean(dim=1).float())
    return torch.cat(signals).cpu() if signals else torch.zeros(0)


@dataclass
class PromptNeurons:
    """What NeMo found for one memorized prompt."""

    prompt: str
    neurons: Neurons
    signal_before: float
    signal_after: float
    theta: float
    initial_count: int
    mitigated: bool
    evaluations: int

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.neurons.values())


@dataclass
class NeMoResult:
    """Neurons per memorized prompt, their union (the mitigation), and how they were found."""

    prompts: list[PromptNeurons]
    threshold: float
    config: NeMoConfig
    layers: list[str] = field(default_factory=list)

    @property
    def neurons(self) -> Neurons:
        """Union over prompts: {value layer: sorted neuron indices}, only layers with at least one neuron."""
        union: dict[str, set[int]] = {}
        for found in self.prompts:
            for path, indices in found.neurons.items():
                union.setdefault(path, set()).update(indices)
        return {path: sorted(union[path]) for path in self.layers if union.get(path)}

    def report(self) -> dict:
        """JSON-ready summary: threshold, config, per-prompt search and the union of neurons."""
        return {
            "method": "nemo",
            "threshold": round(self.threshold, 6),
            "config": asdict(self.config),
            "neurons": self.neurons,
            "neuron_count": sum(len(v) for v in self.neurons.values()),
            "prompts": [{**asdict(p), "count": p.count} for p in self.prompts],
        }


class NeuronSearch:
    """Evaluates the memorization signal of one prompt with a given set of value neurons deactivated."""

    def __init__(self, model: Model, layers: Mapping[str, torch.nn.Linear], prompt_states: States,
                 empty_states: States, noise: torch.Tensor, timestep: int | float | None = None):
        self.backend, self.layers = as_backend(model), layers
        self.prompt_states, self.empty_states = conditioning_of(prompt_states), conditioning_of(empty_states)
        self.noise = noise
        self.timestep = first_sampling_timestep(self.backend) if timestep is None else timestep
        self.evaluations = 0

    def signal(self, neurons: Neurons) -> float:
        self.evaluations += 1
        blocked = {path: self.layers[path] for path, indices in neurons.items() if indices}
        hooks = forward_hooks(blocked, lambda path: blocking_hook(torch.tensor(neurons[path], dtype=torch.long)))
        with hooks:
            return float(first_step_signal(self.backend, self.prompt_states, self.empty_states, self.noise,
                                           self.timestep)[0])


def initial_selection(
    search: NeuronSearch, z: Mapping[str, torch.Tensor], threshold: float, config: NeMoConfig
) -> tuple[Neurons, float, float]:
    """Lower theta (and raise k) until the signal falls under `threshold`: (neurons, theta, signal)."""
    theta, top_k = config.theta_start, 0
    while True:
        neurons = {path: out_of_distribution_neurons(scores, theta, top_k) for path, scores in z.items()}
        signal = search.signal(neurons)
        if signal < threshold or theta - config.theta_step < config.theta_min - 1e-9:
            return neurons, theta, signal
        theta -= config.theta_step
        top_k += config.top_k_step


def refine_selection(search: NeuronSearch, neurons: Neurons, limit: float) -> tuple[Neurons, float]:
    """Re-enable whole layers (last first), then single neurons, whenever the signal stays under `limit` without
    them (NeMo, sec. 3.2): (neurons still needed, final signal)."""
    kept = {path: list(indices) for path, indices in neurons.items() if indices}
    signal = search.signal(kept)
    for path in reversed(list(kept)):
        trial = {p: v for p, v in kept.items() if p != path}
        trial_signal = search.signal(trial)
        if trial_signal < limit:
            kept, signal = trial, trial_signal
    for path in reversed(list(kept)):
        for neuron in list(kept[path]):
            trial = {**kept, path: [n for n in kept[path] if n != neuron]}
            trial_signal = search.signal(trial)
            if trial_signal < limit:
                kept, signal = trial, trial_signal
    return {path: indices for path, indices in kept.items() if indices}, signal


def localize_prompt(search: NeuronSearch, prompt: str, z: Mapping[str, torch.Tensor], threshold: float,
                    config: NeMoConfig) -> PromptNeurons:
    """NeMo's initial selection and refinement for one prompt."""
    before = search.signal({})
    if before < threshold:
        return PromptNeurons(prompt, {}, before, before, config.theta_start, 0, True, search.evaluations)
    neurons, theta, signal = initial_selection(search, z, threshold, config)
    mitigated = signal < threshold
    initial_count = sum(len(v) for v in neurons.values())
    if config.refine:
        # A prompt left over its threshold must not get worse than what the widest selection reached.
        limit = threshold if mitigated else signal + 1e-12
        neurons, signal = refine_selection(search, neurons, limit)
    neurons = {path: indices for path, indices in neurons.items() if indices}
    return PromptNeurons(prompt, neurons, before, signal, theta, initial_count, signal < threshold,
                         search.evaluations)


def localize_neurons(
    model: Model,
    prompts: Sequence[str],
    prompt_states: States,
    ordinary_states: States,
    empty_states: States,
    threshold: float,
    config: NeMoConfig = NeMoConfig(),
    progress: Callable[[PromptNeurons], None] | None = None,
) -> NeMoResult:
    """NeMo on any backend (or bare world UNet), from the conditioning of the memorized prompts [P rows], of the
    ordinary prompts [N rows] (activation statistics) and of the empty prompt [1 row]. The model is not
    modified. Activations are recorded at the signal's first noise draw (`value_activations`)."""
    backend = as_backend(model)
    prompt_states, ordinary_states = conditioning_of(prompt_states), conditioning_of(ordinary_states)
    if len(prompts) != len(prompt_states):
        raise ValueError(f"got {len(prompts)} prompts but {len(prompt_states)} text states")
    config = resolved_config(backend, config)
    layers = value_layers(backend, config.blocks)
    noise = first_step_noise(backend, config)
    z = z_scores_against(
        value_activations(backend, layers, prompt_states, noise, config.timestep, config.batch_size),
        value_activations(backend, layers, ordinary_states, noise, config.timestep, config.batch_size))
    found = []
    for i, prompt in enumerate(prompts):
        search = NeuronSearch(backend, layers, prompt_states.rows(i, i + 1), empty_states, noise, config.timestep)
        found.append(localize_prompt(search, prompt, {path: scores[i] for path, scores in z.items()}, threshold,
                                     config))
        if progress is not None:
            progress(found[-1])
    return NeMoResult(found, threshold, config, list(layers))


def first_step_noise(model: Model, config: NeMoConfig) -> torch.Tensor:
    """The fixed noise draws x_T [generations, *sample_shape] of the signal, from `config.seed` (one generator
    for all draws, on the CPU, so the draws do not depend on the device)."""
    generator = torch.Generator().manual_seed(config.seed)
    return torch.randn((config.generations, *as_backend(model).sample_shape), generator=generator)


def calibrate_threshold(model: Model, calibration_states: States, empty_states: States,
                        config: NeMoConfig = NeMoConfig()) -> tuple[float, torch.Tensor]:
    """(threshold, signals) from non-memorized calibration prompts [N rows] (`memorization_threshold`)."""
    signals = first_step_signal(model, calibration_states, empty_states, first_step_noise(model, config),
                                config.timestep, config.batch_size)
    return memorization_threshold(signals, config.threshold_stds), signals


def neuron_masks(model: Model, neurons: Mapping[str, Sequence[int]]) -> WeightMasks:
    """Weight masks (keyed by the denoiser's parameter names) that deactivate `neurons` ({value layer:
    indices}): their rows of the weight, and of the bias where the layer has one."""
    modules = dict(as_backend(model).denoiser.named_modules())
    masks = {}
    for path, indices in neurons.items():
        if path not in modules or not isinstance(modules[path], torch.nn.Linear):
            raise DiffmemError(f"the model has no linear layer {path!r} to deactivate neurons in")
        layer = modules[path]
        rows = torch.zeros(layer.out_features, dtype=torch.bool)
        rows[torch.tensor(list(indices), dtype=torch.long)] = True
        masks[f"{path}.weight"] = rows[:, None].expand_as(layer.weight).clone()
        if layer.bias is not None:
            masks[f"{path}.bias"] = rows
    return masks


def nemo_mitigate(
    model: Model,
    memorized_prompts: Sequence[str],
    ordinary_prompts: Sequence[str],
    calibration_prompts: Sequence[str] | None = None,
    lora=None,
    config: NeMoConfig = NeMoConfig(),
    threshold: float | None = None,
    encode: Callable[[list[str]], States] | None = None,
    progress: Callable[[PromptNeurons], None] | None = None,
    apply: bool | None = None,
) -> tuple[Backend | UNet2DConditionModel | None, NeMoResult, WeightMasks]:
    """NeMo as a mitigation: (mitigated model, what was found, the weight masks).

    `model` is a backend or a bare world UNet; `lora` (a file or `LoraFile`, world models only: a pipeline's is
    merged by `open_backend`) is merged into a copy first. `ordinary_prompts` give the activation statistics;
    the threshold is `threshold` or calibrated on `calibration_prompts` (default the ordinary prompts), which must
    not be memorized. `encode` turns prompts into conditioning or text states (default: the backend's encoder).

    The input model is never modified. The mitigated model is a pruned copy: of the UNet for a bare UNet, a
    backend with a pruned denoiser (`masked_backend`) for a backend; a pipeline is copied only with `apply=True`
    (default: the world yes, a pipeline no, returning None: the masks are the result there)."""
    backend = mitigation_backend(model, lora)
    encode = encode or backend.encode
    if not memorized_prompts:
        raise DiffmemError("NeMo needs at least one memorized prompt")
    calibration_prompts = list(calibration_prompts or ordinary_prompts)
    if len(ordinary_prompts) < 2 or (threshold is None and len(calibration_prompts) < 2):
        raise DiffmemError("NeMo needs at least 2 ordinary prompts (activation statistics) and, without a given "
                           "threshold, at least 2 calibration prompts (many more give steadier statistics)")
    config = resolved_config(backend, config)
    empty = encode([""])
    if threshold is None:
        threshold, _ = calibrate_threshold(backend, encode(calibration_prompts), empty, config)
    result = localize_neurons(backend, list(memorized_prompts), encode(list(memorized_prompts)),
                              encode(list(ordinary_prompts)), empty, threshold, config, progress)
    masks = neuron_masks(backend, result.neurons)
    return mitigated_output(model, backend, masks, apply), result, masks


def describe(result: NeMoResult) -> str:
    """One line per prompt: signal before/after, neurons kept, whether it fell under the threshold."""
    lines = [f"threshold {result.threshold:.4f}"]
    for p in result.prompts:
        lines.append(f"{p.prompt!r}: signal {p.signal_before:.3f} -> {p.signal_after:.3f}, theta {p.theta:g}, "
                     f"{p.initial_count} -> {p.count} neurons, {'mitigated' if p.mitigated else 'NOT mitigated'}")
    lines.append(json.dumps({path: len(v) for path, v in result.neurons.items()}))
    return "\n".join(lines)
