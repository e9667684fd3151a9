"""A training step captured as one CUDA graph and replayed (``train.cuda_graph``)."""
from __future__ import annotations

import warnings

import torch


class GraphedStep:
    """A training step's device work as one CUDA graph: ``forward(x, draws)`` (a dict of 0-d tensors with
    ``"loss"``), its backward and ``optimizer.step()``, replayed by every call with new ``x`` and ``draws``.

    The whole-network recipe of torch's CUDA graph notes: ``warmup`` steps run eagerly on a side stream, then
    the step is captured on that same stream with the gradients set to None first, so the captured backward
    allocates them in the graph's pool and every replay rewrites them (static gradients, nothing to zero).
    Every call is a real training step, the warm-up ones included. ``x`` and every tensor of ``draws`` are
    copied into static device buffers before the graph runs, so ``forward`` must read nothing else from the
    host and never synchronise. The graph bakes in the learning rates (SGD reads ``lr`` as a Python float; a
    tensor lr would be read with ``.item()``), so it is captured again when they change (at epoch boundaries).
    Draws from the default CUDA generator (dropout) stay random: capture registers that generator with the
    graph and every replay advances its offset.
    """

    def __init__(self, forward, optimizer: torch.optim.Optimizer, device: torch.device, warmup: int = 3):
        self.forward, self.optimizer, self.device, self.warmup = forward, optimizer, device, warmup
        self.stream = torch.cuda.Stream(device)
        self.reset()

    def reset(self):
        """Forget the graph and its buffers (the next calls warm up and capture again)."""
        self.graph = self.lrs = self.static = self.parts = self.keys = None
        self.steps = 0

    def _step(self) -> torch.Tensor:
        out = self.forward(*self.static)
        out["loss"].backward()
        self.optimizer.step()
        self.keys = list(out)
        return torch.stack([v.detach().float() for v in out.values()])

    def __call__(self, x: torch.Tensor, draws) -> dict:
        """One training step; returns the values of ``forward``'s outputs after it (a synchronisation)."""
        with torch.cuda.device(self.device):
            if self.static is None:
                self.static = tree_map(lambda t: torch.empty_like(t, device=self.device), (x, draws))
            for buf, value in zip(leaves(self.static), leaves((x, draws))):
                if buf.shape != value.shape or buf.dtype != value.dtype:
                    raise ValueError(f"a captured step needs inputs of fixed shapes and dtypes: got {value.dtype} "
                                     f"{tuple(value.shape)} for a buffer of {buf.dtype} {tuple(buf.shape)}")
                buf.copy_(value, non_blocking=True)
            lrs = [group["lr"] for group in self.optimizer.param_groups]
            if self.graph is not None and lrs != self.lrs:
                self.graph = None  # captured again below with the new learning rates
            current = torch.cuda.current_stream()
            if self.graph is None and self.steps < self.warmup:
                self.stream.wait_stream(current)
                with torch.cuda.stream(self.stream), warnings.catch_warnings():
                    # A capturable optimizer (AdamW) warns when it steps uncaptured: here that is the point.
                    warnings.filterwarnings("ignore", message=".*capturable=True.*")
                    self.optimizer.zero_grad(set_to_none=True)
                    parts = self._step()
                current.wait_stream(self.stream)
            else:
                if self.graph is None:
                    self.optimizer.zero_grad(set_to_none=True)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=self.stream):
                        self.parts = self._step()
                    self.graph, self.lrs = graph, lrs
                self.graph.replay()
                parts = self.parts
            self.steps += 1
            return dict(zip(self.keys, parts.tolist()))


def tree_map(fn, tree):
    """``fn`` applied to every tensor of nested dicts, lists and tuples."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return fn(tree)


def leaves(tree) -> list:
    out = []
    tree_map(out.append, tree)
    return out
