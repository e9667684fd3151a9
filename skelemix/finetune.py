"""The optimisation settings of the evaluation protocols, and fine-tuning a whole encoder with its classifier
(docs/DESIGN.md 6.1, 6.3, 6.4)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .augment import to_view
from .probe import topk_accuracy


@dataclass(frozen=True)
class Schedule:
    """How a protocol trains: SGD with momentum 0.9, batches of ``batch_size`` (the last partial one dropped),
    the lr ``x0.1`` after each milestone epoch, a linear warm-up ``lr * epoch / warmup`` for the epochs before
    ``warmup`` (1-based), and an evaluation every ``eval_interval`` epochs and after the last."""

    lr: float
    epochs: int
    milestones: tuple[int, ...]
    weight_decay: float = 0.0
    nesterov: bool = False
    warmup: int = 0
    batch_size: int = 128
    eval_interval: int = 5

    def lr_at(self, epoch: int) -> float:
        if epoch < self.warmup:
            return self.lr * epoch / self.warmup
        return self.lr * 0.1 ** sum(epoch > m for m in self.milestones)

    def evaluates(self, epoch: int) -> bool:
        return epoch % self.eval_interval == 0 or epoch == self.epochs

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "milestones": list(self.milestones)}


# The defaults of each protocol; the semi rows are the released configs for 1% and 10% labels.
PROTOCOLS = {
    "linear": Schedule(lr=3.0, epochs=150, milestones=(80,)),
    "finetune": Schedule(lr=0.1, epochs=110, milestones=(50, 70, 90), weight_decay=1e-4, nesterov=True, warmup=10),
    "semi-0.1": Schedule(lr=0.1, epochs=150, milestones=(80,), weight_decay=1e-4),
    "semi-0.01": Schedule(lr=0.05, epochs=150, milestones=(40,)),
}


def semi_protocol(fraction: float) -> str:
    """The released semi config closest to ``fraction`` (0.01 or 0.1)."""
    return "semi-0.01" if abs(np.log(fraction / 0.01)) < abs(np.log(fraction / 0.1)) else "semi-0.1"


@dataclass(frozen=True)
class FinetuneOptions:
    """``official_eval_mode``: train in eval mode (BN frozen at the pretrained statistics, no dropout) as the
    official code did (quirk 16). ``clip_grad_norm``: clip after ``backward()``; the official call came before
    it and never clipped anything (quirk 17), so the default is off."""

    official_eval_mode: bool = False
    clip_grad_norm: float | None = None
    workers: int = 0
    seed: int = 0


def loader(dataset, batch_size: int, device: torch.device, workers: int, shuffle: bool = False,
           drop_last: bool = False, generator=None) -> DataLoader:
    """The evaluation's DataLoader (pinned memory for a CUDA device)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=workers,
                      pin_memory=device.type == "cuda", generator=generator)


@torch.no_grad()
def predict(encoder, loader, device, view: str, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(features, logits, labels)`` of every batch (CPU), in eval mode: the pooled backbone feature and the
    classifier's output in one pass."""
    was_training = encoder.training
    encoder.eval()
    feats, logits, labels = [], [], []
    for x, y in loader:
        x = to_view(x.to(device, non_blocking=True), view, layout)
        h = encoder.pool(encoder.feature_map(x), x.shape[-1])
        feats.append(h.float().cpu())
        logits.append(encoder.fc(h).float().cpu())
        labels.append(torch.as_tensor(y))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(logits), torch.cat(labels)


def finetune(encoder, train_set, val_set, schedule: Schedule, options: FinetuneOptions = FinetuneOptions(), *,
             device, view: str, layout: str, log=print) -> dict:
    """Train every parameter of ``encoder`` (with its classifier ``fc``) with cross-entropy on unaugmented data,
    in train mode (BN batch statistics, dropout on) unless ``options.official_eval_mode``.

    Returns ``{"history": [{"epoch", "top1", "top5", "loss"}], "features", "logits", "labels"}`` with the
    features and logits of the val split under the final weights.
    """
    g = torch.Generator().manual_seed(options.seed)
    bs = min(schedule.batch_size, len(train_set))
    train_loader = loader(train_set, bs, device, options.workers, shuffle=True, drop_last=True, generator=g)
    val_loader = loader(val_set, schedule.batch_size, device, options.workers)
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=schedule.lr, momentum=0.9, nesterov=schedule.nesterov,
                          weight_decay=schedule.weight_decay)
    history = []
    for epoch in range(1, schedule.epochs + 1):
        for group in opt.param_groups:
            group["lr"] = schedule.lr_at(epoch)
        encoder.train(not options.official_eval_mode)
        losses = []
        for x, y in train_loader:
            x = to_view(x.to(device, non_blocking=True), view, layout)
            loss = F.cross_entropy(encoder(x), torch.as_tensor(y).to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the fine-tuning loss became {loss.item()} in epoch {epoch}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if options.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, options.clip_grad_norm)
            opt.step()
            losses.append(loss.item())
        if schedule.evaluates(epoch):
            feats, logits, labels = predict(encoder, val_loader, device, view, layout)
            top = topk_accuracy(logits, labels)
            history.append({"epoch": epoch, "top1": top[1], "top5": top[5],
                            "loss": float(np.mean(losses)) if losses else float("nan")})
            log(f"  epoch {epoch:>3}/{schedule.epochs}  lr {opt.param_groups[0]['lr']:.4g}  loss "
                f"{history[-1]['loss']:.4f}  top-1 {top[1]:.2f}%  top-5 {top[5]:.2f}%")
    return {"history": history, "features": feats, "logits": logits, "labels": labels}
