"""The one interface every diffmem method talks to a text-to-image diffusion model through.

A `Backend` hides what differs between the embedded world, Stable Diffusion 1.x/2.x, SDXL, Flux and SD3: how prompts
become conditioning, how the denoiser is called, how it is sampled and trained, how its samples become images, and
which of its layers the mitigations touch. The methods (the audit, Wen's detector, the Dori attack, NeMo, Wanda)
take a backend and nothing model-specific, so a method written once runs on every model diffmem loads
(docs/backends.md lists command x backend).

Definitions that depend on the architecture are decided in the implementations and documented there: Flux's
"noise prediction" is its velocity, its denoising loss the flow-matching loss, its NeMo value layers the text
stream's values of joint attention (`diffmem.backends.flux`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from diffmem.metrics.wen import WenConfig, guided_sampling_chunk


@dataclass
class Conditioning:
    """What the denoiser is conditioned on, one row per sample.

    Attributes:
        context: the cross-attention (or joint-attention text) states [N, L, D].
        added: further per-sample tensors the denoiser takes as `added_cond_kwargs`: SDXL's pooled text embedding
            and time ids (`text_embeds`, `time_ids`), Flux's pooled CLIP embedding (`pooled_projections`); empty for
            the world and SD 1.x/2.x.
    """

    context: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.context.shape[0]

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor, context first (what the Dori attack optimises)."""
        yield self.context
        yield from self.added.values()

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        """The same conditioning with `function` applied to every tensor."""
        return Conditioning(function(self.context), {key: function(value) for key, value in self.added.items()})

    def expand(self, count: int) -> Conditioning:
        """One row (N = 1) repeated `count` times (a view, no copy)."""
        return self.map(lambda tensor: tensor.expand(count, *tensor.shape[1:]))

    def repeat_interleave(self, repeats: int) -> Conditioning:
        """Each row `repeats` times in a row (row i becomes rows i*repeats ... i*repeats + repeats - 1)."""
        return self.map(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def rows(self, start: int, stop: int) -> Conditioning:
        """Rows start ... stop - 1."""
        return self.map(lambda tensor: tensor[start:stop])

    def detach(self) -> Conditioning:
        return self.map(lambda tensor: tensor.detach())

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Conditioning:
        return self.map(lambda tensor: tensor.to(device, dtype))

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Rows of `parts` one after the other."""
        return Conditioning(torch.cat([part.context for part in parts]),
                            {key: torch.cat([part.added[key] for part in parts]) for key in parts[0].added})


def per_seed_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Starting noise [N, *shape], one CPU generator per seed, so a sample depends only on its own seed and not on
    the batch it is drawn in or the device."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)))
                        for seed in seeds]) if seeds else torch.zeros(0, *shape)


class Backend:
    """A text-to-image diffusion model as diffmem's methods use it. Subclasses set the attributes and implement
    `encode`, `decode`, `encode_images` and `training_pair`; sampling, the losses and the layer lookups are shared.

    Attributes:
        name: shown in reports, e.g. the base and LoRA file names.
        family: "world", "sd1", "sd2", "sdxl", "flux" or "sd3".
        denoiser: the network, called like a diffusers UNet: `denoiser(x, t, encoder_hidden_states=...,
            added_cond_kwargs=...)` returns an object whose `.sample` is the prediction (noise, v or velocity).
        scheduler: the sampler (DDIM for the SD family as in Wen et al.; the flow-matching Euler scheduler for
            Flux): anything with diffusers' `set_timesteps`, `timesteps`, `init_noise_sigma`, `scale_model_input`
            and `step`. `sampler()` hands out a fresh copy.
        sample_shape: [C, H, W] of the denoiser's input.
        image_size: [H, W] of the images `decode` returns (targets and training images are resized to it).
        default_steps, default_guidance: how the model is normally sampled, used when the user does not say.
        value_blocks: the top-level blocks of `denoiser` whose cross-attention values NeMo searches by default.
    """

    name: str
    family: str
    denoiser: torch.nn.Module
    scheduler: object
    sample_shape: tuple[int, int, int]
    image_size: tuple[int, int]
    default_steps: int = 50
    default_guidance: float = 7.5
    value_blocks: tuple[str, ...] = ("down_blocks", "mid_block", "up_blocks")

    # --- what each model family implements ---------------------------------------------------------------------

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Prompts -> their conditioning (the empty string gives what the model is guided away from)."""
        raise NotImplementedError

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Final samples of the denoiser's space [N, C, H, W] -> images [N, 3, H', W'] in [0, 1] on the CPU."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H', W'] in [0, 1] -> clean samples x_0 of the denoiser's space (a VAE encode for latent
        models, a rescale for pixel models)."""
        raise NotImplementedError

    def training_pair(self, x0: torch.Tensor, noise: torch.Tensor,
                      u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy x_t, the denoiser's timesteps, the training target) for clean samples `x0`, `noise` and noise
        levels `u` [N] in [0, 1) (0: clean, towards 1: pure noise), as the model is trained: a DDPM timestep
        floor(u T) with an epsilon or v target, or a flow-matching sigma with a velocity target."""
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------------------------------

    def loss_at(self, x0: torch.Tensor, noise: torch.Tensor, u: torch.Tensor, conditioning: Conditioning,
                reduce: bool = True) -> torch.Tensor:
        """Mean squared error of the denoiser's prediction to the training target at given noise and noise levels
        (`training_pair`); per sample unless `reduce`."""
        noisy, timesteps, target = self.training_pair(x0.float().cpu(), noise, u)
        per_sample = mse_per_sample(self.predict(noisy, timesteps, conditioning), target.to(self.device))
        return per_sample.mean() if reduce else per_sample

    def denoising_loss(self, x0: torch.Tensor, conditioning: Conditioning, generator: torch.Generator | None = None,
                       reduce: bool = True) -> torch.Tensor:
        """The model's training loss on clean samples `x0` (from `encode_images`): noise, then noise levels,
        drawn from `generator` (Ho et al. 2020's simple loss; flow matching for Flux and SD3)."""
        noise = torch.randn(x0.shape, generator=generator)
        return self.loss_at(x0, noise, torch.rand((x0.shape[0],), generator=generator), conditioning, reduce)

    @torch.no_grad()
    def heldout_loss(self, x0: torch.Tensor, conditioning: Conditioning, levels_per_sample: int = 8, seed: int = 0,
                     batch_size: int = 16) -> float:
        """Mean denoising loss of clean samples `x0` with their conditioning at fixed noise and stratified noise
        levels (one level in each of `levels_per_sample` equal strata of [0, 1) per sample), all drawn from `seed`:
        two models (a LoRA, its filtered variant) are compared on exactly the same noisy inputs."""
        if len(x0) == 0 or len(x0) != len(conditioning):
            raise ValueError(f"need one conditioning row per sample, got {len(x0)} samples, {len(conditioning)} rows")
        generator = torch.Generator().manual_seed(seed)
        offsets = torch.rand((len(x0), 1), generator=generator)
        levels = ((torch.arange(levels_per_sample) + offsets) / levels_per_sample).flatten()
        samples = x0.float().cpu().repeat_interleave(levels_per_sample, dim=0)
        noise = torch.randn(samples.shape, generator=generator)
        rows = conditioning.repeat_interleave(levels_per_sample)
        total = 0.0
        for start in range(0, len(samples), batch_size):
            stop = start + batch_size
            total += float(self.loss_at(samples[start:stop], noise[start:stop], levels[start:stop],
                                        rows.rows(start, stop), reduce=False).sum())
        return total / len(samples)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def unconditional(self) -> Conditioning:
        """The conditioning of the empty prompt, one row."""
        return self.encode([""])

    def sampler(self):
        """A fresh copy of the sampling scheduler (schedulers keep state between steps)."""
        return copy.deepcopy(self.scheduler)

    def predict(self, x: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The denoiser's prediction for a batch (on the denoiser's device and dtype)."""
        conditioning = conditioning.to(self.device, self.dtype)
        kwargs = {"added_cond_kwargs": conditioning.added} if conditioning.added else {}
        return self.denoiser(x.to(self.device, self.dtype), timesteps.to(self.device),
                             encoder_hidden_states=conditioning.context, **kwargs).sample

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """x_T for each seed [N, *sample_shape] (`per_seed_noise`)."""
        return per_seed_noise(seeds, self.sample_shape)

    @torch.no_grad()
    def generate(self, conditioning: Conditioning, seeds: Sequence[int], steps: int | None = None,
                 guidance: float | None = None, batch_size: int = 8) -> torch.Tensor:
        """Images [N, 3, H, W] in [0, 1], one per row of `conditioning` and seed, sampled with classifier-free
        guidance against the empty prompt (the model's defaults where `steps` or `guidance` is None).
        Deterministic per (conditioning, seed)."""
        seeds = list(seeds)
        if len(seeds) != len(conditioning):
            raise ValueError(f"got {len(conditioning)} conditionings but {len(seeds)} seeds")
        settings = WenConfig(num_inference_steps=steps or self.default_steps,
                             guidance_scale=self.default_guidance if guidance is None else guidance)
        empty = self.unconditional()
        noise = self.initial_noise(seeds)
        images = []
        for start in range(0, len(seeds), batch_size):
            chunk = conditioning.rows(start, start + batch_size).detach().to(self.device, self.dtype)
            empties = empty.expand(len(chunk)).to(self.device, self.dtype)
            kwargs = {}
            if chunk.added:
                kwargs["added_cond_kwargs"] = {key: torch.cat([empties.added[key], chunk.added[key]])
                                               for key in chunk.added}
            _, samples = guided_sampling_chunk(self.denoiser, self.sampler(),
                                               noise[start:start + batch_size].to(self.device, self.dtype),
                                               chunk.context, empties.context, settings, {}, kwargs)
            images.append(self.decode(samples))
        return torch.cat(images) if images else torch.zeros(0, 3, *self.image_size)

    def linear_layers(self, keep: Callable[[str], bool]) -> dict[str, torch.nn.Linear]:
        """The denoiser's linear layers whose module path `keep` accepts, in model order."""
        return {path: module for path, module in self.denoiser.named_modules()
                if isinstance(module, torch.nn.Linear) and keep(path)}

    def value_layers(self, blocks: Sequence[str] | None = None) -> dict[str, torch.nn.Linear]:
        """The value projections of cross-attention (`attn2.to_v`; what NeMo searches) inside the top-level
        `blocks` (default `value_blocks`)."""
        blocks = tuple(blocks or self.value_blocks)
        return self.linear_layers(lambda path: path.endswith("attn2.to_v") and path.split(".")[0] in blocks)

    def feed_forward_layers(self) -> dict[str, torch.nn.Linear]:
        """The output projections of the transformer blocks' feed-forward networks (`ff.net.2`; what Wanda
        prunes)."""
        return self.linear_layers(lambda path: path.endswith("ff.net.2"))


def batched(function: Callable[[torch.Tensor], torch.Tensor], tensor: torch.Tensor, size: int = 8) -> torch.Tensor:
    """`function` over `tensor` in chunks of `size` rows, concatenated (VAE passes on a bounded memory)."""
    return torch.cat([function(chunk) for chunk in tensor.split(size)]) if len(tensor) else tensor


def mse_per_sample(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample [N] in float32."""
    return ((prediction.float() - target.float()) ** 2).flatten(1).mean(dim=1)
