"""The SkeleMixCLR objective (skelemix/models/skelemixclr.py) against an independent implementation of the released
loss written here from the algorithm, and the two properties a plausible bug breaks while the loss barely moves:
the logits read the queue as it was before the step (this step's keys are enqueued after them), and the extra
negative of the trimmed and truncated logits is a stop-gradient copy of the other view."""
import copy

import pytest
import torch
from torch import nn

from skelemix.models import SkeleMixCLR

N, D, K, TAU = 4, 8, 16, 0.2  # samples, feature size, queue length, temperature
SHAPE = (N, 3, 16, 25, 2)  # (N, C, T, V, M): 4 temporal blocks of 4 frames


def unit(f: torch.Tensor) -> torch.Tensor:
    return f / f.norm(dim=1, keepdim=True)


def nce(logits: torch.Tensor) -> torch.Tensor:
    """Mean over samples of -log softmax(logits)[:, 0]: the positive sits in column 0."""
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def released_objective(q, k, mixes, queue, weight, reduction, detach_extra=True):
    """The SkeleMixCLR+ loss of one query view with repeats r = 1..R, from unit features:

    ``L = w nce([q.k, q.Q] / tau) + w reduce_r (nce([p_r.k[partner_r], p_r.Q, p_r.sg(c_r)] / tau) / 2
                                                 + nce([c_r.k, c_r.Q, c_r.sg(p_r)] / tau) / 2)``

    with ``Q`` the queue before the step, ``sg`` stop-gradient and ``reduce`` the sum over repeats (the released
    code) or their mean. ``mixes``: ``(p, c, partner)`` per repeat. Returns ``(L, {term: mean over repeats})``.
    ``detach_extra=False`` is the bug this file guards against, for checking that the tests can see it."""
    def logits(f, positive, extra=None):
        cols = [torch.einsum("nd,nd->n", f, positive)[:, None], torch.einsum("nd,dk->nk", f, queue)]
        if extra is not None:
            cols.append(torch.einsum("nd,nd->n", f, extra.detach() if detach_extra else extra)[:, None])
        return torch.cat(cols, dim=1) / TAU

    loss_ins = nce(logits(q, k))
    loss_p = [nce(logits(p, k[partner], extra=c)) for p, c, partner in mixes]
    loss_c = [nce(logits(c, k, extra=p)) for p, c, _ in mixes]
    regional = sum(0.5 * (lp + lc) for lp, lc in zip(loss_p, loss_c))
    if reduction == "mean":
        regional = regional / len(mixes)
    terms = {"loss_ins": loss_ins, "loss_p": sum(loss_p) / len(mixes), "loss_c": sum(loss_c) / len(mixes)}
    return weight * loss_ins + weight * regional, terms


