"""Several processes (GPUs, nodes) through ``torchrun`` and DistributedDataParallel (docs/DESIGN.md 8, item 2).

Everything here is a thin layer over ``torch.distributed``; with one process every helper is a no-op, so
single-process runs are bitwise unchanged. Conventions:

* ``train.batch_size`` is the **global** batch. Each of the W processes takes ``batch_size / W`` samples of
  every global batch (a contiguous slice, in rank order), so the data order, the queue and the optimizer
  steps are functions of the global batch only, and a run can resume with another W that divides it.
* MoCo keys are all-gathered (rank order) and enqueued once per step on every rank, so every rank holds
  the same queue; the momentum encoder is updated from identical parameters on every rank.
* The SkeleMix partner is drawn within each rank's batch (each rank mixes its own samples).
* BatchNorm (``dist.bn``): ``per_rank`` statistics (default; the paper's single-GPU statistics over the
  per-rank batch), ``sync`` (statistics over the global batch) or ``shuffle`` (MoCo's shuffled BN: the key
  encoder sees a random cross-rank batch, so the positives cannot leak through per-rank BN statistics).
* Logs, plots and checkpoints come from rank 0 only.
"""
from __future__ import annotations

import gc
import inspect
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

BN_MODES = ("per_rank", "sync", "shuffle")
BACKENDS = ("auto", "nccl", "gloo")


# ------------------------------------------------------------------------------------------ process group
def launched() -> bool:
    """True when started by torchrun (or anything else that sets the env:// variables) with WORLD_SIZE > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init(backend: str = "auto", device: torch.device | None = None) -> torch.device | None:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``); no-op without it. ``backend="auto"`` picks nccl for CUDA devices and gloo otherwise.
    Returns the device this process should use (``cuda:LOCAL_RANK`` for CUDA), or ``device`` unchanged."""
    if not launched() or is_initialized():
        return device
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    cuda = device is not None and device.type == "cuda"
    if cuda:
        if local_rank() >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank()} but only {torch.cuda.device_count()} CUDA devices are "
                               "visible: start at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(minutes=30),
                            device_id=device if cuda else None)
    return device


def cleanup():
    """Leave the process group, together: gloo can abort a process that tears down while a peer still talks.
    Unreachable DistributedDataParallel wrappers (they sit in reference cycles) are collected first: freed
    later, during interpreter shutdown, they tore gloo down after the group was gone and the process aborted
    with "terminate called without an active exception" (about 1 in 20 CPU runs)."""
    if is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def print0(*args, **kwargs):
    """``print`` on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


def rank_seed(seed: int, rank_: int) -> int:
    """Seed of a rank's random streams; rank 0 keeps ``seed`` so one process is unchanged."""
    return seed + 1_000_003 * rank_


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel (rank 0's weights and buffers broadcast once, at construction), or
    ``model`` itself with one process. Buffers are not re-broadcast every step: the queue is kept identical
    by the key gather, and per-rank BN statistics are the point of per-rank BN."""
    if world_size() == 1:
        return model
    no_sync = ({"forward_sync_buffers": False}
               if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else {"broadcast_buffers": False})  # the name before torch 2.13
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None, **no_sync)


# ------------------------------------------------------------------------------------------ collectives
def _comm_device(t: torch.Tensor) -> torch.device:
    """nccl moves CUDA tensors only; gloo anything."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


@torch.no_grad()
def all_gather(t: torch.Tensor) -> torch.Tensor:
    """The ``t`` of every rank concatenated along dim 0 in rank order, without autograd (the result is a
    plain tensor: gradients never flow back to other ranks). All ranks must pass the same shape."""
    if world_size() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


@torch.no_grad()
def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Like :func:`all_gather` for tensors whose first dimension differs between ranks (evaluation shards);
    the result is on ``t``'s device."""
    if world_size() == 1:
        return t
    home, dev = t.device, _comm_device(t)
    t = t.to(dev)
    sizes = all_gather(torch.tensor([t.shape[0]], device=dev)).tolist()
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[:t.shape[0]] = t
    parts = all_gather(padded).split(max(sizes))
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(home)


def all_gather_object(obj) -> list:
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Average of ``t`` over the ranks (for logging: every rank's loss is the mean over its equal share)."""
    if world_size() == 1:
        return t
    dev = _comm_device(t)
    s = t.detach().to(dev).clone()
    dist.all_reduce(s)
    return (s / world_size()).to(t.device)


def any_rank(flag: bool, device=None) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks stop at the same step)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    t = t.to(_comm_device(t))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@torch.no_grad()
def broadcast_buffers(module: nn.Module, src: int = 0):
    """Copy rank ``src``'s buffers (BN running statistics) to every rank, e.g. before evaluation with per-rank BN."""
    if world_size() == 1:
        return
    for b in module.buffers():
        tmp = b.to(_comm_device(b))
        dist.broadcast(tmp, src)
        b.copy_(tmp)


# ------------------------------------------------------------------------------------------ data
class ResumableDistributedSampler(DistributedSampler):
    """A DistributedSampler whose epochs split *global* batches between ranks, and that can start mid-epoch.

    Each epoch is a permutation drawn from ``(seed, epoch)`` alone (``set_epoch``), cut into
    ``len(dataset) // global_batch`` global batches (the rest is dropped, as the official loader does); rank
    ``r`` takes the ``r``-th contiguous slice of ``global_batch / world`` samples of each. Unlike the stock
    sampler's interleaving this keeps the gathered global batch in the one-process order, so W ranks with
    batch B see exactly the samples of one rank with batch W*B, and ``set_epoch(epoch, start_step)`` replays
    an interrupted epoch from any step for any W that divides the global batch.
    """

    def __init__(self, dataset, global_batch: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        if global_batch % num_replicas:
            raise ValueError(f"the global batch ({global_batch}) must be divisible by the number of processes "
                             f"({num_replicas})")
        self.global_batch, self.local_batch = global_batch, global_batch // num_replicas
        self.steps = len(dataset) // global_batch
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0):
        super().set_epoch(epoch)
        self.start_step = start_step

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=g)[:self.steps * self.global_batch]
        mine = order.view(self.steps, self.num_replicas, self.local_batch)[self.start_step:, self.rank]
        return iter(mine.reshape(-1).tolist())

    def __len__(self):
        return (self.steps - self.start_step) * self.local_batch


