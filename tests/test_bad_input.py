"""Bad input: one `error:` line naming the file and the problem, exit 2, nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom

from conftest import SAMPLE, run_cli


def _recon(tmp_path: Path, nm: Path, ct: Path | None, *extra: str):
    """``recon spect`` calibrated by the sample's registry unless ``extra`` names one."""
    out = tmp_path / "out"
    registry = [] if "--registry" in extra else ["--registry", str(SAMPLE / "sensitivity.json")]
    args = ["recon", "spect", "--nm", str(nm), "--out", str(out), *registry, *extra]
    if ct is not None:
        args += ["--ct", str(ct)]
    return run_cli(*args), out


def _assert_refused(proc, out: Path, *phrases: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out")], "partial output left behind"


def _edited_nm(sample: Path, tmp_path: Path, edit) -> Path:
    ds = pydicom.dcmread(sample / "nm" / "projections.dcm")
    edit(ds)
    path = tmp_path / "edited_projections.dcm"
    ds.save_as(path)
    return path


def test_not_nm(sample, tmp_path):
    ct_file = sorted((sample / "ct").glob("*.dcm"))[0]
    proc, out = _recon(tmp_path, ct_file, None)
    _assert_refused(proc, out, ct_file.name, "not an NM image")


def test_not_dicom(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    proc, out = _recon(tmp_path, junk, None)
    _assert_refused(proc, out, "notes.txt", "not a readable DICOM file")


def test_no_photopeak_window_for_the_nuclide(sample, tmp_path):
    def tc99m_windows(ds):
        for item, (lo, hi) in zip(ds.EnergyWindowInformationSequence, [(108.0, 129.5), (129.5, 150.5), (150.5, 171.6)]):
            item.EnergyWindowRangeSequence[0].EnergyWindowLowerLimit = lo
            item.EnergyWindowRangeSequence[0].EnergyWindowUpperLimit = hi

    nm = _edited_nm(sample, tmp_path, tc99m_windows)
    proc, out = _recon(tmp_path, nm, sample / "ct")
    _assert_refused(proc, out, nm.name, "no photopeak window for Lu-177")


def test_truncated_pixel_data(sample, tmp_path):
    nm = tmp_path / "truncated.dcm"
    nm.write_bytes((sample / "nm" / "projections.dcm").read_bytes()[:-50_000])
    proc, out = _recon(tmp_path, nm, sample / "ct")
    _assert_refused(proc, out, nm.name, "truncated pixel data")


def test_ct_not_covering_the_spect_field(sample, tmp_path):
    ct = tmp_path / "ct_top"
    ct.mkdir()
    for path in sorted((sample / "ct").glob("*.dcm"))[:15]:  # z from +40 down to −30 mm: misses the phantom
        shutil.copy(path, ct)
    proc, out = _recon(tmp_path, sample / "nm" / "projections.dcm", ct)
    _assert_refused(proc, out, "ct_top", "CT covers z")


def test_unknown_collimator(sample, tmp_path):
    def rename(ds):
        for item in ds.DetectorInformationSequence:
            item.CollimatorGridName = "PINHOLE9"

    nm = _edited_nm(sample, tmp_path, rename)
    proc, out = _recon(tmp_path, nm, sample / "ct")
    _assert_refused(proc, out, nm.name, "unknown collimator 'PINHOLE9'")


def test_missing_frame_duration(sample, tmp_path):
    def drop(ds):
        del ds.RotationInformationSequence[0].ActualFrameDuration

    nm = _edited_nm(sample, tmp_path, drop)
    proc, out = _recon(tmp_path, nm, sample / "ct")
    _assert_refused(proc, out, nm.name, "missing acquisition time")


def test_no_sensitivity_for_the_camera(sample, tmp_path):
    registry = tmp_path / "empty.json"
    registry.write_text('{"entries": []}')
    proc, out = _recon(tmp_path, sample / "nm" / "projections.dcm", sample / "ct", "--registry", str(registry))
    _assert_refused(proc, out, "projections.dcm", "no sensitivity", "--sensitivity")


def test_missing_argument_is_one_error_line(tmp_path):
    proc = run_cli("recon", "spect", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


def test_existing_unrelated_output_folder_is_kept(sample, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    proc = run_cli("recon", "spect", "--nm", str(sample / "nm" / "projections.dcm"), "--out", str(out))
    assert proc.returncode == 2 and "not a previous theraflow result" in proc.stderr
    assert (out / "precious.txt").read_text() == "keep me"


def test_nuclide_contradicting_the_header(sample, tmp_path):
    proc, out = _recon(tmp_path, sample / "nm" / "projections.dcm", None, "--nuclide", "Ac-225")
    _assert_refused(proc, out, "projections.dcm", "the header names Lu-177 but --nuclide says Ac-225")


def test_windows_fitting_no_photopeak_of_the_named_nuclide(sample, tmp_path):
    def actinium(ds):   # header says Ac-225, windows are Lu-177's (named neutrally)
        item = ds.RadiopharmaceuticalInformationSequence[0]
        item.Radiopharmaceutical = "Ac-225 PSMA"
        item.RadionuclideCodeSequence[0].CodeMeaning = "^225^Actinium"
        for window in ds.EnergyWindowInformationSequence:
            window.EnergyWindowName = "W"

    nm = _edited_nm(sample, tmp_path, actinium)
    proc, out = _recon(tmp_path, nm, None)
    _assert_refused(proc, out, nm.name, "no photopeak window for Ac-225", "440.5, 218.2")
