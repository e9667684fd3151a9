"""skelemix.ops.graph_conv: the C++ op against the eager reference, its PT2 surface, errors, and the ST-GCN
encoder built on it."""
import copy
import importlib
import re

import pytest
import torch

from skelemix import _extension, reference
from skelemix.models.stgcn import STGCN, init_weights
from skelemix.ops import graph_conv
from skelemix.testing import assert_close_verbose, poison_allocator, require_impl, sample_inputs_graph_conv, tolerances

graph_conv_module = importlib.import_module("skelemix.ops.graph_conv")  # the attribute is the function

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]
IMPL_OF = {"cpu": "cpp", "cuda": "cuda"}
NAMES = ("x", "weight", "bias", "A")


needs_cpp = pytest.mark.skipif(not _extension.HAS_CPP, reason=f"C++ ops not loaded: {_extension.LOAD_ERROR}")


def close(actual, expected, dtype, name):
    """fp32/fp64 parity: relative to the size of the result (sums of C_in * V products cancel)."""
    rtol, atol = tolerances(dtype)
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    assert_close_verbose(actual, expected, rtol, max(atol, rtol * scale), name=name)


def grads_of(out, inputs, grad_out):
    """Gradients of ``out`` for every input that requires grad (None for the others)."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True)) if wanted else iter(())
    return [next(got) if t is not None and t.requires_grad else None for t in inputs]


def test_uses_both_contraction_orders():
    """The samples exercise both kernels' branches (graph_conv_a_first: C_in <= C_out)."""
    orders = {x.shape[1] <= w.shape[0] // A.shape[0] for _, (x, w, _, A) in sample_inputs_graph_conv()}
    assert orders == {True, False}


# ---------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_grads_match_reference(device, dtype):
    impl = IMPL_OF[device]
    require_impl(impl)
    for name, args in sample_inputs_graph_conv(device, dtype, requires_grad=True):
        x, weight, _, A = args
        expected = reference.graph_conv(*args)
        poison_allocator(expected.numel(), dtype, device)
        out = graph_conv(*args, impl=impl)
        assert not out.isnan().any(), f"{name}: NaN in the output"
        close(out, expected, dtype, f"{name} forward")
        # A non-contiguous incoming gradient, as autograd may pass.
        grad_out = torch.randn(out.shape[:2] + out.shape[2:][::-1], device=device, dtype=dtype).transpose(2, 3)
        want = grads_of(expected, args, grad_out)
        got = grads_of(out, args, grad_out)
        for arg_name, g, e in zip(NAMES, got, want):
            assert (g is None) == (e is None), f"{name}: grad_{arg_name} presence differs"
            if e is not None:
                assert not g.isnan().any(), f"{name}: NaN in grad_{arg_name}"
                close(g, e, dtype, f"{name} grad_{arg_name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_error_at_most_twice_eager(device, dtype):
    """FlashAttention's rule: against a float64 oracle, the kernel's error is at most twice the error of the
    eager reference run in the same dtype, plus atol."""
    impl = IMPL_OF[device]
    require_impl(impl)
    _, atol = tolerances(dtype)
    for name, args in sample_inputs_graph_conv(device, dtype, requires_grad=True):
        if args[0].numel() == 0:
            continue
        oracle_args = [a.detach().double().requires_grad_(a.requires_grad) if a is not None else None for a in args]
        oracle = reference.graph_conv(*oracle_args)
        eager = reference.graph_conv(*args)
        out = graph_conv(*args, impl=impl)
        grad_out = torch.randn_like(out)
        pairs = [("forward", out, eager, oracle)] + [
            (f"grad_{n}", g, ge, go) for n, g, ge, go in zip(
                NAMES, grads_of(out, args, grad_out), grads_of(eager, args, grad_out),
                grads_of(oracle, oracle_args, grad_out.double())) if go is not None]
        for what, mine, theirs, truth in pairs:
            assert mine.dtype == dtype, f"{name} {what}: dtype {mine.dtype}"
            err = (mine.double() - truth).abs().max().item()
            eager_err = (theirs.double() - truth).abs().max().item()
            scale = truth.abs().max().item()
            assert err <= 2 * eager_err + atol * max(scale, 1.0), (
                f"{name} {what}: error {err:.3g} > 2 x eager error {eager_err:.3g} + atol (scale {scale:.3g})")


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


@needs_cpp
def test_stgcn_encoder_cpp_matches_eager():
    """A whole encoder forward and backward with impl="cpp" against impl="eager" (same weights, same input).

    Features are compared in float32. Gradients are compared in float64: in float32 an element whose
    pre-ReLU value is within round-off of 0 may take the other side of the kink in one of the two runs, which
    changes its gradient by O(1) and, through the BatchNorms, every gradient below it; that happens as well
    between two eager runs that sum in a different order, so it says nothing about the op."""
    eager, cpp = _encoder_pair()
    x = torch.randn(2, 3, 20, 25, 2)
    with torch.no_grad():
        close(cpp.feature_map(x), eager.feature_map(x), torch.float32, "float32 encoder features")
    eager, cpp = eager.double(), cpp.double()
    (fe, ge), (fc, gc) = (_encoder_run(m, x.double()) for m in (eager, cpp))
    close(fc, fe, torch.float64, "float64 encoder features")
    # atol relative to the largest gradient of the model: the biases of the convolutions right before a
    # BatchNorm (tcn.2, residual.0) have an exact gradient of 0, so theirs is pure round-off in both runs.
    scale = max(g.abs().max().item() for g in ge.values())
    for name, g in ge.items():
        assert_close_verbose(gc[name], g, 1e-9, 1e-11 * scale, name=f"grad {name}")


@needs_cpp
@pytest.mark.parametrize("fused", [False, True], ids=["modules", "fused_epilogue"])
def test_skelemixclr_plus_training_step_cpp_matches_eager(fused):
    """One whole SkeleMixCLR+ training step (query and 3 mixed batches through encoder_q, the key through
    encoder_k, the fused ops, SGD with momentum, momentum update, enqueue) with impl="cpp" against
    impl="eager": same initial weights (same seed), same batch, same mixing and dropout draws. With
    ``fused`` both run the fused block epilogue (for impl="eager" its reference), so bn_epilogue and its hash
    dropout are checked too; without it both use the modules and torch's dropout.

    Run in float64 for the reason given in test_stgcn_encoder_cpp_matches_eager: in float32 a pre-ReLU value
    within round-off of 0 can land on the other side of the kink in one of the two runs, which moves its
    gradient by O(1) (and, through the BatchNorms, every gradient below it) whichever op is right."""
    from skelemix.models import SkeleMixCLR

    cfg = dict(feature_dim=8, queue_size=64, swap_params=((2, 3, 2, 3, 3, 1.0),))  # repeat 3: SkeleMixCLR+
    x = torch.randn(4, 3, 16, 25, 2, dtype=torch.float64)
    key = x + 0.01 * torch.randn_like(x)
    results = {}
    for impl in ("eager", "cpp"):
        torch.manual_seed(0)
        encoder = dict(hidden_channels=4, hidden_dim=16, dropout=0.5, impl=impl, fused_epilogue=fused)
        model = SkeleMixCLR(encoder=encoder, **cfg).double()
        with torch.no_grad():  # move the edge importances off 1 so every A differs
            for name, p in model.encoder_q.named_parameters():
                if name.endswith("edge_importance"):
                    p.add_(torch.rand_like(p) * 0.5)
        optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(1)  # the same dropout draws
        out = model(x, key, generator=torch.Generator().manual_seed(1))
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.encoder_q.named_parameters()}
        optimizer.step()
        params = {n: p.detach().clone() for n, p in model.encoder_q.named_parameters()}
        results[impl] = (out, grads, params, model.queue.clone())
    (e_out, e_grads, e_params, e_queue), (c_out, c_grads, c_params, c_queue) = results["eager"], results["cpp"]
    for name in ("loss", "loss_ins", "loss_p", "loss_c"):
        close(c_out[name], e_out[name], torch.float64, name)
    assert c_grads.keys() == e_grads.keys()
    # atol relative to the largest gradient (a conv bias right before a BatchNorm has a true gradient of 0).
    scale = max(g.abs().max().item() for g in e_grads.values())
    assert scale > 0
    for name, g in e_grads.items():
        assert_close_verbose(c_grads[name], g, 1e-9, 1e-11 * scale, name=f"grad {name}")
    for name, p in e_params.items():  # one SGD step of lr 0.1: at most lr x the gradient tolerance apart
        assert_close_verbose(c_params[name], p, 1e-9, 0.1 * 1e-11 * scale, name=f"updated {name}")
    close(c_queue, e_queue, torch.float64, "queue")


@needs_cpp
@pytest.mark.parametrize("wanted", [w for w in range(1, 16)], ids=lambda w: "+".join(
    n for i, n in enumerate(NAMES) if w >> i & 1))
def test_every_subset_of_requires_grad(wanted):
    """The autograd wrapper saves only what the requested gradients read and passes stand-ins for the rest;
    every combination must still give the reference's gradients."""
    base = sample_inputs_graph_conv("cpu", torch.float64)[1].args
    args = [a.detach().clone().requires_grad_(bool(wanted >> i & 1)) for i, a in enumerate(base)]
    grad_out = torch.randn(args[0].shape[0], args[1].shape[0] // args[3].shape[0], *args[0].shape[2:],
                           dtype=torch.float64)
    want = grads_of(reference.graph_conv(*args), args, grad_out)
    got = grads_of(graph_conv(*args, impl="cpp"), args, grad_out)
    for arg_name, g, e in zip(NAMES, got, want):
        assert (g is None) == (e is None), f"grad_{arg_name} presence differs"
        if e is not None:
            close(g, e, torch.float64, f"grad_{arg_name}")


@needs_cpp
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
            close(out, expected, torch.float64, f"{name} forward")
            grad_out = torch.randn_like(expected)
            for arg_name, g, e in zip(NAMES, grads_of(out, args, grad_out), grads_of(expected, args, grad_out)):
                close(g, e, torch.float64, f"{name} grad_{arg_name} ({threads} threads)")
    finally:
        torch.set_num_threads(before)


@needs_cpp
def test_empty_batch_gives_zero_parameter_grads():
    x = torch.randn(0, 4, 5, 25)
    weight, bias, A = (torch.randn(12, 4, requires_grad=True), torch.randn(12, requires_grad=True),
                       torch.rand(3, 25, 25, requires_grad=True))
    out = graph_conv(x, weight, bias, A, impl="cpp")
    assert out.shape == (0, 4, 5, 25)
    grads = torch.autograd.grad(out.sum(), (weight, bias, A))
    for g, p in zip(grads, (weight, bias, A)):
        assert g.shape == p.shape and not g.any()


@pytest.mark.needs_cuda
def test_cuda_runs_on_current_stream():
    device, impl = "cuda", "cuda"
    require_impl(impl)
    args = sample_inputs_graph_conv(device, torch.float32)[0].args
    x = args[0].repeat(64, 1, 1, 1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        big = x * 2  # queue work first, so a kernel on the wrong stream reads too early
        out = graph_conv(big, *args[1:], impl=impl)
    stream.synchronize()
    close(out, reference.graph_conv(big, *args[1:]), torch.float32, "side stream")


# ------------------------------------------------------------------------------------------- PT2 and autograd


@needs_cpp
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


@needs_cpp
def test_double_backward_raises():
    x, weight, bias, A = sample_inputs_graph_conv("cpu", torch.float64, requires_grad=True)[0].args
    out = graph_conv(x, weight, bias, A, impl="cpp")
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        gx.sum().backward()


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, requires_grad):
    require_impl(IMPL_OF[device])
    for name, args in sample_inputs_graph_conv(device, torch.float32, requires_grad=requires_grad):
        torch.library.opcheck(torch.ops.skelemix.graph_conv.default, args)
        x, weight, bias, A = (a.detach() if a is not None else None for a in args)
        grad = torch.randn(x.shape[0], weight.shape[0] // A.shape[0], *x.shape[2:], device=device)
        for mask in ([True, True, True, True], [True, False, False, False], [False, True, True, False],
                     [False, False, False, True]):
            torch.library.opcheck(torch.ops.skelemix._graph_conv_backward.default, (grad, x, weight, bias, A, mask))


@needs_cpp
def test_backward_output_mask():
    """Gradients not asked for come back as empty tensors; the others match the all-true call."""
    x, weight, bias, A = (a.detach() for a in sample_inputs_graph_conv("cpu", torch.float64)[0].args)
    grad = torch.randn(x.shape[0], weight.shape[0] // 3, *x.shape[2:], dtype=torch.float64)
    full = torch.ops.skelemix._graph_conv_backward(grad, x, weight, bias, A, [True] * 4)
    for i in range(4):
        mask = [j == i for j in range(4)]
        got = torch.ops.skelemix._graph_conv_backward(grad, x, weight, bias, A, mask)
        for j, g in enumerate(got):
            if j == i:
                close(g, full[j], torch.float64, f"grad_{NAMES[j]} alone")
            else:
                assert g.shape == (0,), f"grad_{NAMES[j]} was not asked for; got shape {tuple(g.shape)}"
    no_bias = torch.ops.skelemix._graph_conv_backward(grad, x, weight, None, A, [True] * 4)
    assert no_bias[2].shape == (0,)


@needs_cpp
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(dynamic):
    def fn(x, weight, bias, A):
        return graph_conv(x, weight, bias, A, impl="cpp").square().sum()

    # aot_eager traces forward and backward through the fake kernels without Inductor's slow CPU codegen.
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    args = sample_inputs_graph_conv("cpu", torch.float32, requires_grad=True)[1].args
    expected = torch.autograd.grad(fn(*args), args)
    loss = compiled(*args)
    actual = torch.autograd.grad(loss, args)
    close(loss, fn(*args), torch.float32, "compiled loss")
    for n, a, e in zip(NAMES, actual, expected):
        close(a, e, torch.float32, f"compiled grad_{n}")


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


@pytest.mark.parametrize("make, exc, match", BAD_INPUTS)
def test_wrapper_errors(make, exc, match):
    with pytest.raises(exc, match=r"skelemix\.ops\.graph_conv: " + match):
        graph_conv(*make())


@needs_cpp
@pytest.mark.parametrize("make, exc, match", BAD_INPUTS)
def test_raw_op_errors(make, exc, match):
    # The CPU kernel or, for meta inputs, the fake kernel raises; both prefix the op name. C++ spells dtypes
    # "Float", Python "torch.float32": the patterns accept both.
    with pytest.raises(RuntimeError, match=r"skelemix::graph_conv: " + match):
        torch.ops.skelemix.graph_conv(*make())


@needs_cpp
@pytest.mark.parametrize("grad, match", [
    pytest.param(torch.randn(2, 4, 5), r"grad must have shape \(N, C_out, T, V\) = \[2, 4, 5, 6\]; got shape "
                 r"\[2, 4, 5\]", id="grad_3d"),
    pytest.param(torch.randn(2, 12, 5, 6), r"grad must have shape \(N, C_out, T, V\) = \[2, 4, 5, 6\]; got shape "
                 r"\[2, 12, 5, 6\]", id="grad_k_c_out"),
    pytest.param(torch.randn(2, 4, 5, 6, dtype=torch.float64), r"grad must have the dtype of x", id="grad_dtype"),
])
def test_raw_backward_errors(grad, match):
    x, weight, bias, A = _ok()
    with pytest.raises(RuntimeError, match=r"skelemix::_graph_conv_backward: " + match):
        torch.ops.skelemix._graph_conv_backward(grad, x, weight, bias, A, [True] * 4)


@needs_cpp
@pytest.mark.parametrize("make, exc, match", BAD_INPUTS[:4])
def test_fake_kernel_errors_match(make, exc, match):
    """The fake kernel (meta tensors) raises the C++ kernel's message."""
    args = [a.to("meta") for a in make()]
    with pytest.raises(RuntimeError, match=r"skelemix::graph_conv: " + match):
        torch.ops.skelemix.graph_conv(*args)


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
