"""``python -m skelemix.train``: SkeleMixCLR pretraining.

With no arguments it pretrains a CPU-sized model on generated skeleton data for a few epochs.
"""
from __future__ import annotations

import argparse
import time

import torch

from . import ops
from .augment import pretrain_augment
from .data import make_synthetic
from .models import VARIANTS, build_pretrain_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m skelemix.train", description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="skelemixclr+", choices=sorted(VARIANTS))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=256, help="generated training sequences")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--impl", default="auto", choices=ops.IMPLS, help="kernel implementation for the whole model")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    data, _ = make_synthetic(args.samples, seed=args.seed)
    data = torch.from_numpy(data)
    model = build_pretrain_model(args.variant, encoder=dict(hidden_channels=8, hidden_dim=64, impl=args.impl),
                                 feature_dim=64, queue_size=8 * args.batch_size).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    steps_per_epoch = len(data) // args.batch_size
    step, start = 0, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(data))
        losses = []
        for i in range(steps_per_epoch):
            x = data[order[i * args.batch_size:(i + 1) * args.batch_size]].to(device)
            out = model(pretrain_augment(x), pretrain_augment(x))
            if not torch.isfinite(out["loss"]):
                raise FloatingPointError(f"loss is {out['loss'].item()} at step {step}; stopping")
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            losses.append(out["loss"].item())
            step += 1
        print(f"epoch {epoch}/{args.epochs}  loss {sum(losses) / len(losses):.4f}")
    elapsed = time.perf_counter() - start
    print(f"done: final loss {losses[-1]:.4f}, {step / elapsed:.2f} steps/s, {step} steps, impl={args.impl}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
