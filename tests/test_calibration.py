"""Sensitivity calibration: derivation from a planar source, the registry, counts → Bq/mL."""

from __future__ import annotations

import dataclasses
import getpass
import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from conftest import dciodvfy_errors, run_cli
from recon.io.nm_projections import ProjectionGeometry
from recon.nuclides import get_nuclide
from recon.spect import calibration
from recon.spect.system import RowRange, system_matrix
from recon.spect.windows import EnergyWindow


def test_sensitivity_from_the_planar_source(sample, truth):
    measured = calibration.measure_sensitivity(sample / "calibration" / "planar_source.dcm")
    assert measured.nuclide == "Lu-177" and measured.window_keV == (187.2, 228.8)
    assert len(measured.per_head_cps_per_MBq) == 2
    assert measured.per_head_cps_per_MBq[0] == pytest.approx(measured.per_head_cps_per_MBq[1], rel=0.01)
    # the simulated camera's true primary sensitivity; TEW subtraction is approximate (a few %)
    assert measured.cps_per_MBq == pytest.approx(truth["camera"]["sensitivity_cps_per_MBq"], rel=0.03)


def test_calibrate_command_writes_the_registry_round_trip(sample, tmp_path):
    registry = tmp_path / "registry.json"
    registry.write_text('{"entries": []}')
    planar = sample / "calibration" / "planar_source.dcm"
    proc = run_cli("calibrate", "spect", "--nm", str(planar), "--write", "--registry", str(registry), "--by", "A. Physicist", check=True)
    reported = json.loads(proc.stdout)["cps_per_MBq"]
    found = calibration.find_sensitivity(
        "Tandem_Discovery_670_Pro", "megp", get_nuclide("Lu-177"), EnergyWindow(0, 187.2, 228.8), registry
    )
    assert found is not None and found.cps_per_MBq == pytest.approx(reported, rel=1e-4)
    # a measured entry with its provenance: the planar acquisition's date and instance, the source, who, validity
    assert (found.origin, found.date, found.valid_until, found.by) == ("measured", "2026-11-02", "2027-11-02", "A. Physicist")
    assert found.input == str(pydicom.dcmread(planar, stop_before_pixels=True).SOPInstanceUID)
    assert (found.source_activity_MBq, found.source_activity_time) == (100.0, "2026-11-02T08:00:00")
    # the sample's own registry holds the same derivation, marked simulated
    shipped = calibration.find_sensitivity("Tandem_Discovery_670_Pro", "MEGP", get_nuclide("Lu-177"), EnergyWindow(0, 187.2, 228.8),
                                           sample / "sensitivity.json")
    assert shipped.cps_per_MBq == pytest.approx(reported, rel=1e-3) and shipped.origin == "simulated"
    # a second derivation replaces the entry rather than adding one; by defaults to the user name
    run_cli("calibrate", "spect", "--nm", str(planar), "--activity", "50", "--write", "--registry", str(registry), "--valid-days", "30", check=True)
    entries = calibration.load_registry(registry)
    assert len(entries) == 1 and entries[0].cps_per_MBq == pytest.approx(2 * reported, rel=1e-3)
    assert (entries[0].by, entries[0].valid_until, entries[0].source_activity_MBq) == (getpass.getuser(), "2026-12-02", 50.0)
    assert calibration.calibration_warnings(entries[0], datetime(2026, 11, 20, 10), ["GE Xeleris"]) == []


def test_the_shipped_registry_holds_no_simulated_or_unsourced_entry():
    """Simulated numbers never apply to real cameras: the default registry holds none (the
    sample's calibration lives in data-samples/lu177-iec/sensitivity.json)."""
    for entry in calibration.load_registry(calibration.default_registry()):
        assert entry.origin in ("measured", "vendor") and calibration.calibration_warnings(entry, datetime.fromisoformat(entry.date), []) == []


MEASURED = calibration.SensitivityEntry(
    "Tandem_Discovery_670_Pro", "MEGP", "Lu-177", (187.2, 228.8), 9.0, origin="measured", date="2026-01-10",
    valid_until="2027-01-10", by="A. Physicist", input="1.2.3", source_activity_MBq=100.0, source_activity_time="2026-01-10T08:00:00",
)
SIMULATED = dataclasses.replace(MEASURED, origin="simulated", by="", input="", source_activity_MBq=None, source_activity_time="",
                                simulator="simulate_lu177_iec.py")


def _warned(entry, acquired: str, software=("GE Xeleris 4.0",), max_age_days=365) -> str:
    return " | ".join(calibration.calibration_warnings(entry, datetime.fromisoformat(acquired), list(software), max_age_days))