class Features(nn.Module):
    """An encoder stand-in that returns the given features in call order (the query's, then ``(p, c)`` per mixed
    batch), so a test owns every feature the objective sees. Its one parameter gives the momentum update work."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)
        self.weight = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, x, mask=None):
        return self.outputs.pop(0)


def model_with_features(repeats=2, weight=1.0, reduction="sum", mode="swap"):
    """A float64 model whose encoders return leaf features: ``(model, q, [(p, c)] * repeats, k, draws, x)``. The
    keys equal the queries, so a queue that already held them would put each positive among the negatives."""
    model = SkeleMixCLR(encoder=dict(hidden_channels=4, hidden_dim=16), feature_dim=D, queue_size=K,
                        temperature=TAU, swap_params=((2, 3, 1, 3, repeats, weight),), repeat_reduction=reduction,
                        mix=dict(mode=mode)).double()
    model.queue_ptr.fill_(8)  # mid-queue: the keys go to columns 8..11
    q = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    pcs = [tuple(torch.randn(N, D, dtype=torch.float64, requires_grad=True) for _ in "pc") for _ in range(repeats)]
    k = q.detach().clone()
    model.encoder_q = Features([q, *pcs])
    model.encoder_k = Features([k])
    x = torch.randn(SHAPE, dtype=torch.float64)
    draws = model.draw_mixes(x.shape, torch.Generator().manual_seed(1))
    return model, q, pcs, k, draws, x


def test_logits_read_the_queue_before_the_step():
    """Every term equals the one computed with the queue before the step, whose columns 8..11 then hold the
    keys. (With the keys enqueued first, each positive would also be a negative: the terms differ by about
    log 2 here, which the check below confirms is visible.)"""
    model, q, pcs, k, draws, x = model_with_features()
    before = model.queue.clone()
    out = model(x, x.clone(), mix_draws=draws)
    mixes = [(unit(p), unit(c), partner) for (p, c), partner in zip(pcs, draws[0]["partner"])]
    _, expected = released_objective(unit(q), unit(k), mixes, before, 1.0, "sum")
    for name, want in expected.items():
        torch.testing.assert_close(out[name], want, rtol=1e-12, atol=0, msg=f"{name}: not the pre-step queue's")

    after = before.clone()
    after[:, 8:12] = unit(k).T
    torch.testing.assert_close(model.queue, after, rtol=0, atol=1e-15)
    assert int(model.queue_ptr) == 12
    _, leaked = released_objective(unit(q), unit(k), mixes, after, 1.0, "sum")
    assert abs(leaked["loss_ins"] - expected["loss_ins"]) > 0.1, "the test could not tell the two queues apart"


def test_extra_negative_gets_no_gradient_zeros_mode():
    """Without a partner (mode "zeros") only the truncated term is formed, where p is nothing but the extra
    negative sg(p): no gradient may reach p, while c (the term's query) gets one."""
    model, q, pcs, k, draws, x = model_with_features(mode="zeros")
    model(x, x.clone(), mix_draws=draws)["loss"].backward()
    for p, c in pcs:
        assert p.grad is None or not p.grad.any(), "gradient through the stop-gradient extra negative"
        assert c.grad is not None and c.grad.abs().max() > 1e-3


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_extra_negative_gets_no_gradient(reduction):
    """The gradients reaching q, p and c equal those of the released loss, where each view enters the other's
    logits as a stop-gradient negative; without the stop-gradient they differ (checked, so the test can see it)."""
    model, q, pcs, k, draws, x = model_with_features(repeats=3, weight=0.75, reduction=reduction)
    before = model.queue.clone()
    leaves = [q, *(t for pc in pcs for t in pc)]
    got = torch.autograd.grad(model(x, x.clone(), mix_draws=draws)["loss"], leaves)

    def grads(detach_extra):
        mixes = [(unit(p), unit(c), partner) for (p, c), partner in zip(pcs, draws[0]["partner"])]
        loss, _ = released_objective(unit(q), unit(k), mixes, before, 0.75, reduction, detach_extra)
        return torch.autograd.grad(loss, leaves)

    want, bug = grads(True), grads(False)
    for name, g, w in zip(["q"] + [f"{v}{r}" for r in range(3) for v in "pc"], got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13, msg=f"gradient of {name}")
    assert max((a - b).abs().max() for a, b in zip(want, bug)) > 1e-3, "the test could not see a missing detach"


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_one_step_matches_an_independent_objective(reduction):
    """One SkeleMixCLR+ step in float64 with real encoders (3 mixed repeats, view weight 0.75, momentum 0.9,
    the queue pointer mid-queue): the loss and its terms, every gradient of encoder_q, the momentum-updated encoder_k and
    the queue after the step against the released objective computed here on a copy of the model. Only the
    encoders and the mixing are shared; dropout is off so both runs see the same network."""
    m, weight = 0.9, 0.75
    model = SkeleMixCLR(encoder=dict(hidden_channels=4, hidden_dim=16, dropout=0.0), feature_dim=D, queue_size=K,
                        momentum=m, temperature=TAU, swap_params=((2, 3, 1, 3, 3, weight),),
                        repeat_reduction=reduction).double()
    with torch.no_grad():  # encoder_k != encoder_q, so the momentum update shows
        for param in model.encoder_q.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.queue_ptr.fill_(8)
    twin = copy.deepcopy(model)
    x = torch.randn(SHAPE, dtype=torch.float64)
    key = x + 0.1 * torch.randn_like(x)
    draws = model.draw_mixes(x.shape, torch.Generator().manual_seed(1))

    out = model(x, key, mix_draws=draws)
    out["loss"].backward()

    queue = twin.queue.clone()
    with torch.no_grad():
        for pk, pq in zip(twin.encoder_k.parameters(), twin.encoder_q.parameters()):
            pk.copy_(m * pk + (1 - m) * pq)
    q = unit(twin.encoder_q(x))
    mixes = [(*(unit(f) for f in twin.encoder_q(mb.x, mb.mask)), mb.partner)
             for mb in twin.mixers[0].apply(x, draws[0])]
    with torch.no_grad():
        k = unit(twin.encoder_k(key))
    loss, terms = released_objective(q, k, mixes, queue, weight, reduction)
    loss.backward()

    torch.testing.assert_close(out["loss"], loss, rtol=1e-12, atol=0)
    for name, want in terms.items():
        torch.testing.assert_close(out[name], want, rtol=1e-12, atol=0, msg=name)
    torch.testing.assert_close(out["acc_ins"], (torch.einsum("nd,nd->n", q, k)[:, None] > q @ queue).all(1).double()
                               .mean().to(out["acc_ins"].dtype))
    scale = max(p.grad.abs().max().item() for p in twin.encoder_q.parameters())
    for (name, got), want in zip(model.encoder_q.named_parameters(), twin.encoder_q.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-12 * scale, msg=f"grad of {name}")
    for (name, got), want in zip(model.encoder_k.named_parameters(), twin.encoder_k.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15, msg=f"encoder_k {name}")
        assert got.grad is None, f"encoder_k {name} got a gradient"
    queue[:, 8:12] = k.T
    torch.testing.assert_close(model.queue, queue, rtol=1e-12, atol=1e-13)  # keys from lerp vs m * k + (1 - m) * q
    assert int(model.queue_ptr) == 12
