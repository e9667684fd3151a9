"""skelemix.ops.bn_epilogue: every implementation against the eager reference, the Philox dropout mask, its PT2
surface, errors, and the fused ST-GCN block against the plain modules."""
import copy

import pytest
import torch
from torch import nn

from skelemix import reference
from skelemix.models.stgcn import STGCN, batch_norm_epilogue, init_weights
from skelemix.ops import bn_epilogue
from skelemix.testing import (DTYPES, LOW_PRECISION, assert_at_most_twice_eager, assert_close_scaled,
                              assert_close_verbose, compile_backend, grads, impl_cases, leaves, opcheck,
                              poison_allocator, raw_ops, sample_inputs_bn_epilogue, tolerances)

NAMES = ("x", "weight", "bias", "residual")
OPS = ("bn_epilogue", "_bn_epilogue_backward")  # the raw ops: forward, backward


def call(args, impl):
    """skelemix.ops.bn_epilogue on a sample's ``(x, weight, bias, residual, stats_mean, stats_var, seed, eps, p,
    relu)``."""
    return bn_epilogue(*args[:6], seed=args[6], eps=args[7], p=args[8], relu=args[9], impl=impl)


# ---------------------------------------------------------------------------------------------------- the mask

U32 = 0xFFFFFFFF
# Seeds with both 32-bit halves random, all ones (-2: high half 0xFFFFFFFF), a zero high half, the sign bit alone.
SEEDS = [0x0123456789ABCDEF, -2, 2**32 - 1, -2**63, 7]


def philox_python(counter, key, rounds=10):
    """Philox4x32 on Python integers, written as Random123's philox.h runs it: the key is bumped before each round
    but the first, and a round maps (c0, c1, c2, c3) to (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1,
    lo(M0 c0))."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & U32, (k1 + 0xBB67AE85) & U32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & U32, (p0 >> 32) ^ c3 ^ k1, p0 & U32
    return c0, c1, c2, c3


def keep_python(seed: int, index: int, p: float) -> bool:
    """The specified mask: word 0 of Philox4x32-10, key = the seed's 32-bit halves, counter = (index's, 0, 0)."""
    s = seed & (2**64 - 1)
    return philox_python((index & U32, index >> 32, 0, 0), (s & U32, s >> 32))[0] >= reference.dropout_threshold(p)


# Random123's tests/kat_vectors, its three "philox4x32 10" lines: counter, key, output.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((U32, U32, U32, U32), (U32, U32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS, ids=["zeros", "ones", "pi"])
def test_philox_known_answers(counter, key, expected):
    assert philox_python(counter, key) == expected
    words = reference.philox4x32([torch.tensor([c]) for c in counter], [torch.tensor(k) for k in key])
    assert tuple(int(w) for w in words) == expected


def test_reference_philox_matches_python_integers():
    """The int64 emulation of uint32 arithmetic (16-bit halves in the multiplies) against exact integers."""
    g = torch.Generator().manual_seed(0)
    counters = torch.randint(0, 2**32, (4, 1000), generator=g)
    keys = torch.randint(0, 2**32, (2, 1000), generator=g)
    counters[:, :4] = torch.tensor([0, U32, 0x80000000, 0xFFFF])  # columns at the extremes of the 16-bit split
    keys[:, :4] = torch.tensor([U32, 0, U32, 1])
    got = torch.stack(reference.philox4x32(list(counters), list(keys))).T.tolist()
    want = [list(philox_python(c, k)) for c, k in zip(counters.T.tolist(), keys.T.tolist())]
    assert got == want


def test_dropout_keep_is_philox_of_seed_and_index():
    """reference.dropout_keep against the specification at offsets crossing 2**32 (high counter word 0 -> 1)."""
    for seed in SEEDS:
        for offset in (0, 2**32 - 40, 3 * 2**32 + 5, 2**62):
            for p in (0.1, 0.5):
                keep = reference.dropout_keep(torch.tensor([seed]), (4, 20), p, offset=offset)
                want = [keep_python(seed, i, p) for i in range(offset, offset + 80)]
                assert keep.flatten().tolist() == want, f"seed {seed:#x} offset {offset:#x} p {p}"


# Flat index ranges (start, numel) of the mask checks: across 2**32 (high counter word 0 -> 1) and 5 * 2**32,
# near 2**62, and empty; then 256 random single indices below 2**62.
RANGES = [(0, 1000), (2**32 - 300, 777), (5 * 2**32 - 64, 128), (2**62, 300), (17, 0)]


def kernel_keep(impl, device, seed, ranges, p):
    """The kernels' dropout decisions at the flat index ranges, as their passes compute them."""
    if impl == "triton":
        from skelemix.kernels import bn_epilogue as kernels

        index = torch.cat([torch.arange(start, start + numel) for start, numel in ranges]).to(device)
        return kernels.dropout_keep(seed, index, p).cpu()
    return torch.cat([torch.ops.skelemix._bn_epilogue_dropout_keep(seed, start, numel, p).cpu()
                      for start, numel in ranges])


