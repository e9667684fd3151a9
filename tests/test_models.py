import math

import pytest
import torch

from skelemix.models import STGCN, SkeleMixCLR, build_pretrain_model


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("hc, counts", [
    (16, {"backbone": 821_380, "linear60": 836_800, "linear120": 852_220, "linear128": 854_276, "mlp": 920_580}),
    (64, {"backbone": 3_083_412, "linear60": 3_098_832, "linear120": 3_114_252, "linear128": 3_116_308,
          "mlp": 3_182_612}),
])
def test_parameter_counts_match_the_official_model(hc, counts):
    # docs/DESIGN.md 2.4, measured on the official modules.
    assert n_params(STGCN(hidden_channels=hc)) == counts["backbone"]
    assert n_params(STGCN(hidden_channels=hc, edge_importance=False)) == counts["backbone"] - 18_750
    assert n_params(STGCN(hidden_channels=hc, num_class=60)) == counts["linear60"]
    assert n_params(STGCN(hidden_channels=hc, num_class=120)) == counts["linear120"]
    assert n_params(STGCN(hidden_channels=hc, num_class=128)) == counts["linear128"]
    assert n_params(STGCN(hidden_channels=hc, num_class=128, head="mlp")) == counts["mlp"]


def test_per_block_parameters_and_shapes():
    enc = STGCN()
    per_block = [n_params(b) - b.edge_importance.numel() for b in enc.blocks]
    assert per_block == [2576, 3200, 3200, 3200, 11616, 12544, 12544, 45760, 49664, 658176]
    assert n_params(enc.data_bn) == 150
    x = torch.randn(2, 3, 64, 25, 2)
    h = enc.data_bn(x.permute(0, 4, 3, 1, 2).reshape(4, 75, 64)).view(2, 2, 25, 3, 64)
    h = h.permute(0, 1, 3, 4, 2).reshape(4, 3, 64, 25)
    lengths, widths = [], []
    for block in enc.blocks:
        h = block(h, enc.A)
        lengths.append(h.shape[2])
        widths.append(h.shape[1])
    assert lengths == [64, 64, 64, 64, 32, 32, 32, 16, 16, 16]
    assert widths == [16, 16, 16, 16, 32, 32, 32, 64, 64, 256]
    assert enc.temporal_stride == 4
    assert enc.feature_map(x).shape == (4, 256, 16, 25)
    # Odd lengths give ceil(T / stride) frames.
    assert enc.feature_map(torch.randn(1, 3, 30, 25, 1)).shape == (1, 256, 8, 25)


def test_residual_rules():
    enc16, enc64 = STGCN(hidden_channels=16), STGCN(hidden_channels=64)
    assert enc16.blocks[0].residual is None
    assert isinstance(enc16.blocks[1].residual, torch.nn.Identity)
    assert isinstance(enc16.blocks[4].residual, torch.nn.Sequential)
    assert isinstance(enc16.blocks[9].residual, torch.nn.Sequential)  # 64 -> 256
    assert isinstance(enc64.blocks[9].residual, torch.nn.Identity)  # 256 -> 256
    assert enc16.blocks[0].tcn[4].p == 0 and enc16.blocks[1].tcn[4].p == 0.5


def test_mask_pooling_splits_the_global_mean():
    enc = STGCN(hidden_channels=4, hidden_dim=8).eval()
    x = torch.randn(3, 3, 16, 25, 2)
    g = enc(x)
    mask = torch.zeros(4, 25, dtype=torch.bool)
    mask[1:3, :10] = True
    p, c = enc(x, mask)
    frac = mask.float().mean()
    torch.testing.assert_close(frac * p + (1 - frac) * c, g, rtol=1e-5, atol=1e-6)
    # Per-sample masks: sample i with mask i equals the shared-mask result for that sample.
    masks = torch.stack([mask, ~mask, mask])
    p2, c2 = enc(x, masks)
    torch.testing.assert_close(p2[[0, 2]], p[[0, 2]])
    torch.testing.assert_close(p2[1], c[1])


