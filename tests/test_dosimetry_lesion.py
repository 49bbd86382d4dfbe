"""Lesion concentration on a time point's own grid (quant.dosimetry.lesion) on images made here
by a linear imaging model (a uniform sphere in a uniform background, Gaussian blur on a 1.1 mm
grid, averaged into 8.84 mm voxels): partial-volume fractions sum to the drawn volume, the shell
background is the background, and a recovery RC₀ measured on one sphere (one place on the grid,
10:1) recovers the concentration of the same-sized sphere at other contrasts and, closer than the
mean over the voxel centres within the sphere divided by the phantom's RCmean, at other places on
the grid; a rigid move carries the mask; the recovery curve interpolates in volume and ratio."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from quant.dosimetry import lesion

VOXEL_MM, SUB, N = 8.8392, 8, 14          # coarse voxels, sub-voxels per voxel, coarse voxels per axis
SIGMA_MM = 16.0 / 2.355                    # the blur: 16 mm FWHM


def image(centre_mm, diameter_mm: float, sphere: float, background: float) -> sitk.Image:
    """Bq/mL image (N³ voxels of VOXEL_MM at the origin 0): background everywhere, ``sphere`` inside
    the sphere, blurred (Gaussian), averaged over each voxel."""
    step = VOXEL_MM / SUB
    axis = (np.arange(N * SUB) + 0.5) * step - VOXEL_MM / 2.0
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij", sparse=True)
    inside = (x - centre_mm[0]) ** 2 + (y - centre_mm[1]) ** 2 + (z - centre_mm[2]) ** 2 <= (diameter_mm / 2.0) ** 2
    fine = sitk.GetImageFromArray(np.where(inside, sphere, background).astype(np.float32))
    fine.SetSpacing([step] * 3)
    array = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(fine, SIGMA_MM))
    coarse = sitk.GetImageFromArray(array.reshape(N, SUB, N, SUB, N, SUB).mean(axis=(1, 3, 5)))
    coarse.SetSpacing([VOXEL_MM] * 3)
    return coarse


def centre_mean(img: sitk.Image, centre_mm, diameter_mm: float) -> float:
    """Mean over the voxel centres within the sphere (quant phantom's RCmean VOI)."""
    values = sitk.GetArrayViewFromImage(img)
    k = np.arange(N) * VOXEL_MM
    z, y, x = np.meshgrid(k, k, k, indexing="ij")
    inside = (x - centre_mm[0]) ** 2 + (y - centre_mm[1]) ** 2 + (z - centre_mm[2]) ** 2 <= (diameter_mm / 2.0) ** 2
    return float(values[inside].mean())


CENTRE = np.full(3, 6.5 * VOXEL_MM)     # the phantom's sphere: centred on a voxel corner
PLACES = [CENTRE + np.array(d) * VOXEL_MM for d in ((0.5, 0.5, 0.5), (0.25, 0.0, 0.5), (0.3, 0.1, 0.0), (0.0, 0.45, 0.2))]


@pytest.mark.parametrize("diameter,bound", [(22.0, 0.085), (28.0, 0.03)])
def test_recovery_measured_as_applied_recovers_the_lesion(diameter, bound):
    """RC₀ from one phantom sphere (10:1) recovers the lesion at the phantom's place at any
    contrast within 0.5 % (RCmean: its spill-in depends on the contrast), and at four other
    places on the grid within ``bound`` (22 mm: 8.5 %, 28 mm: 3 %; RCmean: 10 % and 19 %)."""
    phantom = image(CENTRE, diameter, 400e3, 40e3)
    rc0 = lesion.phantom_recovery(phantom, [(CENTRE, diameter, 400e3)], 40e3)[0]
    assert rc0.ratio == pytest.approx(10.0) and rc0.sample.background == pytest.approx(40e3, rel=0.01)
    assert rc0.volume_mL == pytest.approx(np.pi / 6 * diameter**3 / 1000, rel=0.03)
    assert rc0.sample.volume_mL == pytest.approx(rc0.volume_mL, rel=0.01)          # Σ fractions × voxel = drawn volume
    rc_mean = centre_mean(phantom, CENTRE, diameter) / 400e3                         # quant phantom's RCmean
    errors, old_errors = [], []
    for place in [CENTRE, *PLACES]:
        for sphere, background in ((300e3, 50e3), (90e3, 10e3)):
            patient = image(place, diameter, sphere, background)
            sample = lesion.sample_lesion(patient, lesion.sphere_mask(place, diameter))
            errors.append(sample.corrected(rc0.rc0) / sphere - 1.0)
            old_errors.append(centre_mean(patient, place, diameter) / rc_mean / sphere - 1.0)
    assert max(abs(e) for e in errors[:2]) < 0.005 < min(abs(e) for e in old_errors[:2]), (errors[:2], old_errors[:2])
    assert max(abs(e) for e in errors) < bound < max(abs(e) for e in old_errors), (errors, old_errors)
    # moved rigidly: the mask drawn at CENTRE, the lesion imaged at PLACES[1] (transform: image → mask frame)
    patient = image(PLACES[1], diameter, 300e3, 50e3)
    moved = lesion.sample_lesion(patient, lesion.sphere_mask(CENTRE, diameter), sitk.TranslationTransform(3, tuple(CENTRE - PLACES[1])))
    placed = lesion.sample_lesion(patient, lesion.sphere_mask(PLACES[1], diameter))
    assert moved.mean == pytest.approx(placed.mean, rel=0.005) and moved.background == pytest.approx(placed.background, rel=0.005)


def test_recovery_curve_interpolates_volume_and_ratio():
    curve = lesion.RecoveryCurve(((5.0, 4.0, 0.2), (10.0, 4.0, 0.3), (5.0, 16.0, 0.3), (10.0, 16.0, 0.5)))
    assert curve.rc0(7.5, 8.0) == pytest.approx(0.325)          # linear in volume, in log(ratio)
    assert curve.rc0(20.0, 100.0) == pytest.approx(0.5) and curve.rc0(1.0, 1.0) == pytest.approx(0.2)   # held beyond
    # the fixed point C = b + (c̄ − b)/RC₀(V, C/b): a lesion of 8:1 at 7.5 mL measured with RC₀ 0.325
    b, c = 10e3, 80e3
    concentration, rc = curve.concentration(lesion.LesionSample(b + 0.325 * (c - b), b, 7.5, 100), 7.5)
    assert concentration == pytest.approx(c, rel=1e-6) and rc == pytest.approx(0.325, rel=1e-6)
    single = lesion.RecoveryCurve(((5.0, None, 0.2), (10.0, None, 0.4)))
    assert single.rc0(7.5, 2.0) == single.rc0(7.5, 50.0) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="ratio"):
        lesion.RecoveryCurve(((5.0, None, 0.2), (10.0, 4.0, 0.4)))


