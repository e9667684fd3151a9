"""``python -m skelemix.export``: the ONNX model and the torch.export program compute the package's features (eager
reference and C++ ops, 1e-5) for other batch sizes and lengths than the traced ones, from standard operators only."""
import json
import subprocess
import sys

import pytest
import torch

import skelemix
from skelemix import export, train
from test_layouts import HAVE_ONNX, ONNX_REASON, TINY

needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason=ONNX_REASON)
SHAPES = ((1, 64), (5, 23), (2, 5))  # (batch, frames); the export traced batch 2 and the training length 16


@pytest.fixture(scope="module")
def bone_checkpoint(tmp_path_factory):
    """A tiny encoder pretrained on the bone view of generated data (the view with the most graph work)."""
    out = tmp_path_factory.mktemp("run")
    assert train.main(["--set", "data.synthetic_train=16", "--set", "data.synthetic_val=8", "--set", "data.frames=16",
                       "--set", "data.view=bone", *TINY, "--out", str(out)]) == 0
    return out / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def exported(bone_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    formats = ["pt2", "onnx"] if HAVE_ONNX else ["pt2"]
    assert export.main(["--checkpoint", str(bone_checkpoint), "--out", str(out), "--format", *formats]) == 0
    return out


def _inputs():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(n, 3, t, 25, 2, generator=g) for n, t in SHAPES]


@pytest.mark.parametrize("impl", ["eager", "cpp"])
def test_the_exported_program_computes_the_packages_features(bone_checkpoint, exported, impl):
    if impl == "cpp" and not skelemix._extension.available("cpp")[0]:
        pytest.skip("the C++ ops are not built (pip install --no-build-isolation -e .)")
    encoder = skelemix.load_encoder(bone_checkpoint, impl=impl)
    program = torch.export.load(str(exported / "encoder.pt2")).module()
    with torch.no_grad():
        for x in _inputs():
            torch.testing.assert_close(program(x), encoder(x), rtol=0, atol=1e-5)


@needs_onnx
@pytest.mark.parametrize("impl", ["eager", "cpp"])
def test_onnxruntime_computes_the_packages_features(bone_checkpoint, exported, impl):
    if impl == "cpp" and not skelemix._extension.available("cpp")[0]:
        pytest.skip("the C++ ops are not built (pip install --no-build-isolation -e .)")
    encoder = skelemix.load_encoder(bone_checkpoint, impl=impl)
    with torch.no_grad():
        for x in _inputs():
            torch.testing.assert_close(export.run_onnx(exported / "encoder.onnx", x), encoder(x), rtol=0, atol=1e-5)


@needs_onnx
def test_the_onnx_graph_holds_standard_operators_with_dynamic_batch_and_frames(exported):
    import onnx

    model = onnx.load(str(exported / "encoder.onnx"))
    onnx.checker.check_model(model)
    assert {op.domain for op in model.opset_import} == {""} and model.opset_import[0].version >= 17
    assert {node.domain for node in model.graph.node} == {""}  # no custom domain: ai.onnx operators only
    ops = {node.op_type for node in model.graph.node}
    assert {"Conv", "Einsum", "BatchNormalization"} <= ops
    (x,), (features,) = model.graph.input, model.graph.output
    dims = [d.dim_param or d.dim_value for d in x.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and isinstance(dims[2], str) and dims[1:2] + dims[3:] == [3, 25, 2]
    assert (x.name, features.name) == ("x", "features")
    info = json.loads((exported / "export.json").read_text())
    assert info["files"]["encoder.onnx"]["opset"] == 18 and info["files"]["encoder.onnx"]["max_abs_diff_vs_package"] \
        < 1e-5 and info["view"] == "bone"


def test_the_program_runs_without_skelemix(exported):
    """The eager reference is plain ATen: the program holds no skelemix op and loads where skelemix cannot."""
    program = torch.export.load(str(exported / "encoder.pt2"))
    assert json.loads((exported / "export.json").read_text())["files"]["encoder.pt2"]["min_frames"] == 5
    with pytest.raises(AssertionError, match="Guard failed"):  # torch.export's own refusal of T < 5
        program.module()(torch.randn(2, 3, 4, 25, 2))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert targets and not any("skelemix" in t for t in targets), targets
    code = ("import sys; sys.modules['skelemix'] = None\n"  # any import of skelemix now fails
            "import torch\n"
            f"m = torch.export.load({str(exported / 'encoder.pt2')!r}).module()\n"
            "print(tuple(m(torch.randn(4, 3, 30, 25, 2)).shape))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "(4, 16)", run.stderr


@pytest.mark.needs_cuda
def test_the_exported_program_matches_the_cuda_ops(bone_checkpoint, exported):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    encoder = skelemix.load_encoder(bone_checkpoint, device="cuda", impl="cuda")
    program = torch.export.load(str(exported / "encoder.pt2")).module()
    with torch.no_grad():
        for x in _inputs():
            torch.testing.assert_close(program(x), encoder(x.cuda()).cpu(), rtol=0, atol=1e-5)


def test_export_errors_are_one_line(bone_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export, "_importable", lambda module: module not in ("onnx", "onnxscript"))
    assert export.main(["--checkpoint", str(bone_checkpoint), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: ONNX export needs onnx and onnxscript (pip install onnx onnxscript onnxruntime, or pip install -e "
        ".[export]); --format pt2 needs nothing more"]
    assert not (tmp_path / "o").exists()  # refused before anything is written
    assert export.main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o"),
                        "--format", "pt2"]) == 2
    assert capsys.readouterr().err.startswith(f"error: checkpoint not found: {tmp_path / 'missing.pt'}")
    with pytest.raises(FileNotFoundError):  # --debug: the traceback instead of the line
        export.main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o"), "--format", "pt2",
                     "--debug"])
    with pytest.raises(SystemExit) as exit_:
        export.main(["--checkpoint", str(bone_checkpoint), "--out", str(tmp_path / "o"), "--opset", "16"])
    assert exit_.value.code == 2 and "--opset must be >= 17" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match=r"x\.pt2 differs from the package by up to 0\.5 \(more than 0\.0001\)"):
        export.check(torch.zeros(2, 3), torch.full((2, 3), 0.5), "x.pt2")
    with pytest.raises(RuntimeError, match=r"gives features of shape \(2, 4\), the package \(2, 3\)"):
        export.check(torch.zeros(2, 3), torch.zeros(2, 4), "x.pt2")
    with pytest.raises(RuntimeError, match="differs from the package by up to nan"):
        export.check(torch.zeros(1), torch.full((1,), float("nan")), "x.pt2")
