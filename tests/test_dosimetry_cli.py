"""``theraflow dose`` end to end on a synthetic three-time-point Lu-177 SPECT/CT study with known
biokinetics and repositioning between scans (tests/dosimetry_fixtures.py), and its refusals
of bad input (one ``error:`` line, exit 2, nothing written)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dosimetry_fixtures import ADMINISTERED_MBQ, TEST_S_TABLE_CITATION, make_study, write_test_s_table
from conftest import dciodvfy_errors, run_cli
from quant.dosimetry import organ, rtdose


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return make_study(tmp_path_factory.mktemp("dose") / "study")


@pytest.fixture(scope="module")
def settings_file(study) -> Path:
    path = study.folder / "settings.json"
    path.write_text(json.dumps({"monte_carlo_repetitions": 30, "pdf": False, "dose": {"calibration_relative_sd": 0.04}}))
    return path


def _args(study, out: Path, *extra: str, spects=None, cts=None) -> list[str]:
    args = ["dose"]
    for spect, ct in zip(spects or study.spects, cts or study.cts):
        args += ["--timepoint", str(spect)] + (["--ct", str(ct)] if ct else [])
    args += ["--masks", *(f"{k}={v}" for k, v in study.masks.items()), "--lesions", *(f"{k}={v}" for k, v in study.lesions.items())]
    return args + ["--out", str(out), *extra]


@pytest.fixture(scope="module")
def result(study, settings_file) -> Path:
    out = study.folder.parent / "out"
    run_cli(*_args(study, out, "--settings", str(settings_file)), check=True)
    return out


def test_outputs_and_numbers(result, study):
    data = json.loads((result / "dose.json").read_text())
    assert {"dose.json", "dose.csv", "dvh.csv", "dose.nii.gz", "report.html", "rtdose.dcm"} <= {p.name for p in result.iterdir()}
    vois = {v["name"]: v for v in data["vois"]}
    assert [round(t["hours_after_administration"], 3) for t in data["inputs"]["time_points"]] == [4.0, 24.0, 96.0]
    assert data["inputs"]["administered_MBq"] == pytest.approx(ADMINISTERED_MBQ)
    # the large organ's TIA within 10 % of the analytic truth, through registration and resampling
    liver = vois["liver"]
    assert liver["tia_MBq_h"]["value"] == pytest.approx(study.truth_tia_MBq_h["liver"], rel=0.10)
    assert liver["tiac_h"] == pytest.approx(liver["tia_MBq_h"]["value"] / ADMINISTERED_MBQ)
    # doses carry a budget whose shares add up, calibration's relative part exact (4 %)
    dose = liver["dose_Gy"]
    assert sum(dose["shares"].values()) == pytest.approx(1.0)
    assert dose["components"]["calibration"] == pytest.approx(0.04 * dose["value"], rel=1e-6)
    # no S-value table: the liver dose is its electron self-dose, TIA × E_e / CT mass, and every output says so
    expected = vois["liver"]["tia_MBq_h"]["value"] * 3.6e9 * 0.147923 * 1.602176634e-13 / (vois["liver"]["mass_g"] * 1e-3)
    assert dose["value"] == pytest.approx(expected, rel=1e-5)
    assert vois["liver"]["method"].startswith(organ.ELECTRON_ONLY)
    assert data["data_sources"]["organ_s_values"] is None and data["data_sources"]["organ_dose_model"] == organ.ELECTRON_ONLY
    assert f"organ doses: {organ.ELECTRON_ONLY}" in data["notes"]
    assert organ.ELECTRON_ONLY in (result / "dose.csv").read_text() and organ.ELECTRON_ONLY in (result / "report.html").read_text()
    assert vois["lesion"]["method"].startswith("sphere model")
    # the voxel dose in the liver's interior agrees with the electron self-dose within 15 %
    assert vois["liver"]["voxel_dvh"]["D50_Gy"] == pytest.approx(dose["value"], rel=0.15)
    assert data["monte_carlo_check"]["repetitions"] == 30
    assert "versions" in data


def test_registration_recovers_the_repositioning(result, study):
    """Time point 2 was moved by 6, −4, 5 mm and 3° about z: the written transform agrees within 1 mm."""
    estimated = sitk.ReadTransform(str(result / "registration_tp2.tfm"))
    truth = sitk.Euler3DTransform()
    truth.SetRotation(0.0, 0.0, math.radians(3.0))
    truth.SetTranslation((6.0, -4.0, 5.0))
    points = [(-40.0, 0.0, -20.0), (50.0, 30.0, -20.0), (0.0, -25.0, 20.0)]
    errors = [np.linalg.norm(np.subtract(estimated.TransformPoint(p), truth.TransformPoint(p))) for p in points]
    assert max(errors) < 1.0, errors


def test_rt_dose_valid_and_on_the_ct_frame(result, study, dciodvfy):
    path = result / "rtdose.dcm"
    assert dciodvfy_errors(dciodvfy, path) == []
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ct = pydicom.dcmread(sorted(study.cts[0].glob("*.dcm"))[0], stop_before_pixels=True)
    assert ds.FrameOfReferenceUID == ct.FrameOfReferenceUID and ds.StudyInstanceUID == ct.StudyInstanceUID
    assert len(ds.ReferencedImageSequence) == len(list(study.cts[0].glob("*.dcm")))
    back = rtdose.read_rt_dose(path)
    nifti = sitk.ReadImage(str(result / "dose.nii.gz"))
    assert back.GetOrigin() == pytest.approx(nifti.GetOrigin(), abs=1e-3)
    assert back.GetSpacing() == pytest.approx(nifti.GetSpacing(), abs=1e-4)
    a, b = sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(nifti)
    assert np.abs(a - b).max() <= b.max() / 30000


def _refused(out: Path, proc, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], proc.stderr
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))


def test_refusals(study, tmp_path):
    out = tmp_path / "out"
    # times out of order
    _refused(out, run_cli(*_args(study, out, spects=study.spects[::-1], cts=study.cts[::-1])), "out of order")
    # a time point of another patient
    other = make_study(tmp_path / "other", hours=(24.0,), patient_id="SYN-DOSE-2")
    _refused(out, run_cli(*_args(study, out, spects=[study.spects[0], other.spects[0]], cts=[study.cts[0], other.cts[0]])), "another patient")
    # a time point in another frame of reference without CT to register it
    _refused(out, run_cli(*_args(study, out, cts=[study.cts[0], None, study.cts[2]])), "frame of reference")
    # no calibration: a NIfTI time point without the recon.json that says Bq/mL
    nifti = tmp_path / "counts.nii.gz"
    reader = sitk.ReadImage(str(study.spects[0] / "dicom" / "NM_RECON.dcm"))
    sitk.WriteImage(reader, str(nifti))
    _refused(out, run_cli(*_args(study, out, spects=[nifti, *study.spects[1:]])), "no calibration")
    # masks on another grid than the reference CT
    bad = tmp_path / "bad_mask"
    shutil.copytree(study.folder, bad, ignore=shutil.ignore_patterns("tp*"))
    mask = sitk.ReadImage(str(study.masks["liver"]))
    mask.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(mask, str(bad / "liver.nii.gz"))
    args = _args(study, out)
    args[args.index(f"liver={study.masks['liver']}")] = f"liver={bad / 'liver.nii.gz'}"
    _refused(out, run_cli(*args), "another grid")
    # an S-value table without its citation, or malformed
    table = write_test_s_table(tmp_path / "s.csv")
    _refused(out, run_cli(*_args(study, out, "--svalues", str(table))), "citation")
    (tmp_path / "bad.csv").write_text(",Liver\nLiver,x\n")
    _refused(out, run_cli(*_args(study, out, "--svalues", str(tmp_path / "bad.csv"), "--svalues-source", "test")), "not a number")


def test_report(result, tmp_path):
    from quant.dosimetry import report

    page = (result / "report.html").read_text()
    assert page.count("alt='TAC ") == 3 and page.count("alt='dose ") == 3
    assert "± " in page and "largest: " in page
    if shutil.which("chromium") is None:
        pytest.skip("chromium not installed")
    assert report.write_pdf(result / "report.html", tmp_path / "report.pdf") is None
    assert (tmp_path / "report.pdf").read_bytes()[:5] == b"%PDF-"


def test_settings_file_and_recovery_curve(tmp_path):
    from recon.errors import InputError
    from quant.dosimetry import pipeline

    settings_path = tmp_path / "settings.json"
    settings_path.write_text(json.dumps({"recovery_curve": [[0.5, 0.31], [26.5, 0.82]], "voxel_tail": "physical", "dose": {"tac_model": "trapezoid"}}))
    settings = pipeline.PipelineSettings.from_file(settings_path)
    assert settings.recovery_curve == ((0.5, None, 0.31), (26.5, None, 0.82))   # one curve for every lesion-to-background ratio
    assert settings.dose.tac_model == "trapezoid" and settings.voxel_tail == "physical"
    settings_path.write_text(json.dumps({"recovery_curve": [[0.5, 4, 0.2], [0.5, 10, 0.31]], "lesion_background_shell_mm": [15, 25]}))
    settings = pipeline.PipelineSettings.from_file(settings_path)
    assert settings.recovery_curve == ((0.5, 4.0, 0.2), (0.5, 10.0, 0.31)) and settings.lesion_background_shell_mm == (15.0, 25.0)
    settings_path.write_text(json.dumps({"recovery_curve": [[0.5, 4, 0.2], [0.5, 0.31]]}))
    with pytest.raises(InputError, match="ratio"):
        pipeline.PipelineSettings.from_file(settings_path)
    settings_path.write_text(json.dumps({"dose": {"s_values": "s.csv", "s_values_source": "test"}}))
    assert pipeline.PipelineSettings.from_file(settings_path).dose.s_values == str(tmp_path / "s.csv")  # beside the settings file
    settings_path.write_text(json.dumps({"kernel": "other"}))
    with pytest.raises(InputError, match="unknown settings"):
        pipeline.PipelineSettings.from_file(settings_path)


def test_masks_drawn_on_another_time_point(result, study, settings_file, tmp_path):
    """The same regions drawn on the second CT, carried by its registration: the liver's TIA
    agrees within 3 % with the masks drawn on the reference CT."""
    out = tmp_path / "out"
    args = ["dose"]
    for spect, ct in zip(study.spects, study.cts):
        args += ["--timepoint", str(spect), "--ct", str(ct)]
    args += ["--masks", f"liver={study.masks_tp2['liver']}", "--masks-on", "2", "--settings", str(settings_file), "--out", str(out)]
    table = write_test_s_table(tmp_path / "s.csv")
    run_cli(*args[:-2], "--svalues", str(table), "--svalues-source", TEST_S_TABLE_CITATION, "--out", str(out), check=True)
    data = json.loads((out / "dose.json").read_text())
    carried = {v["name"]: v for v in data["vois"]}
    reference = {v["name"]: v for v in json.loads((result / "dose.json").read_text())["vois"]}
    assert carried["liver"]["tia_MBq_h"]["value"] == pytest.approx(reference["liver"]["tia_MBq_h"]["value"], rel=0.03)
    # with the (made-up) S-value table: the liver self S-value mass-scaled to its CT mass, the citation as given
    liver = carried["liver"]
    s_self = organ.self_s_value(organ.read_s_table(table, "test"), "liver", liver["mass_g"])[0]
    assert liver["dose_Gy"]["value"] == pytest.approx(liver["tia_MBq_h"]["value"] * 3600 * s_self * 1e-3, rel=1e-6)
    assert data["data_sources"]["organ_s_values"]["citation"] == TEST_S_TABLE_CITATION
    assert TEST_S_TABLE_CITATION in liver["method"] and not any(organ.ELECTRON_ONLY in n for n in data["notes"])
    # the same masks said to be on the reference CT are on the wrong place: the liver then holds less activity
    wrong = tmp_path / "wrong"
    run_cli(*[a if a != "2" else "1" for a in args[:-1]], str(wrong), check=True)
    misplaced = {v["name"]: v for v in json.loads((wrong / "dose.json").read_text())["vois"]}
    assert misplaced["liver"]["tia_MBq_h"]["value"] < 0.97 * reference["liver"]["tia_MBq_h"]["value"]
