"""End to end: the paper's ST-GCN encoder forward+backward, and one full SkeleMixCLR+ training step
(query + 3 mixed batches through the query encoder, the key through the momentum encoder, SGD update) for
every combination of the switches a user has (the step matrix):

- impl: ``official-style`` (the eager encoder and the mixing laid out as the official code is:
  :mod:`bench.official_style`; modules, float32, no graph only), ``eager`` (the reference ops), ``compile`` (``torch.compile`` of both encoders around them), the
  compiled ops (``cuda``; ``cpp`` on a CPU) and ``triton``;
- epilogue: ``modules`` (BatchNorm, dropout, add, ReLU) or ``fused`` (``bn_epilogue``; ``model.epilogue``);
- amp: ``none`` or ``bf16`` (``train.amp``);
- CUDA graph: ``off`` or ``on`` (the step's device work replayed as one graph; ``train.cuda_graph``);
- layout of the activations: ``contiguous`` (what the package runs) or ``channels_last`` (the encoder's
  convolution weights and every block's input in ``torch.channels_last``; the fused ops accept any strides),
  for the plain and fused eager, compiled-op and Triton rows without a graph. Row ids name only the latter.

Rows run most useful first (:data:`MATRIX`), so a run cut short keeps them; the compile rows come last (each
is a cold Inductor compile). Each row records the median step, samples/s and the peak of allocated GPU
memory; ``steps.md`` beside the JSON (:func:`bench.common.json_path`) is rewritten after every row.
"""
import itertools

import pytest
import torch

from bench.common import (BATCH, COMPILE_BACKEND, DEVICE, MODEL_OVERRIDES, json_path, measure, payload,
                          release_memory, skip_unless_provider)
from bench.official_style import OfficialModel, official_style_pretrain_model
from bench.report import write_steps
from skelemix.augment import apply_augment, draw_augment, pretrain_augment
from skelemix.config import load_config, make_encoder, make_pretrain_model
from skelemix.train import GraphedStep

T, V, M = 64, 25, 2
KERNELS = "cuda" if DEVICE.type == "cuda" else "cpp"  # the compiled ops of this device
STEP_GROUP = "model/SkeleMixCLR+ step"


def _value_order(row: tuple[str, str, str, str, str]) -> tuple:
    """Most useful first: the eager baseline; the compiled ops and Triton, plain, then fused, bf16, and with a
    CUDA graph; eager's other combinations; the channels-last rows; compile last (cold compiles), plain first."""
    impl, epilogue, amp, graph, layout = row
    switches = (graph == "on", amp == "bf16", epilogue == "fused")
    if impl == "compile":
        return (4, switches)
    if layout == "channels_last":
        return (3, (amp == "none", epilogue == "modules"), impl != KERNELS)
    if impl == "eager":
        return (0 if not any(switches) else 2, switches)
    return (1, switches, impl != KERNELS)


OFFICIAL = ("official-style", "modules", "none", "off", "contiguous")
MATRIX = [OFFICIAL] + sorted(
    list(itertools.product(("eager", "compile", KERNELS, "triton"), ("modules", "fused"), ("none", "bf16"),
                           ("off", "on"), ("contiguous",)))
    + list(itertools.product(("eager", KERNELS, "triton"), ("modules", "fused"), ("none", "bf16"), ("off",),
                             ("channels_last",))), key=_value_order)


def row_id(row: tuple[str, str, str, str, str]) -> str:
    return "-".join(row[:4] if row[4] == "contiguous" else row)


def skip_unsafe_channels_last(channels: int) -> None:
    """On a CPU, torch 2.13's oneDNN backward of a channels-last 1x1 convolution with stride 2 and 8 or fewer input
    channels crashes (segfault or heap corruption, also with one thread): skip encoders whose first widening
    residual has so few (the tiny sizes; the paper's widths start at 16)."""
    if DEVICE.type == "cpu" and channels <= 8:
        pytest.skip(f"channels-last on the CPU with hidden_channels {channels} <= 8: torch's oneDNN backward of a "
                    "strided 1x1 convolution crashes there (docs/PERFORMANCE.md)")


def to_channels_last(encoder: torch.nn.Module) -> torch.nn.Module:
    """``encoder`` with its convolution weights, and every block's input, in ``torch.channels_last``."""
    encoder.to(memory_format=torch.channels_last)
    for block in encoder.blocks:
        block.register_forward_pre_hook(
            lambda module, args: (args[0].contiguous(memory_format=torch.channels_last), *args[1:]))
    return encoder


