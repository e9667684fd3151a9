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