def test_lesion_outside_the_image_and_bad_shell():
    img = image(CENTRE, 22.0, 400e3, 40e3)
    with pytest.raises(ValueError, match="outside"):
        lesion.sample_lesion(img, lesion.sphere_mask((500.0, 500.0, 500.0), 22.0))
    with pytest.raises(ValueError, match="shell"):
        lesion.sample_lesion(img, lesion.sphere_mask(CENTRE, 22.0), shell_mm=(30.0, 20.0))


def test_recovery_curve_from_quant_phantom_results(tmp_path):
    """The pipeline's ``recovery_phantom_qc``: RC₀ measured on the image a phantom_qc.json names
    (found beside it when recorded relative), one ratio per filling; a result without its image is refused."""
    from quant.dosimetry import pipeline
    from recon.errors import InputError

    paths = []
    for ratio in (4.0, 10.0):
        folder = tmp_path / f"filling{ratio:g}"
        folder.mkdir()
        sitk.WriteImage(image(CENTRE, 28.0, 40e3 * ratio, 40e3), str(folder / "phantom.nii.gz"))
        (folder / "phantom.json").write_text(json.dumps({"background_concentration_Bq_per_mL": 40e3, "spheres": [
            {"label": 5, "diameter_mm": 28.0, "centre_mm": list(CENTRE), "concentration_Bq_per_mL": 40e3 * ratio}]}))
        (folder / "phantom_qc.json").write_text(json.dumps({"image": "phantom.nii.gz", "phantom": "phantom.json", "background_true": 40e3,
                                                            "spheres": [{"label": 5, "true_concentration": 40e3 * ratio}]}))
        paths.append(folder / "phantom_qc.json")
    curve = pipeline.recovery_curve_from_phantom_qc(paths)
    assert [c[1] for c in curve] == [4.0, 10.0]
    assert curve[0][2] == pytest.approx(curve[1][2], rel=0.01)        # a linear imaging model: RC₀ independent of the ratio
    (tmp_path / "filling4" / "phantom.nii.gz").unlink()
    with pytest.raises(InputError, match="not found"):
        pipeline.recovery_curve_from_phantom_qc(paths)
