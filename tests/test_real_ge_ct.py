"""The real GE Discovery 670 Lu-177 patient with its CT: theraflow against PyTomography's own GE
pipeline, run independently on the same bed with attenuation correction, PSF and TEW scatter.

The reference is PyTomography 3.4's documented DICOM path as its tutorials run it: its projection
reader (``get_metadata``/``get_projections``), its TEW estimate
(``get_energy_window_scatter_estimate_projections``), its CT→μ (``get_attenuation_map_from_CT_slices``:
its own CT reader and alignment, its HU→μ table for the Optima CT540 at 120 kVp and 208 keV), its
PSF (``get_psfmeta_from_scanner_params('GI-MEGP', ...)``) and its ``SPECTSystemMatrix`` with OSEM.
theraflow runs ``reconstruct_spect`` (its reader, μ-map, collimator table and native projector).
Shared by both, to compare like with like: bed 2 (kidneys, liver, pelvis; bed 1 reaches above
the CT), 1 iteration × 10 subsets, the intrinsic resolution (3.9 mm FWHM at 140 keV), the scatter
smoothing (σ 8.5 mm) and theraflow's calibration factor (the file has no administered activity
and no calibration: any sensitivity serves, the same for both), so organ means are compared in
Bq/mL without normalisation.

Organ VOIs are boxes in LPS mm drawn on this patient's CT; in a hot organ the VOI is the part of
its box above 40 % of the box maximum. The bladder lies below the CT and below this bed's field,
so the pelvic VOI is the hot spot at the bottom of the field (bowel, by the CT).

theraflow's means come out 1–4 % higher: the HU→μ conversions differ below 0 HU (PyTomography's
fitted table gives less μ to fat, lung and foam); with PyTomography's μ-map in theraflow's
pipeline the totals agree to 0.01 %.

Cost: 2.5 min of CPU time in all on 2 cores (theraflow ~50 s, PyTomography ~90 s wall on a
lightly loaded machine: one PyTomography iteration sweeps all 60 views whatever the subsets).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch

from recon.io.ct import read_ct_series
from recon.io.nm_projections import read_acquisition
from recon.spect import calibration
from recon.spect.pipeline import _SCATTER_SMOOTHING_MM, SpectParameters, reconstruct_spect
from recon.spect.reconstruct import Algorithm

ITERATIONS, SUBSETS = 1, 10
SENSITIVITY_CPS_PER_MBQ = 9.0  # any value: applied to both reconstructions alike
INTRINSIC_FWHM_140KEV_CM = 0.39  # theraflow's GE value (recon/spect/data/collimators.json)
HOT_FRACTION = 0.4

# (lowest corner, highest corner) in LPS mm, and whether the VOI is the box's hot part
ORGANS = {
    "left kidney": ((60, 25, -215), (130, 105, -80), True),
    "right kidney": ((-105, 25, -185), (-35, 105, -80), True),
    "pelvic hot spot": ((-37, -22, -409), (95, 88, -299), True),
    "liver": ((-148, 13, -64), (-81, 66, -11), False),
    "background (paraspinal muscle)": ((25, 105, -280), (70, 135, -230), False),
}
LEFT_KIDNEY = ORGANS["left kidney"][:2]


@pytest.fixture(scope="module")
def bed(ge_d670) -> Path:
    return next(p for p in ge_d670 if p.name == "bed2_projections.dcm")


@pytest.fixture(scope="module")
def theraflow(bed, ge_d670_ct):
    t0 = time.perf_counter()
    params = SpectParameters(algorithm=Algorithm("osem", ITERATIONS, SUBSETS), sensitivity_cps_per_MBq=SENSITIVITY_CPS_PER_MBQ)
    result = reconstruct_spect([bed], ge_d670_ct, params)
    print(f"\ntheraflow: {time.perf_counter() - t0:.0f} s")
    return result


def _pytomography_ge(nm_file: Path, ct_dir: Path) -> sitk.Image:
    """PyTomography's GE pipeline as in its tutorials; the object in its own units (counts per
    view), placed with its own affine (voxel (i, j, k) at affine · (i, j, k, 1), LPS mm)."""
    from pytomography.algorithms import OSEM
    from pytomography.io.SPECT import dicom
    from pytomography.likelihoods import PoissonLogLikelihood
    from pytomography.projectors.SPECT import SPECTSystemMatrix
    from pytomography.transforms.SPECT import SPECTAttenuationTransform, SPECTPSFTransform

    file = str(nm_file)
    n_windows = len(pydicom.dcmread(file, stop_before_pixels=True).EnergyWindowInformationSequence)
    bounds = [dicom.get_energy_window_bounds(file, i) for i in range(n_windows)]
    peak = next(i for i, (lo, hi) in enumerate(bounds) if lo < 208 < hi)
    lower = min(range(n_windows), key=lambda i: abs(bounds[i][1] - bounds[peak][0]))
    upper = min(range(n_windows), key=lambda i: abs(bounds[i][0] - bounds[peak][1]))
    object_meta, proj_meta = dicom.get_metadata(file, index_peak=peak)
    projections = dicom.get_projections(file)
    sigma_cm = _SCATTER_SMOOTHING_MM / 10.0
    scatter = dicom.get_energy_window_scatter_estimate_projections(
        file, projections, peak, lower, upper, proj_meta=proj_meta, sigma_r=sigma_cm, sigma_z=sigma_cm
    )
    files_ct = sorted(str(p) for p in ct_dir.glob("*.dcm"))
    mu = dicom.get_attenuation_map_from_CT_slices(files_ct, file, index_peak=peak)
    psf_meta = dicom.get_psfmeta_from_scanner_params("GI-MEGP", energy_keV=208, intrinsic_resolution_140keV=INTRINSIC_FWHM_140KEV_CM)
    system = SPECTSystemMatrix(
        obj2obj_transforms=[SPECTAttenuationTransform(attenuation_map=mu), SPECTPSFTransform(psf_meta)],
        proj2proj_transforms=[],
        object_meta=object_meta,
        proj_meta=proj_meta,
    )
    torch.manual_seed(0)
    obj = OSEM(PoissonLogLikelihood(system, projections[peak], scatter))(n_iters=ITERATIONS, n_subsets=SUBSETS)
    image = sitk.GetImageFromArray(obj.cpu().numpy().transpose(2, 1, 0).astype(np.float32))
    affine = object_meta.affine_matrix
    image.SetSpacing([float(affine[d, d]) for d in range(3)])
    image.SetOrigin([float(v) for v in affine[:3, 3]])
    return image


@pytest.fixture(scope="module")
def reference(bed, ge_d670_ct, theraflow) -> sitk.Image:
    """PyTomography's reconstruction in Bq/mL with theraflow's calibration factor."""
    t0 = time.perf_counter()
    image = _pytomography_ge(bed, ge_d670_ct)
    print(f"\nPyTomography: {time.perf_counter() - t0:.0f} s")
    cal = theraflow.provenance["calibration"]
    voxel_mL = float(np.prod(image.GetSpacing())) / 1000.0
    return image * calibration.bq_per_ml_scale(cal["sensitivity_cps_per_MBq"], cal["frame_duration_s"], voxel_mL, cal["mean_decay_factor"])


def _box(image: sitk.Image, lo_mm, hi_mm) -> np.ndarray:
    """[z, y, x] mask of the voxels of ``image`` whose centres lie in the box (LPS mm)."""
    index = np.indices(image.GetSize()[::-1]).astype(np.float64)
    origin, spacing = np.array(image.GetOrigin()), np.array(image.GetSpacing())
    centre = [origin[d] + index[2 - d] * spacing[d] for d in range(3)]  # identity direction
    return np.all([(centre[d] >= lo_mm[d]) & (centre[d] <= hi_mm[d]) for d in range(3)], axis=0)


def _hot(values: np.ndarray, box: np.ndarray) -> np.ndarray:
    inside = np.where(box, values, 0.0)
    return inside > HOT_FRACTION * inside.max()


def _centroid_mm(image: sitk.Image, values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    index = np.argwhere(mask)[:, ::-1].astype(np.float64)  # (x, y, z)
    weights = values[mask].astype(np.float64)
    mean = (index * weights[:, None]).sum(axis=0) / weights.sum()
    return np.array(image.TransformContinuousIndexToPhysicalPoint(mean.tolist()))


@pytest.fixture(scope="module")
def comparison(theraflow, reference) -> dict[str, dict[str, float]]:
    """Per organ: mean Bq/mL of each on a common VOI (hot part of the mean of both images), and
    the distance [mm] between the activity centroids of each image's own hot VOI."""
    grid = theraflow.image
    ours = sitk.GetArrayFromImage(grid)
    theirs = sitk.GetArrayFromImage(sitk.Resample(reference, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0))
    table = {}
    for name, (lo, hi, hot) in ORGANS.items():
        box = _box(grid, lo, hi)
        common = _hot((ours + theirs) / 2, box) if hot else box
        own_ours, own_theirs = (_hot(ours, box), _hot(theirs, box)) if hot else (box, box)
        shift = _centroid_mm(grid, ours, own_ours) - _centroid_mm(grid, theirs, own_theirs)
        table[name] = {
            "voxels": int(common.sum()),
            "theraflow_Bq_per_mL": float(ours[common].mean()),
            "pytomography_Bq_per_mL": float(theirs[common].mean()),
            "ratio": float(ours[common].mean() / theirs[common].mean()),
            "centroid_distance_mm": float(np.linalg.norm(shift)),
        }
    everything = np.ones(ours.shape, bool)
    table["whole field"] = {
        "ratio": float(ours.sum() / theirs.sum()),
        "centroid_distance_mm": float(np.linalg.norm(_centroid_mm(grid, ours, everything) - _centroid_mm(grid, theirs, everything))),
    }
    print()
    for name, row in table.items():
        print(f"{name:32s} " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()))
    return table


