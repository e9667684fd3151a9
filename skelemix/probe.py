"""Evaluation math shared by the trainer's monitors and ``python -m skelemix.evaluate`` (docs/DESIGN.md 6).

Feature extraction, the weighted kNN classifier, a linear classifier trained on frozen features, and the
class-balanced labelled subsets of the semi-supervised protocol.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from . import distributed
from .augment import pretrain_augment, to_view
from .config import make_encoder
from .models import init_weights


@torch.no_grad()
def extract_features(encoder: nn.Module, loader, device, view: str = "joint", layout: str = "ntu-rgb+d",
                     projection: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every batch of ``loader`` (in order) with the encoder in eval mode.

    ``projection=False`` gives the pooled backbone feature (what linear evaluation sees); ``True`` runs the
    encoder's ``fc`` head too (what the official kNN monitor uses). Returns ``(features, labels)`` on the CPU.
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for x, y in loader:
        x = to_view(x.to(device, non_blocking=True), view, layout)
        h = encoder.pool(encoder.feature_map(x), x.shape[-1])
        if projection and encoder.fc is not None:
            h = encoder.fc(h)
        feats.append(h.float().cpu())
        labels.append(torch.as_tensor(y))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def sharded_features(encoder: nn.Module, dataset, loader_of, device, view: str, layout: str,
                     projection: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`extract_features` of the whole ``dataset`` through the loader ``loader_of(part)`` makes. Under
    torch.distributed each rank encodes a contiguous shard and the shards are gathered in order, so every rank
    gets the one-process result."""
    if distributed.world_size() > 1:
        dataset = Subset(dataset, list(distributed.shard(len(dataset))))
    feats, labels = extract_features(encoder, loader_of(dataset), device, view, layout, projection=projection)
    return distributed.gather_rows(feats), distributed.gather_rows(labels)


@torch.no_grad()
def calibrate_batchnorm(encoder: nn.Module, loader, device, view: str, layout: str) -> None:
    """Recompute every BatchNorm's running statistics as the plain average over ``loader`` (no weight changes)."""
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    encoder.train()
    for x, _ in loader:
        encoder.feature_map(to_view(x.to(device), view, layout))
    for m in norms:
        m.momentum = 0.1
    encoder.eval()


def standardised_linear(encoders: dict[str, nn.Module], loader_of, train_set, val_set, device, view: str,
                        layout: str, num_classes: int, epochs: int, seed: int) -> dict[str, dict]:
    """:func:`train_linear` on the features of each encoder, standardised with the training statistics, so the
    probe measures what the features separate rather than their scale (a random-init encoder's features are
    tiny). Returns each encoder's :func:`train_linear` result (``lr`` 0.1, a x0.1 step at 80% of ``epochs``)."""
    results = {}
    for name, encoder in encoders.items():
        (f_train, y_train), (f_val, y_val) = (extract_features(encoder, loader_of(ds), device, view, layout)
                                              for ds in (train_set, val_set))
        mean, std = f_train.mean(0), f_train.std(0) + 1e-12
        results[name] = train_linear((f_train - mean) / std, y_train, (f_val - mean) / std, y_val, num_classes,
                                     epochs=epochs, lr=0.1, milestones=(int(0.8 * epochs),), seed=seed)
    return results


class AugmentedBatches:
    """The batches of ``loader`` with the pretraining augmentation (shear + temporal shift), as the official kNN
    monitor's feeders apply it to both the memory bank and the test data (docs/DESIGN.md 6.2)."""

    def __init__(self, loader, shear: float, ratio: int, seed: int, coords: int = 3):
        self.loader, self.shear, self.ratio, self.coords = loader, shear, ratio, coords
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        for x, y in self.loader:
            yield pretrain_augment(x, self.shear, self.ratio, generator=self.generator, coords=self.coords), y