def test_calibration_warnings():
    assert _warned(MEASURED, "2026-06-01T10:00") == ""
    # simulated: trusted only for the projections its simulator made
    assert _warned(SIMULATED, "2026-06-01T10:00", ["simulate_lu177_iec.py"]) == ""
    assert "SIMULATED calibration (by simulate_lu177_iec.py) for a real camera" in _warned(SIMULATED, "2026-06-01T10:00")
    # validity date: the acquisition day itself is still valid, the day after is not
    assert _warned(MEASURED, "2027-01-10T23:00", max_age_days=1000) == ""
    assert "EXPIRED: valid until 2027-01-10" in _warned(MEASURED, "2027-01-11T08:00", max_age_days=1000)
    # age, either side of the acquisition, at the limit and one day past it
    assert _warned(MEASURED, "2026-02-09T10:00", max_age_days=30) == ""
    assert "31 days from the acquisition on 2026-02-10 (more than 30 days)" in _warned(MEASURED, "2026-02-10T10:00", max_age_days=30)
    assert "31 days from the acquisition" in _warned(MEASURED, "2025-12-10T10:00", max_age_days=30)
    # unknown or incomplete provenance; unknown acquisition date
    old_format = calibration.SensitivityEntry("X", "MEGP", "Lu-177", (187.2, 228.8), 9.0, source="someone's number")
    assert "of unknown origin" in _warned(old_format, "2026-06-01T10:00")
    assert "measured without by, input" in _warned(dataclasses.replace(MEASURED, by="", input=""), "2026-06-01T10:00")
    assert "vendor without reference" in _warned(dataclasses.replace(MEASURED, origin="vendor"), "2026-06-01T10:00")
    assert calibration.calibration_warnings(MEASURED, None, []) == ["acquisition date unknown: calibration validity and age not checked"]


def _as_real_camera(sample: Path, tmp_path: Path) -> Path:
    """The sample projections as if a real camera had made them (its own software version)."""
    ds = pydicom.dcmread(sample / "nm" / "projections.dcm")
    ds.SoftwareVersions = "GE Xeleris 4.0"
    path = tmp_path / "real_camera.dcm"
    ds.save_as(path)
    return path


def test_untrusted_calibration_is_said_in_recon_json_dicom_and_stderr(sample, tmp_path, dciodvfy):
    out = tmp_path / "out"
    proc = run_cli("recon", "spect", "--nm", str(_as_real_camera(sample, tmp_path)), "--out", str(out), "--registry", str(sample / "sensitivity.json"),
                   "--iterations", "1", "--subsets", "10", "--no-psf", check=True)
    said = "SIMULATED calibration (by simulate_lu177_iec.py) for a real camera (projections made by GE Xeleris 4.0)"
    assert f"warning: {said}" in proc.stderr
    recorded = json.loads((out / "recon.json").read_text())["calibration"]
    assert recorded["warnings"] == [said] and recorded["origin"] == "simulated" and recorded["entry"]["simulator"] == "simulate_lu177_iec.py"
    dicom = out / "dicom" / "NM_RECON.dcm"
    assert f"CALIBRATION WARNING: {said}" in pydicom.dcmread(dicom, stop_before_pixels=True).ImageComments
    assert dciodvfy_errors(dciodvfy, dicom) == []


@pytest.mark.parametrize("case", ["simulated for a real camera", "too old", "expired", "missing"])
def test_untrusted_calibration_is_refused_when_strict(sample, tmp_path, case):
    nm, registry = sample / "nm" / "projections.dcm", sample / "sensitivity.json"
    extra = ["--strict"]
    if case == "simulated for a real camera":
        nm, phrase = _as_real_camera(sample, tmp_path), "SIMULATED calibration"
    elif case in ("too old", "expired"):
        entry = dataclasses.replace(MEASURED, date="2026-01-10" if case == "too old" else "2025-06-01",
                                    valid_until="2027-01-10" if case == "too old" else "2026-06-01")
        registry = tmp_path / "registry.json"
        calibration.add_to_registry(entry, registry)
        extra += ["--max-calibration-age-days", "200"] if case == "too old" else []
        phrase = "296 days from the acquisition on 2026-11-02 (more than 200 days)" if case == "too old" else "EXPIRED"
    else:
        registry, extra, phrase = tmp_path / "empty.json", [], "no sensitivity for camera"   # refused, strict or not
        registry.write_text('{"entries": []}')
    out = tmp_path / "out"
    proc = run_cli("recon", "spect", "--nm", str(nm), "--out", str(out), "--registry", str(registry), *extra)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and phrase in lines[0], proc.stderr
    assert not out.exists()


def test_projector_keeps_the_object_sum_in_every_view():
    """The conversion v / (S·T) MBq assumes an unattenuated object's sum appears in every view."""
    geometry = ProjectionGeometry(np.arange(0, 360, 30.0), np.full(12, 200.0), 4.0, 24, 32, (0.0, 0.0), 40.0)
    system = system_matrix(geometry, RowRange(0, 24), None, None)
    obj = torch.zeros(32, 32, 24)
    obj[10:14, 18:21, 5:9] = 3.0
    obj[20, 8, 15] = 7.0
    views = system.forward(obj).sum(dim=(1, 2))
    assert torch.allclose(views, torch.full_like(views, float(obj.sum())), rtol=5e-3)  # bilinear rotation: ±0.3 %


def test_bq_per_ml_scale():
    # 1 MBq in a 1 mL voxel, S = 10 cps/MBq, 20 s per view → 200 counts per view
    assert 200.0 * calibration.bq_per_ml_scale(10.0, 20.0, 1.0, 1.0) == pytest.approx(1e6)
    assert calibration.bq_per_ml_scale(10.0, 20.0, 1.0, 0.5) == pytest.approx(2 * calibration.bq_per_ml_scale(10.0, 20.0, 1.0, 1.0))


def test_mean_decay_factor():
    lu = get_nuclide("Lu-177")
    half = lu.half_life_s
    assert lu.decay_factor(half) == pytest.approx(0.5)
    # over one half-life the mean activity is 1/(2 ln 2) of the start
    assert lu.mean_decay_factor(0.0, half) == pytest.approx(1 / (2 * np.log(2)))
