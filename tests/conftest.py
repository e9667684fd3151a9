"""Markers turned into skips, a fixed seed and RNG isolation for every test.

``needs_impl(name)`` skips a test when implementation ``name`` (cpp, cuda, triton) cannot run here, saying why
(skelemix's own report: not built, no GPU, no triton); the op tests get it from
:func:`skelemix.testing.impl_cases`.
"""
import faulthandler
import importlib.util
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch  # does not import triton

# Before anything imports triton (it reads TRITON_INTERPRET when a kernel is defined): without a GPU, run Triton
# kernels in the CPU interpreter unless told otherwise. With a GPU they compile for it, as do torch.compile's
# own Triton kernels, which the interpreter would only slow down.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Prepared datasets shared between checkouts: the data folder inside the "shared" folder beside this repository.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# bench/ (the sweep tool, the official-style model) is not installed: appended, so an installed skelemix still
# comes first.
sys.path.append(str(Path(__file__).resolve().parents[1]))
SEED = 0
# Tests use tiny tensors: one thread is faster and does not slow to a crawl when the machine is busy.
torch.set_num_threads(1)


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install is as good as none
        return False
    return True


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_impl(name): needs implementation name (cpp, cuda or triton) to be "
                                       "usable here (skipped otherwise, with the reason)")


def _impl_missing(name: str) -> str:
    from skelemix import _extension

    ok, why = _extension.available(name)
    return "" if ok else f"needs impl={name!r}: {why}"


def pytest_collection_modifyitems(config, items):
    skips = {
        "needs_cuda": (lambda: not torch.cuda.is_available(), "needs a CUDA device (torch.cuda.is_available() is False)"),
        "needs_triton": (lambda: importlib.util.find_spec("triton") is None or not _triton_importable(),
                         "needs triton (pip install triton)"),
        "needs_data": (lambda: not SHARED_DATA.is_dir(), f"needs the prepared datasets in {SHARED_DATA}"),
        "triton_interpret": (lambda: os.environ.get("TRITON_INTERPRET") != "1" or not _triton_importable(),
                             "needs triton and TRITON_INTERPRET=1 (Triton's CPU interpreter; set by this conftest "
                             "when no GPU is visible)"),
    }
    decided, impls = {}, {}
    for item in items:
        for mark in item.iter_markers("needs_impl"):
            name = mark.args[0]
            if name not in impls:
                impls[name] = _impl_missing(name)
            if impls[name]:
                item.add_marker(pytest.mark.skip(reason=impls[name]))
        for marker, (missing, reason) in skips.items():
            if marker in item.keywords:
                if marker not in decided:
                    decided[marker] = missing()
                if decided[marker]:
                    item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def shared_data() -> Path:
    """The prepared datasets folder (tests using it should also carry the needs_data marker)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the prepared datasets in {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_rng():
    """Seed every test the same way and give the RNG states back afterwards, so tests cannot leak into
    each other's random draws."""
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(SEED)  # seeds CUDA too
    np.random.seed(SEED)
    random.seed(SEED)
    yield
    torch.set_rng_state(torch_state)
    np.random.set_state(np_state)
    random.setstate(py_state)
    if cuda_states is not None:
        torch.cuda.set_rng_state_all(cuda_states)


@pytest.fixture
def no_hang():
    """For tests of inputs that could block (a FIFO opened for reading waits for a writer forever): a hang
    ends the test run with every thread's traceback after 10 minutes instead of stalling CI."""
    faulthandler.dump_traceback_later(600, exit=True, file=sys.__stderr__)  # pytest captures sys.stderr
    yield
    faulthandler.cancel_dump_traceback_later()
