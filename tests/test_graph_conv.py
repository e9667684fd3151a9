"""skelemix.ops.graph_conv: every implementation against the eager reference, its PT2 surface, errors, and the
ST-GCN encoder and SkeleMixCLR training step built on the fused ops."""
import copy
import importlib
import re

import pytest
import torch

from skelemix import _extension, reference
from skelemix.models.stgcn import STGCN, init_weights
from skelemix.ops import graph_conv
from skelemix.testing import (LOW_PRECISION, assert_at_most_twice_eager, assert_close_scaled, assert_close_verbose,
                              compile_backend, grads, impl_cases, leaves, opcheck, poison_allocator, raw_ops,
                              sample_inputs_graph_conv, tolerances)

graph_conv_module = importlib.import_module("skelemix.ops.graph_conv")  # the attribute is the function
NAMES = ("x", "weight", "bias", "A")
# The backward ops of each implementation (their extra arguments after grad, x, weight, bias, A): the C++ one with
# an output mask; Triton's input gradient is the forward op, with its own ops for the weight and bias and for A.
BACKWARD_OPS = {"cpp": {"_graph_conv_backward": ([True] * 4,)},
                "triton": {"_graph_conv_backward_weight": (), "_graph_conv_backward_adjacency": ()}}


def backward_ops(impl):
    kind = "triton" if impl == "triton" else "cpp"
    return zip(raw_ops(impl, *BACKWARD_OPS[kind]), BACKWARD_OPS[kind].values())


