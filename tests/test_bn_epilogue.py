"""skelemix.ops.bn_epilogue: the C++ op against the eager reference, its Philox dropout mask, its PT2 surface,
errors, and the fused ST-GCN block against the plain modules."""
import copy

import pytest
import torch
from torch import nn

from skelemix import _extension, reference
from skelemix.models.stgcn import STGCN, batch_norm_epilogue, init_weights
from skelemix.ops import bn_epilogue
from skelemix.testing import (assert_close_verbose, poison_allocator, require_impl, sample_inputs_bn_epilogue,
                              tolerances)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
IMPL_OF = {"cpu": "cpp", "cuda": "cuda"}
NAMES = ("x", "weight", "bias", "residual")
needs_cpp = pytest.mark.skipif(not _extension.HAS_CPP, reason=f"C++ ops not loaded: {_extension.LOAD_ERROR}")


def _grads(out, args, grad_out):
    inputs = [a for a in args[:4] if a is not None and a.requires_grad]
    got = iter(torch.autograd.grad(out, inputs, grad_out, allow_unused=True))
    return [next(got) if a is not None and a.requires_grad else None for a in args[:4]]


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


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_mask_matches_reference_across_2_32(device):
    """The kernels' mask (through the functions their passes use) equals the reference's bit for bit, also where
    the element index crosses a multiple of 2**32, which no test tensor is large enough to reach."""
    require_impl(IMPL_OF[device])
    for seed in SEEDS:
        for start, numel in ((0, 1000), (2**32 - 300, 777), (5 * 2**32 - 3, 11), (2**62, 300), (17, 0)):
            for p in (0.0, 0.1, 0.5, 0.9):
                got = torch.ops.skelemix._bn_epilogue_dropout_keep(torch.tensor([seed], device=device), start, numel, p)
                want = reference.dropout_keep(torch.tensor([seed]), (numel,), p, offset=start)
                assert torch.equal(got.cpu(), want), f"seed {seed:#x} start {start:#x} p {p}"


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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_matches_reference(device, dtype):
    impl = IMPL_OF[device]
    require_impl(impl)
    rtol, atol = tolerances(dtype)
    for name, args in sample_inputs_bn_epilogue(device, dtype):
        poison_allocator(args[0].numel(), dtype, device)
        y, mean, var = bn_epilogue(*args[:6], seed=args[6], eps=args[7], p=args[8], relu=args[9], impl=impl)
        ey, emean, evar = reference.bn_epilogue(*args)
        assert_close_verbose(y, ey, rtol, atol, name=f"{name} y")
        assert_close_verbose(mean, emean, 1e-5 if dtype != torch.float64 else 1e-12, 1e-6, name=f"{name} mean")
        assert_close_verbose(var, evar, 1e-5 if dtype != torch.float64 else 1e-12, 1e-6, name=f"{name} var")
        if args[8] > 0 and not args[9] and args[0].numel():  # no ReLU: the zeros are exactly the dropped cells
            dropped = ~reference.dropout_keep(args[6], args[0].shape, args[8])
            y_pre = y if args[3] is None else y.double() - args[3].double()
            assert bool((y_pre[dropped].abs() < 1e-2).all()), f"{name}: a dropped element is not 0"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_reference(device, dtype):
    impl = IMPL_OF[device]
    require_impl(impl)
    rtol, atol = tolerances(dtype)
    if dtype in (torch.float16, torch.bfloat16):
        rtol, atol = rtol * 5, atol * 5  # the reference rounds x - mean and xhat in 16 bits; the kernels do not
    for name, args in sample_inputs_bn_epilogue(device, dtype, requires_grad=True):
        y, _, _ = bn_epilogue(*args[:6], seed=args[6], eps=args[7], p=args[8], relu=args[9], impl=impl)
        ey, _, _ = reference.bn_epilogue(*args)
        grad_out = torch.randn(y.shape[::-1], device=device, dtype=dtype).permute(*range(y.dim() - 1, -1, -1))
        for arg_name, g, e in zip(NAMES, _grads(y, args, grad_out), _grads(ey, args, grad_out)):
            assert (g is None) == (e is None), f"{name}: grad_{arg_name} presence differs"
            if e is not None:
                scale = max(e.abs().max().item(), 1.0) if e.numel() else 1.0
                assert_close_verbose(g, e, rtol, atol * scale, name=f"{name} grad_{arg_name}")