def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, k: int,
               num_classes: int, t: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN votes on cosine similarity (the official monitor): each test feature's top-``k`` neighbours
    in the bank vote for their class with weight ``exp(sim / t)``. Returns ``(N_test, num_classes)`` votes."""
    bank = F.normalize(train_feats, dim=1)
    k = min(k, len(bank))
    out = []
    for start in range(0, len(test_feats), chunk):
        sim = F.normalize(test_feats[start:start + chunk], dim=1) @ bank.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, dtype=top.dtype, device=top.device)
        votes.scatter_add_(1, train_labels.to(idx.device)[idx], (top / t).exp())
        out.append(votes)
    return torch.cat(out)


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, k: int,
                num_classes: int, t: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """The class with the most :func:`knn_scores` votes, for every test feature."""
    return knn_scores(train_feats, train_labels, test_feats, k, num_classes, t, chunk).argmax(1)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, ks=(10, 20, 40), num_classes=None,
                 t: float = 0.1) -> dict[int, float]:
    """Top-1 accuracy (%) of the weighted kNN classifier for each ``k``."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    return {k: 100.0 * (knn_predict(train_feats, train_labels, test_feats, k, num_classes, t).cpu()
                        == test_labels.cpu()).float().mean().item() for k in ks}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Top-``k`` accuracy (%) of class scores ``(N, C)`` (logits or probabilities) for each ``k``; a ``k``
    above ``C`` counts every sample as correct, as it must."""
    scores, labels = torch.as_tensor(scores), torch.as_tensor(labels).to(torch.as_tensor(scores).device)
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return {k: 100.0 * hit[:, :k].any(1).float().mean().item() for k in ks}


def train_linear(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, epochs: int = 150, lr: float = 3.0,
                 milestones=(80,), batch_size: int = 128, eval_interval: int = 5, seed: int = 0,
                 device=None) -> dict:
    """The official linear protocol on frozen features: SGD (momentum 0.9, no weight decay), lr x0.1 after each
    milestone epoch, batches of ``batch_size`` (last partial batch dropped).

    The official code trains the classifier on top of a frozen encoder in eval mode without augmentation, so
    its features never change: training on precomputed features is the same computation, much faster.

    Returns ``{"last": top-1 % after the final epoch (clean protocol), "best": best top-1 over the evaluations
    every ``eval_interval`` epochs and the last (the paper's protocol, model selection on the test set),
    "logits": test logits of the final classifier (CPU), "history": [{"epoch", "top1", "top5"}] of every
    evaluation, "fc": the trained classifier}``.
    """
    device = torch.device(device) if device is not None else train_feats.device
    g = torch.Generator().manual_seed(seed)
    fc = nn.Linear(train_feats.shape[1], num_classes)
    nn.init.normal_(fc.weight, 0.0, 0.02)  # the official weights_init
    nn.init.zeros_(fc.bias)
    fc.to(device)
    train_feats, train_labels = train_feats.to(device), train_labels.to(device)
    test_feats, test_labels = test_feats.to(device), test_labels.to(device)
    opt = torch.optim.SGD(fc.parameters(), lr=lr, momentum=0.9)
    n = len(train_feats)
    bs = min(batch_size, n)
    best, history = 0.0, []
    for epoch in range(1, epochs + 1):
        for group in opt.param_groups:
            group["lr"] = lr * 0.1 ** sum(epoch > m for m in milestones)
        order = torch.randperm(n, generator=g).to(device)
        for i in range(n // bs):
            idx = order[i * bs:(i + 1) * bs]
            loss = F.cross_entropy(fc(train_feats[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch % eval_interval == 0 or epoch == epochs:
            with torch.no_grad():
                logits = fc(test_feats)
            top = topk_accuracy(logits, test_labels)
            acc = top[1]
            history.append({"epoch": epoch, "top1": acc, "top5": top[5]})
            best = max(best, acc)
    return {"last": acc, "best": best, "logits": logits.cpu(), "history": history, "fc": fc}


def balanced_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-balanced subset: ``round(fraction * n_c)`` samples of every class ``c`` (at
    least one), drawn without replacement with a seeded generator (the semi-supervised protocol)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = max(1, int(round(fraction * len(members))))
        chosen.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(chosen))


def knn_monitor(encoder: nn.Module, train_set, val_set, loader_of, device, view: str, layout: str, ks,
                t: float) -> dict[str, float]:
    """The official monitor: weighted kNN top-1 (%) of the projected val features against the train split's,
    as ``{"knn@k": accuracy}`` (every rank gets it; rank 0's BatchNorm statistics are used everywhere)."""
    distributed.broadcast_buffers(encoder)
    feats = [sharded_features(encoder, ds, loader_of, device, view, layout, projection=True) for ds in (train_set,
                                                                                                         val_set)]
    acc = knn_accuracy(*feats[0], *feats[1], ks=ks, num_classes=train_set.num_classes, t=t)
    return {f"knn@{k}": v for k, v in acc.items()}


def pretrained_vs_random_init(pretrained: nn.Module, random_init: nn.Module, loader_of, train_set, val_set, device,
                              view: str, layout: str, epochs: int, seed: int) -> dict[str, dict]:
    """:func:`standardised_linear` of a pretrained encoder and of the same architecture at random init, whose
    BatchNorm statistics are recomputed on the training data first: at init they are 0/1 and, with the official
    weight init, shrink the eval-mode features to ~1e-7 (a baseline the official protocol lacks)."""
    calibrate_batchnorm(random_init, loader_of(train_set), device, view, layout)
    return standardised_linear({"pretrained": pretrained, "random init": random_init}, loader_of, train_set, val_set,
                               device, view, layout, train_set.num_classes, epochs, seed)


def query_encoder_vs_random_init(model: nn.Module, config, loader_of, train_set, val_set, device) -> dict[str, dict]:
    """:func:`pretrained_vs_random_init` of a pretraining model's query encoder (without its projection head)
    and of the same architecture initialised from ``train.seed``."""
    c = config
    pretrained = make_encoder(c.model).to(device)
    pretrained.load_state_dict({k[len("encoder_q."):]: v for k, v in model.state_dict().items()
                                if k.startswith("encoder_q.") and not k.startswith("encoder_q.fc.")})
    torch.manual_seed(c.train.seed)
    random_init = make_encoder(c.model).to(device)
    random_init.apply(init_weights)
    return pretrained_vs_random_init(pretrained, random_init, loader_of, train_set, val_set, device, c.data.view,
                                     c.model.layout, c.train.linear_epochs, c.train.seed)
