"""`diffmem world ...` sub-commands: train the base, fine-tune (LoRA or full), check memorization."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffmem.world.model import UNetConfig


def add_train_base(subparsers: argparse._SubParsersAction) -> None:
    from diffmem.world.train import BaseTrainingConfig

    d = BaseTrainingConfig()
    p = subparsers.add_parser("train-base", help="train the world's base UNet from scratch (CPU, about an hour)")
    p.add_argument("--out", type=Path, default=Path("runs/base/base.safetensors"),
                   help="output weights (fp16 safetensors); a .json record and a .ckpt.safetensors checkpoint go next to it")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of weights, data and noise (default {d.seed})")
    p.add_argument("--threads", type=int, default=d.threads, help=f"torch CPU threads (default {d.threads})")
    p.add_argument("--widths", type=str, default=",".join(map(str, UNetConfig().block_out_channels)),
                   help="UNet block widths, comma-separated (default %(default)s)")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    p.set_defaults(func=run_train_base)


def run_train_base(args: argparse.Namespace) -> int:
    from diffmem.world.train import BaseTrainingConfig, train_base

    config = BaseTrainingConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                threads=args.threads)
    unet_config = UNetConfig(block_out_channels=tuple(int(w) for w in args.widths.split(",")))
    record = train_base(args.out, config, unet_config, resume=not args.no_resume,
                        checkpoint_every=args.checkpoint_every)
    print(json.dumps(record, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `world` and its sub-commands to the diffmem CLI."""
    world = subparsers.add_parser("world", help="the embedded tiny text-to-image world: train, fine-tune, check")
    commands = world.add_subparsers(dest="world_command", required=True)
    add_train_base(commands)


def main(argv: list[str] | None = None) -> int:
    """Run `world` sub-commands directly: `python -m diffmem.world.commands train-base ...`."""
    parser = argparse.ArgumentParser(prog="python -m diffmem.world.commands")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["world", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
