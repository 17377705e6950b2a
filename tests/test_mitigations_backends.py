"""NeMo and Wanda on every backend: `diffmem mitigate nemo|wanda` end to end on tiny SD1, SDXL and Flux pipelines
(masks of the right layers, shaped like the denoiser's parameters, the family in the file), the whole conditioning
reaching the first-step signal (SDXL's pooled embedding), value activations recorded inside the model (Flux's
add_v_proj sees the modulated text stream; a UNet's to_v sees the text states, as the world's old shortcut), and
the world-only options refused on a pipeline in one line."""

from __future__ import annotations

import pytest
import torch

from builders_pipelines import build_tiny_pipeline, write_pipeline_lora
from diffmem.backends import Conditioning, as_backend, open_backend
from diffmem.cli import main
from diffmem.errors import DiffmemError
from diffmem.formats.safetensors_io import read_header
from diffmem.mitigations.nemo import (
    NeMoConfig,
    first_sampling_timestep,
    first_step_noise,
    first_step_signal,
    nemo_mitigate,
    neuron_activations,
    value_activations,
    value_layers,
    value_outputs,
)
from diffmem.mitigations.pruning import FAMILY_KEY, load_masks, masked_count
from diffmem.mitigations.wanda import per_row_count
from diffmem.world.model import build_unet
from diffmem.world.text import encode_prompts
from test_world import TINY

MEMORIZED = "a red cat"
ORDINARY = ["blue sky", "green field", "old house", "brown dog"]
#: What each method may zero: NeMo the value layers (a UNet's cross-attention values, Flux's text-stream values of
#: joint attention), Wanda the feed-forward outputs.
VALUE_SUFFIX = {"sd1": ("attn2.to_v",), "sdxl": ("attn2.to_v",), "flux": ("attn.add_v_proj",),
                "sd3": ("attn.add_v_proj",)}
FEED_FORWARD_SUFFIX = ("ff.net.2",)


def pipeline(tmp_path_factory: pytest.TempPathFactory, family: str):
    """(folder, LoRA, backend with the LoRA merged) of a tiny `family` pipeline, built once per module."""
    folder = build_tiny_pipeline(tmp_path_factory.mktemp(family), family)
    lora = write_pipeline_lora(folder, family, folder.parent / f"{family}-lora.safetensors")
    return folder, lora, open_backend(folder, lora)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return pipeline(tmp_path_factory, "sd1")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return pipeline(tmp_path_factory, "sdxl")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return pipeline(tmp_path_factory, "flux")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return pipeline(tmp_path_factory, "sd3")


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    (folder / "memorized.txt").write_text(MEMORIZED + "\n")
    (folder / "ordinary.txt").write_text("\n".join(ORDINARY) + "\n")
    return folder / "memorized.txt", folder / "ordinary.txt"


