"""The project's own copy-detection embedder: a small CNN trained contrastively on the world's images.

SSCD (Pizzi et al. 2022, "A self-supervised descriptor for image copy detection") is a ResNet trained so that an
image and its edited copies (crops, flips, colour changes, blur, noise) embed close together and different
images far apart. Its weights are not available here, and its domain (web photos at 288 px) is not the world's
(32 x 32), so diffmem ships a small network trained the same way on the world's own images. Its committed weights
are pinned by sha256; `python -m diffmem.metrics.train_embedder` rebuilds them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from diffmem.errors import BadWeightsError, DiffmemError
from diffmem.formats.safetensors_io import load_file, sha256_file
from diffmem.metrics.features import ModuleEmbedder
from diffmem.progress import progress_bar

EMBEDDER_FILE = "copy_embedder.safetensors"
#: sha256 of the committed embedder weights, checked by `load_copy_embedder`.
EMBEDDER_SHA256 = "601359e2954d21963fc603fd13c6948d3aa2277ce178fce5aee10adb42a843d8"


@dataclass(frozen=True)
class EmbedderConfig:
    """Shape and training of the copy-detection embedder (SSCD recipe, Pizzi et al. 2022, scaled to 32 x 32).

    Args:
        widths: channels of the four conv stages (resolutions 32, 16, 8, 4); about 0.2 M parameters, 0.45 MB in fp16.
        dim: embedding size. 128, enough to separate a few thousand images, small enough for fast search.
        gem_p: generalised-mean pooling exponent; 3 as in SSCD, between average (1) and max pooling.
        temperature: InfoNCE temperature; 0.1, SimCLR's value for small batches.
        koleo_weight: weight of the KoLeo entropy term that spreads embeddings over the sphere (SSCD uses 30 at
            batch 4096; 1 suits batch 96 here, where the term is larger per sample).
        steps, batch_size, lr: AdamW training schedule with cosine decay; 600 steps of 96 images (two views
            each) take about 8 minutes on one busy CPU core.
        crop_scale: random-resized-crop area range of the augmentations.
        seed: seed of initialisation, batches and augmentations.
    """

    widths: tuple[int, int, int, int] = (16, 32, 64, 96)
    dim: int = 128
    gem_p: float = 3.0
    temperature: float = 0.1
    koleo_weight: float = 1.0
    steps: int = 600
    batch_size: int = 96
    lr: float = 2e-3
    crop_scale: tuple[float, float] = (0.4, 1.0)
    seed: int = 0


class CopyDetectionNet(torch.nn.Module):
    """Four strided conv stages, GeM pooling, a linear projection and L2 normalisation (SSCD's head)."""

    def __init__(self, widths: tuple[int, ...] = EmbedderConfig.widths, dim: int = EmbedderConfig.dim,
                 gem_p: float = EmbedderConfig.gem_p) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        channels = 3
        for index, width in enumerate(widths):
            # The full-resolution stage has one conv only: it dominates the cost at 32 x 32.
            convs = [torch.nn.Conv2d(channels, width, 3, stride=1 if index == 0 else 2, padding=1)]
            if index > 0:
                convs.append(torch.nn.Conv2d(width, width, 3, padding=1))
            for conv in convs:
                layers += [conv, torch.nn.GroupNorm(8, width), torch.nn.SiLU()]
            channels = width
        self.features = torch.nn.Sequential(*layers)
        self.gem_p = gem_p
        self.head = torch.nn.Linear(channels, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images * 2 - 1)
        pooled = x.clamp_min(1e-6).pow(self.gem_p).mean(dim=(2, 3)).pow(1 / self.gem_p)
        return F.normalize(self.head(pooled), dim=1)


def random_augment(images: torch.Tensor, generator: torch.Generator, crop_scale: tuple[float, float]) -> torch.Tensor:
    """A random edited copy of each image: resized crop, flip, small rotation, colour jitter, blur and noise
    (the copy-detection augmentations of SSCD, Pizzi et al. 2022)."""
    n = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    scale = uniform(*crop_scale).sqrt()
    aspect = uniform(math.log(3 / 4), math.log(4 / 3)).exp().sqrt()
    sx, sy = (scale * aspect).clamp(max=1), (scale / aspect).clamp(max=1)
    tx, ty = (1 - sx) * uniform(-1, 1), (1 - sy) * uniform(-1, 1)
    angle = uniform(-0.25, 0.25)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([
        torch.stack([sx * cos * flip, -sy * sin, tx], dim=1),
        torch.stack([sx * sin * flip, sy * cos, ty], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    view = (n, 1, 1, 1)
    brightness = uniform(-0.25, 0.25).view(view)
    contrast = uniform(0.6, 1.4).view(view)
    saturation = uniform(0.5, 1.5).view(view)
    grey = out.mean(dim=1, keepdim=True)
    out = grey + (out - grey) * saturation
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast + mean + brightness

    blurred = F.avg_pool2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    blur = (torch.rand(n, generator=generator) < 0.3).float().view(view)
    out = blur * blurred + (1 - blur) * out
    noise_level = uniform(0.0, 0.05).view(view)
    out = out + noise_level * torch.randn(out.shape, generator=generator)
    return out.clamp(0, 1)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over 2N normalised embeddings: each view must find its partner (Chen et al. 2020, SimCLR)."""
    z = torch.cat([a, b])
    self_pairs = torch.eye(z.shape[0], dtype=torch.bool)
    logits = (z @ z.T / temperature).masked_fill(self_pairs, float("-inf"))
    n = a.shape[0]
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(logits, targets)


def koleo(z: torch.Tensor) -> torch.Tensor:
    """Kozachenko-Leonenko entropy term: -mean log distance to the nearest other embedding (Sablayrolles et al.
    2019; used by SSCD)."""
    self_pairs = torch.eye(z.shape[0], dtype=torch.bool)
    distances = torch.cdist(z, z).masked_fill(self_pairs, float("inf"))
    return -torch.log(distances.min(dim=1).values + 1e-8).mean()


def train_copy_embedder(
    images: torch.Tensor, config: EmbedderConfig = EmbedderConfig(), progress: bool = False
) -> tuple[CopyDetectionNet, list[float]]:
    """Train the embedder on images [N, 3, 32, 32] in [0, 1]; returns the network and the loss per step."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    net = CopyDetectionNet(config.widths, config.dim, config.gem_p)
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, config.steps)
    losses = []
    iterator = range(config.steps)
    if progress:
        iterator = progress_bar(iterator, desc="embedder", unit="step")
    for _ in iterator:
        batch = images[torch.randint(0, images.shape[0], (config.batch_size,), generator=generator)]
        view_a = random_augment(batch, generator, config.crop_scale)
        view_b = random_augment(batch, generator, config.crop_scale)
        za, zb = net(view_a), net(view_b)
        loss = info_nce(za, zb, config.temperature) + config.koleo_weight * koleo(torch.cat([za, zb]))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
    return net.eval(), losses


def embedder_path() -> Path:
    """Where the committed embedder weights live inside the installed package."""
    return Path(str(resources.files("diffmem.metrics") / "assets" / EMBEDDER_FILE))


def load_copy_embedder(
    path: str | Path | None = None, device: str | torch.device = "cpu", expected_sha256: str | None = None
) -> ModuleEmbedder:
    """The project's copy-detection embedder as an `ImageEmbedder` ("diffmem-copy-v1"). Without `path`, the
    committed weights, whose sha256 must equal `EMBEDDER_SHA256`."""
    if path is None:
        path, expected_sha256 = embedder_path(), EMBEDDER_SHA256
    path = Path(path)
    if not path.exists():
        raise DiffmemError("no embedder weights here; build them with `python -m diffmem.metrics.train_embedder`",
                           path)
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise BadWeightsError(
            f"sha256 is {sha256_file(path)}, expected {expected_sha256}: the embedder weights were changed or "
            "damaged; restore them with `git checkout` or rebuild with `python -m diffmem.metrics.train_embedder`",
            path,
        )
    tensors, metadata = load_file(path)
    widths = tuple(int(w) for w in metadata.get("widths", "").split(",") if w)
    if not widths or "dim" not in metadata:
        raise DiffmemError("has no embedder metadata (widths, dim): not saved by diffmem's embedder training", path)
    net = CopyDetectionNet(widths, int(metadata["dim"]), float(metadata.get("gem_p", 3.0)))
    try:
        net.load_state_dict({k: v.float() for k, v in tensors.items()})
    except RuntimeError as exc:
        raise DiffmemError(f"does not match the embedder architecture ({str(exc).splitlines()[0]})", path) from None
    return ModuleEmbedder(net, metadata.get("name", "diffmem-copy-v1"), image_size=32, device=device)