def test_same_voxel_grid(theraflow, reference):
    """Both readers put the voxels at the same places: same transaxial origin and spacing,
    theraflow's axial slices (the rows holding counts) a whole-voxel sub-block of PyTomography's."""
    ours, theirs = theraflow.image, reference
    assert ours.GetSpacing() == pytest.approx(theirs.GetSpacing(), abs=1e-4)
    assert ours.GetOrigin()[:2] == pytest.approx(theirs.GetOrigin()[:2], abs=0.01)
    offset = (ours.GetOrigin()[2] - theirs.GetOrigin()[2]) / ours.GetSpacing()[2]
    assert offset == pytest.approx(round(offset), abs=1e-3) and offset >= 0
    assert round(offset) + ours.GetSize()[2] <= theirs.GetSize()[2]


def test_organ_means_agree_within_5_percent(comparison):
    for name, row in comparison.items():
        assert row["ratio"] == pytest.approx(1.0, abs=0.05), name


def test_activity_centroids_within_one_voxel(comparison, theraflow):
    voxel_mm = theraflow.image.GetSpacing()[0]
    for name, row in comparison.items():
        assert row["centroid_distance_mm"] < voxel_mm, name


def _ct_left_kidney(ct: sitk.Image) -> sitk.Image:
    """The left kidney on the CT: soft tissue (0–100 HU after 3 mm smoothing: this CT's noise is
    ±50 HU) in the kidney's box, opened, largest connected part."""
    hu = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(ct, 3.0))
    mask = sitk.GetImageFromArray((_box(ct, *LEFT_KIDNEY) & (hu > 0) & (hu < 100)).astype(np.uint8))
    mask.CopyInformation(ct)
    return sitk.RelabelComponent(sitk.ConnectedComponent(sitk.BinaryMorphologicalOpening(mask, [3, 3, 2]))) == 1


