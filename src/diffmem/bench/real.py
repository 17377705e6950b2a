"""`diffmem bench-real`: the benchmark's variants on a user's own Stable Diffusion checkpoint and LoRAs.

The world benchmark (`diffmem.bench.run`) knows which images each fine-tune memorized; on a real checkpoint the
user says which training images they suspect, in a probe manifest (`read_probe`). Every LoRA is filtered with
the same variants and baselines as the world benchmark (`diffmem.bench.grid`), each filtered file is written and
loaded into the base's diffusers pipeline (Stable Diffusion 1.x/2.x, SDXL, Flux or SD3, driven through
`diffmem.backends`) with diffusers' own `load_lora_weights` (so a variant that a front-end could not load fails
here too), a few images per caption are generated with fixed seeds, and the
generations are measured against the probe images with `diffmem.metrics`. Rows go to ``<out>/results.jsonl`` as
soon as each is measured and are keyed by LoRA, base, probe and settings, so a stopped run resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from diffmem import __version__
from diffmem.backends import Backend, pipeline_backend
from diffmem.backends.stable_diffusion import load_pipeline, pipeline_family
from diffmem.bench.grid import (  # noqa: F401 (the plans: importable from here, as PLANS names them)
    FULL_PLAN,
    QUICK_PLAN,
    VARIATION_PLAN,
    Variant,
    VariantPlan,
    reference_variants,
)
from diffmem.bench.run import append_row, read_rows, settings_id, variant_lora
from diffmem.bench.settings import PLANS, RealBenchSettings  # noqa: F401 (defined there, without diffusers)
from diffmem.errors import DiffmemError, FileFormatError
from diffmem.formats.base import BaseCheckpoint, open_base
from diffmem.formats.lora import write_lora
from diffmem.formats.safetensors_io import sha256_file, write_atomic
from diffmem.metrics.amd import amd
from diffmem.metrics.copy import CopyConfig, copy_decisions, paired_tiled_l2
from diffmem.metrics.extraction import extraction_attack
from diffmem.metrics.features import (
    ModuleEmbedder,
    PixelEmbedder,
    embed,
    load_embedder,
    preprocessor_settings,
)
from diffmem.metrics.fid import fid_from_features
from diffmem.pipeline import filter_lora, provenance, resolve_device
from diffmem.progress import progress_bar
from diffmem.report import image_grid, load_image, markdown_table, save_png

RESULTS_FILE = "results.jsonl"
REPORT_FILE = "report.md"
#: Seed offset of the held-out captions' generations, so they never share noise with the suspected ones.
HELDOUT_SEED_OFFSET = 10_000


# ------------------------------------------------------------------------------------------------ probe manifest


@dataclass(frozen=True)
class ProbeManifest:
    """A probe manifest, validated: absolute image paths, captions, and a hash of the manifest and its images.

    The file is JSON; image paths are relative to the manifest's folder::

        {
          "suspected": [{"image": "train/001.png", "caption": "a photo of sks person"}, ...],
          "references": ["train/002.png", "train/003.png"],
          "heldout": [{"caption": "a photo of sks person at the beach", "image": "heldout/001.png"}, ...]
        }

    `suspected` (required, at least one): training images the user suspects are memorized, each with the caption
    it was trained with. `references` (optional): further training images; the copy test's relative criterion
    compares a generation's nearest training image with its other near neighbours, so it works best with a few
    dozen training images in all. `heldout` (optional): captions the LoRA should still serve, each optionally
    with an image that was not trained on; images give the held-out denoising loss (one or more) and FID (two or
    more).
    """

    path: Path
    suspected_images: tuple[Path, ...]
    suspected_captions: tuple[str, ...]
    references: tuple[Path, ...]
    heldout: tuple[tuple[Path | None, str], ...]
    sha256: str

    @property
    def heldout_captions(self) -> tuple[str, ...]:
        return tuple(caption for _, caption in self.heldout)

    @property
    def heldout_with_images(self) -> tuple[tuple[Path, str], ...]:
        """The held-out entries that have an image."""
        return tuple((image, caption) for image, caption in self.heldout if image is not None)


def _caption_entries(record: dict, key: str, path: Path, need_image: bool) -> list[tuple[Path | None, str]]:
    """(image, caption) pairs of a list of ``{"image": ..., "caption": ...}`` entries, or an error naming `path`."""
    entries = record.get(key, [])
    if not isinstance(entries, list):
        raise FileFormatError(f"'{key}' must be a list of {{\"image\": ..., \"caption\": ...}} entries", path)
    pairs = []
    for number, entry in enumerate(entries):
        where = f"'{key}' entry {number}"
        if not isinstance(entry, dict):
            raise FileFormatError(f"{where} is not an object with 'image' and 'caption'", path)
        caption = entry.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise FileFormatError(f"{where} has no caption (a non-empty string under 'caption')", path)
        image = entry.get("image")
        if image is None and need_image:
            raise FileFormatError(f"{where} has no image (a path relative to the manifest under 'image')", path)
        if image is not None and not isinstance(image, str):
            raise FileFormatError(f"{where}: 'image' must be a path string", path)
        pairs.append((None if image is None else _image_path(path, image, where), caption.strip()))
    return pairs


def _image_path(manifest: Path, relative: str, where: str) -> Path:
    """An image path of the manifest, resolved against its folder; a missing file is an error naming both."""
    image = manifest.parent / relative
    if not image.is_file():
        raise DiffmemError(f"{where} names the image {relative!r}, which does not exist ({image})", manifest)
    return image


def read_probe(path: str | Path) -> ProbeManifest:
    """Read and validate a probe manifest (see `ProbeManifest` for the schema); images are checked to exist but
    not decoded yet."""
    path = Path(path)
    if not path.is_file():
        raise DiffmemError("no such probe manifest", path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FileFormatError(f"is not a JSON probe manifest ({exc})", path) from None
    if not isinstance(record, dict):
        raise FileFormatError("must hold a JSON object with a 'suspected' list", path)
    unknown = set(record) - {"suspected", "references", "heldout"}
    if unknown:
        raise FileFormatError(f"has unknown keys {sorted(unknown)}; expected suspected, references, heldout", path)
    suspected = _caption_entries(record, "suspected", path, need_image=True)
    if not suspected:
        raise FileFormatError("lists no suspected training images (a non-empty 'suspected' list of "
                              "{\"image\": ..., \"caption\": ...})", path)
    references = record.get("references", [])
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise FileFormatError("'references' must be a list of image paths", path)
    heldout = _caption_entries(record, "heldout", path, need_image=False)
    suspected_images = tuple(image for image, _ in suspected)
    reference_images = tuple(_image_path(path, r, f"'references' entry {i}") for i, r in enumerate(references))
    digest = hashlib.sha256(path.read_bytes())
    for image in (*suspected_images, *reference_images, *(image for image, _ in heldout if image is not None)):
        digest.update(sha256_file(image).encode())
    return ProbeManifest(path, suspected_images, tuple(c for _, c in suspected), reference_images, tuple(heldout),
                         digest.hexdigest())


def load_images(files: Sequence[Path], size: tuple[int, int]) -> torch.Tensor:
    """Image files as [N, 3, H, W] in [0, 1], each resized (bilinear, antialiased) to `size`."""
    from diffmem.evaluation.inputs import resize_images

    return torch.cat([resize_images(load_image(file)[None], size) for file in files])


# ------------------------------------------------------------------------------------------------ the pipeline


def load_bench_model(base: str | Path, device: torch.device, dtype: torch.dtype = torch.float32,
                     config: str | Path | None = None) -> Backend:
    """The base pipeline (`diffmem.backends.stable_diffusion.load_pipeline`: a diffusers folder, or a single file
    whose configs come from `config`; SD 1.x/2.x, SDXL, Flux or SD3) as its `Backend` on `device`. The LoRAs are
    loaded into its `pipe` with diffusers' own loader (`load_lora_weights`), so a variant a front-end could not
    load fails here too."""
    pipe = load_pipeline(base, dtype, config)
    return pipeline_backend(pipe.to(device), Path(base).name, pipeline_family(Path(base)))


def load_lora_weights(pipe, lora: Path, adapter_name: str) -> None:
    """Apply a LoRA file with diffusers' own loader; a file diffusers refuses, or of which it loads nothing, is an
    error naming it."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # transformers prints a "MISSING keys" table for every LoRA'd text encoder (PEFT loads only the LoRA keys), and
    # diffusers a warning for every component a UNet-only LoRA has no keys for; what matters is checked below.
    verbosity, diffusers_verbosity = transformers_logging.get_verbosity(), diffusers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()
    try:
        pipe.load_lora_weights(str(lora), adapter_name=adapter_name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise FileFormatError(f"diffusers' load_lora_weights refused this file ({exc})", lora) from None
    finally:
        transformers_logging.set_verbosity(verbosity)
        diffusers_logging.set_verbosity(diffusers_verbosity)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    if not any(adapter_name in getattr(module, "lora_A", {}) for module in denoiser.modules()):
        # diffusers only warns when it finds no key it reads for this model: measuring the base as if it were
        # the LoRA would be a silent wrong row.
        pipe.unload_lora_weights()
        raise FileFormatError(f"diffusers' load_lora_weights loaded none of its weights into the "
                              f"{type(denoiser).__name__} (a key naming diffusers does not read for this model); "
                              "bench-real measures LoRAs as diffusers loads them", lora)


def generate_images(model: Backend, captions: Sequence[str], seeds: Sequence[int], settings: RealBenchSettings,
                    batch_size: int = 8) -> torch.Tensor:
    """One image per (caption, seed) pair with the model's own sampler (DDIM for Stable Diffusion), [N, 3, H, W] in
    [0, 1] on the CPU; each image depends on its own seed only."""
    return model.generate(model.encode(list(captions)), seeds, settings.steps, settings.guidance, batch_size)


def caption_loss(model: Backend, latents: torch.Tensor, captions: Sequence[str], settings: RealBenchSettings) -> float:
    """Denoising loss of the model on `latents` with their captions, at fixed noise and stratified noise levels
    (`Backend.heldout_loss`), so every variant is measured on the same noisy inputs."""
    return model.heldout_loss(latents, model.encode(list(captions)), settings.timesteps_per_image)


# ------------------------------------------------------------------------------------------------ measuring


@dataclass
class ProbeImages:
    """A probe manifest's images at the pipeline's image size, their latents and features."""

    manifest: ProbeManifest
    suspected: torch.Tensor
    pool: torch.Tensor
    heldout: torch.Tensor | None
    suspected_latents: torch.Tensor
    heldout_latents: torch.Tensor | None
    pool_features: torch.Tensor
    heldout_features: torch.Tensor | None

    @classmethod
    def load(cls, manifest: ProbeManifest, model: Backend,
             embedder: Callable[[torch.Tensor], torch.Tensor]) -> ProbeImages:
        """Read, resize and embed the images once; every model is measured against the same tensors."""
        size = model.image_size
        suspected = load_images(manifest.suspected_images, size)
        pool = torch.cat([suspected, load_images(manifest.references, size)]) if manifest.references else suspected
        heldout_files = [image for image, _ in manifest.heldout_with_images]
        heldout = load_images(heldout_files, size) if heldout_files else None
        return cls(manifest, suspected, pool, heldout, model.encode_images(suspected),
                   None if heldout is None else model.encode_images(heldout), embed(embedder, pool),
                   None if heldout is None or len(heldout) < 2 else embed(embedder, heldout))


def measure_pipeline(model: Backend, probe: ProbeImages, settings: RealBenchSettings,
                     embedder: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 8,
                     ) -> tuple[dict, torch.Tensor]:
    """Memorization and quality numbers of the model as it is (with whatever LoRA is loaded into it), and its
    suspected-caption generations [captions * generations, 3, H, W], caption-major.

    - copy_rate: share of suspected-caption generations that Carlini et al.'s relative tiled-L2 test calls a copy
      of a training image (suspected or reference);
    - captions_copied: suspected captions copied in at least half their generations;
    - own_distance: median tiled-L2 distance of a generation to its own caption's training image;
      own_distance_min: the smallest such distance (the best copy);
    - nearest_distance: median tiled-L2 distance of a generation to its nearest training image;
    - extracted: training images the extraction attack recovers (Carlini et al. 2023);
    - amd: average minimum cosine distance to the training images in the embedder's space (MemControl);
    - suspected_loss / heldout_loss: denoising loss on the suspected images / held-out images with their captions;
    - fid: held-out captions' generations against the held-out images, in the embedder's space (two or more
      held-out images).
    """
    manifest = probe.manifest
    captions, count = manifest.suspected_captions, settings.generations
    prompts = [c for c in captions for _ in range(count)]
    generated = generate_images(model, prompts, [settings.seed + g for _ in captions for g in range(count)],
                                settings, batch_size)
    copy = CopyConfig(distance_threshold=settings.copy_distance)
    decisions = copy_decisions(generated, probe.pool, copy)
    per_caption = decisions.is_copy.view(len(captions), count).float().mean(dim=1)
    own = paired_tiled_l2(generated, probe.suspected.repeat_interleave(count, dim=0))
    extraction = extraction_attack(generated.view(len(captions), count, *generated.shape[1:]), train=probe.pool)
    numbers = {
        "copy_rate": round(decisions.rate, 4),
        "captions_copied": int((per_caption >= 0.5).sum()),
        "own_distance": round(float(own.median()), 4),
        "own_distance_min": round(float(own.min()), 4),
        "nearest_distance": round(float(decisions.distance.median()), 4),
        "extracted": extraction.extracted_images,
        "amd": round(amd(embed(embedder, generated), probe.pool_features), 4),
        "suspected_loss": round(caption_loss(model, probe.suspected_latents, captions, settings), 6),
    }
    if probe.heldout_latents is not None:
        heldout_captions = [caption for _, caption in manifest.heldout_with_images]
        numbers["heldout_loss"] = round(caption_loss(model, probe.heldout_latents, heldout_captions, settings), 6)
    if probe.heldout_features is not None:
        heldout_prompts = [c for c in manifest.heldout_captions for _ in range(settings.heldout_generations)]
        if len(heldout_prompts) >= 2:
            seeds = [settings.seed + HELDOUT_SEED_OFFSET + i for i in range(len(heldout_prompts))]
            quality = generate_images(model, heldout_prompts, seeds, settings, batch_size)
            numbers["fid"] = round(fid_from_features(probe.heldout_features, embed(embedder, quality)), 4)
    return numbers, generated


# ------------------------------------------------------------------------------------------------ the run


SAFETY_CHECKER = "safety-checker"


def safety_checker_embedder(base: str | Path, device: str | torch.device = "cpu") -> ModuleEmbedder:
    """CLIP image embeddings (vision tower and projection) of the safety checker that Stable Diffusion 1.x diffusers
    folders ship in ``safety_checker/`` (CLIP ViT-L/14, Radford et al. 2021), preprocessed as its
    ``feature_extractor/`` says: a learned image feature space that is on disk wherever the base is."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    folder = Path(base) / "safety_checker"
    if not (folder / "config.json").is_file():
        raise DiffmemError(f"has no {folder.name}/ with config.json: --embedder {SAFETY_CHECKER} needs a diffusers "
                           "folder that ships one (Stable Diffusion 1.x folders do)", base)
    try:
        checker = StableDiffusionSafetyChecker.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise FileFormatError(f"could not load the safety checker's CLIP model ({exc})", folder) from None
    checker = checker.to(device).eval()

    def image_features(pixels: torch.Tensor) -> torch.Tensor:
        return checker.visual_projection(checker.vision_model(pixel_values=pixels.to(checker.dtype)).pooler_output)

    return ModuleEmbedder(image_features, "safety-checker-clip", device=device,
                          **preprocessor_settings(Path(base) / "feature_extractor"))


def make_embedder(spec: str | Path | None = None, device: str | torch.device = "cpu",
                  base: str | Path | None = None):
    """The feature network of AMD and FID: "pixels" or "pixelsN" (raw pixels pooled to N x N; default
    "pixels16"), "safety-checker" (the CLIP image encoder in `base`'s ``safety_checker/``), or a user's network
    file or folder (`diffmem.metrics.features.load_embedder`)."""
    spec = "pixels16" if spec is None else str(spec)
    if spec == SAFETY_CHECKER:
        if base is None:
            raise DiffmemError(f"--embedder {SAFETY_CHECKER} needs the base folder")
        return safety_checker_embedder(base, device)
    if spec.startswith("pixels") and not Path(spec).exists():
        size = spec[len("pixels"):]
        if size and not size.isdigit():
            raise DiffmemError(f"unknown embedder {spec!r}: use pixels, pixelsN (e.g. pixels16), {SAFETY_CHECKER} "
                               "or a network path")
        return PixelEmbedder(int(size) if size else None)
    return load_embedder(spec, device=device)


def variants_for(lora: Path, base: BaseCheckpoint, plan: VariantPlan, device: torch.device) -> list[Variant]:
    """The reference variants and `plan`'s, with fraction-matched budgets at the channel share that BAF's
    default rule keeps on this LoRA (as the world benchmark does)."""
    default = filter_lora(lora, base, reference_variants()[2].config, device=device).report
    return reference_variants() + plan.variants(default.channels_kept / default.channels_total)


def transform_provenance(variant: Variant, base: BaseCheckpoint, source_sha256: str) -> dict[str, str]:
    """The ``diffmem.*`` metadata keys of a file a transform variant (`Variant.transform`) wrote: what
    `diffmem.pipeline.provenance` records of a channel filter, less its channels."""
    return {"diffmem.version": __version__, "diffmem.method": variant.method,
            "diffmem.base_sha256": base.content_hash(), "diffmem.base_family": base.family,
            "diffmem.source_sha256": source_sha256}


def file_safe(key: str) -> str:
    """A variant key as a file name stem: ``baf@energy=0.8`` -> ``baf_energy_0.8``."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in key).replace("__", "_")


def lora_label(lora: Path, sha256: str) -> str:
    """Folder name of a LoRA's outputs: its stem and the start of its hash (two files may share a name)."""
    return f"{lora.stem}-{sha256[:8]}"


def grid_path(label: str, key: str) -> Path:
    """Where a variant's generations are saved, relative to the output folder (the base model's once)."""
    return Path("images") / ("base.png" if key == "base" else Path(label) / f"{file_safe(key)}.png")


def run_real_bench(
    base: str | Path,
    loras: Sequence[str | Path],
    probe: str | Path,
    out: str | Path,
    settings: RealBenchSettings | None = None,
    plan: VariantPlan = QUICK_PLAN,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    embedder: str | Path | None = None,
    batch_size: int = 8,
    progress: bool = True,
    config: str | Path | None = None,
) -> list[dict]:
    """Filter every LoRA with the base model, the LoRA as given and `plan`'s variants, load each written file into
    the base pipeline with diffusers' `load_lora_weights`, measure it against the probe, and append a row to
    ``<out>/results.jsonl``; then write ``<out>/report.md``. Rows already measured with the same LoRA, base,
    probe and settings are skipped. Returns the rows of this base, probe and settings. `config`: the diffusers
    folder whose configs describe a single-file `base` (see `load_bench_model`)."""
    device = resolve_device(device)
    out = Path(out)
    manifest = read_probe(probe)
    lora_paths = [Path(p) for p in loras]
    for path in lora_paths:
        if path.is_dir():
            raise DiffmemError("is a folder: bench-real takes LoRA .safetensors files (kohya, LyCORIS or diffusers "
                               "format); save a PEFT adapter with diffusers' save_lora_weights first", path)
        if not path.is_file():
            raise DiffmemError("no such LoRA file", path)
    checkpoint = open_base(base)
    settings = settings or RealBenchSettings()
    # A single-file base has no safety_checker/ of its own; its --config folder may.
    folder = base if Path(base).is_dir() or config is None else config
    features = make_embedder(settings.embedder if embedder is None else embedder, device, folder)
    settings = replace(settings, embedder=features.name)
    identity = {"settings_id": settings_id(settings), "base_sha256": checkpoint.content_hash(),
                "probe_sha256": manifest.sha256}
    out.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS_FILE
    inputs = (*lora_paths, Path(base), manifest.path)

    def matching() -> list[dict]:
        return [r for r in read_rows(results) if all(r.get(k) == v for k, v in identity.items())]

    done = {(r["lora_sha256"], r["variant"]) for r in matching()}
    base_numbers = next((r["numbers"] for r in matching() if r["variant"] == "base"), None)
    model = probe_images = None
    for lora in lora_paths:
        lora_sha = sha256_file(lora)
        label = lora_label(lora, lora_sha)
        variants = variants_for(lora, checkpoint, plan, device)
        todo = [v for v in variants if (lora_sha, v.key) not in done]
        if todo and model is None:
            model = load_bench_model(base, device, dtype, config)
            probe_images = ProbeImages.load(manifest, model, features)
        for variant in progress_bar(todo, desc=label, unit="variant", disable=not progress):
            started = time.perf_counter()
            kept, generated = {}, None
            if variant.is_base and base_numbers is not None:
                numbers = base_numbers  # the base is the same model for every LoRA: measured once
            elif variant.is_base:
                numbers, generated = measure_pipeline(model, probe_images, settings, features, batch_size)
                base_numbers = numbers
            else:
                filtered, report, kept = variant_lora(variant, lora, checkpoint, device=device)
                keys = (provenance(report, lora) if report is not None
                        else transform_provenance(variant, checkpoint, lora_sha))
                written = write_lora(filtered, out / "loras" / label / f"{file_safe(variant.key)}.safetensors",
                                     provenance=keys, protect=inputs)
                load_lora_weights(model.pipe, written, adapter_name="bench")
                try:
                    numbers, generated = measure_pipeline(model, probe_images, settings, features, batch_size)
                finally:
                    model.pipe.unload_lora_weights()
            if generated is not None:
                save_png(image_grid(generated, columns=settings.generations), out / grid_path(label, variant.key))
            row = {"lora": str(lora), "lora_label": label, "lora_sha256": lora_sha, "base": str(base), **identity,
                   "probe": str(manifest.path), "settings": asdict(settings), "variant": variant.key,
                   "method": variant.method, "budget": variant.budget, "level": variant.level,
                   "seconds": round(time.perf_counter() - started, 1), "numbers": numbers} | kept
            append_row(results, row)
            done.add((lora_sha, variant.key))
    rows = matching()
    write_atomic(render_report(rows, manifest, settings).encode("utf-8"), out / REPORT_FILE, protect=inputs)
    return rows


# ------------------------------------------------------------------------------------------------ the report

COLUMNS = (
    ("copy rate", "copy_rate", "percent"),
    ("captions copied", "captions_copied", "count"),
    ("own distance", "own_distance", "3"),
    ("best own distance", "own_distance_min", "3"),
    ("nearest distance", "nearest_distance", "3"),
    ("extracted", "extracted", "count"),
    ("AMD", "amd", "3"),
    ("suspected loss", "suspected_loss", "4"),
    ("held-out loss", "heldout_loss", "4"),
    ("FID", "fid", "3"),
)


def format_number(value: float | int | None, style: str) -> str:
    """A table cell: percent, count, or a fixed number of decimals; "-" when not measured."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if style == "percent":
        return f"{value:.0%}"
    if style == "count":
        return str(value)
    return f"{value:.{int(style)}f}"


def render_report(rows: Sequence[dict], manifest: ProbeManifest, settings: RealBenchSettings) -> str:
    """report.md: the settings, then one table per LoRA with a row per variant and links to its generations."""
    images = sum(1 for _ in manifest.heldout_with_images)
    lines = [
        "# diffmem bench-real",
        "",
        f"Probe `{manifest.path.name}`: {len(manifest.suspected_images)} suspected training images with their "
        f"captions, {len(manifest.references)} further training images, {len(manifest.heldout)} held-out captions "
        f"({images} with images). Sampling: {settings.generations} generations per suspected caption, "
        f"{settings.steps} DDIM steps, guidance {settings.guidance}, seeds from {settings.seed}; AMD and FID in "
        f"the `{settings.embedder}` feature space.",
        "",
        "Columns: **copy rate**, share of suspected-caption generations that Carlini et al.'s relative tiled-L2 test "
        "calls a copy of a training image; **captions copied**, suspected captions copied in at least half their "
        f"generations (of {len(manifest.suspected_images)}); **own distance** / **best own distance**, median / "
        "smallest tiled-L2 distance of a generation to its own caption's image; **nearest distance**, median "
        "distance to the nearest training image; **extracted**, training images the extraction attack recovers; "
        "**AMD**, average minimum cosine distance to the training images (low = memorized); **suspected loss** / "
        "**held-out loss**, denoising loss on the suspected / held-out images (the LoRA lowers the first by "
        "memorizing, the second by generalizing); **FID**, held-out generations against held-out images.",
    ]
    for label in dict.fromkeys(r["lora_label"] for r in rows):
        group = [r for r in rows if r["lora_label"] == label]
        header = ["variant", "channels kept", "energy kept", *(name for name, _, _ in COLUMNS), "generations"]
        table = []
        for r in group:
            kept = f"{r['channels_kept']} / {r['channels_total']}" if "channels_kept" in r else "-"
            energy = format_number(r.get("energy_kept"), "percent")
            cells = [format_number(r["numbers"].get(key), style) for _, key, style in COLUMNS]
            link = f"[grid]({grid_path(label, r['variant']).as_posix()})"
            table.append([r["variant"], kept, energy, *cells, link])
        lines += ["", f"## {label}", "", f"LoRA `{group[0]['lora']}`; filtered files in `loras/{label}/`.", "",
                  markdown_table(header, table)]
    return "\n".join(lines) + "\n"