@pytest.mark.parametrize("impl, device", impl_cases())
def test_kernel_mask_matches_reference_across_2_32(impl, device):
    """The kernels' mask (through the functions their passes use) equals the reference's bit for bit, also where
    the element index crosses a multiple of 2**32, which no test tensor is large enough to reach."""
    ranges = RANGES + [(int(i), 1) for i in torch.randint(0, 1 << 62, (256,))]
    for seed in SEEDS:
        for p in (0.0, 0.1, 0.3, 0.5, 0.9):
            got = kernel_keep(impl, device, torch.tensor([seed], device=device), ranges, p)
            want = torch.cat([reference.dropout_keep(torch.tensor([seed]), (numel,), p, offset=start)
                              for start, numel in ranges])
            assert torch.equal(got, want), f"seed {seed:#x} p {p}"


def test_related_seeds_give_unrelated_masks():
    """Masks of seeds that differ in a few low bits or by 2**32, lined up by the index map that would make them
    copies, agree on about half the elements at p = 0.5, as independent masks do. The first mask, a hash of
    (index ^ low seed word) and (high index word + high seed word), failed this: there seed ^ d gave the mask of
    seed with element i moved to i ^ d, and seed + 2**32 the mask of seed shifted by 2**32 elements."""
    n, p, seed = 4096, 0.5, 0x0123456789ABCDEF
    index = torch.arange(n)
    base = reference.dropout_keep(torch.tensor([seed]), (n,), p)
    pairs = {f"seed ^ {d:#x}": (reference.dropout_keep(torch.tensor([seed ^ d]), (n,), p), base[index ^ d])
             for d in (1, 2, 0x10, 0xFFF)}
    pairs["seed + 2**32"] = (reference.dropout_keep(torch.tensor([seed + 2**32]), (n,), p),
                             reference.dropout_keep(torch.tensor([seed]), (n,), p, offset=2**32))
    for name, (mask, moved) in pairs.items():
        agree = (mask == moved).double().mean().item()
        assert 0.45 < agree < 0.55, f"{name}: the masks agree on {agree:.3f} of the elements (independent: 0.5)"


def test_dropout_keep_rate_and_seeds():
    shape = (8, 16, 32, 25)
    for p in (0.1, 0.5, 0.9):
        rate = reference.dropout_keep(torch.tensor([11]), shape, p).double().mean().item()
        assert abs(rate - (1 - p)) < 0.01, f"p={p}: keep rate {rate}"
    a = reference.dropout_keep(torch.tensor([1]), shape, 0.5)
    b = reference.dropout_keep(torch.tensor([2]), shape, 0.5)
    agree = (a == b).double().mean().item()
    assert 0.48 < agree < 0.52, f"masks of two seeds agree on {agree:.3f} of the elements (independent: 0.5)"
    assert reference.dropout_keep(torch.tensor([3]), shape, 0.0).all()


# ---------------------------------------------------------------------------------------------------- parity