def assert_masks_fit(path, backend, suffixes: tuple[str, ...], family: str) -> tuple[dict, dict]:
    """The mask file at `path` masks only layers ending in `suffixes`, each mask shaped like the denoiser's
    parameter, and names the model family; (masks, report)."""
    masks, _, report = load_masks(path)
    parameters = dict(backend.denoiser.named_parameters())
    assert masks and masked_count(masks) == report["pruned_weights"] > 0
    for name, mask in masks.items():
        layer, kind = name.rsplit(".", 1)
        assert layer.endswith(suffixes) and kind in ("weight", "bias"), name
        assert mask.shape == parameters[name].shape, name
    assert read_header(path)[1][FAMILY_KEY] == family and report["family"] == family
    return masks, report


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux", "sd3"])
def test_nemo_and_wanda_commands_on_pipelines(family, request, prompt_files, tmp_path):
    folder, lora, backend = request.getfixturevalue(family)
    memorized, ordinary = prompt_files
    model = ["--base", str(folder), "--lora", str(lora), "--prompts", str(memorized)]
    # The documented example, threshold calibrated on the ordinary prompts.
    assert main(["mitigate", "nemo", *model, "--ordinary", str(ordinary), "--out", str(tmp_path / "calibrated.safetensors"),
                 "--generations", "2"]) == 0
    assert read_header(tmp_path / "calibrated.safetensors")[1][FAMILY_KEY] == family
    # A threshold under the prompt's signal, so the search must deactivate neurons; the CLI's model and signal are
    # the library's (same pipeline + LoRA, same noise).
    signal = float(first_step_signal(backend, backend.encode([MEMORIZED]), backend.unconditional(),
                                     first_step_noise(backend, NeMoConfig(generations=2)))[0])
    nemo = tmp_path / "nemo.safetensors"
    assert main(["mitigate", "nemo", *model, "--ordinary", str(ordinary), "--out", str(nemo), "--generations", "2",
                 "--threshold", str(0.9 * signal)]) == 0
    _, report = assert_masks_fit(nemo, backend, VALUE_SUFFIX[family], family)
    assert report["prompts"][0]["signal_before"] == pytest.approx(signal, rel=1e-4)
    assert report["config"]["timestep"] == first_sampling_timestep(backend)
    assert report["config"]["blocks"] == list(backend.value_blocks)

    wanda = tmp_path / "wanda.safetensors"
    assert main(["mitigate", "wanda", *model, "--out", str(wanda), "--generations", "1", "--steps", "2"]) == 0
    masks, report = assert_masks_fit(wanda, backend, FEED_FORWARD_SUFFIX, family)
    assert set(masks) == {f"{path}.weight" for path in backend.feed_forward_layers()}
    for mask in masks.values():
        assert int(mask.sum(dim=1).max()) <= per_row_count(mask.shape[1], 0.01)
    assert report["config"]["guidance"] == backend.default_guidance


def test_world_only_options_are_refused_on_a_pipeline(sd1, prompt_files, tmp_path, capsys):
    folder, lora, _ = sd1
    memorized, _ = prompt_files
    out = tmp_path / "mask.safetensors"
    for extra in (["--unet-out", str(tmp_path / "unet.safetensors")], ["--measure"]):
        capsys.readouterr()
        assert main(["mitigate", "wanda", "--base", str(folder), "--prompts", str(memorized), "--out", str(out),
                     *extra]) == 2  # a usage error, as every option the program finds does not fit
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "world models only" in err[0] and extra[0] in err[0]
    assert not out.exists() and not (tmp_path / "unet.safetensors").exists()
    # A pipeline's mask cannot be applied to a world model.
    assert main(["mitigate", "wanda", "--base", str(folder), "--prompts", str(memorized), "--out", str(out),
                 "--generations", "1", "--steps", "1"]) == 0
    capsys.readouterr()
    assert main(["mitigate", "apply", "--masks", str(out), "--out", str(tmp_path / "applied.safetensors")]) == 1
    assert "made for a sd1 model" in capsys.readouterr().err
    with pytest.raises(DiffmemError, match="world models only"):
        nemo_mitigate(sd1[2], [MEMORIZED], ORDINARY, lora=lora)


def test_pipeline_mitigation_returns_masks_and_leaves_the_model_alone(sd1):
    _, _, backend = sd1
    before = {name: p.detach().clone() for name, p in backend.denoiser.named_parameters()}
    config = NeMoConfig(generations=2)
    signal = float(first_step_signal(backend, backend.encode([MEMORIZED]), backend.unconditional(),
                                     first_step_noise(backend, config))[0])
    pruned, result, masks = nemo_mitigate(backend, [MEMORIZED], ORDINARY, config=config, threshold=0.9 * signal)
    assert pruned is None and result.neurons  # a pipeline is not copied unless asked
    pruned, _, again = nemo_mitigate(backend, [MEMORIZED], ORDINARY, config=config, threshold=0.9 * signal,
                                     apply=True)
    assert all(torch.equal(again[k], masks[k]) for k in masks)
    parameters = dict(pruned.denoiser.named_parameters())
    for name, parameter in backend.denoiser.named_parameters():
        assert torch.equal(parameter, before[name]), name  # the input is untouched
        mask = masks.get(name, torch.zeros_like(parameter, dtype=torch.bool))
        assert torch.equal(parameters[name][~mask], before[name][~mask]) and bool((parameters[name][mask] == 0).all())
    after = float(first_step_signal(pruned, backend.encode([MEMORIZED]), backend.unconditional(),
                                    first_step_noise(backend, config))[0])
    assert after == pytest.approx(result.prompts[0].signal_after, rel=1e-5)


