"""``python -m bench.paper_scale``: what the released NTU-60 xview pretraining (SkeleMixCLR+, 300 epochs,
batch 128, 64 frames, the paper's widths) costs, estimated from quantities measured on this machine.

Measured here (no GPU needed): the step's arithmetic and minimum traffic (:func:`bench.bench_model.encoder_cost`,
the floor's inputs), the bytes autograd saves for the backward pass in one step (counted with saved-tensor hooks
on a small batch, scaled to 128; unique storages only), the number of tensor ops one step dispatches (each is at
least one kernel launch on a GPU without CUDA graphs), and the parameter and queue sizes. Combined with a GPU's
published peaks these give lower bounds on the step time (``max(FLOPs / peak, bytes / bandwidth, launches x
launch cost)``) and the memory a step needs; a measured step on the GPU (``bench/device_check.sh``) replaces them.
"""
from __future__ import annotations

import argparse
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.bench_model import encoder_cost
from skelemix.augment import pretrain_augment
from skelemix.config import load_config, make_encoder, make_pretrain_model

NTU60_XVIEW_TRAIN = 37_646  # xview training sequences once the 302 without skeletons are left out
JOINTS, BODIES = 25, 2  # the NTU layout
# NVIDIA H100 SXM5 datasheet, dense: FP32 (CUDA cores), TF32 tensor cores (cuDNN's default for convolutions in
# torch), HBM3 bandwidth; and a typical kernel launch cost.
H100 = {"fp32 FLOP/s": 67e12, "tf32 FLOP/s": 494.7e12, "bytes/s": 3.35e12}
LAUNCH_S = 4e-6


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def measure_step(config, batch: int) -> dict:
    """Saved-for-backward bytes and dispatched ops of one SkeleMixCLR+ step (forward, backward, SGD) on ``batch``
    random sequences."""
    torch.manual_seed(0)
    model = make_pretrain_model(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, config.data.frames, JOINTS, BODIES)
    generator = torch.Generator().manual_seed(0)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    counter = _CountOps()
    with counter:
        q = pretrain_augment(x, config.data.shear, config.data.temporal_ratio, generator=generator)
        k = pretrain_augment(x, config.data.shear, config.data.temporal_ratio, generator=generator)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(q, k, generator=generator)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"saved_bytes": sum(saved.values()), "ops": counter.ops, "trainable_params": params,
            "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ntu60_xview_joint.yaml")
    parser.add_argument("--probe-batch", type=int, default=4, help="batch of the saved-bytes measurement")
    parser.add_argument("--impl", default="cpp", help="model.impl of the measured step")
    parser.add_argument("--epilogue", default="fused", help="model.epilogue of the measured step")
    args = parser.parse_args(argv)

    config = load_config(args.config, [f"model.impl={args.impl}", f"model.epilogue={args.epilogue}"])
    batch, epochs = config.train.batch_size, config.train.epochs
    repeats = int(config.model.swap_params[0][4])  # the mixed query views of the released row
    enc = make_encoder(config.model)
    fb_flops, fb_bytes = encoder_cost(enc, batch, config.data.frames)
    f_flops, f_bytes = encoder_cost(enc, batch, config.data.frames, backward=False)
    flops, traffic = (1 + repeats) * fb_flops + f_flops, (1 + repeats) * fb_bytes + f_bytes
    probe = measure_step(config, args.probe_batch)
    saved = probe["saved_bytes"] * batch / args.probe_batch
    steps = math.ceil(NTU60_XVIEW_TRAIN / batch) * epochs

    print(f"config {args.config}: batch {batch}, {epochs} epochs, {steps} steps, {repeats} mixed views + query + key")
    print(f"per step: {flops / 1e12:.2f} TFLOP, {traffic / 2**30:.2f} GiB minimum traffic, "
          f"{probe['ops']} tensor ops dispatched (impl={args.impl}, epilogue={args.epilogue}), "
          f"{saved / 2**30:.1f} GiB saved for backward (measured at batch {args.probe_batch}, scaled to {batch})")
    print(f"model: {probe['trainable_params'] / 1e6:.2f} M trainable parameters, "
          f"{probe['buffer_bytes'] / 2**20:.0f} MiB of buffers (the queue, BatchNorm statistics)")
    for gpus in (1, 8):
        per_gpu = batch // gpus
        floors = {name: flops / gpus / H100[f"{name} FLOP/s"] for name in ("fp32", "tf32")}
        memory_s, launch_s = traffic / gpus / H100["bytes/s"], probe["ops"] * LAUNCH_S
        for name, compute_s in floors.items():
            step_s = max(compute_s, memory_s, launch_s)
            print(f"{gpus} x H100, {per_gpu} per GPU, {name}: step >= {step_s * 1e3:.1f} ms "
                  f"(compute {compute_s * 1e3:.1f}, traffic {memory_s * 1e3:.1f}, launches {launch_s * 1e3:.1f}); "
                  f"run >= {steps * step_s / 3600:.1f} h; saved activations {saved / gpus / 2**30:.1f} GiB per GPU")


if __name__ == "__main__":
    main()
