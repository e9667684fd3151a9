"""``pytest bench/``: prints one comparison table per benchmark group (median, GB/s, TFLOP/s, speed-up
over the eager reference of the same run) and saves the results as JSON for ``python -m bench.report``."""
from __future__ import annotations

import pytest
import torch

from bench import common
from bench.report import format_tables


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not common.RESULTS:
        return
    payload = {"environment": common.environment(), "results": common.RESULTS}
    path = common.save_results()
    terminalreporter.write_sep("=", "skelemix: speed-up over the eager reference (same run)")
    terminalreporter.write_line(format_tables(payload))
    terminalreporter.write_line(f"results saved to {path}; `python -m bench.report {path}` renders them")
