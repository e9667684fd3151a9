import pytest
import torch

from skelemix import reference
from skelemix.graph import NTU
from skelemix.mix import SkeleMix


def make(**kw):
    return SkeleMix(NTU.body_parts, NTU.num_joints, **kw)


def test_official_region_sizes_and_alignment():
    mixer = make()
    torch.manual_seed(0)
    seen_parts = set()
    for _ in range(200):
        mask = mixer.sample_mask(1, 16)[0]
        frames = mask.any(1)
        joints = mask.any(0)
        span = frames.nonzero().flatten()
        # 7..11 contiguous blocks, 2 or 3 whole body parts (8..17 joints), region = frames x joints.
        assert 7 <= frames.sum() <= 11 and span[-1] - span[0] + 1 == frames.sum()
        parts = [i for i, part in enumerate(NTU.body_parts) if joints[list(part)].all()]
        assert all(not joints[list(p)].any() for i, p in enumerate(NTU.body_parts) if i not in parts)
        assert len(parts) in (2, 3) and 8 <= joints.sum() <= 17
        assert torch.equal(mask, frames[:, None] & joints[None, :])
        seen_parts.add(len(parts))
    assert seen_parts == {2, 3}


def test_mixed_batch_is_the_partner_inside_the_region():
    torch.manual_seed(1)
    mixer = make()
    x = torch.randn(5, 3, 64, 25, 2)
    mb = mixer(x)
    assert mb.mask.shape == (1, 16, 25)
    region = mb.mask.repeat_interleave(4, dim=1)[0]  # frames at feature resolution x stride 4
    assert not (mb.partner == torch.arange(5)).any()
    expected = torch.where(region[None, None, :, :, None], x[mb.partner], x)
    assert torch.equal(mb.x, expected)
    joints, span = mb.mask[0].any(0), mb.mask[0].any(1).nonzero()[[0, -1], 0] + torch.tensor([0, 1])
    mixed, mask = reference.skelemix_gather(x, mb.partner[None], joints[None, None], span[None, None], 4)
    assert torch.equal(mb.x, mixed) and torch.equal(mask[0, :1], mb.mask)
    # Cells outside the region are untouched, inside they differ (random data).
    assert torch.equal(mb.x[:, :, ~region], x[:, :, ~region])
    assert not torch.equal(mb.x[:, :, region], x[:, :, region])


@pytest.mark.parametrize("partner", ["shift", "derangement"])
def test_partner_is_never_self(partner):
    mixer = make(partner=partner)
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 7, 32):
        for _ in range(20):
            idx = mixer.sample_partner(n, g)
            assert sorted(idx.tolist()) == list(range(n)) and not (idx == torch.arange(n)).any()
    with pytest.raises(ValueError, match="at least 2 samples"):
        mixer.sample_partner(1, g)


def test_shift_partner_covers_every_shift():
    mixer = make()
    g = torch.Generator().manual_seed(0)
    shifts = {int(mixer.sample_partner(4, g)[0]) for _ in range(200)}
    assert shifts == {1, 2, 3}  # the official code never drew N-1 (quirk 5)


def test_per_sample_regions_and_random_joints():
    mixer = make(per_sample=True, spatial_mode="random")
    g = torch.Generator().manual_seed(0)
    mask = mixer.sample_mask(8, 16, g)
    assert mask.shape == (8, 16, 25)
    joints = mask.any(1).sum(1)
    assert ((joints >= 10) & (joints <= 15)).all()
    assert len({m.flatten().nonzero().flatten().tolist().__str__() for m in mask}) > 1
    x = torch.randn(8, 3, 64, 25, 1)
    mb = mixer(x, g)
    region = mb.mask.repeat_interleave(4, dim=1)
    assert torch.equal(mb.x, torch.where(region[:, None, :, :, None], x[mb.partner], x))


def test_fill_modes_and_determinism():
    x = torch.randn(4, 3, 32, 25, 2)
    zeros = make(mode="zeros", tem_range=(2, 4))(x, torch.Generator().manual_seed(3))
    region = zeros.mask.repeat_interleave(4, dim=1)[0]
    assert zeros.partner is None and (zeros.x[:, :, region] == 0).all()
    a = make(mode="gaussian", tem_range=(2, 4))(x, torch.Generator().manual_seed(3))
    b = make(mode="gaussian", tem_range=(2, 4))(x, torch.Generator().manual_seed(3))
    assert torch.equal(a.x, b.x) and torch.equal(a.mask, zeros.mask)