@needs_cpp
@pytest.mark.parametrize("case", range(8))
def test_gradcheck_float64(case):
    name, args = sample_inputs_bn_epilogue("cpu", torch.float64, requires_grad=True)[case]
    differentiable = [a for a in args[:4] if a is not None]

    def fn(*tensors):
        full = list(tensors) + [None] * (4 - len(tensors)) if args[3] is None else list(tensors)
        return bn_epilogue(*full, *args[4:6], seed=args[6], eps=args[7], p=args[8], relu=args[9], impl="cpp")[0]

    assert torch.autograd.gradcheck(fn, differentiable, eps=1e-6, atol=1e-6), name


@needs_cpp
@pytest.mark.parametrize("wanted", range(1, 16), ids=lambda w: "+".join(n for i, n in enumerate(NAMES) if w >> i & 1))
def test_every_subset_of_requires_grad(wanted):
    """Each gradient is computed only when asked for, and every combination matches the reference."""
    base = sample_inputs_bn_epilogue("cpu", torch.float64)[1].args  # batch statistics, dropout, residual
    args = [a.detach().clone().requires_grad_(bool(wanted >> i & 1)) if i < 4 else a for i, a in enumerate(base)]
    y = bn_epilogue(*args[:6], seed=args[6], eps=args[7], p=args[8], relu=args[9], impl="cpp")[0]
    grad_out = torch.randn_like(y)
    for arg_name, g, e in zip(NAMES, _grads(y, args, grad_out), _grads(reference.bn_epilogue(*args)[0], args, grad_out)):
        assert (g is None) == (e is None), f"grad_{arg_name} presence differs"
        if e is not None:
            assert_close_verbose(g, e, 1e-10, 1e-12, name=f"grad_{arg_name}")


@needs_cpp
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    for name, args in sample_inputs_bn_epilogue("cpu", torch.float32, requires_grad=requires_grad):
        if args[0].numel() == 0 or not args[0].is_contiguous():
            continue
        torch.library.opcheck(torch.ops.skelemix.bn_epilogue.default, args)
        x, weight, _, _, stats_mean, stats_var, seed, eps, p, relu = args
        y, mean, var = torch.ops.skelemix.bn_epilogue(*args)
        if stats_mean is not None:
            mean, var = stats_mean, stats_var
        grad = torch.randn_like(y)
        torch.library.opcheck(torch.ops.skelemix._bn_epilogue_backward.default,
                              (grad, x.detach(), y.detach(), weight.detach(), mean, var, seed, eps, p, relu,
                               stats_mean is None, [True, True, True, True]))


@needs_cpp
def test_compile_fullgraph():
    name, args = sample_inputs_bn_epilogue("cpu", torch.float32, requires_grad=True)[1]

    def fn(x, weight, bias, residual):
        return bn_epilogue(x, weight, bias, residual, seed=args[6], p=0.5, impl="cpp")[0].square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss = compiled(*args[:4])
    actual = torch.autograd.grad(loss, args[:4])
    expected_loss = fn(*args[:4])
    expected = torch.autograd.grad(expected_loss, args[:4])
    assert_close_verbose(loss, expected_loss, 1e-5, 1e-6, name="compiled loss")
    for n, a, e in zip(NAMES, actual, expected):
        assert_close_verbose(a, e, 1e-5, 1e-6, name=f"compiled grad_{n}")


