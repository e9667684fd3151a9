"""End to end: the paper's ST-GCN encoder forward+backward, and one full SkeleMixCLR+ training step
(query + 3 mixed batches through the query encoder, the key through the momentum encoder, SGD update).
The "+graph" providers replay the step's device work as one CUDA graph (``train.cuda_graph=on``)."""
import pytest
import torch

from bench.common import BATCH, DEVICE, measure, skip_unless_provider
from skelemix.augment import apply_augment, draw_augment, pretrain_augment
from skelemix.config import load_config, make_encoder, make_pretrain_model
from skelemix.train import GraphedStep

T, V, M = 64, 25, 2


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
    return "eager" if provider in ("eager", "compile") else provider


@pytest.mark.parametrize("provider", ["eager", "compile", "cpp", "cuda", "triton", "cpp+fused", "cuda+fused",
                                      "triton+fused"])
def test_encoder_fwd_bwd(benchmark, provider):
    impl, _, variant = provider.partition("+")  # "+fused": the fused block epilogue (train.epilogue=fused)
    skip_unless_provider(impl)
    config = load_config("paper.yaml")
    encoder = make_encoder(config.model, num_class=128, impl=_impl_of(impl)).to(DEVICE)
    encoder.fused_epilogue = variant == "fused"
    run = torch.compile(encoder) if provider == "compile" else encoder
    x = torch.randn(BATCH, 3, T, V, M, device=DEVICE)

    def step():
        encoder.zero_grad(set_to_none=True)
        run(x).square().mean().backward()

    flops, traffic = encoder_cost(encoder, BATCH, T)
    measure(benchmark, step, group="model/encoder fwd+bwd", provider=provider,
            shapes={"x": list(x.shape), "hidden": [16, 256]}, bytes=traffic, flops=flops)


@pytest.mark.parametrize("provider", ["eager", "compile", "cpp", "cuda", "triton", "cpp+fused", "cuda+fused",
                                      "triton+fused", "cuda+bf16", "triton+bf16", "cuda+graph", "triton+graph"])
def test_training_step(benchmark, provider):
    # "+bf16": the encoders under bf16 autocast (train.amp=bf16); "+fused": train.epilogue=fused.
    provider, _, variant = provider.partition("+")
    amp = "bf16" if variant == "bf16" else ""
    skip_unless_provider(provider)
    if variant == "graph" and DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    config = load_config("paper.yaml", [f"train.impl={_impl_of(provider)}",
                                        f"train.epilogue={'fused' if variant == 'fused' else 'modules'}"])
    model = make_pretrain_model(config).to(DEVICE)
    if provider == "compile":
        model.encoder_q, model.encoder_k = torch.compile(model.encoder_q), torch.compile(model.encoder_k)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(BATCH, 3, T, V, M, device=DEVICE)
    generator = torch.Generator().manual_seed(0)
    repeats = int(config.model.swap_params[0][4])

    def eager_step():
        q = pretrain_augment(x, config.data.shear, config.data.temporal_ratio, generator=generator)
        k = pretrain_augment(x, config.data.shear, config.data.temporal_ratio, generator=generator)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = model(q, k, generator=generator)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # "+graph": the same draws on the host, the device work replayed; its warm-up step and the capture fall in
    # measure()'s untimed calls.
    def device_work(x, d):
        return model(apply_augment(x, d["q"]), apply_augment(x, d["k"]), mix_draws=d["mix"], sync_free=True)

    graphed = GraphedStep(device_work, optimizer, DEVICE, warmup=1) if variant == "graph" else None

    def graphed_step():
        draws = {v: draw_augment(x.shape, config.data.shear, config.data.temporal_ratio, generator) for v in ("q", "k")}
        graphed(x, {**draws, "mix": model.draw_mixes(x.shape, generator)})

    step = graphed_step if graphed is not None else eager_step

    enc = model.encoder_q
    fb_flops, fb_bytes = encoder_cost(enc, BATCH, T)
    f_flops, f_bytes = encoder_cost(enc, BATCH, T, backward=False)
    measure(benchmark, step, group="model/SkeleMixCLR+ step", provider=provider + (f"+{variant}" if variant else ""),
            shapes={"x": list(x.shape), "mixes": repeats, "queue": config.model.queue_size},
            flops=(1 + repeats) * fb_flops + f_flops, bytes=(1 + repeats) * fb_bytes + f_bytes)