def test_block_follows_the_encoder_stride_and_errors_are_named():
    with pytest.raises(ValueError, match="multiple of the encoder's temporal stride 4"):
        make()(torch.randn(4, 3, 62, 25, 1))
    with pytest.raises(ValueError, match="only 8 blocks"):
        make()(torch.randn(4, 3, 32, 25, 1))
    with pytest.raises(ValueError, match="mode must be one of"):
        make(mode="cutmix")
    with pytest.raises(ValueError, match="spa_range"):
        make(spa_range=(0, 2))
    mb = make(block=2, tem_range=(1, 3))(torch.randn(3, 3, 10, 25, 1))
    assert mb.mask.shape == (1, 5, 25)


def former_call(mixer, x, generator):
    """SkeleMix.__call__ as it was before the batched gather: one draw and one torch.where per mixed batch."""
    N, T = x.shape[0], x.shape[2]
    partner = mixer.sample_partner(N, generator)
    mask = mixer.sample_mask(N if mixer.per_sample else 1, T // mixer.block, generator)
    region = mask.repeat_interleave(mixer.block, dim=1)
    return torch.where(region[:, None, :, :, None], x[partner], x), mask, partner


@pytest.mark.parametrize("impl", ["eager", "auto"])  # auto = the C++ kernel when it is built
@pytest.mark.parametrize("kw", [{}, dict(per_sample=True, spatial_mode="random", partner="derangement")],
                         ids=["official", "per_sample"])
def test_batches_are_the_former_calls_in_a_row(kw, impl):
    """R mixed batches from one gather launch equal R former calls drawn from the same seed."""
    mixer = make(impl=impl, **kw)
    x = torch.randn(6, 3, 64, 25, 2)
    g_new, g = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    new = mixer.batches(x, 3, g_new)
    assert len(new) == 3
    for mb in new:
        mixed, mask, partner = former_call(mixer, x, g)
        assert torch.equal(mb.x, mixed) and torch.equal(mb.mask, mask) and torch.equal(mb.partner, partner)
    assert torch.equal(g_new.get_state(), g.get_state())  # the same number of draws: later draws agree too
    base = new[0].x._base  # every batch is a view of one (3 * N, ...) tensor
    assert base is not None and all(mb.x._base is base for mb in new)


def test_batches_with_fill_modes_match_single_calls():
    x = torch.randn(4, 3, 32, 25, 2)
    mixer = make(mode="gaussian", tem_range=(2, 4))
    many = mixer.batches(x, 2, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    for mb in many:
        one = mixer(x, g)
        assert mb.partner is None and torch.equal(mb.x, one.x) and torch.equal(mb.mask, one.mask)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        mixer.batches(x, 0)


def test_skelemixclr_step_is_unchanged_by_the_batched_gather():
    """A SkeleMixCLR+ step (3 repeats of a view, one gather launch) gives the loss and gradients of the former
    per-repeat mixing, for the same seed and batch."""
    import copy

    from skelemix.models import SkeleMixCLR

    torch.manual_seed(0)
    model = SkeleMixCLR(encoder=dict(hidden_channels=4, hidden_dim=16), feature_dim=8, queue_size=64,
                        swap_params=((2, 3, 7, 11, 3, 1.0),))
    former = copy.deepcopy(model)
    for mixer in former.mixers:
        def per_repeat(x, repeats, generator=None, mixer=mixer):
            from skelemix.mix import MixedBatch
            return [MixedBatch(*former_call(mixer, x, generator)) for _ in range(repeats)]
        mixer.batches = per_repeat
    q, k = torch.randn(4, 3, 64, 25, 2), torch.randn(4, 3, 64, 25, 2)
    results = []
    for m in (model, former):
        torch.manual_seed(1)  # dropout draws from the global RNG
        out = m(q, k, torch.Generator().manual_seed(11))
        out["loss"].backward()
        results.append((out, [p.grad for p in m.encoder_q.parameters()]))
    (new, new_grads), (old, old_grads) = results
    for key in ("loss", "loss_ins", "loss_p", "loss_c", "acc_ins"):
        assert torch.equal(new[key], old[key]), key
    assert all(torch.equal(a, b) for a, b in zip(new_grads, old_grads))
    assert torch.equal(model.queue, former.queue)
    torch.manual_seed(1)  # the mixing matters: other regions and partners give another loss
    assert not torch.equal(model(q, k, torch.Generator().manual_seed(12))["loss_p"], new["loss_p"])