def encoder_cost(model, batch: int, frames: int, backward: bool = True) -> tuple[float, float]:
    """(FLOPs, bytes) of the encoder's forward (+ backward, counted as twice the forward) on ``batch`` sequences
    of ``frames`` frames: graph conv + 9x1 temporal conv + residual 1x1 convs, and each block's input read and
    output written once in float32 (the least traffic any implementation needs: the floor, not a model)."""
    B, t, flops, traffic = batch * M, frames, 0.0, 0.0
    K = model.A.shape[0]
    for block in model.blocks:
        cin, cout = block.gcn.conv.in_channels, block.gcn.conv.out_channels // K
        t_out = -(-t // block.stride)
        flops += 2 * B * t * V * cin * K * cout + 2 * B * K * cout * t * V * V + 2 * B * t_out * V * cout * cout * 9
        if isinstance(block.residual, torch.nn.Module) and any(p.dim() == 4 for p in block.residual.parameters()):
            flops += 2 * B * t_out * V * cin * cout
        traffic += 4 * B * V * (cin * t + cout * t_out)
        t = t_out
    factor = 3 if backward else 1
    return factor * flops, factor * traffic


def _impl_of(provider):
    return "eager" if provider in ("eager", "compile", "official-style") else provider


@pytest.mark.parametrize("provider", [
    "official-style", "eager", "eager+channels_last", "compile", "cpp", "cuda", "triton", "cpp+fused", "cuda+fused",
    "triton+fused", "cpp+fused+channels_last", "cuda+fused+channels_last", "triton+fused+channels_last"])
def test_encoder_fwd_bwd(benchmark, provider):
    impl, *variants = provider.split("+")  # "+fused": the fused block epilogue (model.epilogue=fused)
    skip_unless_provider(impl)
    config = load_config("paper.yaml", MODEL_OVERRIDES)
    encoder = make_encoder(config.model, num_class=128, impl=_impl_of(impl)).to(DEVICE)
    encoder.fused_epilogue = "fused" in variants
    if "channels_last" in variants:
        skip_unsafe_channels_last(config.model.hidden_channels)
        to_channels_last(encoder)
    run = torch.compile(encoder, backend=COMPILE_BACKEND) if provider == "compile" else encoder
    if provider == "official-style":
        m = config.model
        run = OfficialModel(encoder.A, m.hidden_channels, m.hidden_dim, 128, dropout=m.dropout).to(DEVICE)
    x = torch.randn(BATCH, 3, T, V, M, device=DEVICE)

    def step():
        run.zero_grad(set_to_none=True)
        run(x).square().mean().backward()

    flops, traffic = encoder_cost(encoder, BATCH, T)
    measure(benchmark, step, group="model/encoder fwd+bwd", provider=provider,
            shapes={"x": list(x.shape), "hidden": [16, 256]}, bytes=traffic, flops=flops)


@pytest.mark.parametrize("row", MATRIX, ids=[row_id(row) for row in MATRIX])
def test_training_step(benchmark, row):
    impl, epilogue, amp, graph, layout = row
    release_memory()
    skip_unless_provider(impl)
    if graph == "on" and DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    config = load_config("paper.yaml", MODEL_OVERRIDES + [f"model.impl={_impl_of(impl)}", f"model.epilogue={epilogue}"])
    model = (official_style_pretrain_model if impl == "official-style" else make_pretrain_model)(config).to(DEVICE)
    if layout == "channels_last":
        skip_unsafe_channels_last(config.model.hidden_channels)
        model.encoder_q, model.encoder_k = to_channels_last(model.encoder_q), to_channels_last(model.encoder_k)
    if impl == "compile":
        model.encoder_q = torch.compile(model.encoder_q, backend=COMPILE_BACKEND)
        model.encoder_k = torch.compile(model.encoder_k, backend=COMPILE_BACKEND)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(BATCH, 3, T, V, M, device=DEVICE)
    generator = torch.Generator().manual_seed(0)
    repeats = int(config.model.swap_params[0][4])
    autocast = dict(device_type=DEVICE.type, dtype=torch.bfloat16, enabled=amp == "bf16")

    def eager_step():
        q = pretrain_augment(x, config.data.shear, config.data.temporal_ratio, generator=generator)
        k = pretrain_augment(x, config.data.shear, config.data.temporal_ratio, generator=generator)
        with torch.autocast(**autocast):
            loss = model(q, k, generator=generator)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # CUDA graph: the same draws on the host, the device work replayed; its warm-up step and the capture fall
    # in measure()'s untimed calls. No autocast weight cache inside a captured graph (as the trainer does).
    def device_work(x, d):
        with torch.autocast(**autocast, cache_enabled=False):
            return model(apply_augment(x, d["q"]), apply_augment(x, d["k"]), mix_draws=d["mix"], sync_free=True)

    graphed = GraphedStep(device_work, optimizer, DEVICE, warmup=1) if graph == "on" else None

    def graphed_step():
        draws = {v: draw_augment(x.shape, config.data.shear, config.data.temporal_ratio, generator) for v in ("q", "k")}
        graphed(x, {**draws, "mix": model.draw_mixes(x.shape, generator)})

    enc = make_encoder(config.model)  # the architecture (the official-style model has its own module names)
    fb_flops, fb_bytes = encoder_cost(enc, BATCH, T)
    f_flops, f_bytes = encoder_cost(enc, BATCH, T, backward=False)
    # The floor's bytes count float32 activations; bf16 ones are half.
    traffic = ((1 + repeats) * fb_bytes + f_bytes) * (0.5 if amp == "bf16" else 1.0)
    variant = dict(impl=impl, epilogue=epilogue, amp=amp, graph=graph, layout=layout)
    try:
        measure(benchmark, graphed_step if graphed is not None else eager_step, group=STEP_GROUP,
                provider=row_id(row), dtype=torch.bfloat16 if amp == "bf16" else torch.float32,
                shapes={"x": list(x.shape), "mixes": repeats, "queue": config.model.queue_size},
                flops=(1 + repeats) * fb_flops + f_flops, bytes=traffic, extra={"variant": variant})
    except Exception as err:  # noqa: BLE001 - the table says which row broke, then the test fails
        from bench import common

        common.RESULTS.append({"group": STEP_GROUP, "provider": row_id(row), "variant": variant,
                               "error": f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"})
        raise
    finally:
        write_steps(json_path().with_name("steps.md"), payload())
