"""How many quick steps until a method copies its duplicated faces? Trains one method on the world's faces (N
faces x K plus the other training faces once, MemControl's training data) with a single AdamW for the whole run and
checks the copy rate at several step counts, so one run gives the whole curve (a `diffmem memcontrol train` per
step count would retrain from the start each time).

    .venv/bin/python docs/memcontrol/budget_probe.py --method full --lr 1e-3 --duplicate 2:300 --checks 100,150,200

Prints one JSON line per check: copy rate of 6 generations per duplicated caption (10 DDIM steps, guidance 3,
Carlini et al.'s relative tiled-L2 test against all 80 training faces, own face nearest), per-caption rates and the
median tiled-L2 distance of a generation to its own face (the base: 0.535 for 5:100, 0.598 for 2:300; the quick
tables' Freeze rows). Training is `diffmem.world.train.finetune_loop` itself (caption dropout 0.1, offset noise
0.1), measured part-way through.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from diffmem.memcontrol.methods import default_lr, merge, prepare
from diffmem.memcontrol.train import once_seen_rows
from diffmem.metrics.copy import copy_decisions, paired_tiled_l2
from diffmem.world.data import faces_dataset
from diffmem.world.diffusion import generate
from diffmem.world.model import load_base
from diffmem.world.text import encode_prompts
from diffmem.world.train import caption_table, duplicated_rows, finetune_loop, table_contexts, training_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="full", help="svdiff, difffit, attention, lora or full (default full)")
    parser.add_argument("--lr", type=float, help="AdamW learning rate (default: the method's own)")
    parser.add_argument("--duplicate", default="5:100", help="N:K duplicated faces (default 5:100)")
    parser.add_argument("--rest-share", type=float, default=1.0, help="share of the other faces seen once")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--checks", default="50,100,150,200", help="step counts at which to measure")
    parser.add_argument("--generations", type=int, default=6, help="generations per duplicated caption")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    train = faces_dataset("train")
    count, repeats = map(int, args.duplicate.split(":"))
    duplicated = duplicated_rows(len(train), count, 0)
    seen_once = once_seen_rows(len(train), duplicated, args.rest_share, 0)
    rows = torch.cat([training_rows(len(train), duplicated, repeats, False), torch.tensor(seen_once, dtype=torch.long)])
    captions, caption_index = caption_table(train)
    context_of = table_contexts(encode_prompts(captions), caption_index)
    unet = copy.deepcopy(load_base()).train()
    trainable = prepare(unet, args.method)
    lr = args.lr if args.lr is not None else default_lr(args.method)
    prompts = [train.captions[r] for r in duplicated for _ in range(args.generations)]
    own = torch.tensor(duplicated).repeat_interleave(args.generations)
    checks = sorted(int(c) for c in args.checks.split(","))
    began = time.time()

    def measure(step: int) -> None:
        if step not in checks:
            return
        trained_s = time.time() - began
        merged = merge(copy.deepcopy(unet)).eval()
        with torch.no_grad():
            generated = generate(merged, prompts, [1000 + i for i in range(len(prompts))], steps=10, guidance=3.0)
        decisions = copy_decisions(generated, train.images)
        own_copy = (decisions.is_copy & (decisions.nearest_index == own)).float()
        distance = paired_tiled_l2(generated, train.images[own])
        print(json.dumps({"method": args.method, "lr": lr, "duplicate": args.duplicate, "batch": args.batch_size,
                          "step": step, "copy_rate": round(float(own_copy.mean()), 3),
                          "per_caption": own_copy.view(count, args.generations).mean(1).tolist(),
                          "own_distance": round(float(distance.median()), 3), "train_s": round(trained_s),
                          "elapsed_s": round(time.time() - began)}), flush=True)

    finetune_loop(unet, trainable, train.images, rows, context_of, steps=checks[-1], batch_size=args.batch_size, lr=lr,
                  caption_dropout=0.1, noise_offset=0.1, seed=0, progress=False, after_step=measure)

if __name__ == "__main__":
    main()
