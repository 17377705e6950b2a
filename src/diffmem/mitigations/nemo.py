"""NeMo: find and deactivate the neurons of the cross-attention value layers that memorized prompts need
(Hintersdorf et al. 2024, "Finding NeMo: Localizing Neurons Responsible For Memorization in Diffusion Models",
NeurIPS, arXiv 2406.02366).

1. Activation of neuron j of a value layer for a prompt with text states e: a_j = mean over tokens |to_v(e)_j|.
2. z-score against the mean and standard deviation of a_j over many ordinary (not memorized) prompts.
3. Initial selection: deactivate the neurons with z > theta in every value layer (plus, as in the authors' code,
   the k highest-z neurons per layer), lowering theta from 5 in steps of 0.25 and raising k by one until the
   memorization signal of the prompt falls under its threshold.
4. Refinement: re-enable whole layers, then single neurons, whenever the signal stays under the threshold without
   them.

Deactivating neuron j of `to_v` zeroes row j of its weight (and bias, if any): the value vectors lose channel j
for every prompt. The union over all memorized prompts is the mitigation.

The memorization signal is Wen et al.'s data-free score at the first sampling step only (`first_step_signal`):
the norm of eps(x_T, c) - eps(x_T, empty) on pure noise, averaged over a few noise draws. On the world's example
LoRA the first step alone separates the 5 memorized from the 20 held-out captions perfectly (ROC AUC 1.0, where
Wen's mean over all steps reaches 0.79; docs/audit.md), and it costs one UNet call per evaluation, which matters
because the search evaluates it dozens of times per prompt. NeMo itself used an SSIM of first-step noise
differences, another first-step statistic.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from diffmem.errors import DiffmemError
from diffmem.metrics.wen import conditional_difference_norms
from diffmem.mitigations.pruning import WeightMasks, apply_masks, forward_hooks, modules_matching

Neurons = dict[str, list[int]]


@dataclass(frozen=True)
class NeMoConfig:
    """Settings of NeMo's search (Hintersdorf et al. 2024, sec. 3 and their public code).

    Args:
        theta_start: first z-score threshold of the initial selection, 5 as in the paper.
        theta_step: how much theta is lowered per round, 0.25 as in the paper.
        theta_min: lowest theta tried, 1 as in the authors' code; a prompt whose signal is still over its
            threshold there keeps the neurons of that last round and is reported as not mitigated.
        top_k_step: the authors' code also adds the k highest-z neurons of every layer, k growing by this much per
            round (so a layer with no outlier still contributes); 0 uses the z-threshold alone, as the paper's text.
        blocks: which top-level UNet blocks' cross-attention value layers (`attn2.to_v`) are searched: all of
            them. The authors' code searches only the down and mid blocks of SD 1.x; on the world's example LoRA
            that lowers none of the 5 memorized prompts' signals under the threshold even at theta = 1 (most of
            the world's attention sits in the up blocks; docs/pruning.md), so the default adds "up_blocks".
        generations: noise draws over which the first-step signal is averaged; 8 gives a stable mean on the world
            (Wen et al. report that even one draw separates well on SD).
        timestep: the first sampling timestep at which the signal is measured; 999 is the world's first DDIM step
            (trailing spacing); SD's DDIM with leading spacing starts at 981.
        threshold_stds: when no threshold is given, the memorization threshold is the mean plus this many
            standard deviations of the signal over the calibration prompts (held-out captions): 3 puts it above
            all 20 held-out captions of the world's example LoRA and below all 5 memorized ones.
        refine: run the refinement (layers, then single neurons); off keeps the initial selection.
        seed: seed of the noise draws.
    """

    theta_start: float = 5.0
    theta_step: float = 0.25
    theta_min: float = 1.0
    top_k_step: int = 1
    blocks: tuple[str, ...] = ("down_blocks", "mid_block", "up_blocks")
    generations: int = 8
    timestep: int = 999
    threshold_stds: float = 3.0
    refine: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.theta_step <= 0 or self.theta_min > self.theta_start:
            raise ValueError(f"need theta_step > 0 and theta_min <= theta_start, got {self}")
        if self.generations < 1 or self.top_k_step < 0:
            raise ValueError(f"need generations >= 1 and top_k_step >= 0, got {self}")


def value_layers(unet: torch.nn.Module, blocks: Sequence[str]) -> dict[str, torch.nn.Linear]:
    """The cross-attention value projections (`...attn2.to_v`) inside the named top-level blocks, in model order."""
    layers = modules_matching(unet, lambda path, _: path.endswith("attn2.to_v") and path.split(".")[0] in blocks)
    if not layers:
        raise DiffmemError(f"the UNet has no cross-attention value layer (attn2.to_v) in the blocks {list(blocks)}")
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
    """Output of every value layer for text states [N, tokens, dim] (the value layer sees only the text)."""
    with torch.no_grad():
        return {path: layer(text_states.to(layer.weight.dtype)).float() for path, layer in layers.items()}


def layer_z_scores(
    layers: Mapping[str, torch.nn.Linear], prompt_states: torch.Tensor, ordinary_states: torch.Tensor
) -> dict[str, torch.Tensor]:
    """{layer: z-scores [P, neurons]} of the prompts against the ordinary prompts' activation statistics."""
    prompt = value_outputs(layers, prompt_states)
    ordinary = value_outputs(layers, ordinary_states)
    scores = {}
    for path in layers:
        mean, std = activation_statistics(neuron_activations(ordinary[path]))
        scores[path] = z_scores(neuron_activations(prompt[path]), mean, std)
    return scores


