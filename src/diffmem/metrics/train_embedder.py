"""Train, evaluate and save the project's copy-detection embedder.

    python -m diffmem.metrics.train_embedder                       # train on the world's images, write the asset
    python -m diffmem.metrics.train_embedder --evaluate-only       # measure the committed embedder

The output is `src/diffmem/metrics/assets/copy_embedder.safetensors` (fp16); put its printed sha256 into
`diffmem.metrics.embedder.EMBEDDER_SHA256`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from diffmem.formats.safetensors_io import save_file, sha256_file
from diffmem.metrics.amd import cosine_similarities
from diffmem.metrics.embedder import (
    EmbedderConfig,
    embedder_path,
    load_copy_embedder,
    random_augment,
    train_copy_embedder,
)
from diffmem.metrics.features import embed

#: How often each fine-tune image (faces, photos) is repeated in the embedder's training set: they are few, and
#: they are the images whose copies the audit must recognise.
FINETUNE_REPEAT = 8


def embedder_images(shapes: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) images from the world's data (`diffmem.world.data`): training = shapes, base photo crops
    and the fine-tune `train` splits (faces, photos, repeated); held-out = the fine-tune `heldout` splits, which no
    diffmem training run sees, plus shapes drawn with another seed."""
    from diffmem.world.data import base_photos_dataset, faces_dataset, photos_dataset, shapes_dataset

    finetune = torch.cat([faces_dataset("train").images, photos_dataset("train").images])
    train = torch.cat([shapes_dataset(shapes, seed).images, base_photos_dataset(seed=seed).images,
                       finetune.repeat(FINETUNE_REPEAT, 1, 1, 1)])
    held_out = torch.cat([faces_dataset("heldout").images, photos_dataset("heldout").images,
                          shapes_dataset(64, seed + 1000).images])
    return train, held_out


def copy_detection_quality(embedder, images: torch.Tensor, seed: int = 1, threshold: float = 0.5) -> dict:
    """How well an embedder tells edited copies from other images, on images it was not trained on:
    the share of edited copies whose cosine to their original exceeds `threshold` (copy recall), the share of
    pairs of different images above it (false copies), and the share of copies whose nearest original is the
    right one (retrieval accuracy at 1)."""
    generator = torch.Generator().manual_seed(seed)
    copies = random_augment(images, generator, EmbedderConfig.crop_scale)
    similarity = cosine_similarities(embed(embedder, copies), embed(embedder, images))
    matching = similarity.diagonal()
    others = similarity[~torch.eye(len(images), dtype=torch.bool)]
    return {
        "copy_recall": float((matching > threshold).float().mean()),
        "false_copy_rate": float((others > threshold).float().mean()),
        "retrieval_at_1": float((similarity.argmax(dim=1) == torch.arange(len(images))).float().mean()),
        "mean_copy_cosine": float(matching.mean()),
        "mean_other_cosine": float(others.mean()),
        "images": len(images),
    }


def save_embedder(net: torch.nn.Module, config: EmbedderConfig, path: Path, record: dict) -> str:
    """Write the embedder in fp16 with the metadata `load_copy_embedder` rebuilds it from; returns the sha256."""
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items()}
    metadata = {
        "name": "diffmem-copy-v1",
        "widths": ",".join(str(w) for w in config.widths),
        "dim": str(config.dim),
        "gem_p": str(config.gem_p),
        "training": json.dumps(record, sort_keys=True),
    }
    save_file(tensors, path, metadata=metadata)
    return sha256_file(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=embedder_path(), help="where to write the weights")
    parser.add_argument("--steps", type=int, default=EmbedderConfig.steps)
    parser.add_argument("--seed", type=int, default=EmbedderConfig.seed)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--evaluate-only", action="store_true", help="measure the committed embedder, do not train")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, held_out = embedder_images()
    if args.evaluate_only:
        print(json.dumps(copy_detection_quality(load_copy_embedder(), held_out), indent=2))
        return 0
    config = EmbedderConfig(steps=args.steps, seed=args.seed)
    start = time.time()
    net, losses = train_copy_embedder(train, config, progress=True)
    seconds = time.time() - start
    record = {"config": asdict(config), "train_images": len(train), "seconds": round(seconds),
              "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
              "command": " ".join(["python -m diffmem.metrics.train_embedder", *(argv if argv is not None else sys.argv[1:])])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    digest = save_embedder(net, config, args.out, record)
    quality = copy_detection_quality(load_copy_embedder(args.out, expected_sha256=digest), held_out)
    print(json.dumps({**record, "held_out": quality, "sha256": digest}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
