"""The pretraining optimiser a config describes and its learning-rate schedule."""
from __future__ import annotations

import torch

from .config import Config, base_lr


def lr_at(config: Config, epoch: int) -> float:
    """Step schedule of the official code: base * 0.1^(number of steps passed); ``epoch`` is 1-based. The base
    is ``optim.lr`` or, with ``optim.lr_scaling: linear``, scaled by the global batch."""
    return base_lr(config) * 0.1 ** sum(epoch > s for s in config.optim.steps)


def make_optimizer(params, config: Config) -> torch.optim.Optimizer:
    """SGD (the paper's) or AdamW over ``params``; a captured step (``train.cuda_graph=on``) needs AdamW's step
    counters on the device (``capturable``)."""
    o = config.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               nesterov=o.nesterov)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay,
                             capturable=config.train.cuda_graph == "on")


def set_capturable(optimizer: torch.optim.Optimizer, capturable: bool, device: torch.device) -> None:
    """AdamW's ``capturable`` (and where its step counters live) as this run needs, whatever the run that wrote
    the loaded state used: on ``device`` when captured, else on the host."""
    for group in optimizer.param_groups:
        if "capturable" in group:
            group["capturable"] = capturable
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].to(device if capturable else "cpu", torch.float32)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
