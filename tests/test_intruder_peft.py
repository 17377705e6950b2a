"""Our `intruder` filter against PEFT's ``reduce_intruder_dimension`` on the same LoRA (issue 18, section 2).

The two rules differ by design (docs/filter.md, "The intruder test and PEFT's"): PEFT decomposes the merged weight
``W0 + dW`` and tests only its ``top_k`` largest directions, scales intruders by ``mitigation_lambda`` and
re-factorises at the adapter's rank; ours decomposes ``dW`` and drops its intruder channels. These tests pin what
that means: the same update exactly where the merged SVD splits into the base's and the LoRA's; nothing flagged by
PEFT when the intruders are too small for its top k; the same intruders and an update that converges to ours as
``||W0|| / sigma_intruder`` on a full-rank base. Each LoRA is rank 8 on a 64x32 base: four small channels on the
base's own singular directions and four large ones: intruders at cosine 0 to the base in the split case; on the
full-rank base two random intruders (cosines 0.2 and 0.35) and two channels that are not (0.65 and 0.8).
"""

import pytest
import torch

import builders_base as bb
import builders_lora as bl
from diffmem.errors import DiffmemError
from diffmem.filters import IntruderConfig, ModuleView, select
from diffmem.filters.peft_intruder import PeftIntruderConfig, peft_intruder_factors, peft_intruder_lora
from diffmem.formats.base import open_base, resolve_targets
from diffmem.formats.lora import read_lora
from diffmem.spectral import lowrank_channels, rebuild_factors

pytest.importorskip("peft.tuners.lora.intruders")  # PEFT >= 0.18 (the `world` extra may hold an older one)

OUT, IN, RANK, SCALE = 64, 32, 8, 0.5  # an nn.Linear(32, 64); lora_alpha 4 at rank 8
MULTIPLES = (5.0, 15.0, 45.0)  # the large channels' gains over the base's largest singular value


def orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator))[0]


def factors(u: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor, scale: float = SCALE):
    """(B, A) with scale * B @ A = u diag(sigma) v^T, the gain split evenly between the factors."""
    root = (sigma / scale).sqrt()
    return u * root, (v * root).T


#: Base singular directions the LoRA's four small channels reinforce: two of them beyond the top 10.
ALIGNED = [0, 6, 13, 21]


def planted_lora(base_u, base_v, large_u, large_v, large_sigma):
    """Four channels on base singular directions `ALIGNED` (gains 0.3 .. 0.15) plus four large ones."""
    sigma = torch.cat([torch.tensor([0.3, 0.25, 0.2, 0.15]), torch.as_tensor(large_sigma, dtype=torch.float32)])
    return factors(torch.cat([base_u[:, ALIGNED], large_u], 1), sigma, torch.cat([base_v[:, ALIGNED], large_v], 1))


def split_case(generator, intruder_sigma):
    """A rank-24 base 64x32 whose merged SVD splits: the four large channels are intruders outside the base's
    column space and inside its null space, so each is a singular direction of ``W0 + dW`` with cosine 0 to every
    base direction of nonzero gain (the SVD's 8 null-space vectors are arbitrary; both rules take the same ones,
    from the same SVD)."""
    u0, v0 = orthonormal(OUT, OUT, generator), orthonormal(IN, IN, generator)
    weight = u0[:, :24] @ torch.diag(torch.linspace(1.0, 0.05, 24)) @ v0[:, :24].T
    intruder_u = u0[:, 24:] @ orthonormal(OUT - 24, 4, generator)
    intruder_v = v0[:, 24:] @ orthonormal(IN - 24, 4, generator)
    return weight, *planted_lora(u0, v0, intruder_u, intruder_v, intruder_sigma)


#: Largest cosine of each large channel of `full_rank_case` to the base (< 0.5: an intruder) and the base
#: direction it is taken on.
COSINES, ON = torch.tensor([0.2, 0.35, 0.65, 0.8]), [3, 9, 17, 26]


