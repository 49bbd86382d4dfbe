"""CI never hides a missing reference (issue #14 item 8).

With ``CI`` set (any value but '', '0', 'false'), a test that needs the real data in
``../shared/data`` fails instead of skipping (``shared_data``), and any other skip whose reason
does not mention a GPU is reported as a failure. ``-ra`` (pyproject) lists what was skipped.
``tests/conftest.py`` imports the hooks from here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def shared_data(relative: str) -> Path:
    """``../shared/data/<relative>``: a skip where it is absent, a failure under CI."""
    path = SHARED / relative
    if not path.exists():
        message = f"real data not available ({path})"
        if in_ci():
            pytest.fail(f"{message}; CI must have it", pytrace=False)
        pytest.skip(message)
    return path


def _reason(report) -> str:
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


def _fail_skip(report, what: str) -> None:
    """Turn a skipped report into a failure under CI, unless the reason is a missing GPU."""
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = _reason(report)
        if "gpu" not in reason.lower():
            report.outcome = "failed"
            report.longrepr = f"{what} skipped under CI, where only a missing GPU may skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip(outcome.get_result(), "test")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip(outcome.get_result(), "module")