@needs_cpp
def test_double_backward_raises():
    args = sample_inputs_bn_epilogue("cpu", torch.float64, requires_grad=True)[0].args
    y = bn_epilogue(*args[:6], seed=args[6], impl="cpp")[0]
    (g,) = torch.autograd.grad(y.square().sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


# ---------------------------------------------------------------------------------------------------- NaN

# (impl, device) for every implementation; triton runs in the interpreter on the CPU.
IMPLS_ON = [pytest.param("cpp", "cpu", id="cpp"), pytest.param("cuda", "cuda", marks=pytest.mark.needs_cuda, id="cuda"),
            pytest.param("triton", "cpu", marks=[pytest.mark.needs_triton, pytest.mark.triton_interpret],
                         id="triton-interpreted"),
            pytest.param("triton", "cuda", marks=[pytest.mark.needs_triton, pytest.mark.needs_cuda], id="triton-cuda")]


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
@pytest.mark.parametrize("impl, device", IMPLS_ON)
def test_nan_reaches_output_and_gradients(impl, device, where, fixed, p, relu):
    """A NaN in x or the residual reaches y and the gradients exactly as in the eager reference, so a diverging
    run stays visible to the trainer's finiteness check: the ReLU passes NaN (a max with 0 would give 0, as
    tl.maximum does) and passes the gradient where y is NaN (as torch.relu's backward: only y <= 0 is clamped).
    With batch statistics one NaN in x makes its whole channel NaN."""
    require_impl(impl)
    x = torch.randn(3, 4, 5, 6, device=device)
    res = torch.randn_like(x)
    (x if where == "x" else res)[1, 2, 3, 4] = float("nan")
    stats = (torch.randn(4, device=device), torch.rand(4, device=device) + 0.5) if fixed else (None, None)
    seed = torch.tensor([0x0123456789ABCDEF], device=device)
    leaves = [a.requires_grad_() for a in (x, torch.rand(4, device=device) + 0.5, torch.randn(4, device=device), res)]
    args = (*leaves, *stats, seed, 1e-5, p, relu)
    y = bn_epilogue(*args[:6], seed=seed, p=p, relu=relu, impl=impl)[0]
    want = reference.bn_epilogue(*args)[0]
    assert bool(want.isnan().any()), "the case must put a NaN into y"
    assert_close_with_nans(y, want, 1e-5, 1e-5, "y")
    grad_out = torch.randn_like(y)
    for name, g, e in zip(NAMES, _grads(y, args, grad_out), _grads(want, args, grad_out)):
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
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_kernels_cover_large_and_odd_shapes(shape):
    """impl=cuda on those shapes (batch statistics, residual, dropout; no ReLU, whose clamp at 0 would make the
    comparison with float64 flip on rounding) against the float64 reference: y, statistics and every gradient;
    and a second call gives the same bits (fixed-order reductions)."""
    require_impl("cuda")
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


@pytest.mark.parametrize("impl", ["eager", pytest.param("cpp", marks=needs_cpp)])
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


@needs_cpp
def test_cpp_op_checks_its_arguments():
    """The C++ op, called directly, gives the same named errors."""
    x, w, b, seed = torch.randn(2, 3, 4, 5), torch.rand(3), torch.randn(3), torch.zeros(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"skelemix::bn_epilogue: weight must have shape \(3,\)"):
        torch.ops.skelemix.bn_epilogue(x, torch.rand(4), b, None, None, None, seed, 1e-5, 0.0, True)
    with pytest.raises(RuntimeError, match=r"skelemix::bn_epilogue: p \(dropout probability\) must be in \[0, 1\)"):
        torch.ops.skelemix.bn_epilogue(x, w, b, None, None, None, seed, 1e-5, 1.5, True)
    with pytest.raises(RuntimeError, match="skelemix::_bn_epilogue_backward: grad must have the shape of x"):
        torch.ops.skelemix._bn_epilogue_backward(torch.randn(2, 3, 4), x, x, w, b, w, seed, 1e-5, 0.0, True, True,
                                                 [True, True, True, True])
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


# ---------------------------------------------------------------------------------------------------- the block


@pytest.mark.parametrize("impl", ["eager", pytest.param("cpp", marks=needs_cpp)])
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


@needs_cpp
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
    """train.epilogue reaches the encoders (the default, modules, is tested by the line below)."""
    from skelemix.config import Config

    assert Config().model.epilogue == "modules"
    from skelemix.config import build_config, make_pretrain_model

    config = build_config({}, [f"train.epilogue={setting}", f"train.impl={impl}", "model.queue_size=64",
                                        "train.batch_size=16"])
    model = make_pretrain_model(config)
    assert model.encoder_q.fused_epilogue is expected and model.encoder_k.fused_epilogue is expected


def test_config_switch_rejects_unknown_values():
    from skelemix.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="train.epilogue"):
        build_config({}, ["train.epilogue=yes"])