def test_bad_inputs_are_named():
    enc = STGCN(hidden_channels=4, hidden_dim=8)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3, T, 25, M\); got \(2, 3, 16, 20, 1\)"):
        enc(torch.randn(2, 3, 16, 20, 1))
    with pytest.raises(TypeError, match="floating"):
        enc(torch.ones(2, 3, 16, 25, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        enc(torch.randn(2, 3, 16, 25, 1), torch.ones(3, 25, dtype=torch.bool))
    with pytest.raises(ValueError, match="head must be"):
        STGCN(num_class=3, head="deep")
    with pytest.raises(ValueError, match="impl must be one of"):
        STGCN(impl="fast")


def test_missing_implementation_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # without it (or a GPU), impl="triton" cannot run
    enc = STGCN(hidden_channels=4, hidden_dim=8, impl="triton")
    with pytest.raises((NotImplementedError, RuntimeError, ValueError), match="impl='triton'"):
        enc(torch.randn(2, 3, 16, 25, 1))


def small_model(**kw):
    args = dict(encoder=dict(hidden_channels=4, hidden_dim=16), feature_dim=8, queue_size=64)
    args.update(kw)
    return args


@pytest.mark.parametrize("reduction, terms", [("sum", 1 + 3), ("mean", 1 + 1)])
def test_initial_loss_is_about_terms_times_log_k(reduction, terms):
    torch.manual_seed(0)
    K = 4096
    model = build_pretrain_model("skelemixclr+", encoder=dict(hidden_channels=8, hidden_dim=32),
                                 queue_size=K, repeat_reduction=reduction, official_key_init=True)
    x = torch.randn(16, 3, 64, 25, 2)
    out = model(x, torch.randn_like(x))
    expected = terms * math.log(K + 1)
    assert abs(out["loss"].item() - expected) / expected < 0.05
    for name in ("loss_ins", "loss_p", "loss_c"):
        assert abs(out[name].item() - math.log(K + 1)) < 1.0


def test_key_encoder_init_and_momentum_update():
    torch.manual_seed(0)
    fixed = SkeleMixCLR(**small_model())
    for pq, pk in zip(fixed.encoder_q.parameters(), fixed.encoder_k.parameters()):
        assert torch.equal(pq, pk) and not pk.requires_grad
    official = SkeleMixCLR(**small_model(official_key_init=True))
    differs = [not torch.equal(pq, pk) for pq, pk in
               zip(official.encoder_q.parameters(), official.encoder_k.parameters())]
    assert any(differs)

    model = SkeleMixCLR(**small_model(momentum=0.9))
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    before_k = [p.clone() for p in model.encoder_k.parameters()]
    model._momentum_update()
    for bk, pq, pk in zip(before_k, model.encoder_q.parameters(), model.encoder_k.parameters()):
        torch.testing.assert_close(pk, 0.9 * bk + 0.1 * pq)


def test_queue_enqueue_and_pointer():
    torch.manual_seed(0)
    model = SkeleMixCLR(**small_model())
    x = torch.randn(8, 3, 64, 25, 1)
    before = model.queue.clone()
    model(x, x.clone())
    assert int(model.queue_ptr) == 8
    assert not torch.equal(model.queue[:, :8], before[:, :8])
    torch.testing.assert_close(model.queue[:, 8:], before[:, 8:])
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(64))
    with pytest.raises(ValueError, match=r"queue_size \(64\) must be a multiple of the global batch size \(6\)"):
        model(x[:6], x[:6])


def test_loss_backpropagates_to_encoder_q_only():
    torch.manual_seed(0)
    model = SkeleMixCLR(**small_model())
    x = torch.randn(4, 3, 64, 25, 2)
    out = model(x, x + 0.01 * torch.randn_like(x))
    out["loss"].backward()
    assert all(p.grad is not None for p in model.encoder_q.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("variant", ["skeletonclr", "skelemixclr", "skelemixclr+"])
def test_variants_run(variant):
    torch.manual_seed(0)
    model = build_pretrain_model(variant, encoder=dict(hidden_channels=4, hidden_dim=16), feature_dim=8,
                                 queue_size=64)
    x = torch.randn(4, 3, 64, 25, 2)
    out = model(x, x.clone())
    assert torch.isfinite(out["loss"])
    if variant == "skeletonclr":
        assert math.isnan(out["loss_p"].item()) and len(model.encoder_q.fc) == 3  # Linear-ReLU-Linear
    else:
        assert torch.isfinite(out["loss_p"]) and len(model.encoder_q.fc) == 4


def test_multi_view_queries_and_modes():
    torch.manual_seed(0)
    rows = ((2, 3, 7, 11, 1, 1.0), (2, 3, 3, 6, 2, 0.5))
    model = SkeleMixCLR(**small_model(swap_params=rows, mix=dict(mode="zeros", per_sample=True)))
    q64, q32 = torch.randn(4, 3, 64, 25, 1), torch.randn(4, 3, 32, 25, 1)
    out = model([q64, q32], q64.clone())
    assert torch.isfinite(out["loss"]) and math.isnan(out["loss_p"].item())  # zeros: no trimmed term
    with pytest.raises(ValueError, match="2 rows"):
        model([q64], q64)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="variant must be one of"):
        build_pretrain_model("simclr")
    with pytest.raises(ValueError, match="repeat_reduction"):
        SkeleMixCLR(**small_model(repeat_reduction="max"))
    with pytest.raises(ValueError, match="spa_l, spa_u, tem_l, tem_u, repeat, weight"):
        SkeleMixCLR(**small_model(swap_params=((2, 3, 7, 11),)))
    with pytest.raises(ValueError, match="spa_range"):
        SkeleMixCLR(**small_model(swap_params=((2, 7, 7, 11, 1, 1.0),)))


def test_impl_and_the_fused_epilogue_are_module_attributes():
    """The blocks hold the implementation and the epilogue switch; setting them on the encoder reaches every
    block, and forward takes only the data."""
    from skelemix.models.stgcn import GraphConv, STGCNBlock

    enc = STGCN(hidden_channels=4, hidden_dim=8, impl="eager")
    ops_modules = [m for m in enc.modules() if isinstance(m, (GraphConv, STGCNBlock))]
    assert len(ops_modules) == 20 and all(m.impl == "eager" for m in ops_modules)
    x = torch.randn(2, 3, 16, 25, 1)
    eager = enc.eval()(x)
    enc.impl, enc.fused_epilogue = "cpp", True
    assert all(m.impl == "cpp" for m in ops_modules) and all(b.fused for b in enc.blocks)
    torch.testing.assert_close(enc(x), eager, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="impl must be one of"):
        enc.impl = "fast"
    import copy

    twin = copy.deepcopy(enc)
    assert twin.impl == "cpp" and twin.blocks[3].gcn.impl == "cpp" and twin.blocks[3].fused


def test_objective_settings_have_their_names():
    from skelemix.models.skelemixclr import SwapRow

    model = SkeleMixCLR(**small_model(momentum=0.9, temperature=0.5, swap_params=[[2, 3, 1, 2, 3, 0.5]]))
    assert (model.queue_size, model.momentum, model.temperature) == (64, 0.9, 0.5)
    row = model.swap_params[0]
    assert isinstance(row, SwapRow) and row == (2, 3, 1, 2, 3, 0.5)
    assert (row.min_parts, row.max_parts, row.min_blocks, row.max_blocks, row.repeats, row.weight) == (2, 3, 1, 2, 3,
                                                                                                        0.5)
    assert model.mixers[0].spa_range == (2, 3) and model.mixers[0].tem_range == (1, 2)
    with pytest.raises(ValueError, match="swap_params repeat must be >= 1; got 0"):
        SkeleMixCLR(**small_model(swap_params=[[2, 3, 1, 2, 0, 1.0]]))
