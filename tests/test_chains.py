"""Pieces of the after-scan chains without services: a PET selection's lesions carried onto a
later SPECT/CT of the patient by CT–CT registration (the patient lies elsewhere), patient keys."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from flows import chains
from flows.store import DONE, ResultRecord
from quant import synthetic as syn

LESION_MM = (12.0, -40.0, 10.0)


def _record(folder, route: str) -> ResultRecord:
    now = datetime.now(timezone.utc)
    return ResultRecord(1, "k", "1.2.3", 1, DONE, None, None, "src", {}, [], now, now, 0.0, None, None, None, str(folder), None,
                        route=route, summary={"lesion_labels": chains.LESIONS_FILE})


def test_pet_lesions_follow_the_patient_to_the_spect(tmp_path):
    pet_grid = syn.grid((64, 64, 80), (4.0, 4.0, 4.0))
    extent = syn.half_extent_mm(pet_grid)
    pet_dir = tmp_path / "pet-result"
    pet_dir.mkdir()
    sitk.WriteImage(syn.scene_ct(pet_grid, extent), str(pet_dir / chains.CT_FILE))
    r = np.linalg.norm(syn.points_mm(pet_grid) - np.asarray(LESION_MM), axis=-1)
    sitk.WriteImage(syn.image_like((r <= 12.0).astype(np.uint16), pet_grid, sitk.sitkUInt16), str(pet_dir / chains.LESIONS_FILE))

    moved = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.0, 0.0, np.deg2rad(4.0), (8.0, -6.0, 25.0))   # body → SPECT frame
    ct_grid = syn.grid((108, 108, 136), (2.5, 2.5, 2.5), origin=(-140.0, -120.0, -160.0))
    syn.write_ct_series(syn.scene_ct(ct_grid, extent, moved), tmp_path / "spect-ct")
    spect_grid = syn.grid((72, 72, 72), (4.4, 4.4, 4.4))

    carried, registration = chains._carry(_record(pet_dir, "pet"), tmp_path / "spect-ct", spect_grid,
                                          chains._pet_lesions(_record(pet_dir, "pet")))
    assert list(carried) == ["lesion_1"] and registration["reference"]["route"] == "pet"
    inside = np.argwhere(sitk.GetArrayViewFromImage(carried["lesion_1"]))
    centre = np.asarray(spect_grid.TransformContinuousIndexToPhysicalPoint(inside.mean(axis=0)[::-1].tolist()))
    expected = np.asarray(moved.TransformPoint(LESION_MM))
    assert np.linalg.norm(centre - expected) < 2.0, (centre, expected)          # the lesion went where the patient went
    volume_mL = len(inside) * 4.4**3 / 1000.0
    assert volume_mL == pytest.approx(4.0 / 3.0 * np.pi * 12.0**3 / 1000.0, rel=0.25)


def test_patient_keys_link_without_the_id():
    key = chains.patient_key("PAT-001")
    assert key == chains.patient_key(" PAT-001 ") and key != chains.patient_key("PAT-002") and "PAT-001" not in key
    assert chains.patient_key("PAT-001", "HOSPITAL-A") != key


def test_a_configured_segmenter_gives_the_reference_regions(tmp_path):
    """No SEG in the study: the configured command runs on the CT folder and its SEG is used."""
    from flows import samples

    files, scene = samples.write_psma_study(tmp_path / "study")
    seg = files.files_by_kind["seg"][0]
    tool = tmp_path / "segment.py"     # stands for TotalSegmentator & co.: reads {ct}, writes {out}
    tool.write_text("import shutil, sys, pathlib\n"
                    "assert any(pathlib.Path(sys.argv[1]).glob('*.dcm'))\n"
                    f"shutil.copy({str(seg)!r}, pathlib.Path(sys.argv[2]) / 'organs.dcm')\n")
    import sys

    steps: list = []
    result = chains.pet_chain(tmp_path / "study" / "pet", tmp_path / "study" / "ct", [], tmp_path / "result", steps,
                              segmenter=f"{sys.executable} {tool} {{ct}} {{out}}", work=tmp_path)
    assert result.status == DONE and result.summary["verdicts"]["vision"] is True
    assert [s.name for s in steps] == ["tracer", "segmenter", "reference-regions", "selection", "report-pdf"]
    assert result.summary["references_suv_mean"]["liver"] == pytest.approx(scene.reference_suv["liver"], rel=0.02)

    failing = tmp_path / "fail.py"
    failing.write_text("import sys; sys.exit('no GPU for the model')\n")
    with pytest.raises(chains.InputError, match="segmenter .* failed \\(exit 1\\): no GPU for the model"):
        chains.pet_chain(tmp_path / "study" / "pet", tmp_path / "study" / "ct", [], tmp_path / "result2", [],
                         segmenter=f"{sys.executable} {failing} {{ct}} {{out}}", work=tmp_path / "w2")


def _spect_row(folder, study_uid: str, cycle: str, acquired: str, status: str = DONE, version: int = 1) -> ResultRecord:
    now = datetime.now(timezone.utc)
    return ResultRecord(1, "k", study_uid, version, status, None, None, "src", {}, [], now, now, 0.0, None, None, None, str(folder), None,
                        route=chains.ROUTE_SPECT, summary={"reference_time": acquired}, cycle_key=cycle)


def test_a_cycle_with_its_time_points_complete_gets_its_dosimetry(tmp_path):
    """Time points 1 and 3 of a cycle were processed before (their results keep the CT as
    NIfTI); time point 2 arrives last with its regions on its SPECT grid: the cycle's dosimetry
    runs on the three in chronological order with time point 2 as reference, the liver TIA is
    within 10 % of the analytic truth and the RT Dose is on time point 2's CT."""
    import json

    from dosimetry_fixtures import make_study

    from quant import registration as reg
    from quant.phantom_qc import read_image
    from recon.io.ct import read_ct_series

    study = make_study(tmp_path / "study")
    rows = []
    for k in (0, 2):
        sitk.WriteImage(read_ct_series(study.cts[k])[0], str(study.spects[k] / chains.CT_FILE))
        rows.append(_spect_row(study.spects[k], f"1.2.{k}", "cycle-1", study.times[k].isoformat()))
    stale = _spect_row(study.spects[0], "1.2.0", "cycle-1", study.times[0].isoformat())
    rows = [stale, *rows,
            _spect_row(study.spects[0], "1.2.7", "cycle-2", study.times[0].isoformat()),                 # another cycle
            _spect_row(study.spects[0], "1.2.8", "cycle-1", study.times[0].isoformat(), status="failed"),
            _spect_row(study.spects[1], "1.2.1", "cycle-1", study.times[1].isoformat())]                 # this study's older version
    earlier = chains._cycle_timepoints(rows, "cycle-1", "1.2.1")
    assert [r.study_uid for r in earlier] == ["1.2.0", "1.2.2"] and earlier[0] is rows[1]

    spect = read_image(study.spects[1] / "dicom" / "NM_RECON.dcm").image
    masks = {("lesion_1" if name == "lesion" else name): reg.resample_mask(sitk.ReadImage(str(path)), spect, None)
             for name, path in study.masks_tp2.items()}
    settings = tmp_path / "dose_settings.json"
    settings.write_text(json.dumps({"monte_carlo_repetitions": 0, "pdf": False}))
    result = chains.cycle_dosimetry(earlier, study.spects[1], study.cts[1], study.times[1].isoformat(), masks,
                                    chains.DoseOptions(3, settings), tmp_path / "dose")
    assert result.times_h == pytest.approx([4.0, 24.0, 96.0])
    data = json.loads((tmp_path / "dose" / "dose.json").read_text())
    assert data["inputs"]["reference_time_point"] == 2 and [r.get("registered") for r in data["registration"]] == [True, None, True]
    vois = {v.name: v for v in result.vois}
    assert vois["lesion_1"].kind == "lesion" and vois["liver"].kind == "organ"
    assert vois["liver"].tia.value == pytest.approx(study.truth_tia_MBq_h["liver"], rel=0.10)
    assert "rtdose.dcm" in result.files
    rt = pydicom.dcmread(tmp_path / "dose" / "rtdose.dcm", stop_before_pixels=True)
    assert rt.FrameOfReferenceUID == read_ct_series(study.cts[1])[1].FrameOfReferenceUID
    summary = chains._dose_summary(result)
    assert summary["vois"]["liver"]["dose_Gy"] > 0 and summary["time_points"] == 3


def test_dose_options_from_set_keys(tmp_path):
    from flows import jobs
    from recon.errors import InputError

    assert jobs.dose_options({}) == chains.DoseOptions(3, None)
    assert jobs.dose_parameters(jobs.dose_options({})) == {}     # the keys of results made with the defaults do not change
    settings = tmp_path / "s.json"
    settings.write_text('{"pdf": false}')
    options = jobs.dose_options({"dose_timepoints": "2", "dose_settings": str(settings), "iterations": "4"})
    assert options == chains.DoseOptions(2, settings.absolute())
    assert jobs.dose_parameters(options) == {"dose_timepoints": 2, "dose_settings": str(settings.absolute())}
    assert jobs.spect_parameters({"dose_timepoints": "2", "iterations": "4"}).algorithm.iterations == 4
    with pytest.raises(InputError, match="dose_timepoints"):
        jobs.dose_options({"dose_timepoints": "-1"})
    (tmp_path / "bad.json").write_text('{"no_such_setting": 1}')
    with pytest.raises(InputError, match="unknown settings"):
        jobs.dose_options({"dose_settings": str(tmp_path / "bad.json")})
