"""Reference regions and organs from a study's segmentations (quant.regions): name mapping,
a SEG on a finer CT grid carried onto the PET grid, RTSTRUCT ROIs, other frames left out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from flows import samples
from quant import regions, suv
from recon.errors import InputError
from test_quant_cli import _rtstruct


@pytest.mark.parametrize("name, canonical", [
    ("liver", "liver"), ("Liver", "liver"), ("parotid_gland_left", "parotid"), ("Parotid Gland R", "parotid"),
    ("PAROTID-GLAND", "parotid"), ("aorta", "blood_pool"), ("kidney_right", "kidney"), ("Kidney L", "kidney"),
    ("urinary_bladder", "bladder"), ("spleen", "spleen"), ("brain", None), ("liver_lesion", None),
])
def test_names_are_mapped_without_case_or_laterality(name, canonical):
    assert regions.canonical_region(name, regions.load_name_table()) == canonical


def test_a_site_table_adds_names_and_refuses_names_that_are_no_file_names(tmp_path):
    table = tmp_path / "names.json"
    table.write_text(json.dumps({"Leber": "liver"}))
    assert regions.canonical_region("LEBER", regions.load_name_table(table)) == "liver"
    table.write_text(json.dumps({"Leber": "../liver"}))
    with pytest.raises(InputError, match="canonical names"):
        regions.load_name_table(table)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("psma")
    files, scene = samples.write_psma_study(folder)
    return {"folder": folder, "scene": scene, "series": suv.read_pet_series(folder / "pet"), "seg": files.files_by_kind["seg"][0]}


def test_seg_on_the_ct_grid_gives_the_regions_on_the_pet_grid(study):
    series, scene = study["series"], study["scene"]
    found = regions.regions_from_files([study["seg"]], series.image, str(series.first.FrameOfReferenceUID))
    assert sorted(found.masks) == ["blood_pool", "liver", "parotid", "spleen"] and found.unknown == []
    for name, mask in found.masks.items():
        got = sitk.GetArrayViewFromImage(mask).astype(bool)
        truth = sitk.GetArrayViewFromImage(scene.masks[name]).astype(bool)
        # a voxel is in when more than half of its centre's neighbourhood is: no rim of background
        assert (got & ~truth).sum() <= 0.02 * truth.sum() and (got & truth).sum() >= 0.8 * truth.sum(), name
        assert mask.GetSpacing() == series.image.GetSpacing()
    values = sitk.GetArrayViewFromImage(scene.suv)
    liver = sitk.GetArrayViewFromImage(found.masks["liver"]) != 0
    assert float(values[liver].mean()) == pytest.approx(scene.reference_suv["liver"], rel=0.02)


def test_rtstruct_rois_and_other_frames(study, tmp_path):
    series = study["series"]
    frame = str(series.first.FrameOfReferenceUID)
    rt = _rtstruct(tmp_path / "rt.dcm", frame, {"Liver": -60.0, "Spleen": 60.0, "tumour": 0.0})
    other = _rtstruct(tmp_path / "other.dcm", "1.2.3.4.5", {"liver": 0.0})
    found = regions.regions_from_files([rt, other], series.image, frame)
    assert sorted(found.masks) == ["liver", "spleen"] and found.unknown == ["tumour"]
    assert len(found.other_frames) == 1 and "1.2.3.4.5" in found.other_frames[0]
    centre_x = [series.image.TransformContinuousIndexToPhysicalPoint(
        np.argwhere(sitk.GetArrayViewFromImage(found.masks[n])).mean(axis=0)[::-1].tolist())[0] for n in ("liver", "spleen")]
    assert centre_x == pytest.approx([-60.0, 60.0], abs=2.0)
