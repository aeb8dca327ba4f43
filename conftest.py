"""Test-suite settings shared by the unit tests and the notebooks (run through nbval).

The environment is set here, before any notebook kernel starts, so kernels inherit it:
FAST mode unless the caller chose otherwise, and no hub downloads.
"""
import os
import signal
import time
from collections import defaultdict

import pytest

os.environ.setdefault("NBLIB_FAST", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

NOTEBOOK_BUDGET_S = 60.0
_file_seconds: dict[str, float] = defaultdict(float)
_started = time.perf_counter()


def pytest_configure(config):
    """A pytest-xdist worker (addopts: -n auto) starts with Ctrl-C ignored, which the programs the tests
    start would inherit: give it Python's usual handler, so that tests see what a terminal gives them."""
    if hasattr(config, "workerinput") and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items):
    """Every notebook cell is ``slow`` (a lesson takes 3-35 s in FAST mode), so ``-m "not slow"`` is a quick pass.
    (pyproject.toml registers the marker; without ``-m`` nothing is deselected.)"""
    for item in items:
        if item.nodeid.split("::")[0].endswith(".ipynb"):
            item.add_marker(pytest.mark.slow)


def pytest_runtest_logreport(report):
    _file_seconds[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter):
    notebooks = {f: s for f, s in _file_seconds.items() if f.endswith(".ipynb")}
    if not notebooks:
        return
    tr = terminalreporter
    tr.section("time per notebook (NBLIB_FAST=%s)" % os.environ.get("NBLIB_FAST"))
    for f, s in sorted(notebooks.items()):
        flag = "  <-- over the %.0f s budget" % NOTEBOOK_BUDGET_S if s > NOTEBOOK_BUDGET_S else ""
        tr.write_line(f"{s:7.1f} s  {f}{flag}")
    units = sum(s for f, s in _file_seconds.items() if not f.endswith(".ipynb"))
    workers = tr.config.getoption("numprocesses", None) or 1  # pytest-xdist's -n: the sums add up its workers
    tr.write_line(f"{sum(notebooks.values()):7.1f} s  all notebooks; {units:.1f} s unit tests; "
                  f"{time.perf_counter() - _started:.1f} s wall on {workers} worker{'s' * (workers > 1)}")
