"""Shared fixtures: sample data, the real data in ../shared/data (skipped when absent, a failure
under CI: see ci_policy), and one reconstruction of the sample phantom per test session."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ci_policy import SHARED, pytest_make_collect_report, pytest_runtest_makereport, shared_data  # noqa: F401 - hooks

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data-samples" / "lu177-iec"


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run ``theraflow`` as a user would (a fresh process), capturing its output."""
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"theraflow {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def sample() -> Path:
    if not (SAMPLE / "nm" / "projections.dcm").exists():
        pytest.fail(f"sample data missing: run python data-samples/simulate_lu177_iec.py --out {SAMPLE}")
    return SAMPLE


@pytest.fixture(scope="session")
def truth(sample: Path) -> dict:
    return json.loads((sample / "truth" / "phantom.json").read_text())


def _unzipped(relative: str, tmp_path_factory, name: str) -> Path:
    """An archive of ../shared/data unzipped once into a temporary folder (see ``shared_data``)."""
    folder = tmp_path_factory.mktemp(name)
    with zipfile.ZipFile(shared_data(relative)) as zf:
        zf.extractall(folder)
    return folder


@pytest.fixture(scope="session")
def ge_d670(tmp_path_factory) -> list[Path]:
    """The real GE Discovery 670 Lu-177 patient (2 beds), unzipped to a temporary folder."""
    return sorted(_unzipped("spect-lu177-ge-d670/NM.zip", tmp_path_factory, "ge_d670").rglob("bed*_projections.dcm"))


@pytest.fixture(scope="session")
def ge_d670_ct(tmp_path_factory) -> Path:
    """The CT of the same GE Discovery 670 SPECT/CT (Optima CT540, 303 slices of 256², GE's
    negative SpacingBetweenSlices as exported), unzipped to a temporary folder: its slice folder."""
    return next(_unzipped("spect-lu177-ge-d670/CT.zip", tmp_path_factory, "ge_d670_ct").rglob("*.dcm")).parent


@pytest.fixture(scope="session")
def sample_recon(sample: Path, tmp_path_factory) -> Path:
    """The README's main job on the sample: CT attenuation, PSF, TEW scatter, OSEM 4×10,
    sensitivity from the sample's own registry (its simulated camera), strict."""
    out = tmp_path_factory.mktemp("sample") / "recon"
    run_cli("recon", "spect", "--nm", str(sample / "nm" / "projections.dcm"), "--ct", str(sample / "ct"), "--out", str(out),
            "--registry", str(sample / "sensitivity.json"), "--strict", check=True)
    return out


@pytest.fixture()
def dciodvfy():
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian dicom3tools) not installed")
    return exe


def dciodvfy_errors(exe: str, path: Path) -> list[str]:
    """The 'Error' lines dciodvfy prints for ``path`` (warnings are not errors)."""
    result = subprocess.run([exe, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
