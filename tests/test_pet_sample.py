"""The simulated Ga-68 IEC phantom (data-samples/ga68-iec-pet, a Monte Carlo independent of the
reconstruction) through ``theraflow recon pet``: accuracy, TOF benefit, DICOM output and SUV."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pet_truth_checks as checks
import pytest
import SimpleITK as sitk
from conftest import dciodvfy_errors, run_cli
from pet_truth_checks import sphere_rcs

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data-samples" / "ga68-iec-pet"


@pytest.fixture(scope="module")
def truth() -> dict:
    return json.loads((SAMPLE / "truth" / "phantom.json").read_text())


@pytest.fixture(scope="module")
def pet_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pet") / "recon"
    run_cli("recon", "pet", "--listmode", str(SAMPLE / "listmode.petsird"), "--ct", str(SAMPLE / "ct"), "--out", str(out), check=True)
    return out


@pytest.fixture(scope="module")
def non_tof_image() -> sitk.Image:
    from recon.pet.pipeline import PetParameters, reconstruct_pet

    return reconstruct_pet(SAMPLE / "listmode.petsird", SAMPLE / "ct", PetParameters(tof=False)).image


def background_mask(image: sitk.Image, truth: dict) -> np.ndarray:
    return checks.background_mask(image, truth, SAMPLE / "truth")


def test_background_within_5_percent(pet_out, truth):
    image = sitk.ReadImage(str(pet_out / "recon.nii.gz"))
    mask = background_mask(image, truth)
    assert mask.sum() > 3000
    measured = sitk.GetArrayFromImage(image)[mask].mean()
    assert measured == pytest.approx(truth["background_concentration_Bq_per_mL"], rel=0.05)


def test_activity_in_the_whole_field(pet_out):
    """Activity in the whole reconstructed field (the detector's axial extent, every slice)
    against the truth's in the same box, within the 5 % bound set before measuring it. It was
    missed (-5.1 %) while the image support was cut on the attenuated sensitivity, which dropped
    the end planes behind the phantom (end slices at 0.22 of the truth)."""
    ratio = checks.field_activity_ratio(sitk.ReadImage(str(pet_out / "recon.nii.gz")), SAMPLE / "truth")
    assert ratio == pytest.approx(1.0, abs=0.05), ratio


def test_axial_end_slices_hold_their_activity(pet_out):
    """Each axial slice's activity against the truth's in the same slab, the two end slices
    included (they are seen by the fewest LORs): within 10 %."""
    ratios = checks.slice_activity_ratios(sitk.ReadImage(str(pet_out / "recon.nii.gz")), SAMPLE / "truth")
    assert np.all(np.abs(ratios - 1) <= 0.10), ratios


def test_readme_figures_are_the_measured_ones(pet_out, truth):
    """The figures README.md quotes for the sample (background, RCmean per sphere, scatter
    fraction) and the sample's own README counts are the ones this reconstruction and the
    truth give (to their printed precision), so a README number cannot drift from the code."""
    readme = (ROOT / "README.md").read_text()
    quoted = re.search(r"background ([+-][0-9.]+) % of truth, RCmean ([0-9. /\n]+?) for the 10.37 mm spheres, "
                       r"tail-fitted scatter fraction ([0-9.]+)\s+\(simulated ([0-9.]+)\), activity in the whole field ([0-9.]+) ",
                       readme.replace("\n", " "))
    assert quoted, "README sentence on the PET sample not found"
    image = sitk.ReadImage(str(pet_out / "recon.nii.gz"))
    background = 100 * (checks.background_ratio(image, truth, SAMPLE / "truth") - 1)
    assert abs(background - float(quoted.group(1))) <= 0.06, background
    rcs = [float(v) for v in quoted.group(2).split("/")]
    assert np.allclose(sphere_rcs(image, truth), rcs, atol=0.006), sphere_rcs(image, truth)
    provenance = json.loads((pet_out / "recon.json").read_text())
    assert abs(provenance["corrections"]["scatter"]["scatter_fraction"] - float(quoted.group(3))) <= 0.0006
    field = checks.field_activity_ratio(image, SAMPLE / "truth")
    assert abs(field - float(quoted.group(5))) <= 0.0006, field
    counts = truth["counts"]
    assert abs(counts["scatter"] / counts["prompts"] - float(quoted.group(4))) <= 0.0006
    sample_readme = (SAMPLE / "README.md").read_text()
    row = f"| {counts['prompts']} | {counts['trues']} | {counts['scatter']} | {counts['randoms']} | {counts['delayeds']} |"
    assert row in sample_readme
    assert (provenance["events"]["prompts"], provenance["events"]["delayeds"]) == (counts["prompts"], counts["delayeds"])


def test_sphere_recovery_grows_with_size(pet_out, truth):
    rc = sphere_rcs(sitk.ReadImage(str(pet_out / "recon.nii.gz")), truth)
    assert rc[-1] >= 0.8, rc  # 37 mm
    assert rc[-1] <= 1.15, rc
    # increasing with size, within a noise margin of 0.05 between neighbours; and clearly overall
    assert np.all(np.diff(rc) > -0.05), rc
    assert rc[0] + 0.1 < rc[-1], rc


def test_tof_improves_contrast_at_equal_iterations(pet_out, non_tof_image, truth):
    tof_image = sitk.ReadImage(str(pet_out / "recon.nii.gz"))
    contrast = {}
    for name, image in (("tof", tof_image), ("non_tof", non_tof_image)):
        background = sitk.GetArrayFromImage(image)[background_mask(image, truth)].mean()
        ratio = truth["spheres"][0]["concentration_Bq_per_mL"] / truth["background_concentration_Bq_per_mL"]
        contrast[name] = (sphere_rcs(image, truth) * truth["spheres"][0]["concentration_Bq_per_mL"] / background - 1) / (ratio - 1)
    # contrast recovery of the 10-22 mm spheres, averaged: TOF converges faster
    assert contrast["tof"][:4].mean() > contrast["non_tof"][:4].mean() + 0.03, contrast


def test_outputs_dicom_geometry_and_provenance(pet_out, truth, dciodvfy):
    nifti = sitk.ReadImage(str(pet_out / "recon.nii.gz"))
    files = sorted((pet_out / "dicom").glob("*.dcm"))
    assert len(files) == nifti.GetSize()[2]
    for path in files[:: max(1, len(files) // 4)]:
        assert dciodvfy_errors(dciodvfy, path) == [], path.name
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(pet_out / "dicom")))
    series = reader.Execute()
    assert np.allclose(series.GetOrigin(), nifti.GetOrigin(), atol=1e-3)
    assert np.allclose(series.GetSpacing(), nifti.GetSpacing(), atol=1e-4)
    values, reference = sitk.GetArrayFromImage(series), sitk.GetArrayFromImage(nifti)
    assert np.abs(values - reference).max() <= reference.max() / 30000
    provenance = json.loads((pet_out / "recon.json").read_text())
    assert provenance["inputs"]["listmode_sop_instance_uid"] == truth["uids"]["pet_sop_instance"]
    assert len(provenance["inputs"]["ct_sop_instance_uids"]) == len(list((SAMPLE / "ct").glob("*.dcm")))
    assert provenance["corrections"]["randoms"] == "DLYD"
    assert set(provenance["corrections"]["applied"]) >= {"ATTN", "SCAT", "RAN", "NORM", "DECY"}
    assert provenance["units"] == "Bq/mL" and provenance["versions"]["petsird"]


def test_quant_suv_reads_the_series(pet_out, truth):
    """`theraflow quant suv` on the PET series: SUVbw scale = weight / decayed dose, and the
    background in SUV close to its true value."""
    result = run_cli("quant", "suv", str(pet_out / "dicom"), "--json", check=True)
    report = json.loads(result.stdout)
    acquisition = truth["acquisition"]
    assert report["suv_bw_scale"] == pytest.approx(acquisition["suv_bw_of_1_Bq_per_mL"], rel=1e-3)