def assert_dropout_mask(y, args, name):
    """Where no ReLU follows, an element is dropped exactly when y equals the residual (0 without one): the
    kernel's Philox mask must be the reference's bit for bit. A kept element smaller than the rounding of the
    residual in y's dtype equals it too (fp16/bf16): those few are left out."""
    x, res, seed, p, relu = args[0], args[3], args[6], args[8], args[9]
    if p == 0 or relu or y.numel() == 0:
        return
    keep = reference.dropout_keep(seed.cpu(), x.shape, p)
    base = torch.zeros(y.shape, dtype=torch.float64) if res is None else res.detach().double().cpu()
    dropped = y.detach().double().cpu() == base
    exact = [a.detach().cpu().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    kept_value = reference.bn_epilogue(*exact[:3], None, *exact[4:6], seed.cpu(), *args[7:])[0]  # float64, no residual
    tiny = keep & (kept_value.abs() <= torch.finfo(y.dtype).eps * base.abs())
    assert torch.equal(dropped[~tiny], ~keep[~tiny]), (
        f"{name}: {int((dropped[~tiny] == keep[~tiny]).sum())} dropout decisions differ")


@pytest.mark.parametrize("impl, device, dtype", impl_cases(dtypes=DTYPES))
def test_forward_matches_reference(impl, device, dtype):
    rtol, atol = tolerances(dtype)
    stats_rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, args in sample_inputs_bn_epilogue(device, dtype):
        poison_allocator(args[0].numel(), dtype, device)
        y, mean, var = call(args, impl)
        ey, emean, evar = reference.bn_epilogue(*args)
        assert_close_verbose(y, ey, rtol, atol, name=f"{name} y")
        if args[4] is None:  # batch statistics: returned, never differentiable
            assert_close_verbose(mean, emean, stats_rtol, 1e-7, name=f"{name} mean")
            assert_close_verbose(var, evar, stats_rtol, 1e-7, name=f"{name} var")
        else:
            assert mean.shape == var.shape == (0,), name
        assert not mean.requires_grad and not var.requires_grad, name
        assert_dropout_mask(y, args, name)


@pytest.mark.parametrize("impl, device, dtype", impl_cases(dtypes=DTYPES))
def test_backward_matches_reference(impl, device, dtype):
    rtol, atol = tolerances(dtype)
    if dtype in LOW_PRECISION:
        rtol, atol = rtol * 5, atol * 5  # the reference rounds x - mean and xhat in 16 bits; the kernels do not
    for name, args in sample_inputs_bn_epilogue(device, dtype, requires_grad=True):
        y, _, _ = call(args, impl)
        ey, _, _ = reference.bn_epilogue(*args)
        grad_out = torch.randn(y.shape[::-1], device=device, dtype=dtype).permute(*range(y.dim() - 1, -1, -1))
        for arg_name, g, e in zip(NAMES, grads(y, args[:4], grad_out), grads(ey, args[:4], grad_out)):
            assert (g is None) == (e is None), f"{name}: grad_{arg_name} presence differs"
            if e is not None:
                scale = max(e.abs().max().item(), 1.0) if e.numel() else 1.0
                assert_close_verbose(g, e, rtol, atol * scale, name=f"{name} grad_{arg_name}")


@pytest.mark.parametrize("impl, device, dtype", impl_cases(dtypes=LOW_PRECISION))
def test_low_precision_error_at_most_twice_eager(impl, device, dtype):
    """y and grad_x/grad_residual are rounded to dtype once; grad_weight/grad_bias stay fp32. Against a float64
    oracle, with an atol of 1e-3 x the oracle's largest entry."""
    for name, args in sample_inputs_bn_epilogue(device, torch.float32, requires_grad=True):
        a64, a, ae = leaves(args, torch.float64), leaves(args, dtype, cast=(0, 3)), leaves(args, dtype, cast=(0, 3))
        grad = torch.randn(args[0].shape, device=device)
        (oracle, *_), (y, mean, _), (eager, eager_mean, _) = reference.bn_epilogue(*a64), call(a, impl), \
            reference.bn_epilogue(*ae)
        assert y.dtype == dtype and mean.dtype == torch.float32, name
        assert_at_most_twice_eager(y, eager, oracle, 1e-3 * oracle.abs().max().item() if y.numel() else 0.0,
                                   f"{name} {dtype} y")
        if a[4] is None:  # the statistics of the same rounded x
            assert_close_verbose(mean, eager_mean, 1e-5, 1e-6, name=f"{name} {dtype} mean")
        assert_dropout_mask(y, a, f"{name} {dtype}")
        for arg_name, g, e, r in zip(NAMES, grads(y, a[:4], grad.to(dtype)), grads(eager, ae[:4], grad.to(dtype)),
                                     grads(oracle, a64[:4], grad.double())):
            if r is None:
                continue
            assert g.dtype == e.dtype, f"{name} grad {arg_name}"
            assert_at_most_twice_eager(g, e, r, 1e-3 * r.abs().max().item() if r.numel() else 0.0,
                                       f"{name} {dtype} grad {arg_name}")


@pytest.mark.needs_impl("cpp")
@pytest.mark.parametrize("case", range(8))
def test_gradcheck_float64(case):
    name, args = sample_inputs_bn_epilogue("cpu", torch.float64, requires_grad=True)[case]
    differentiable = [a for a in args[:4] if a is not None]

    def fn(*tensors):
        full = list(tensors) + [None] * (4 - len(tensors)) if args[3] is None else list(tensors)
        return bn_epilogue(*full, *args[4:6], seed=args[6], eps=args[7], p=args[8], relu=args[9], impl="cpp")[0]

    assert torch.autograd.gradcheck(fn, differentiable, eps=1e-6, atol=1e-6), name


@pytest.mark.parametrize("impl, device", impl_cases(("cpp", "triton"), devices=("cpu",)))
@pytest.mark.parametrize("wanted", range(1, 16), ids=lambda w: "+".join(n for i, n in enumerate(NAMES) if w >> i & 1))
def test_every_subset_of_requires_grad(wanted, impl, device):
    """Each gradient is computed only when asked for, and every combination matches the reference."""
    dtype = torch.float32 if impl == "triton" else torch.float64  # Triton refuses float64
    base = sample_inputs_bn_epilogue(device, dtype)[1].args  # batch statistics, dropout, residual
    args = [a.detach().clone().requires_grad_(bool(wanted >> i & 1)) if i < 4 else a for i, a in enumerate(base)]
    y = call(args, impl)[0]
    grad_out = torch.randn_like(y)
    rtol = tolerances(dtype)[0]
    for arg_name, g, e in zip(NAMES, grads(y, args[:4], grad_out), grads(reference.bn_epilogue(*args)[0], args[:4],
                                                                            grad_out)):
        assert (g is None) == (e is None), f"grad_{arg_name} presence differs"
        if e is not None:
            assert_close_scaled(g, e, rtol, f"grad_{arg_name}", atol=1e-12 if dtype == torch.float64 else 0.0)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("impl, device", impl_cases())
def test_opcheck(impl, device, requires_grad):
    forward, backward = raw_ops(impl, *OPS)
    for name, args in sample_inputs_bn_epilogue(device, torch.float32, requires_grad=requires_grad):
        if args[0].numel() == 0 or not args[0].is_contiguous():
            continue
        opcheck(forward.default, args)
        x, weight, _, _, stats_mean, stats_var, seed, eps, p, relu = args
        y, mean, var = forward(*args)
        if stats_mean is not None:
            mean, var = stats_mean, stats_var
        opcheck(backward.default, (torch.randn_like(y), x.detach(), y.detach(), weight.detach(), mean.detach(),
                                   var.detach(), seed, eps, p, relu, stats_mean is None, [True, True, True, True]))


@pytest.mark.parametrize("impl, device", impl_cases(("cpp", "triton"), devices=("cpu",)))
@pytest.mark.parametrize("index", [1, 2], ids=["batch", "fixed"])  # both with dropout and a residual
def test_backward_output_mask(impl, device, index):
    """Each output of the backward op alone equals the full call's (the kernels run in other combinations:
    grad_residual from the reduction or from the elementwise pass); unrequested outputs are empty."""
    forward, backward = raw_ops(impl, *OPS)
    x, weight, bias, res, stats_mean, stats_var, seed, eps, p, relu = sample_inputs_bn_epilogue(device)[index].args
    y, mean, var = forward(x, weight, bias, res, stats_mean, stats_var, seed, eps, p, relu)
    if stats_mean is not None:
        mean, var = stats_mean, stats_var
    grad = torch.randn_like(x)
    full = backward(grad, x, y, weight, mean, var, seed, eps, p, relu, stats_mean is None, [True] * 4)
    for mask in ([True, False, False, False], [False, True, False, False], [False, False, True, False],
                 [False, False, False, True], [False, True, False, True], [True, False, True, True]):
        for i, (out, want) in enumerate(zip(backward(grad, x, y, weight, mean, var, seed, eps, p, relu,
                                                     stats_mean is None, mask), full)):
            if mask[i]:
                assert torch.equal(out, want), f"{mask}: output {i}"
            else:
                assert out.shape == (0,), f"{mask}: unrequested output {i} has shape {tuple(out.shape)}"


@pytest.mark.parametrize("impl, device", impl_cases())
def test_compile_fullgraph(impl, device):
    """Dynamo traces forward and backward without graph breaks, with batch and with fixed statistics."""
    for name, args in sample_inputs_bn_epilogue(device, torch.float32, requires_grad=True)[1:3]:

        def fn(x, weight, bias, residual, args=args):
            y, mean, _ = bn_epilogue(x, weight, bias, residual, *args[4:6], seed=args[6], p=0.5, impl=impl)
            return y.square().sum(), mean

        compiled = torch.compile(fn, fullgraph=True, backend=compile_backend(impl))
        (loss, mean), (want_loss, want_mean) = compiled(*args[:4]), fn(*args[:4])
        actual, expected = torch.autograd.grad(loss, args[:4]), torch.autograd.grad(want_loss, args[:4])
        assert_close_scaled(loss, want_loss, 1e-5, f"{name} compiled loss")
        for n, a, e in zip(NAMES, actual, expected):
            assert_close_scaled(a, e, 1e-5, f"{name} compiled grad_{n}")
        assert torch.equal(mean, want_mean), name


@pytest.mark.parametrize("impl, device", impl_cases(("cpp", "triton"), devices=("cpu",)))
def test_double_backward_raises(impl, device):
    args = sample_inputs_bn_epilogue(device, torch.float32, requires_grad=True)[0].args
    y = call(args, impl)[0]
    (g,) = torch.autograd.grad(y.square().sum(), args[0], create_graph=True)
    forward, _ = raw_ops(impl, *OPS)
    with pytest.raises(NotImplementedError, match=f"{forward.default.name()} does not support double backward"):
        g.sum().backward()


@pytest.mark.parametrize("impl, device", impl_cases(devices=("cuda",)))
def test_cuda_graph_capture(impl, device):
    """The seed is read on the device (no .item()): forward and backward replay in a CUDA graph, and a new seed
    copied into the captured tensor gives the new mask."""
    args = leaves(sample_inputs_bn_epilogue(device)[3].args, requires_grad=True)  # dropout, residual, no ReLU
    x, seed = args[0], args[6]
    side = torch.cuda.Stream()  # warm up (compile every kernel) on a side stream, as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.autograd.grad(call(args, impl)[0].square().sum(), x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, _, _ = call(args, impl)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
    for value in (12345, -987654321987):
        seed.fill_(value)
        graph.replay()
        want_y = reference.bn_epilogue(*args)[0]
        (want_gx,) = torch.autograd.grad(want_y.square().sum(), x)
        assert_close_scaled(y, want_y, 1e-5, f"seed {value} y")
        assert_close_scaled(gx, want_gx, 1e-5, f"seed {value} grad x")
        assert_dropout_mask(y, args, f"seed {value}")


# ---------------------------------------------------------------------------------------------------- NaN


def assert_close_with_nans(actual, expected, rtol, atol, name):
    """NaN exactly where ``expected`` has NaN, and close elsewhere."""
    got_nan, want_nan = actual.isnan().cpu(), expected.isnan().cpu()
    if not torch.equal(got_nan, want_nan):
        first = tuple((got_nan != want_nan).nonzero()[0].tolist())
        raise AssertionError(f"{name}: {int(got_nan.sum())} NaNs, expected {int(want_nan.sum())}; first differing "
                             f"index {first}")
    assert_close_verbose(actual.masked_fill(actual.isnan(), 0), expected.masked_fill(expected.isnan(), 0), rtol, atol,
                         name=name)


@pytest.mark.parametrize("where, fixed, p, relu", [("x", False, 0.3, True), ("x", True, 0.3, True),
                                                   ("residual", False, 0.0, True), ("residual", True, 0.5, True),
                                                   ("x", False, 0.5, False)])
@pytest.mark.parametrize("impl, device", impl_cases())
def test_nan_reaches_output_and_gradients(impl, device, where, fixed, p, relu):
    """A NaN in x or the residual reaches y and the gradients exactly as in the eager reference, so a diverging
    run stays visible to the trainer's finiteness check: the ReLU passes NaN (a max with 0 would give 0, as
    tl.maximum does) and passes the gradient where y is NaN (as torch.relu's backward: only y <= 0 is clamped).
    With batch statistics one NaN in x makes its whole channel NaN."""
    x = torch.randn(3, 4, 5, 6, device=device)
    res = torch.randn_like(x)
    (x if where == "x" else res)[1, 2, 3, 4] = float("nan")
    stats = (torch.randn(4, device=device), torch.rand(4, device=device) + 0.5) if fixed else (None, None)
    seed = torch.tensor([0x0123456789ABCDEF], device=device)
    inputs = [a.requires_grad_() for a in (x, torch.rand(4, device=device) + 0.5, torch.randn(4, device=device), res)]
    args = (*inputs, *stats, seed, 1e-5, p, relu)
    y = bn_epilogue(*args[:6], seed=seed, p=p, relu=relu, impl=impl)[0]
    want = reference.bn_epilogue(*args)[0]
    assert bool(want.isnan().any()), "the case must put a NaN into y"
    assert_close_with_nans(y, want, 1e-5, 1e-5, "y")
    grad_out = torch.randn_like(y)
    for name, g, e in zip(NAMES, grads(y, args[:4], grad_out), grads(want, args[:4], grad_out)):
        assert_close_with_nans(g, e, 1e-4, 1e-4 * max(e.nan_to_num().abs().max().item(), 1.0), f"grad_{name}")


# ------------------------------------------------------------------------------ the CUDA kernels' reductions


def reduction_threads(n: int) -> int:
    """csrc/cuda/helpers.cuh's reduction_threads: a whole number of warps, 32 to 256."""
    return min(max(-(-n // 32) * 32, 32), 256)


def channel_reduce_emulated(rows, merge, empty):
    """The order in which the channel kernels of csrc/cuda/bn_epilogue_kernel.cu combine each channel's N row
    partials, on the CPU and vectorised over the channels. rows: one (C, N) tensor per component of a partial;
    merge(a, b) combines two partials; empty is the partial of no row. Thread t of T = reduction_threads(N) takes
    rows t, t + T, ... in order; a warp combines its 32 threads by a shuffle tree in which lane l takes lane l + k
    for k = 16, 8, 4, 2, 1 (a lane whose partner is past the warp keeps its value); warp 0 combines the warps'
    results by the same tree, padded with empty partials."""
    N = rows[0].shape[1]
    T = reduction_threads(N)
    threads = []
    for t in range(T):
        acc = empty
        for n in range(t, N, T):
            acc = merge(acc, tuple(r[:, n] for r in rows))
        threads.append(acc)

    def warp(lanes):
        for k in (16, 8, 4, 2, 1):
            lanes = [merge(lanes[l], lanes[l + k]) if l + k < 32 else lanes[l] for l in range(32)]
        return lanes[0]

    warps = [warp(threads[w:w + 32]) for w in range(0, T, 32)]
    return warp(warps + [empty] * (32 - len(warps)))


def merge_moments(a, b):
    """The kernel's merge(): Chan et al.'s merge of (count, mean, M2); an empty side leaves the other as it is."""
    (ca, ma, qa), (cb, mb, qb) = a, b
    count, delta = ca + cb, mb - ma
    share_b = cb / count.clamp(min=1)
    merged = (count, ma + delta * share_b, qa + qb + delta * delta * (ca * share_b))
    return tuple(torch.where(cb == 0, u, torch.where(ca == 0, v, w)) for u, v, w in zip(a, b, merged))


def row_moments_emulated(x):
    """The row kernel's (mean, M2) of every row of x (N, C, L) as (C, N) float64: both passes over x - shift
    (the row's first element) in x's accumulation dtype, the mean shift + offset in double."""
    rows = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32).transpose(0, 1)
    d = rows - rows[..., :1]
    offset = d.sum(-1) / rows.shape[-1]
    m2 = (d - offset[..., None]).square().sum(-1)
    return rows[..., 0].double() + offset.double(), m2.double()


@pytest.mark.parametrize("N", [1, 5, 31, 32, 33, 257, 600])
def test_cuda_reduction_order_emulated(N):
    """The CUDA kernels' statistics and channel sums, replayed on the CPU in their fixed order: every row is
    counted once (exact with float64 rows and integer sums), and with the float32 row passes the kernel runs the
    statistics of data whose mean is 1000 x its spread keep float32 accuracy relative to the spread, as the CPU
    kernel's shifted double sums do (a float32 row mean without the shift loses three digits there)."""
    C, L = 3, 7
    x = (1000 + torch.randn(N, C, L, dtype=torch.float64)).float()
    want_var, want_mean = torch.var_mean(x.double(), dim=[0, 2], correction=0)
    count = torch.full((C, N), float(L), dtype=torch.float64)
    empty = tuple(torch.zeros(C, dtype=torch.float64) for _ in range(3))

    total, mean, m2 = channel_reduce_emulated((count, *row_moments_emulated(x.double())), merge_moments, empty)
    assert total.tolist() == [N * L] * C
    assert_close_verbose(mean, want_mean, 1e-14, 0, name="mean, float64 rows")
    assert_close_verbose(m2 / total, want_var, 1e-11, 0, name="var, float64 rows")

    row_mean, row_m2 = row_moments_emulated(x)
    _, mean, m2 = channel_reduce_emulated((count, row_mean, row_m2), merge_moments, empty)
    assert_close_verbose(mean, want_mean, 0, 2e-7, name="mean, float32 rows")  # the spread is 1
    assert_close_verbose(m2 / total, want_var, 1e-6, 0, name="var, float32 rows")
    plain_row_mean = (x.transpose(0, 1).sum(-1) / L).double()  # without the shift: 1e-5 off, this test fails
    _, plain_mean, _ = channel_reduce_emulated((count, plain_row_mean, row_m2), merge_moments, empty)
    assert (plain_mean - want_mean).abs().max() > 2e-7, "the data must defeat a float32 mean"

    parts = torch.randint(-2**20, 2**20, (2, C, N), dtype=torch.float64)  # exact sums: a lost row would show
    sums = channel_reduce_emulated(tuple(parts), lambda a, b: (a[0] + b[0], a[1] + b[1]), empty[:2])
    assert torch.equal(torch.stack(sums), parts.sum(-1))


# Shapes that run every loop of the CUDA kernels: channels past the grid's 65535 blocks (channel and row kernels,
# and the elementwise kernels' channel loop at one channel per block), samples past it (row kernels, elementwise
# sample loop), a row longer than 65535 blocks of 256 (elementwise cell loop), batch sizes around a channel
# kernel's warps (not a multiple of 32, more than its 256 threads), one cell per row and an empty batch.
CUDA_SHAPES = [(3, 70000, 5), (1, 70000, 256), (70000, 1, 256), (1, 1, 65535 * 256 + 77), (37, 3), (300, 5, 7),
               (33, 6, 25, 3), (0, 4, 5)]


@pytest.mark.needs_cuda
@pytest.mark.needs_impl("cuda")
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_kernels_cover_large_and_odd_shapes(shape):
    """impl=cuda on those shapes (batch statistics, residual, dropout; no ReLU, whose clamp at 0 would make the
    comparison with float64 flip on rounding) against the float64 reference: y, statistics and every gradient;
    and a second call gives the same bits (fixed-order reductions)."""
    C = shape[1]
    x = 3 + 2 * torch.randn(shape, device="cuda")
    args = [x, torch.rand(C, device="cuda") + 0.5, torch.randn(C, device="cuda"), torch.randn_like(x)]
    seed = torch.tensor([0x0123456789ABCDEF], device="cuda")
    grad_out = torch.randn_like(x)

    def run(impl, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        y, mean, var = bn_epilogue(*leaves, seed=seed, p=0.3, relu=False, impl=impl)
        return (y, mean, var, *torch.autograd.grad(y, leaves, grad_out.to(y.dtype)))

    got = run("cuda", args)
    want = list(run("eager", [a.double() for a in args]))
    if x.numel() == 0:  # grad_weight: the kernels' sum over no element is 0; eager multiplies it by the NaN invstd
        want[4] = torch.zeros_like(want[4])
    names = ("y", "mean", "var", *(f"grad_{n}" for n in NAMES))
    for name, g, e in zip(names, got, want):
        scale = e.nan_to_num().abs().max().item() if e.numel() else 0.0
        assert_close_with_nans(g.double(), e, 1e-4, 1e-4 * max(scale, 1.0), name)
    for name, a, b in zip(names, got, run("cuda", args)):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"{name} differs between two identical calls"


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("impl", ["eager", pytest.param("cpp", marks=pytest.mark.needs_impl("cpp"))])
def test_errors_name_the_argument(impl):
    x = torch.randn(2, 3, 4, 5)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    cases = [
        (dict(weight=torch.rand(4)), ValueError, r"weight must have shape \(3,\).*got shape \[4\]"),
        (dict(weight=w.double()), TypeError, "weight must be torch.float32.*got torch.float64"),
        (dict(bias=b.half()), TypeError, "bias must be torch.float32"),
        (dict(residual=torch.randn(2, 3, 4, 6)), ValueError, r"residual must have the shape of x \[2, 3, 4, 5\]"),
        (dict(stats_mean=torch.zeros(3)), ValueError, "stats_mean and stats_var must both be given"),
        (dict(p=1.0), ValueError, r"p \(dropout probability\) must be in \[0, 1\); got 1.0"),
        (dict(p=0.5, seed=torch.tensor([1.0])), TypeError, "seed must be an int64 tensor of one element"),
        (dict(x=torch.randn(3)), ValueError, r"x must be at least 2-D \(N, C, \*\); got shape \[3\]"),
    ]
    for change, exc, message in cases:
        kwargs = dict(x=x, weight=w, bias=b, impl=impl) | change
        with pytest.raises(exc, match=f"skelemix.ops.bn_epilogue: {message}"):
            bn_epilogue(**kwargs)


def _valid_args():
    """(x, weight, bias, residual, stats_mean, stats_var, seed, eps, p, relu) of a batch-statistics call."""
    x = torch.randn(3, 3, 25, 7)
    return (x, torch.rand(3) + 0.5, torch.randn(3), torch.randn_like(x), None, None, torch.tensor([7]), 1e-5, 0.3,
            True)


RAW_BAD = [
    pytest.param(lambda a: (a[0][0, 0, 0], *a[1:]), r"x must be at least 2-D \(N, C, \*\); got shape \[7\]", id="x_1d"),
    pytest.param(lambda a: (a[0], a[1][:2], *a[2:]), r"weight must have shape \(3,\) \(the channels of x", id="weight"),
    pytest.param(lambda a: (*a[:2], a[2].double(), *a[3:]), r"bias must be (torch\.float32|Float) .* got "
                 r"(torch\.float64|Double)", id="bias_dtype"),
    pytest.param(lambda a: (*a[:3], a[3][:1], *a[4:]), r"residual must have the shape of x \[3, 3, 25, 7\]",
                 id="residual_shape"),
    pytest.param(lambda a: (*a[:4], a[1], None, *a[6:]), "stats_mean and stats_var must both be given", id="stats"),
    pytest.param(lambda a: (*a[:6], a[6].int(), *a[7:]), r"seed must be an int64 tensor of one element; got "
                 r"(torch\.int32|Int)", id="seed_int32"),
    pytest.param(lambda a: (*a[:7], -1.0, *a[8:]), "eps must be >= 0", id="eps"),
    pytest.param(lambda a: (*a[:8], 1.0, a[9]), r"p \(dropout probability\) must be in \[0, 1\); got 1(\.0)?$", id="p"),
]


@pytest.mark.parametrize("bad, match", RAW_BAD)
@pytest.mark.parametrize("impl, device", impl_cases(("cpp", "triton"), devices=("cpu",)))
def test_raw_op_errors(impl, device, bad, match):
    """The C++ op and the Triton op, called directly, give the wrapper's named errors."""
    forward, _ = raw_ops(impl, *OPS)
    with pytest.raises(RuntimeError, match=f"{forward.default.name()}: " + match):
        forward(*bad(_valid_args()))


@pytest.mark.parametrize("impl, device", impl_cases(("cpp", "triton"), devices=("cpu",)))
def test_raw_backward_errors(impl, device):
    x, w, b, seed = torch.randn(2, 3, 4, 5), torch.rand(3), torch.randn(3), torch.zeros(1, dtype=torch.int64)
    _, backward = raw_ops(impl, *OPS)
    with pytest.raises(RuntimeError, match=f"{backward.default.name()}: grad must have the shape of x"):
        backward(torch.randn(2, 3, 4), x, x, w, b, w, seed, 1e-5, 0.0, True, True, [True, True, True, True])


@pytest.mark.needs_impl("cpp")
def test_dropout_keep_op_checks_its_arguments():
    seed = torch.zeros(1, dtype=torch.int64)
    keep_op = torch.ops.skelemix._bn_epilogue_dropout_keep
    with pytest.raises(RuntimeError, match=r"_bn_epilogue_dropout_keep: start and numel must be >= 0 .* got start -1"):
        keep_op(seed, -1, 5, 0.5)
    with pytest.raises(RuntimeError, match=r"_bn_epilogue_dropout_keep: start and numel .* numel -5"):
        keep_op(seed, 0, -5, 0.5)
    with pytest.raises(RuntimeError, match=r"_bn_epilogue_dropout_keep: start and numel .*start \+ numel < 2\*\*63"):
        keep_op(seed, 2**62, 2**62, 0.5)
    with pytest.raises(RuntimeError, match=r"_bn_epilogue_dropout_keep: p \(dropout probability\) must be in"):
        keep_op(seed, 0, 5, 1.0)
    with pytest.raises(RuntimeError, match="_bn_epilogue_dropout_keep: seed must be an int64 tensor of one element"):
        keep_op(torch.zeros(2, dtype=torch.int64), 0, 5, 0.5)


@pytest.mark.parametrize("impl, device", impl_cases(("triton",)))
def test_triton_refuses_float64(impl, device):
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in _valid_args()]
    message = "impl='triton' takes float32, float16 or bfloat16 x; got torch.float64"
    with pytest.raises(RuntimeError, match=message):  # the wrapper's checks pass: float64 weight, bias, residual
        call([a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args], impl)
    forward, _ = raw_ops(impl, *OPS)
    with pytest.raises(RuntimeError, match="skelemix::bn_epilogue_triton: " + message):  # before the weight's dtype
        forward(args[0].double(), *args[1:])


@pytest.mark.needs_triton
def test_launch_settings_are_pure_and_bounded():
    from skelemix.kernels import bn_epilogue as kernels

    assert kernels.settings(256 * 64, 75 * 25) == (4, 1024, 8)  # (BLOCK_R, BLOCK_L, num_warps): 4096-element tiles
    assert kernels.settings(256, 1) == (256, 16, 8)  # (N, C) input: tiles of rows
    with pytest.raises(ValueError, match="bn_epilogue .* more than 65535 programs"):
        kernels.settings(4, 1 << 27)


# ---------------------------------------------------------------------------------------------------- the block


@pytest.mark.parametrize("impl", ["eager", pytest.param("cpp", marks=pytest.mark.needs_impl("cpp"))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_epilogue_matches_modules(impl, momentum):
    """Without dropout, relu(bn(x) + residual) of the module and of the fused call agree, and so do the updated
    running statistics (training) and the outputs in evaluation mode."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, momentum=momentum).double()
    init_weights(bn)
    fused_bn = copy.deepcopy(bn)
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    res = torch.randn(3, 4, 6, 5, dtype=torch.float64)
    for _ in range(2):
        expected = torch.relu(bn(x) + res)
        actual = batch_norm_epilogue(x, fused_bn, res, impl=impl)
        assert_close_verbose(actual, expected, 1e-10, 1e-12, name="training output")
        ge, = torch.autograd.grad(expected.square().sum(), x)
        ga, = torch.autograd.grad(actual.square().sum(), x)
        assert_close_verbose(ga, ge, 1e-9, 1e-11, name="training grad_x")
    for key, value in bn.state_dict().items():
        assert_close_verbose(fused_bn.state_dict()[key].double(), value.double(), 1e-12, 1e-14, name=key)
    bn.eval(), fused_bn.eval()
    assert_close_verbose(batch_norm_epilogue(x, fused_bn, res, impl=impl), torch.relu(bn(x) + res), 1e-10, 1e-12,
                         name="evaluation output")


@pytest.mark.needs_impl("cpp")
def test_fused_encoder_matches_modules_without_dropout():
    """The whole encoder with fused epilogues (impl=cpp) against the plain modules (impl=eager), float64."""
    torch.manual_seed(0)
    eager = STGCN(hidden_channels=8, hidden_dim=32, dropout=0.0, impl="eager").double()
    eager.apply(init_weights)
    fused = copy.deepcopy(eager)
    fused.impl, fused.fused_epilogue = "cpp", True
    x = torch.randn(2, 3, 16, 25, 2, dtype=torch.float64)
    fe, ff = eager.feature_map(x), fused.feature_map(x)
    assert_close_verbose(ff, fe, 1e-9, 1e-11, name="features")
    w = torch.randn_like(fe)
    (fe * w).sum().backward()
    (ff * w).sum().backward()
    scale = max(p.grad.abs().max().item() for p in eager.parameters())
    for (name, pe), pf in zip(eager.named_parameters(), fused.parameters()):
        assert_close_verbose(pf.grad, pe.grad, 1e-8, 1e-11 * scale, name=f"grad {name}")
    for (name, be), bf in zip(eager.named_buffers(), fused.buffers()):
        assert_close_verbose(bf.double(), be.double(), 1e-10, 1e-12, name=name)


def test_fused_dropout_draws_differ_per_call_and_follow_the_seed():
    """Dropout in a fused block draws a fresh seed per call from the global generator: two calls differ, and
    the same torch.manual_seed reproduces a call."""
    model = STGCN(hidden_channels=4, hidden_dim=8, dropout=0.5, impl="eager", fused_epilogue=True)
    x = torch.randn(2, 3, 8, 25, 1)
    torch.manual_seed(3)
    a = model.feature_map(x)
    b = model.feature_map(x)
    torch.manual_seed(3)
    c = model.feature_map(x)
    assert not torch.equal(a, b)
    assert torch.equal(a, c)


@pytest.mark.parametrize("setting, impl, expected", [("modules", "cpp", False), ("fused", "eager", True),
                                                     ("fused", "cpp", True)])
def test_config_switch(setting, impl, expected):
    """model.epilogue (and its old name train.epilogue) reaches the encoders; the default is fused."""
    from skelemix.config import Config

    assert Config().model.epilogue == "fused"
    from skelemix.config import build_config, make_pretrain_model

    config = build_config({}, [f"train.epilogue={setting}", f"train.impl={impl}", "model.queue_size=64",
                                        "train.batch_size=16"])
    model = make_pretrain_model(config)
    assert model.encoder_q.fused_epilogue is expected and model.encoder_k.fused_epilogue is expected


def test_config_switch_rejects_unknown_values():
    from skelemix.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="train.epilogue"):
        build_config({}, ["train.epilogue=yes"])