def full_rank_case(generator, large_sigma):
    """A full-rank 64x32 base (spectrum 1 .. 0.03) and four large channels, each ``c u0_j + sqrt(1 - c^2) w``
    with ``w`` random outside the base's column space (`COSINES`, `ON`): two intruders and two that are not."""
    u0, v0 = orthonormal(OUT, OUT, generator), orthonormal(IN, IN, generator)
    weight = u0[:, :IN] @ torch.diag(torch.logspace(0, -1.5, IN)) @ v0.T
    outside = u0[:, IN:] @ orthonormal(OUT - IN, 4, generator)
    large_u = COSINES * u0[:, ON] + (1 - COSINES.square()).sqrt() * outside
    others = [j for j in range(IN) if j not in ALIGNED]
    large_v = v0[:, others] @ orthonormal(len(others), 4, generator)
    return weight, *planted_lora(u0, v0, large_u, large_v, large_sigma)


def ours(weight, up, down, mitigation_lambda=0.0):
    """Our `intruder` filter's update (score, default threshold rule, rebuild) and its flags; with a nonzero
    ``mitigation_lambda`` the flagged channels are scaled by it instead of dropped, PEFT's way."""
    config = IntruderConfig()
    channels = lowrank_channels(up, down, SCALE)
    view = ModuleView(name="m", channels=channels, anchors=None, weight=lambda: weight)
    kept = select({"m": config.score(view)}, {"m": channels.sigma}, config.selection)["m"]
    if mitigation_lambda == 0.0:
        b, a = rebuild_factors(channels, kept, SCALE, RANK)
        return SCALE * b @ a, kept == 0
    return channels.dense(kept + mitigation_lambda * (1 - kept)), kept == 0


def peft(weight, up, down, **options):
    b, a = peft_intruder_factors(weight, up, down, SCALE, PeftIntruderConfig(**options))
    return SCALE * b @ a


def relative(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x - reference).norm() / reference.norm())


def test_runner_is_peft_on_a_model_with_the_lora_loaded():
    """`peft_intruder_factors` (one layer at a time) gives what PEFT's function gives on a two-layer model whose
    LoRA was loaded with ``get_peft_model``, to float32 rounding (1e-5 relative)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN, OUT, bias=False), torch.nn.ReLU(),
                                torch.nn.Linear(OUT, IN, bias=False))
    cases = {"0": full_rank_case(generator, [2.0, 1.8, 1.6, 1.4]),
             "2": (torch.randn(IN, OUT, generator=generator) / OUT**0.5,
                   *factors(orthonormal(IN, RANK, generator), torch.linspace(3.0, 0.5, RANK),
                            orthonormal(OUT, RANK, generator)))}
    with torch.no_grad():
        for name, (weight, _, _) in cases.items():
            model.get_submodule(name).weight.copy_(weight)
    wrapped = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=SCALE * RANK, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, (_, up, down) in cases.items():
            layer = wrapped.base_model.model.get_submodule(name)
            layer.lora_B["default"].weight.copy_(up)
            layer.lora_A["default"].weight.copy_(down)
        reduce_intruder_dimension(wrapped, logging_sink=None)
    for name, (weight, up, down) in cases.items():
        layer = wrapped.base_model.model.get_submodule(name)
        expected = layer.get_delta_weight("intruder_reduced").detach()
        assert relative(expected, SCALE * up @ down) > 0.05  # PEFT changed this layer: the comparison bites
        torch.testing.assert_close(peft(weight, up, down), expected, rtol=0, atol=1e-5 * float(expected.norm()))


@pytest.mark.parametrize("mitigation_lambda", [0.0, 0.75])
def test_same_update_where_the_merged_svd_splits(mitigation_lambda):
    """Intruders orthogonal to the base on both sides and above its spectrum: PEFT's update is ours (intruder
    channels dropped, or scaled by lambda) to 1e-5 of the update's norm."""
    weight, up, down = split_case(torch.Generator().manual_seed(1), [2.0, 1.8, 1.6, 1.4])
    update, flagged = ours(weight, up, down, mitigation_lambda)
    assert flagged.tolist() == [True] * 4 + [False] * 4  # channels sorted by gain: the intruders come first
    reduced = peft(weight, up, down, mitigation_lambda=mitigation_lambda)
    torch.testing.assert_close(reduced, update, rtol=0, atol=1e-5 * float((SCALE * up @ down).norm()))


