"""theraflow's default SPECT reconstruction of the Monte Carlo sample (data-samples/lu177-mc),
whose simulator shares no model with it: photon transport with Klein-Nishina scattering in water
and bone, hexagonal-hole collimator with septal penetration, energy resolution, and a separate
simulated point-source acquisition in air from which ``theraflow calibrate spect`` made the
sample's registry entry.

Run ``python tests/test_spect_mc_sample.py RECON_DIR`` to print the figures of any reconstruction
of the sample (how the README's mutation figures were made)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from quant.phantom import centroid_mm, physical_coordinates, sphere_mask

MC = Path(__file__).resolve().parents[1] / "data-samples" / "lu177-mc"
# Plausibility band for the photopeak scatter-to-primary ratio (S/P) of Lu-177 at 208 keV (20 %
# window, medium-energy collimator, water): the project's own bound, NOT a published range. A range
# of 0.15-0.5 was once recalled from MIRD pamphlet 26 / de Nijs et al. 2014, but no published Lu-177
# S/P or scatter fraction could be read and verified (see data-samples/lu177-mc/README.md); the band
# only tells scatter that is absent (S/P 0) or grossly inflated from a body-sized water phantom's.
SP_PLAUSIBLE = (0.15, 0.5)


def load_truth() -> dict:
    return json.loads((MC / "truth" / "phantom.json").read_text())


@pytest.fixture(scope="module")
def mc_truth() -> dict:
    if not (MC / "nm" / "projections.dcm").exists():
        pytest.fail(f"sample missing: run python data-samples/simulate_lu177_mc.py --out {MC}")
    return load_truth()


@pytest.fixture(scope="module")
def mc_recon(mc_truth, tmp_path_factory) -> Path:
    """The README's default job: CT attenuation, PSF, TEW, OSEM 4x10, the sample's registry, strict."""
    from conftest import run_cli

    out = tmp_path_factory.mktemp("mc") / "recon"
    run_cli("recon", "spect", "--nm", str(MC / "nm" / "projections.dcm"), "--ct", str(MC / "ct"), "--out", str(out),
            "--registry", str(MC / "sensitivity.json"), "--strict", check=True)
    return out


def background_mask(image: sitk.Image, truth: dict) -> np.ndarray:
    """Voxels 15 mm or more inside the water (from the cylinder's wall and ends, the bone rod and
    every sphere's surface)."""
    p = physical_coordinates(image)
    cyl, bone = truth["phantom"]["water_cylinder"], truth["phantom"]["bone_rod"]
    radial = np.hypot(p[..., 0] - cyl["axis_xy_mm"][0], p[..., 1] - cyl["axis_xy_mm"][1])
    to_bone = np.hypot(p[..., 0] - bone["axis_xy_mm"][0], p[..., 1] - bone["axis_xy_mm"][1])
    z0, z1 = cyl["z_range_mm"]
    mask = (radial < cyl["radius_mm"] - 15) & (to_bone > bone["radius_mm"] + 15) & (p[..., 2] > z0 + 15) & (p[..., 2] < z1 - 15)
    for s in truth["spheres"]:
        mask &= np.linalg.norm(p - np.asarray(s["centre_mm"]), axis=-1) > s["diameter_mm"] / 2 + 15
    return mask


def figures(recon: Path, truth: dict) -> dict:
    """Total activity (MBq), background mean (Bq/mL), sphere RCmean and centroid errors (mm) of
    the reconstruction in ``recon``."""
    image = sitk.ReadImage(str(recon / "recon.nii.gz"))
    array = sitk.GetArrayViewFromImage(image)
    voxel_mL = float(np.prod(image.GetSpacing())) / 1000.0
    background = truth["background_concentration_Bq_per_mL"]
    excess = sitk.GetImageFromArray(np.clip(array - background, 0, None).astype(np.float32))
    excess.CopyInformation(image)
    out = {"total_MBq": float(array.sum(dtype=np.float64)) * voxel_mL / 1e6,
           "background_Bq_per_mL": float(array[background_mask(image, truth)].mean()), "rc": {}, "centroid_error_mm": {}}
    for s in truth["spheres"]:
        d = s["diameter_mm"]
        out["rc"][d] = float(array[sphere_mask(image, s["centre_mm"], d)].mean()) / s["concentration_Bq_per_mL"]
        found = centroid_mm(excess, sphere_mask(image, s["centre_mm"], d + 16))
        out["centroid_error_mm"][d] = float(np.linalg.norm(found - np.asarray(s["centre_mm"])))
    return out


@pytest.fixture(scope="module")
def mc_figures(mc_recon, mc_truth) -> dict:
    return figures(mc_recon, mc_truth)


def test_registry_is_theraflow_calibrate_of_the_separate_calibration_acquisition(mc_truth):
    """The sample's registry entry is what ``theraflow calibrate spect`` derives from the
    simulated point source in air, marked simulated by this simulator; within 3 % of the
    simulation's true photopeak sensitivity (TEW in air subtracts the 249.7 keV line's tail)."""
    from conftest import run_cli

    measured = json.loads(run_cli("calibrate", "spect", "--nm", str(MC / "calibration" / "point_source.dcm"), check=True).stdout)
    entry = json.loads((MC / "sensitivity.json").read_text())["entries"][0]
    assert entry["cps_per_MBq"] == pytest.approx(measured["cps_per_MBq"], rel=1e-4)
    assert entry["camera_model"] == measured["camera_model"] == mc_truth["camera"]["model"]
    assert entry["origin"] == "simulated" and entry["input"] == measured["input_sop_instance_uid"]
    for name in ("nm/projections.dcm", "calibration/point_source.dcm"):
        assert pydicom.dcmread(MC / name, stop_before_pixels=True).SoftwareVersions == entry["simulator"]
    assert entry["cps_per_MBq"] == pytest.approx(mc_truth["calibration"]["true_photopeak_cps_per_MBq_per_head"], rel=0.03)


def test_reconstruction_used_ct_psf_tew_and_the_trusted_registry(mc_recon):
    provenance = json.loads((mc_recon / "recon.json").read_text())
    assert provenance["corrections"]["attenuation"] and provenance["corrections"]["scatter"] == "tew"
    assert provenance["corrections"]["collimator_response"] is not None
    assert provenance["calibration"]["origin"] == "simulated" and provenance["calibration"]["warnings"] == []


def test_total_activity_within_5_percent(mc_figures, mc_truth):
    assert mc_figures["total_MBq"] == pytest.approx(mc_truth["total_activity_MBq"], rel=0.05)


def test_background_concentration_within_5_percent(mc_figures, mc_truth):
    assert mc_figures["background_Bq_per_mL"] == pytest.approx(mc_truth["background_concentration_Bq_per_mL"], rel=0.05)


def test_recovery_of_the_largest_spheres(mc_figures):
    """RCmean of the 37 and 28 mm spheres: 0.877 and 0.829 when written; the bounds (about
    +-0.07) fail with PSF modelling off (0.760, 0.664) or scatter correction off (0.959, 0.903)."""
    rc = mc_figures["rc"]
    assert 0.80 <= rc[37.0] <= 0.95, rc
    assert 0.75 <= rc[28.0] <= 0.90, rc
    assert rc[37.0] > rc[28.0] > rc[22.0] > rc[17.0], rc


def test_sphere_centroids_within_2_mm(mc_figures):
    errors = mc_figures["centroid_error_mm"]
    assert all(errors[d] < 2.0 for d in (37.0, 28.0, 22.0)), errors


def test_scatter_to_primary_consistent_and_plausible(mc_truth):
    """Photopeak S/P of the sample: (1) the truth's S/P is its own expected counts' ratio and the
    S/P that TEW measures on the DICOM projections (0.234) is the one those expected counts predict
    (within 1 %, Poisson noise is 0.2 %), so the file holds the simulated photopeak and side-window
    counts (TEW cannot tell the two side windows apart); (2) true
    (0.217, per view 0.209-0.226) and TEW-measured S/P lie in the plausibility band SP_PLAUSIBLE,
    an internal bound, not a published one (no published Lu-177 value could be verified); (3) TEW's
    estimate is within 15 % of the true scatter (it is not exact here). Fails with Compton
    scattering removed from the simulation (true S/P 0, TEW-measured 0.023)."""
    sp = mc_truth["photopeak_scatter_to_primary"]
    primary = np.asarray(mc_truth["expected_counts"]["primary_per_window"])     # lower, photopeak, upper
    scatter = np.asarray(mc_truth["expected_counts"]["scatter_per_window"])
    assert sp["total"] == pytest.approx(scatter[1] / primary[1], abs=1e-4)
    ds = pydicom.dcmread(MC / "nm" / "projections.dcm")
    counts = ds.pixel_array.reshape(3, -1).sum(axis=1, dtype=np.float64)          # windows in file order
    widths = [float(w.EnergyWindowRangeSequence[0].EnergyWindowUpperLimit) - float(w.EnergyWindowRangeSequence[0].EnergyWindowLowerLimit)
              for w in ds.EnergyWindowInformationSequence]

    def tew_sp(c: np.ndarray) -> float:
        tew = (c[0] / widths[0] + c[2] / widths[2]) * widths[1] / 2
        return float(tew / (c[1] - tew))

    measured = tew_sp(counts)
    assert measured == pytest.approx(tew_sp(primary + scatter), rel=0.01)
    assert SP_PLAUSIBLE[0] <= sp["per_view_min"] <= sp["total"] <= sp["per_view_max"] <= SP_PLAUSIBLE[1], sp
    assert SP_PLAUSIBLE[0] <= measured <= SP_PLAUSIBLE[1], measured
    assert sp["tew_estimate_over_true_scatter"] == pytest.approx(1.0, abs=0.15)


if __name__ == "__main__":
    print(json.dumps(figures(Path(sys.argv[1]), load_truth()), indent=1))