def shard(n: int) -> range:
    """This rank's contiguous share of ``range(n)`` (evaluation: concatenating the shards in rank order gives
    back ``range(n)``)."""
    r, w = rank(), world_size()
    return range(r * n // w, (r + 1) * n // w)


# ------------------------------------------------------------------------------------------ BatchNorm
class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalisation over the batches of all ranks, with the backward of torch's SyncBatchNorm: the
    per-channel sums of the output gradient are all-reduced, the parameter gradients stay local (DDP averages
    them). Sums accumulate in float64, as torch's CPU BatchNorm kernels do: in float32 a deep network's
    gradients drift by ~1e-3 relative where the one-process kernel stays at ~1e-5."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        C = x.shape[1]
        count = torch.tensor([float(x.numel() // C)], dtype=torch.float64)
        dist.all_reduce(count)
        total = x.sum(dims, dtype=torch.float64)
        dist.all_reduce(total)
        mean = total / count
        xmu = x - mean.to(x.dtype).view(shape)
        sq = (xmu.double() * xmu).sum(dims)
        dist.all_reduce(sq)
        var = sq / count
        invstd = torch.rsqrt(var + eps)
        xhat = xmu * invstd.to(x.dtype).view(shape)
        ctx.save_for_backward(xhat, invstd, weight, count)
        out = xhat if weight is None else xhat * weight.view(shape) + bias.view(shape)
        ctx.mark_non_differentiable(mean, var)
        return out, mean.to(x.dtype), (var * count / (count - 1)).to(x.dtype)  # unbiased, for the running stats

    @staticmethod
    def backward(ctx, grad, _mean, _var):
        xhat, invstd, weight, count = ctx.saved_tensors
        dims = [0] + list(range(2, grad.dim()))
        shape = [1, -1] + [1] * (grad.dim() - 2)
        sum_dy, sum_dy_xhat = grad.sum(dims, dtype=torch.float64), (grad.double() * xhat).sum(dims)
        sums = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(sums)
        g_dy, g_dy_xhat = (sums / count).split(sum_dy.shape[0])
        scale = invstd if weight is None else invstd * weight
        dx = ((grad - g_dy.to(grad.dtype).view(shape) - xhat * g_dy_xhat.to(grad.dtype).view(shape))
              * scale.to(grad.dtype).view(shape))
        if weight is None:
            return dx, None, None, None
        return dx, sum_dy_xhat.to(weight.dtype), sum_dy.to(weight.dtype), None


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """The statistics of ``torch.nn.SyncBatchNorm`` for CPU tensors (the gloo backend): torch's SyncBatchNorm
    runs on GPUs only and DistributedDataParallel refuses it on the CPU. In training the mean and the
    (biased) variance come from all ranks' batches, the unbiased variance goes into the running statistics;
    evaluation and single-process runs are plain BatchNorm."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        out, mean, var = _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_(var.to(self.running_var.dtype), m)
        return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``module`` made to use global-batch statistics (weights and statistics kept):
    ``torch.nn.SyncBatchNorm`` for GPUs, :class:`CPUSyncBatchNorm` for the CPU."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        new = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        # The same Parameter objects (requires_grad kept: the key encoder's stay frozen) and buffers.
        for name, value in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            setattr(new, name, value)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module


@torch.no_grad()
def shuffled_forward(encoder: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """MoCo's shuffled BN: run ``encoder`` on a random slice of the gathered global batch, then give every rank
    the outputs of its own samples back. The permutation is drawn on every rank (so the generators stay in
    step) and rank 0's is used. All ranks must pass the same batch size."""
    if world_size() == 1:
        return encoder(x)
    everything = all_gather(x)
    perm = torch.randperm(everything.shape[0], generator=generator).to(_comm_device(x))
    dist.broadcast(perm, 0)
    perm = perm.to(x.device)
    n, r = x.shape[0], rank()
    out = all_gather(encoder(everything[perm[r * n:(r + 1) * n]]))
    return out[torch.argsort(perm)[r * n:(r + 1) * n]]