def grad_like_output(x, weight, A, device="cpu", dtype=torch.float32):
    return torch.randn(x.shape[0], weight.shape[0] // A.shape[0], *x.shape[2:], device=device, dtype=dtype)


def test_uses_both_contraction_orders():
    """The samples exercise both kernels' branches (graph_conv_a_first: C_in <= C_out)."""
    orders = {x.shape[1] <= w.shape[0] // A.shape[0] for _, (x, w, _, A) in sample_inputs_graph_conv()}
    assert orders == {True, False}


# ---------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("impl, device, dtype", impl_cases(dtypes=[torch.float32, torch.float64]))
def test_forward_and_grads_match_reference(impl, device, dtype):
    """Relative to the size of each result (sums of C_in * V products cancel)."""
    # fp32 parity needs IEEE fp32 dots: the kernels use TF32 only when torch's matmul precision allows it.
    assert torch.get_float32_matmul_precision() == "highest"
    rtol = tolerances(dtype)[0]
    for name, args in sample_inputs_graph_conv(device, dtype, requires_grad=True):
        expected = reference.graph_conv(*args)
        poison_allocator(expected.numel(), dtype, device)
        out = graph_conv(*args, impl=impl)
        assert not out.isnan().any(), f"{name}: NaN in the output"
        assert_close_scaled(out, expected, rtol, f"{name} forward")
        # A non-contiguous incoming gradient, as autograd may pass.
        grad_out = torch.randn(out.shape[:2] + out.shape[2:][::-1], device=device, dtype=dtype).transpose(2, 3)
        for arg_name, g, e in zip(NAMES, grads(out, args, grad_out), grads(expected, args, grad_out)):
            assert (g is None) == (e is None), f"{name}: grad_{arg_name} presence differs"
            if e is not None:
                assert not g.isnan().any(), f"{name}: NaN in grad_{arg_name}"
                assert_close_scaled(g, e, rtol, f"{name} grad_{arg_name}")


@pytest.mark.parametrize("impl, device, dtype", impl_cases(dtypes=LOW_PRECISION))
def test_low_precision_error_at_most_twice_eager(impl, device, dtype):
    """Against a float64 oracle, forward and every gradient, with an atol of 1e-3 x the oracle's largest entry."""
    for name, args in sample_inputs_graph_conv(device, torch.float32, requires_grad=True):
        a64, a, ae = leaves(args, torch.float64), leaves(args, dtype), leaves(args, dtype)
        oracle = reference.graph_conv(*a64)
        out, eager = graph_conv(*a, impl=impl), reference.graph_conv(*ae)
        assert out.dtype == dtype, name
        grad_out = torch.randn_like(oracle)
        pairs = [("forward", out, eager, oracle)] + [
            (f"grad_{n}", g, ge, go) for n, g, ge, go in zip(
                NAMES, grads(out, a, grad_out.to(dtype)), grads(eager, ae, grad_out.to(dtype)),
                grads(oracle, a64, grad_out)) if go is not None]
        for what, mine, theirs, truth in pairs:
            assert mine.dtype == dtype, f"{name} {what}: dtype {mine.dtype}"
            scale = truth.abs().max().item() if truth.numel() else 0.0
            assert_at_most_twice_eager(mine, theirs, truth, 1e-3 * scale, f"{name} {dtype} {what}")


@pytest.mark.needs_impl("cpp")
@pytest.mark.parametrize("wanted", [w for w in range(1, 16)], ids=lambda w: "+".join(
    n for i, n in enumerate(NAMES) if w >> i & 1))
def test_every_subset_of_requires_grad(wanted):
    """The C++ op's autograd saves only what the requested gradients read and passes stand-ins for the rest;
    every combination must still give the reference's gradients. (Triton's autograd keeps every input.)"""
    base = sample_inputs_graph_conv("cpu", torch.float64)[1].args
    args = [a.detach().clone().requires_grad_(bool(wanted >> i & 1)) for i, a in enumerate(base)]
    grad_out = grad_like_output(args[0], args[1], args[3], dtype=torch.float64)
    want = grads(reference.graph_conv(*args), args, grad_out)
    got = grads(graph_conv(*args, impl="cpp"), args, grad_out)
    for arg_name, g, e in zip(NAMES, got, want):
        assert (g is None) == (e is None), f"grad_{arg_name} presence differs"
        if e is not None:
            assert_close_scaled(g, e, 1e-10, f"grad_{arg_name}")


@pytest.mark.needs_impl("cpp")
@pytest.mark.parametrize("threads", [2, 3])
def test_parallel_matches_reference(threads):
    """The CPU kernel splits samples over intra-op threads and reduces per-thread parts of grad_weight, grad_A
    and the bias sums (the rest of the suite runs on one thread, see conftest)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, args in sample_inputs_graph_conv("cpu", torch.float64, requires_grad=True)[:4]:
            args = [a.detach().repeat(3, *([1] * (a.dim() - 1))).requires_grad_() if i == 0 else a
                    for i, a in enumerate(args)]  # more samples than threads
            expected = reference.graph_conv(*args)
            out = graph_conv(*args, impl="cpp")
            assert_close_scaled(out, expected, 1e-10, f"{name} forward")
            grad_out = torch.randn_like(expected)
            for arg_name, g, e in zip(NAMES, grads(out, args, grad_out), grads(expected, args, grad_out)):
                assert_close_scaled(g, e, 1e-10, f"{name} grad_{arg_name} ({threads} threads)")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("impl, device", impl_cases())
def test_empty_batch_gives_zero_parameter_grads(impl, device):
    x = torch.randn(0, 4, 5, 25, device=device)
    weight, bias, A = (torch.randn(12, 4, requires_grad=True, device=device),
                       torch.randn(12, requires_grad=True, device=device),
                       torch.rand(3, 25, 25, requires_grad=True, device=device))
    out = graph_conv(x, weight, bias, A, impl=impl)
    assert out.shape == (0, 4, 5, 25)
    for g, p in zip(torch.autograd.grad(out.sum(), (weight, bias, A)), (weight, bias, A)):
        assert g.shape == p.shape and not g.any()


@pytest.mark.parametrize("impl, device", impl_cases(devices=("cuda",)))
def test_runs_on_current_stream(impl, device):
    args = sample_inputs_graph_conv(device, torch.float32)[0].args
    x = args[0].repeat(64, 1, 1, 1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        big = x * 2  # queue work first, so a kernel on the wrong stream reads too early
        out = graph_conv(big, *args[1:], impl=impl)
    stream.synchronize()
    assert_close_scaled(out, reference.graph_conv(big, *args[1:]), 1e-5, "side stream")


# ------------------------------------------------------------------------------------------- PT2 and autograd


@pytest.mark.needs_impl("cpp")
def test_gradcheck_float64():
    for name, args in sample_inputs_graph_conv("cpu", torch.float64, requires_grad=True):
        if args[0].numel() == 0 or args[0].numel() > 2000:
            continue
        args = tuple(a.detach()[:2].requires_grad_(a.requires_grad) if i == 0 else a
                     for i, a in enumerate(args))  # at most 2 samples keeps it quick
        diff = [a for a in args if a is not None and a.requires_grad]

        def fn(*diff_args, args=args):
            it = iter(diff_args)
            full = [next(it) if a is not None and a.requires_grad else a for a in args]
            return graph_conv(*full, impl="cpp")

        assert torch.autograd.gradcheck(fn, diff), name


@pytest.mark.needs_impl("cpp")
def test_double_backward_raises():
    x, weight, bias, A = sample_inputs_graph_conv("cpu", torch.float64, requires_grad=True)[0].args
    out = graph_conv(x, weight, bias, A, impl="cpp")
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        gx.sum().backward()


@pytest.mark.parametrize("impl, device", impl_cases(("triton",), devices=("cpu",)))
def test_triton_double_backward_wrt_x(impl, device):
    """The Triton input gradient is the forward op itself, so it differentiates again; the weight, bias and A
    gradients do not."""
    x, weight, bias, A = sample_inputs_graph_conv(device, requires_grad=True)[5].args  # K = 3, no bias
    grad = grad_like_output(x, weight, A).requires_grad_()
    results = []
    for impl_ in (impl, "eager"):
        (gx,) = torch.autograd.grad(graph_conv(x, weight, bias, A, impl=impl_), x, grad, create_graph=True)
        results.append(torch.autograd.grad((gx * gx).sum(), (grad, weight, A)))
    for arg, a, e in zip(("grad", "weight", "A"), *results):
        assert_close_scaled(a, e, 1e-5, f"grad of grad_x wrt {arg}")
    (gw,) = torch.autograd.grad(graph_conv(x, weight, bias, A, impl=impl), weight, grad, create_graph=True)
    with pytest.raises(NotImplementedError, match="does not support double backward through "
                                                  "skelemix::_graph_conv_backward_weight_triton"):
        torch.autograd.grad(gw.sum(), x)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("impl, device", impl_cases())
def test_opcheck(impl, device, requires_grad):
    forward, = raw_ops(impl, "graph_conv")
    samples = sample_inputs_graph_conv(device, torch.float32, requires_grad=requires_grad)
    if impl == "triton" and device == "cpu":
        samples = samples[:2]  # the interpreter runs every program in turn: a few seconds a sample
    for name, args in samples:
        opcheck(forward.default, args)
        x, weight, bias, A = (a.detach() if a is not None else None for a in args)
        grad = grad_like_output(x, weight, A, device)
        for op, extra in backward_ops(impl):
            for mask in ([[True, True, True, True], [True, False, False, False], [False, True, True, False],
                          [False, False, False, True]] if extra else [None]):
                opcheck(op.default, (grad, x, weight, bias, A, *([mask] if mask else [])))


@pytest.mark.needs_impl("cpp")
def test_backward_output_mask():
    """Gradients not asked for come back as empty tensors; the others match the all-true call."""
    x, weight, bias, A = (a.detach() for a in sample_inputs_graph_conv("cpu", torch.float64)[0].args)
    grad = grad_like_output(x, weight, A, dtype=torch.float64)
    full = torch.ops.skelemix._graph_conv_backward(grad, x, weight, bias, A, [True] * 4)
    for i in range(4):
        mask = [j == i for j in range(4)]
        got = torch.ops.skelemix._graph_conv_backward(grad, x, weight, bias, A, mask)
        for j, g in enumerate(got):
            if j == i:
                assert_close_scaled(g, full[j], 1e-10, f"grad_{NAMES[j]} alone")
            else:
                assert g.shape == (0,), f"grad_{NAMES[j]} was not asked for; got shape {tuple(g.shape)}"
    no_bias = torch.ops.skelemix._graph_conv_backward(grad, x, weight, None, A, [True] * 4)
    assert no_bias[2].shape == (0,)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("impl, device", impl_cases())
def test_compile_fullgraph(impl, device, dynamic):
    def fn(x, weight, bias, A):
        return graph_conv(x, weight, bias, A, impl=impl).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend(impl), dynamic=dynamic)
    args = sample_inputs_graph_conv(device, torch.float32, requires_grad=True)[1].args
    expected = torch.autograd.grad(fn(*args), args)
    loss = compiled(*args)
    actual = torch.autograd.grad(loss, args)
    assert_close_scaled(loss, fn(*args), 1e-5, "compiled loss")
    for n, a, e in zip(NAMES, actual, expected):
        assert_close_scaled(a, e, 1e-5, f"compiled grad_{n}")


# -------------------------------------------------------------------------------------------------- errors


def _ok(N=2, c_in=3, c_out=4, T=5, V=6, K=3):
    return [torch.randn(N, c_in, T, V), torch.randn(K * c_out, c_in), torch.randn(K * c_out), torch.rand(K, V, V)]


def _with(i, value):
    def make():
        args = _ok()
        args[i] = value() if callable(value) else value
        return args
    return make


BAD_INPUTS = [
    pytest.param(_with(0, lambda: torch.randn(2, 3, 5)), ValueError,
                 r"x must be 4-D \(N, C_in, T, V\); got shape \[2, 3, 5\]", id="x_3d"),
    pytest.param(_with(0, lambda: torch.ones(2, 3, 5, 6, dtype=torch.int64)), TypeError,
                 r"x must be floating point .*; got (torch\.int64|Long)", id="x_int"),
    pytest.param(_with(1, lambda: torch.randn(12, 3, 1)), ValueError,
                 r"weight must be 2-D \(K \* C_out, C_in\); got shape \[12, 3, 1\]", id="weight_3d"),
    pytest.param(_with(3, lambda: torch.rand(6, 6)), ValueError, r"A must be 3-D \(K, V, V\); got shape \[6, 6\]",
                 id="A_2d"),
    pytest.param(_with(1, lambda: torch.randn(12, 3, dtype=torch.float64)), TypeError,
                 r"weight must have the dtype of x \((torch\.float32|Float)\); got (torch\.float64|Double)",
                 id="weight_dtype"),
    pytest.param(_with(3, lambda: torch.rand(3, 6, 6, dtype=torch.float64)), TypeError,
                 r"A must have the dtype of x \((torch\.float32|Float)\); got (torch\.float64|Double)", id="A_dtype"),
    pytest.param(_with(2, lambda: torch.randn(12, dtype=torch.float16)), TypeError,
                 r"bias must have the dtype of x \((torch\.float32|Float)\); got (torch\.float16|Half)",
                 id="bias_dtype"),
    pytest.param(_with(3, lambda: torch.rand(3, 6, 5)), ValueError,
                 r"A must have shape \(K, 6, 6\) to match x of shape \[2, 3, 5, 6\]; got shape \[3, 6, 5\]",
                 id="A_wrong_v"),
    pytest.param(_with(1, lambda: torch.randn(12, 4)), ValueError,
                 r"weight must have shape \(K \* C_out, 3\) to match x of shape \[2, 3, 5, 6\]; got shape \[12, 4\]",
                 id="weight_wrong_c_in"),
    pytest.param(_with(1, lambda: torch.randn(10, 3)), ValueError,
                 r"weight must have a multiple of K = 3 rows \(K \* C_out\) to match A of shape \[3, 6, 6\]; "
                 r"got shape \[10, 3\]", id="weight_rows_not_multiple_of_k"),
    pytest.param(_with(3, lambda: torch.rand(0, 6, 6)), ValueError,
                 r"weight must have a multiple of K = 0 rows", id="A_no_subsets"),
    pytest.param(_with(2, lambda: torch.randn(4)), ValueError,
                 r"bias must have shape \(12,\) \(K \* C_out\) to match weight of shape \[12, 3\]; got shape \[4\]",
                 id="bias_wrong_size"),
    pytest.param(_with(3, lambda: torch.rand(3, 6, 6, device="meta")), ValueError,
                 r"x and A must be on the same device; got x on cpu and A on meta", id="A_device"),
]
# The raw ops that check CPU tensors: the C++ CPU kernel (its fake kernel for meta inputs) and the Triton ops.
RAW = impl_cases(("cpp", "triton"), devices=("cpu",))


@pytest.mark.parametrize("make, exc, match", BAD_INPUTS)
def test_wrapper_errors(make, exc, match):
    with pytest.raises(exc, match=r"skelemix\.ops\.graph_conv: " + match):
        graph_conv(*make())


@pytest.mark.parametrize("make, exc, match", BAD_INPUTS)
@pytest.mark.parametrize("impl, device", RAW)
def test_raw_op_errors(impl, device, make, exc, match):
    # The CPU kernel or, for meta inputs, the fake kernel raises; the Triton op checks in its body. Both prefix
    # the op name. C++ spells dtypes "Float", Python "torch.float32": the patterns accept both.
    op, = raw_ops(impl, "graph_conv")
    with pytest.raises(RuntimeError, match=f"{op.default.name()}: " + match):
        op(*make())


@pytest.mark.parametrize("grad, match", [
    pytest.param(torch.randn(2, 4, 5), r"grad must have shape \(N, C_out, T, V\) = \[2, 4, 5, 6\]; got shape "
                 r"\[2, 4, 5\]", id="grad_3d"),
    pytest.param(torch.randn(2, 12, 5, 6), r"grad must have shape \(N, C_out, T, V\) = \[2, 4, 5, 6\]; got shape "
                 r"\[2, 12, 5, 6\]", id="grad_k_c_out"),
    pytest.param(torch.randn(2, 4, 5, 6, dtype=torch.float64), r"grad must have the dtype of x", id="grad_dtype"),
])
@pytest.mark.parametrize("impl, device", RAW)
def test_raw_backward_errors(impl, device, grad, match):
    x, weight, bias, A = _ok()
    for op, extra in backward_ops(impl):
        with pytest.raises(RuntimeError, match=f"{op.default.name()}: " + match):
            op(grad, x, weight, bias, A, *extra)


@pytest.mark.parametrize("make, exc, match", BAD_INPUTS[:4])
@pytest.mark.parametrize("impl, device", RAW)
def test_fake_kernel_errors_match(impl, device, make, exc, match):
    """The fake kernel (meta tensors) raises the kernel's message."""
    args = [a.to("meta") for a in make()]
    op, = raw_ops(impl, "graph_conv")
    with pytest.raises(RuntimeError, match=f"{op.default.name()}: " + match):
        op(*args)


@pytest.mark.parametrize("impl, device", impl_cases(("triton",)))
def test_triton_refuses_float64(impl, device):
    x, weight, bias, A = (a.to(device) for a in _ok())
    with pytest.raises(RuntimeError, match="impl='triton' takes float32, float16 or bfloat16 x; got torch.float64"):
        graph_conv(x.double(), weight.double(), bias.double(), A.double(), impl="triton")


# ------------------------------------------------------------------------------------- Triton launch settings


@pytest.mark.needs_triton
def test_launch_settings_are_pure_and_bounded():
    from skelemix.kernels import graph_conv as kernels

    assert kernels.padded_joints(25) == 32 and kernels.padded_joints(3) == 16
    with pytest.raises(ValueError, match="at most 128 joints"):
        kernels.padded_joints(129)
    block_c, block_i, block_t, split, _ = kernels.reduction_settings(32, 64, 64, lambda bt, bc: 1000,
                                                                     lambda bc, bi: 6, interpret=False)
    assert (block_c, block_i, block_t) == (32, 32, 2) and split == 512 // 6
    assert kernels.reduction_settings(32, 64, 64, lambda bt, bc: 1000, lambda bc, bi: 6, False,
                                      target=8 * 132)[3] == 176
    # The fixed forward config (no autotuning): channel tiles fitted to the layer, within the register budget.
    for cin, cout in ((3, 16), (16, 16), (64, 256), (256, 64)):
        config = kernels.fwd_config(32, cin, cout, interpret=False)
        assert config["BLOCK_C"] == min(64, max(16, cout)) and config["BLOCK_I"] == min(32, max(16, cin))
        assert kernels.fits_registers(config["BLOCK_C"], config["BLOCK_T"], 32) and config["num_stages"] == 2
    assert kernels.fwd_config(32, 64, 256, interpret=False) == dict(BLOCK_C=64, BLOCK_I=32, BLOCK_T=4, num_warps=8,
                                                                    num_stages=2)


@pytest.mark.needs_triton
def test_autotunes_only_when_asked(monkeypatch):
    from skelemix.kernels import graph_conv as kernels

    x = torch.randn(2, 3)
    monkeypatch.delenv(kernels.AUTOTUNE_ENV, raising=False)
    assert not kernels._autotune(x)
    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert kernels._autotune(x)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        assert not kernels._autotune(mode.from_tensor(x))  # inside a trace: the fixed config
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not kernels._autotune(x)


# ----------------------------------------------------------------------------------------- impl selection


def test_impl_cuda_on_cpu_raises():
    with pytest.raises((RuntimeError, ValueError), match=re.escape("impl='cuda'")):
        graph_conv(*_ok(), impl="cuda")


def test_auto_on_cpu_picks_cpp_when_built():
    from skelemix.ops._impl import select

    chosen = select("graph_conv", "auto", torch.device("cpu"), graph_conv_module._IMPLEMENTATIONS)
    expected = "cpp" if _extension.HAS_CPP else "eager"
    assert chosen is graph_conv_module._IMPLEMENTATIONS[expected]


def test_eager_always_works():
    for name, args in sample_inputs_graph_conv("cpu", torch.float32):
        assert_close_verbose(graph_conv(*args, impl="eager"), reference.graph_conv(*args), 0, 0, name=name)


# ------------------------------------------------------------------------------------------ the whole model


def _encoder_pair():
    """An ST-GCN encoder at the paper's widths (10 blocks, hidden 16, out 256) with moved edge importances and
    gcn biases, and a copy using impl="cpp": same weights."""
    eager = STGCN(hidden_channels=16, hidden_dim=256, dropout=0.0, impl="eager")
    eager.apply(init_weights)
    with torch.no_grad():
        for name, p in eager.named_parameters():
            if name.endswith("edge_importance") or name.endswith("gcn.conv.bias"):
                p.add_(torch.rand_like(p) * 0.5)
    cpp = copy.deepcopy(eager)
    cpp.impl = "cpp"
    return eager, cpp


def _encoder_run(model, x):
    feats = model.feature_map(x)
    loss = (feats * torch.linspace(-1, 1, feats.numel(), dtype=feats.dtype).view_as(feats)).sum()
    loss.backward()
    return feats, {n: p.grad for n, p in model.named_parameters()}


def assert_grads_close(got: dict, want: dict, rtol: float, atol: float, what: str = "grad") -> None:
    """rtol with an atol of ``atol`` x the largest gradient entry of the model: the biases of the convolutions
    right before a BatchNorm (tcn.2, residual.0) have an exact gradient of 0, so theirs is pure round-off."""
    assert got.keys() == want.keys()
    scale = max(g.abs().max().item() for g in want.values())
    assert scale > 0
    for name, g in want.items():
        assert_close_verbose(got[name], g, rtol, atol * scale, name=f"{what} {name}")


@pytest.mark.needs_impl("cpp")
def test_stgcn_encoder_cpp_matches_eager():
    """A whole encoder forward and backward with impl="cpp" against impl="eager" (same weights, same input).

    Features are compared in float32. Gradients are compared in float64: in float32 an element whose
    pre-ReLU value is within round-off of 0 may take the other side of the kink in one of the two runs, which
    changes its gradient by O(1) and, through the BatchNorms, every gradient below it; that happens as well
    between two eager runs that sum in a different order, so it says nothing about the op."""
    eager, cpp = _encoder_pair()
    x = torch.randn(2, 3, 20, 25, 2)
    with torch.no_grad():
        assert_close_scaled(cpp.feature_map(x), eager.feature_map(x), 1e-5, "float32 encoder features")
    eager, cpp = eager.double(), cpp.double()
    (fe, ge), (fc, gc) = (_encoder_run(m, x.double()) for m in (eager, cpp))
    assert_close_scaled(fc, fe, 1e-10, "float64 encoder features")
    assert_grads_close(gc, ge, 1e-9, 1e-11)


@pytest.mark.parametrize("impl, device", impl_cases(("triton",), devices=("cpu",)))
def test_fused_encoder_with_masks_matches_eager(impl, device):
    """The encoder with fused epilogues and mask pooling (the (p, c) views) with impl="triton" against the eager
    references (same weights, same Philox dropout draws), float32."""
    torch.manual_seed(0)
    eager = STGCN(hidden_channels=4, hidden_dim=16, impl="eager", fused_epilogue=True)
    fused = STGCN(hidden_channels=4, hidden_dim=16, impl=impl, fused_epilogue=True)
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 16, 25, 2)
    mask = torch.rand(2, 4, 25) < 0.5
    outs = []
    for enc in (eager, fused):
        torch.manual_seed(1)  # the same dropout draws
        p, c = enc(x, mask)
        loss = (p * torch.linspace(-1, 1, p.shape[1])).sum() + c.square().sum()
        loss.backward()
        outs.append((p, c, {n: q.grad for n, q in enc.named_parameters()}))
    assert_close_scaled(outs[1][0], outs[0][0], 1e-5, "p")
    assert_close_scaled(outs[1][1], outs[0][1], 1e-5, "c")
    assert_grads_close(outs[1][2], outs[0][2], 1e-4, 1e-5)


# (rtol, atol x the largest gradient) of the gradients and of the weights after one SGD step of lr 0.1 (at most
# lr x the gradients' atol apart), by dtype.
STEP_TOLERANCES = {torch.float64: ((1e-9, 1e-11), (1e-9, 1e-12)), torch.float32: ((1e-4, 1e-5), (1e-5, 1e-5))}
# The C++ ops run the step in float64 (see test_stgcn_encoder_cpp_matches_eager), with and without the fused
# epilogue, 3 mixed repeats of 2-body samples; Triton (no float64) in float32 on a smaller step for the interpreter.
STEP_CASES = [pytest.param("cpp", "cpu", torch.float64, fused, 3, 2, marks=pytest.mark.needs_impl("cpp"),
                           id=f"cpp-{'fused_epilogue' if fused else 'modules'}") for fused in (False, True)]
STEP_CASES += [pytest.param(*case.values, torch.float32, True, 1, 1, marks=case.marks, id=case.id)
               for case in impl_cases(("triton",), devices=("cpu",))]


def _training_step(impl, dtype, fused, repeats, bodies, x, key):
    from skelemix.models import SkeleMixCLR

    torch.manual_seed(0)
    encoder = dict(hidden_channels=4, hidden_dim=16, dropout=0.5, impl=impl, fused_epilogue=fused)
    model = SkeleMixCLR(encoder=encoder, feature_dim=8, queue_size=64, swap_params=((2, 3, 2, 3, repeats, 1.0),))
    model = model.to(dtype)
    with torch.no_grad():  # move the edge importances off 1 so every A differs
        for name, p in model.encoder_q.named_parameters():
            if name.endswith("edge_importance"):
                p.add_(torch.rand_like(p) * 0.5)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(1)  # the same dropout draws
    out = model(x, key, generator=torch.Generator().manual_seed(1))
    out["loss"].backward()
    grads_ = {n: p.grad.clone() for n, p in model.encoder_q.named_parameters() if p.grad is not None}
    assert len(grads_) == len(list(model.encoder_q.parameters())), "a parameter got no gradient"
    optimizer.step()
    return out, grads_, {n: p.detach().clone() for n, p in model.encoder_q.named_parameters()}, model.queue.clone()


@pytest.mark.parametrize("impl, device, dtype, fused, repeats, bodies", STEP_CASES)
def test_skelemixclr_training_step_matches_eager(impl, device, dtype, fused, repeats, bodies):
    """One whole SkeleMixCLR(+) training step (query and the mixed batches through encoder_q, the key through
    encoder_k, the fused ops, SGD with momentum, momentum update, enqueue) against impl="eager": same initial
    weights (same seed), same batch, same mixing and dropout draws. With ``fused`` both run the fused block
    epilogue (for impl="eager" its reference), so bn_epilogue and its Philox dropout are checked too; without it
    both use the modules and torch's dropout."""
    x = torch.randn(4, 3, 16, 25, bodies, dtype=dtype)
    key = x + 0.01 * torch.randn_like(x)
    (e_out, e_grads, e_params, e_queue), (out, got, params, queue) = (
        _training_step(i, dtype, fused, repeats, bodies, x, key) for i in ("eager", impl))
    rtol = tolerances(dtype)[0]
    for name in ("loss", "loss_ins", "loss_p", "loss_c"):
        assert_close_scaled(out[name], e_out[name], rtol, name)
    (grad_rtol, grad_atol), (param_rtol, param_atol) = STEP_TOLERANCES[dtype]
    assert_grads_close(got, e_grads, grad_rtol, grad_atol)
    scale = max(g.abs().max().item() for g in e_grads.values())
    for name, p in e_params.items():
        assert_close_verbose(params[name], p, param_rtol, param_atol * scale, name=f"updated {name}")
    assert_close_scaled(queue, e_queue, rtol, "queue")