def test_sdxl_signal_sees_the_pooled_embedding(sdxl):
    """The first-step signal goes through `backend.predict` with SDXL's added conditioning: scaling the pooled
    text_encoder_2 embedding changes it."""
    _, _, backend = sdxl
    encoded, empty = backend.encode([MEMORIZED]), backend.unconditional()
    noise = first_step_noise(backend, NeMoConfig(generations=2))
    signal = first_step_signal(backend, encoded, empty, noise)
    louder = Conditioning(encoded.context, {**encoded.added, "text_embeds": 3 * encoded.added["text_embeds"]})
    assert float(first_step_signal(backend, louder, empty, noise)[0]) != pytest.approx(float(signal[0]), rel=1e-3)


def test_flux_value_activations_are_recorded_inside_the_blocks(flux):
    """Flux's add_v_proj sees the text stream after the block's modulation: the hooked activations differ from
    the layer applied to the embedded T5 states, and they follow the pooled CLIP embedding; the raw T5 states do
    not even fit the layer."""
    _, _, backend = flux
    layers = value_layers(backend)
    assert layers and all(path.endswith("attn.add_v_proj") for path in layers)
    encoded = backend.encode([MEMORIZED, *ORDINARY])
    noise = first_step_noise(backend, NeMoConfig(generations=1))
    hooked = value_activations(backend, layers, encoded, noise)
    embedded = backend.denoiser.transformer.context_embedder(encoded.context)
    direct = {p: neuron_activations(v) for p, v in value_outputs(layers, embedded).items()}
    for path in layers:
        assert hooked[path].shape == (len(encoded), layers[path].out_features)
        assert not torch.allclose(hooked[path], direct[path], atol=1e-4)
    pooled = Conditioning(encoded.context, {"pooled_projections": 3 * encoded.added["pooled_projections"]})
    moved = value_activations(backend, layers, pooled, noise)
    assert not all(torch.allclose(hooked[p], moved[p], atol=1e-4) for p in layers)
    with pytest.raises(RuntimeError):
        value_outputs(layers, encoded.context)


def test_unet_value_activations_equal_the_text_state_shortcut(sd1):
    """On a UNet the hooked to_v outputs are to_v(text states): bit for bit on the world (its NeMo numbers are
    unchanged), and on an SD pipeline."""
    torch.manual_seed(0)
    world = as_backend(build_unet(TINY).eval().requires_grad_(False))
    states = encode_prompts([MEMORIZED, *ORDINARY])
    for backend, conditioning, exact in ((world, Conditioning(states), True),
                                         (sd1[2], sd1[2].encode([MEMORIZED, *ORDINARY]), False)):
        layers = value_layers(backend)
        noise = first_step_noise(backend, NeMoConfig(generations=1))
        hooked = value_activations(backend, layers, conditioning, noise, batch_size=2)
        for path, values in value_outputs(layers, conditioning.context).items():
            if exact:
                assert torch.equal(hooked[path], neuron_activations(values)), path
            else:
                torch.testing.assert_close(hooked[path], neuron_activations(values))
    assert first_sampling_timestep(world) == 999 and first_sampling_timestep(sd1[2]) == 981
