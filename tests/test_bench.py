"""The benchmark harness itself: `pytest bench/` collects and records, the report's arithmetic, and the GPU
check script's syntax (it runs only on a lent GPU machine)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (REPO / "bench").is_dir(), reason="needs the source tree (bench/)")


def test_report_ratios_and_floor():
    sys.path.insert(0, str(REPO))
    try:
        from bench.report import format_tables
    finally:
        sys.path.remove(str(REPO))
    env = {"device": "test", "torch": "x", "cuda": None, "triton": None, "size": "cpu", "rounds": 3}
    row = dict(shapes={"n": 1}, dtype="float32", min_s=0.0)
    payload = {"environment": env, "results": [
        {**row, "group": "machine/copy", "provider": "eager", "median_s": 1.0, "bytes": 10e9, "flops": 0},
        {**row, "group": "machine/matmul-float32", "provider": "eager", "median_s": 1.0, "bytes": 0, "flops": 1e12},
        {**row, "group": "op", "provider": "eager", "median_s": 4.0, "bytes": 20e9, "flops": 1e12},
        {**row, "group": "op", "provider": "cpp", "median_s": 2.5, "bytes": 20e9, "flops": 1e12},
    ]}
    text = format_tables(payload)
    # Floor = max(20 GB / 10 GB/s, 1 TFLOP / 1 TFLOP/s) = 2 s; eager is 2x it, cpp 1.25x; cpp is 1.6x eager.
    assert "| eager | 4000.000 | 0.000 | 5.0 | 0.250 | 1.00x |  | 2.0x floor |" in text
    assert "| cpp | 2500.000 | 0.000 | 8.0 | 0.400 | 1.60x |  | 1.2x floor |" in text


@pytest.mark.slow
def test_pytest_bench_runs_and_saves_json(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "SKELEMIX_BENCH_JSON": str(out), "SKELEMIX_BENCH_ROUNDS": "1", "SKELEMIX_BENCH_COMPILE": "0"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/bench_mask_pool.py",
                           "-k", "eager or cpp"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "speed-up over the eager reference" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert [r["provider"] for r in results][0] == "eager"
    assert all(r["median_s"] > 0 and r["group"] == "op/mask_pool fwd+bwd" for r in results)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_device_check_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "bench" / "device_check.sh")], check=True)


def test_gpu_parity_script_on_cpu_kernels():
    """The parity script device_check.sh runs under compute-sanitizer, exercised here on the C++ CPU kernels."""
    from skelemix import _extension

    if not _extension.HAS_CPP:
        pytest.skip(f"needs the C++ extension: {_extension.LOAD_ERROR}")
    sys.path.insert(0, str(REPO))
    try:
        from bench import gpu_parity
    finally:
        sys.path.remove(str(REPO))
    assert gpu_parity.main(["--impl", "cpp", "--device", "cpu", "--dtype", "float32", "float64"]) == 0


def bench_module(name):
    sys.path.insert(0, str(REPO))
    try:
        import importlib

        return importlib.import_module(f"bench.{name}")
    finally:
        sys.path.remove(str(REPO))


def test_step_matrix_covers_every_switch_most_useful_first():
    bench_model = bench_module("bench_model")
    rows = bench_model.MATRIX
    # Every switch, plus the channels-last twins of the graph-free eager, compiled-op and Triton rows.
    assert len(rows) == len(set(rows)) == 1 + 4 * 2 * 2 * 2 + 3 * 2 * 2
    assert rows[0] == ("official-style", "modules", "none", "off", "contiguous")  # what users would otherwise run
    assert rows[1] == ("eager", "modules", "none", "off", "contiguous")  # the baseline
    assert rows[2] == (bench_model.KERNELS, "modules", "none", "off", "contiguous")  # what impl=auto runs
    twins = [row for row in rows if row[4] == "channels_last"]
    assert all(row[:4] + ("contiguous",) in rows for row in twins) and len(twins) == 12
    assert bench_model.row_id(rows[1]) == "eager-modules-none-off"  # the ids device_check.sh selects
    assert bench_model.row_id(twins[0]) == "-".join(twins[0])
    compile_rows = [i for i, row in enumerate(rows) if row[0] == "compile"]
    assert compile_rows == list(range(len(rows) - 8, len(rows)))  # last: each is a cold compile
    assert rows[compile_rows[0]] == ("compile", "modules", "none", "off", "contiguous")  # the compile baseline first
    graphs = [i for i, row in enumerate(rows) if row[3] == "on" and row[0] in (bench_model.KERNELS, "triton")]
    assert min(graphs) > max(i for i, row in enumerate(rows) if row[3] == "off" and row[4] == "contiguous"
                             and row[0] in (bench_model.KERNELS, "triton"))
    assert min(rows.index(row) for row in twins) > max(graphs)  # the layout after every contiguous switch


def test_step_matrix_table():
    report = bench_module("report")
    env = {"device": "GPU", "torch": "x", "cuda": "13", "triton": "3", "size": "paper", "rounds": 10}
    shapes = {"x": [128, 3, 64, 25, 2], "mixes": 3, "queue": 32768}

    def row(impl, epilogue, amp, graph, median, peak=None, **extra):
        return {"group": report.STEP_GROUP, "provider": "-".join((impl, epilogue, amp, graph)), "median_s": median,
                "min_s": median, "shapes": shapes, "dtype": "bfloat16" if amp == "bf16" else "float32",
                "bytes": 0, "flops": 4e12, "peak_bytes": peak,
                "variant": dict(impl=impl, epilogue=epilogue, amp=amp, graph=graph), **extra}

    results = [
        {"group": "machine/matmul-float32", "provider": "eager", "median_s": 1.0, "min_s": 1.0, "shapes": {},
         "dtype": "float32", "bytes": 0, "flops": 40e12},
        {"group": "machine/matmul-bfloat16", "provider": "eager", "median_s": 1.0, "min_s": 1.0, "shapes": {},
         "dtype": "bfloat16", "flops": 400e12, "bytes": 0},
        row("official-style", "modules", "none", "off", 0.5),
        row("eager", "modules", "none", "off", 0.4, 8 * 2**30),
        row("cuda", "fused", "bf16", "on", 0.05, 3 * 2**30),
        {"group": report.STEP_GROUP, "provider": "triton-fused-bf16-on", "error": "RuntimeError: boom",
         "variant": dict(impl="triton", epilogue="fused", amp="bf16", graph="on")},
        row("compile", "modules", "none", "off", 0.2),
    ]
    text = report.format_steps({"environment": env, "results": results})
    # 128 samples / 0.05 s; 0.5 / 0.05 = 10x official-style, 0.4 / 0.05 = 8x eager, 0.2 / 0.05 = 4x compile; floor
    # 4e12 / 400e12 (bf16) = 10 ms, for float32 rows 4e12 / 40e12 = 100 ms.
    assert ("| cuda | fused | bf16 | on | contiguous | 50.0 | 2560 | 10.00x | 8.00x | 4.00x | 3.00 | 5.0x floor |"
            in text)
    assert ("| eager | modules | none | off | contiguous | 400.0 | 320 | 1.25x | 1.00x | 0.50x | 8.00 | 4.0x floor |"
            in text)
    assert "| triton | fused | bf16 | on | contiguous | failed: RuntimeError: boom |" in text
    full = report.format_tables({"environment": env, "results": results})
    assert text in full and "**model/SkeleMixCLR+ step**" not in full  # not twice


def test_gpu_parity_reports_each_case_as_it_finishes():
    from skelemix import _extension

    if not _extension.HAS_CPP:
        pytest.skip(f"needs the C++ extension: {_extension.LOAD_ERROR}")
    import torch

    cases = bench_module("gpu_parity").check("mask_pool", "cpp", torch.float32, "cpu")
    assert next(cases).startswith("ok   mask_pool impl=cpp float32 ")  # one case done, the others not yet run


def test_official_style_swap_pastes_the_partners_region():
    """bench/official_style.py's per-call ske_swap: inside the (4-frame block x body part) region every value is
    the partner's, outside it the sample's own; the feature mask marks exactly that region."""
    import torch

    from bench.official_style import OfficialStyleSwap

    parts = [[0, 1], [2, 3, 4], [5]]
    swap = OfficialStyleSwap(parts, (1, 2), (1, 2), block=4)
    x = torch.randn(5, 3, 16, 6, 2)
    for _ in range(20):
        mb = swap.swap(x)
        region = mb.mask.repeat_interleave(4, 0)[None, None, :, :, None].expand_as(x)  # (T', V) -> frames
        assert torch.equal(mb.x[region], x[mb.partner][region]) and torch.equal(mb.x[~region], x[~region])
        assert (mb.partner != torch.arange(5)).all() and mb.mask.any()
        joints, blocks = set(mb.mask.any(0).nonzero().flatten().tolist()), mb.mask.any(1).nonzero().flatten()
        taken = [p for p in parts if set(p) <= joints]
        assert 1 <= len(taken) <= 2 and joints == set(sum(taken, []))  # whole body parts, 1 or 2 of them
        assert 1 <= len(blocks) <= 2 and blocks.tolist() == list(range(blocks[0], blocks[-1] + 1))  # one time span
        assert torch.equal(mb.mask, mb.mask.any(1)[:, None] & mb.mask.any(0)[None, :])  # their product


def test_official_style_step_runs_skelemix_objective():
    """The official-style provider's model trains with skelemix's objective: a finite loss with every part."""
    import torch

    from bench.official_style import OfficialModel, official_style_pretrain_model
    from skelemix.config import build_config

    config = build_config({}, ["model.hidden_channels=4", "model.hidden_dim=16", "model.feature_dim=8",
                               "model.queue_size=16", "model.swap_params=[[2,3,2,3,2,1.0]]", "data.frames=16",
                               "train.batch_size=4"])
    model = official_style_pretrain_model(config)
    assert isinstance(model.encoder_q, OfficialModel) and isinstance(model.encoder_k, OfficialModel)
    out = model(torch.randn(4, 3, 16, 25, 2), torch.randn(4, 3, 16, 25, 2))
    out["loss"].backward()
    assert all(torch.isfinite(out[k]) for k in ("loss", "loss_ins", "loss_p", "loss_c"))
    assert all(p.grad is not None for p in model.encoder_q.parameters())


@pytest.mark.parametrize("impl, fused", [("eager", False), ("cpp", False), ("cpp", True)])
def test_channels_last_rows_compute_what_the_contiguous_rows_do(impl, fused):
    """The bench's channels-last encoder (weights and block inputs in torch.channels_last; the fused ops take any
    strides) gives the contiguous encoder's features and gradients, so the layout rows time the same work."""
    import torch

    from skelemix import _extension
    from skelemix.config import build_config, make_encoder

    if impl == "cpp" and not _extension.HAS_CPP:
        pytest.skip(f"needs the C++ extension: {_extension.LOAD_ERROR}")
    bench_model = bench_module("bench_model")
    # hidden 16: with 8 or fewer channels torch's CPU channels-last backward of the strided residual convolution
    # crashes (bench_model.skip_unsafe_channels_last)
    config = build_config({}, ["model.hidden_channels=16", "model.hidden_dim=32", "model.dropout=0"])
    plain = make_encoder(config.model, num_class=8, impl=impl)
    plain.fused_epilogue = fused
    last = bench_model.to_channels_last(make_encoder(config.model, num_class=8, impl=impl))
    last.fused_epilogue = fused
    last.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, 16, 25, 2)
    outs = []
    for encoder in (plain, last):
        out = encoder(x)
        out.square().sum().backward()
        outs.append((out, [p.grad for p in encoder.parameters()]))
    assert any(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
               for w in last.parameters())  # the layout really changed
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    # fp32 through ten blocks: within 1e-5 of the largest gradient (a bias before a BatchNorm has a true
    # gradient of 0 and gets rounding noise)
    scale = max(float(g.abs().max()) for g in outs[0][1])
    for a, b in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_paper_scale_counts_saved_activations_in_proportion_to_the_batch():
    from bench.paper_scale import measure_step
    from skelemix.config import load_config

    config = load_config("demo.yaml", ["model.impl=eager"])
    small, large = measure_step(config, 2), measure_step(config, 4)
    assert small["ops"] > 100 and small["trainable_params"] > 0
    assert 1.7 < large["saved_bytes"] / small["saved_bytes"] < 2.1  # activations scale with the batch
    assert small["buffer_bytes"] >= config.model.queue_size * config.model.feature_dim * 4  # the queue
