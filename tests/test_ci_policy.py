"""CI never hides a missing reference: the skip policy of ci_policy, run on a small test file in a
fresh pytest process with and without ``CI``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

CASES = '''
import pytest
from ci_policy import shared_data

def test_passes():
    pass

def test_needs_real_data():
    shared_data("no-such-reference/data.zip")

def test_needs_a_tool():
    pytest.skip("dciodvfy not installed")

@pytest.mark.skipif(True, reason="no GPU (CUDA) available")
def test_needs_a_gpu():
    pass

@pytest.mark.xfail(reason="known")
def test_expected_to_fail():
    assert False
'''


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text("from ci_policy import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401\n")
    (tmp_path / "test_cases.py").write_text(CASES)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(TESTS)}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-ra", "-p", "no:cacheprovider", "-q", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


def test_outside_ci_missing_things_skip(tmp_path):
    proc = _run(tmp_path, None)
    assert proc.returncode == 0, proc.stdout
    assert "1 passed, 3 skipped, 1 xfailed" in proc.stdout
    assert "SKIPPED" in proc.stdout and "real data not available" in proc.stdout   # -ra lists them


def test_under_ci_only_a_missing_gpu_may_skip(tmp_path):
    proc = _run(tmp_path, "true")
    assert proc.returncode == 1, proc.stdout
    assert "2 failed, 1 passed, 1 skipped, 1 xfailed" in proc.stdout
    assert "FAILED test_cases.py::test_needs_real_data" in proc.stdout and "CI must have it" in proc.stdout
    assert "FAILED test_cases.py::test_needs_a_tool" in proc.stdout and "only a missing GPU may skip" in proc.stdout
    assert "SKIPPED" in proc.stdout and "no GPU" in proc.stdout


def test_ci_false_is_not_ci(tmp_path):
    assert _run(tmp_path, "false").returncode == 0