def test_kidney_uptake_inside_the_ct_kidney(theraflow, ge_d670_ct):
    """The CT–SPECT overlay: the left kidney's uptake lies on the CT's left kidney, and shifting
    the SPECT by 2 voxels along any axis would overlay it worse than the geometry read from the
    files (±1 voxel)."""
    ct = read_ct_series(ge_d670_ct)[0]
    kidney = _ct_left_kidney(ct)
    kidney_mL = float(sitk.GetArrayViewFromImage(kidney).sum()) * float(np.prod(ct.GetSpacing())) / 1000.0
    assert 50 < kidney_mL < 250
    grid = theraflow.image
    resample = lambda mask: sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(mask, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, 0.0))  # noqa: E731
    on_kidney = resample(kidney)
    near_kidney = resample(sitk.BinaryDilate(kidney, [2, 2, 2]))  # within ~4 mm (2 CT voxels)
    spect = sitk.GetArrayFromImage(grid)
    box = _box(grid, *LEFT_KIDNEY)

    def fraction(weights: np.ndarray, shift=(0, 0, 0)) -> float:
        shifted = np.roll(spect, shift, axis=(0, 1, 2))
        hot = _hot(shifted, box)
        return float((weights[hot] * shifted[hot]).sum() / shifted[hot].sum())

    inside, near = fraction(on_kidney), fraction(near_kidney)
    print(f"\nleft kidney VOI activity on the CT kidney ({kidney_mL:.0f} mL): {inside:.3f} inside, {near:.3f} within 4 mm")
    assert near > 0.85
    for axis in range(3):
        scores = {s: fraction(on_kidney, tuple(s if a == axis else 0 for a in range(3))) for s in (-2, -1, 0, 1, 2)}
        print(f"axis {'zyx'[axis]}: " + ", ".join(f"{s:+d} voxel {v:.3f}" for s, v in scores.items()))
        assert abs(max(scores, key=scores.get)) <= 1, (axis, scores)


def test_real_file_quirks(ge_d670, ge_d670_ct, theraflow):
    """GE's negative SpacingBetweenSlices in the CT, beds written without acquisition times."""
    ct = read_ct_series(ge_d670_ct)[0]
    assert ct.GetSpacing()[2] == pytest.approx(2.5) and ct.GetDirection() == pytest.approx(np.eye(3).ravel())
    assert ct.GetOrigin()[2] == pytest.approx(-378.0) and ct.GetSize()[2] == 303  # lowest slice first, slices ascending
    assert theraflow.provenance["corrections"]["attenuation"] is True
    assert not any("frames of reference" in note for note in theraflow.provenance["notes"])
    both = read_acquisition(ge_d670)
    assert both.acquisition_start is None
    assert any("no acquisition times, not decay-corrected" in note for note in both.notes)
