"""Pieces of the after-scan chains without services: a PET selection's lesions carried onto a
later SPECT/CT of the patient by CT–CT registration (the patient lies elsewhere), patient keys."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
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