def blocking_hook(indices: torch.Tensor) -> Callable:
    """A forward hook that zeroes output channels `indices` (what zeroed weight rows do to a bias-free layer)."""
    def hook(_module, _inputs, output):
        return output.index_fill(-1, indices.to(output.device), 0)
    return hook


def first_step_signal(
    unet: torch.nn.Module,
    prompt_states: torch.Tensor,
    empty_states: torch.Tensor,
    noise: torch.Tensor,
    timestep: int,
) -> torch.Tensor:
    """Wen et al.'s score at the first sampling step: mean over noise draws of ||eps(x_T, c) - eps(x_T, empty)||,
    one value per prompt [P] (Wen et al. 2024, fig. 2)."""
    prompts, draws = prompt_states.shape[0], noise.shape[0]
    parameter = next(unet.parameters())
    x = noise.repeat(prompts, 1, 1, 1).to(parameter.device, parameter.dtype)
    context = torch.cat([prompt_states.repeat_interleave(draws, dim=0),
                         empty_states.expand(prompts * draws, -1, -1)]).to(parameter.device, parameter.dtype)
    steps = torch.full((2 * prompts * draws,), timestep, device=parameter.device)
    with torch.no_grad():
        eps_cond, eps_empty = unet(torch.cat([x, x]), steps, encoder_hidden_states=context).sample.chunk(2)
    return conditional_difference_norms(eps_cond, eps_empty).view(prompts, draws).mean(dim=1).float()


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

    def __init__(self, unet: torch.nn.Module, layers: Mapping[str, torch.nn.Linear], prompt_states: torch.Tensor,
                 empty_states: torch.Tensor, noise: torch.Tensor, timestep: int):
        self.unet, self.layers = unet, layers
        self.prompt_states, self.empty_states, self.noise, self.timestep = prompt_states, empty_states, noise, timestep
        self.evaluations = 0

    def signal(self, neurons: Neurons) -> float:
        self.evaluations += 1
        blocked = {path: self.layers[path] for path, indices in neurons.items() if indices}
        hooks = forward_hooks(blocked, lambda path: blocking_hook(torch.tensor(neurons[path], dtype=torch.long)))
        with hooks:
            return float(first_step_signal(self.unet, self.prompt_states, self.empty_states, self.noise,
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
    unet: torch.nn.Module,
    prompts: Sequence[str],
    prompt_states: torch.Tensor,
    ordinary_states: torch.Tensor,
    empty_states: torch.Tensor,
    threshold: float,
    config: NeMoConfig = NeMoConfig(),
    progress: Callable[[PromptNeurons], None] | None = None,
) -> NeMoResult:
    """NeMo on any diffusers `UNet2DConditionModel`, from text-encoder states: memorized prompts [P, L, D],
    ordinary prompts [N, L, D] (activation statistics), the empty prompt [1, L, D]. `unet` is not modified."""
    if len(prompts) != prompt_states.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts but {prompt_states.shape[0]} text states")
    layers = value_layers(unet, config.blocks)
    z = layer_z_scores(layers, prompt_states, ordinary_states)
    noise = first_step_noise(unet, config)
    found = []
    for i, prompt in enumerate(prompts):
        search = NeuronSearch(unet, layers, prompt_states[i : i + 1], empty_states, noise, config.timestep)
        found.append(localize_prompt(search, prompt, {path: scores[i] for path, scores in z.items()}, threshold,
                                     config))
        if progress is not None:
            progress(found[-1])
    return NeMoResult(found, threshold, config, list(layers))


def first_step_noise(unet: torch.nn.Module, config: NeMoConfig) -> torch.Tensor:
    """The fixed noise draws x_T [generations, C, H, W] of the signal, from `config.seed`."""
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    generator = torch.Generator().manual_seed(config.seed)
    return torch.randn((config.generations, unet.config.in_channels, *size), generator=generator)


def calibrate_threshold(unet: torch.nn.Module, calibration_states: torch.Tensor, empty_states: torch.Tensor,
                        config: NeMoConfig = NeMoConfig()) -> tuple[float, torch.Tensor]:
    """(threshold, signals) from non-memorized calibration prompts [N, L, D] (`memorization_threshold`)."""
    signals = first_step_signal(unet, calibration_states, empty_states, first_step_noise(unet, config),
                                config.timestep)
    return memorization_threshold(signals, config.threshold_stds), signals


def neuron_masks(unet: torch.nn.Module, neurons: Mapping[str, Sequence[int]]) -> WeightMasks:
    """Weight masks that deactivate `neurons` ({value layer: indices}): their rows of the weight, and of the bias
    where the layer has one."""
    modules = dict(unet.named_modules())
    masks = {}
    for path, indices in neurons.items():
        if path not in modules or not isinstance(modules[path], torch.nn.Linear):
            raise DiffmemError(f"the UNet has no linear layer {path!r} to deactivate neurons in")
        layer = modules[path]
        rows = torch.zeros(layer.out_features, dtype=torch.bool)
        rows[torch.tensor(list(indices), dtype=torch.long)] = True
        masks[f"{path}.weight"] = rows[:, None].expand_as(layer.weight).clone()
        if layer.bias is not None:
            masks[f"{path}.bias"] = rows
    return masks


def nemo_mitigate(
    unet: torch.nn.Module,
    memorized_prompts: Sequence[str],
    ordinary_prompts: Sequence[str],
    calibration_prompts: Sequence[str] | None = None,
    lora=None,
    config: NeMoConfig = NeMoConfig(),
    threshold: float | None = None,
    encode: Callable[[list[str]], torch.Tensor] | None = None,
    progress: Callable[[PromptNeurons], None] | None = None,
) -> tuple[torch.nn.Module, NeMoResult, WeightMasks]:
    """NeMo as a mitigation: (pruned copy of the UNet, what was found, the weight masks it applied).

    `lora` (a file or `LoraFile`) is merged into a copy first (`diffmem.world.lora.apply_lora`); `ordinary_prompts`
    give the activation statistics; the threshold is `threshold` or calibrated on `calibration_prompts` (default
    the ordinary prompts), which must not be memorized. `encode` turns prompts into text states (default: the
    world's text encoder). The input `unet` is never modified.
    """
    if lora is not None:
        from diffmem.world.lora import apply_lora

        unet = apply_lora(unet, lora)
    if encode is None:
        from diffmem.world.text import encode_prompts as encode
    if not memorized_prompts:
        raise DiffmemError("NeMo needs at least one memorized prompt")
    calibration_prompts = list(calibration_prompts or ordinary_prompts)
    if len(ordinary_prompts) < 2 or (threshold is None and len(calibration_prompts) < 2):
        raise DiffmemError("NeMo needs at least 2 ordinary prompts (activation statistics) and, without a given "
                           "threshold, at least 2 calibration prompts (many more give steadier statistics)")
    empty = encode([""])
    if threshold is None:
        threshold, _ = calibrate_threshold(unet, encode(calibration_prompts), empty, config)
    result = localize_neurons(unet, list(memorized_prompts), encode(list(memorized_prompts)),
                              encode(list(ordinary_prompts)), empty, threshold, config, progress)
    masks = neuron_masks(unet, result.neurons)
    return apply_masks(unet, masks), result, masks


def describe(result: NeMoResult) -> str:
    """One line per prompt: signal before/after, neurons kept, whether it fell under the threshold."""
    lines = [f"threshold {result.threshold:.4f}"]
    for p in result.prompts:
        lines.append(f"{p.prompt!r}: signal {p.signal_before:.3f} -> {p.signal_after:.3f}, theta {p.theta:g}, "
                     f"{p.initial_count} -> {p.count} neurons, {'mitigated' if p.mitigated else 'NOT mitigated'}")
    lines.append(json.dumps({path: len(v) for path, v in result.neurons.items()}))
    return "\n".join(lines)