def test_peft_tests_only_the_top_k_merged_directions():
    """Intruders smaller than the base's top-10 singular values: PEFT's default leaves the update as it is while
    ours drops them; with top_k covering every direction PEFT drops them too, and agrees with ours again."""
    weight, up, down = split_case(torch.Generator().manual_seed(2), [0.19, 0.14, 0.11, 0.07])
    update, flagged = ours(weight, up, down)
    assert int(flagged.sum()) == 4
    tolerance = 1e-5 * float((SCALE * up @ down).norm())
    torch.testing.assert_close(peft(weight, up, down, mitigation_lambda=0.0), SCALE * up @ down, rtol=0,
                               atol=tolerance)
    torch.testing.assert_close(peft(weight, up, down, mitigation_lambda=0.0, top_k=IN), update, rtol=0,
                               atol=tolerance)


def test_same_intruders_and_converging_updates_on_a_full_rank_base():
    """On a full-rank base PEFT removes merged components ``sigma' u' v'^T``, which tilt towards the base and carry
    the base's own map along the intruders' input directions: the updates are not equal, but the same two
    intruders are removed (a channel flagged by one rule only would move the update by a whole channel, at least 40% of
    its norm), PEFT's removed part spans our dropped channels' output directions, and the gap is below a half of
    ``||W0|| / sigma_intruder`` (measured: a third), shrinking as the intruders grow."""
    gaps = []
    for multiple in MULTIPLES:
        large_sigma = multiple * torch.tensor([1.0, 0.9, 0.8, 0.7])
        weight, up, down = full_rank_case(torch.Generator().manual_seed(3), large_sigma)
        update, flagged = ours(weight, up, down)
        assert flagged.tolist() == (COSINES < 0.5).tolist() + [False] * 4  # channels sorted by gain
        reduced = peft(weight, up, down, mitigation_lambda=0.0)
        removed_u = torch.linalg.svd(SCALE * up @ down - reduced)[0][:, :2]
        ours_u = lowrank_channels(up, down, SCALE).u[:, flagged]
        distance = float(torch.linalg.matrix_norm(removed_u @ removed_u.T - ours_u @ ours_u.T, ord=2))
        ratio = float(torch.linalg.matrix_norm(weight, ord=2)) / float(large_sigma[:2].min())
        gap = float((reduced - update).norm() / (SCALE * up @ down).norm())
        assert distance < ratio and gap < 0.5 * ratio, (multiple, distance, gap, ratio)
        gaps.append(gap)
    assert gaps[0] > 2 * gaps[1] > 4 * gaps[2]


def test_peft_intruder_lora_reduces_every_module_of_a_file(tmp_path):
    """The file-level runner: each module's update is `peft_intruder_factors` on its base weight; rank, alpha and
    format are kept; DoRA modules are refused."""
    base = open_base(bb.build_tiny_base(tmp_path, "sd1", "single_file"))
    lookups = bb.lora_lookups("sd1", "kohya")
    bl.write_kohya_lora(tmp_path / "lora.safetensors", lookups, rank=4, alpha=2.0)
    lora = read_lora(tmp_path / "lora.safetensors")
    config = PeftIntruderConfig(top_k=64, mitigation_lambda=0.0)
    reduced = peft_intruder_lora(lora, base, config)
    targets = resolve_targets({n: (m.lookup, tuple(m.weight_shape)) for n, m in lora.modules.items()}, base,
                              lora.path)
    changed = 0
    for name, module in lora.modules.items():
        new = reduced.modules[name]
        assert (new.rank, new.alpha) == (module.rank, module.alpha)
        b, a = peft_intruder_factors(base.weight(targets[name]), *module.factors(), module.scale, config)
        torch.testing.assert_close(new.delta().reshape(b.shape[0], -1), module.scale * b @ a, rtol=0, atol=1e-5)
        changed += relative(new.delta(), module.delta()) > 1e-3
    assert changed > 0
    assert reduced.format == lora.format
    bl.write_kohya_lora(tmp_path / "dora.safetensors", lookups, rank=4, dora=True)
    with pytest.raises(DiffmemError, match="DoRA"):
        peft_intruder_lora(tmp_path / "dora.safetensors", base, config)
