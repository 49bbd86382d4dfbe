"""Figures of a PET reconstruction against the truth written by data-samples/simulate_pet_iec.py
(truth/phantom.json, truth/activity.nii.gz): the same measures for every simulated scanner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from quant.phantom import physical_coordinates, recovery_coefficients


def background_mask(image: sitk.Image, truth: dict, truth_dir: Path) -> np.ndarray:
    """Voxels at least 8 mm inside the background compartment, within 16 mm of the spheres'
    plane and at least 12 mm from every sphere's surface."""
    activity = sitk.ReadImage(str(truth_dir / "activity.nii.gz"))
    background = truth["background_concentration_Bq_per_mL"]
    pure = sitk.BinaryThreshold(activity, background * 0.999, background * 1.001)
    eroded = sitk.BinaryErode(pure, [4, 4, 4])
    mask = sitk.GetArrayFromImage(sitk.Resample(eroded, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)).astype(bool)
    xyz = physical_coordinates(image)
    mask &= np.abs(xyz[..., 2] - truth["spheres"][0]["centre_mm"][2]) <= 16
    for sphere in truth["spheres"]:
        mask &= np.linalg.norm(xyz - np.asarray(sphere["centre_mm"]), axis=-1) > sphere["diameter_mm"] / 2 + 12
    return mask


def background_ratio(image: sitk.Image, truth: dict, truth_dir: Path) -> float:
    """Mean of the background voxels / true background concentration."""
    mask = background_mask(image, truth, truth_dir)
    if mask.sum() < 1000:
        raise AssertionError(f"only {mask.sum()} background voxels")
    return float(sitk.GetArrayFromImage(image)[mask].mean()) / truth["background_concentration_Bq_per_mL"]


def sphere_rcs(image: sitk.Image, truth: dict) -> np.ndarray:
    """Recovery coefficients (mean in the true sphere / true concentration), 10 ... 37 mm."""
    spheres = truth["spheres"]
    return np.array(recovery_coefficients(image, [s["centre_mm"] for s in spheres], [s["diameter_mm"] for s in spheres],
                                          spheres[0]["concentration_Bq_per_mL"]))


def sphere_offsets_mm(image: sitk.Image, truth: dict) -> np.ndarray:
    """Distance [mm] from each sphere's true centre to the centroid of the reconstructed hot spot:
    voxels within d/2 + 10 mm of the true centre above half way from the background to their
    maximum, weighted by their excess over the background."""
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    xyz = physical_coordinates(image)
    background = truth["background_concentration_Bq_per_mL"]
    offsets = []
    for sphere in truth["spheres"]:
        centre = np.asarray(sphere["centre_mm"])
        near = np.linalg.norm(xyz - centre, axis=-1) <= sphere["diameter_mm"] / 2 + 10
        excess = np.where(near, values - background, 0.0)
        hot = excess >= 0.5 * excess.max()
        weights = excess[hot]
        offsets.append(float(np.linalg.norm((xyz[hot] * weights[:, None]).sum(axis=0) / weights.sum() - centre)))
    return np.array(offsets)


def slice_activity_ratios(image: sitk.Image, truth_dir: Path) -> np.ndarray:
    """Activity in each axial slice of the image / the truth's in the same slab (the truth sampled
    at the image's voxel centres by linear interpolation), first slice first."""
    truth = sitk.Resample(sitk.ReadImage(str(truth_dir / "activity.nii.gz")), image, sitk.Transform(), sitk.sitkLinear, 0.0)
    per_slice = [sitk.GetArrayFromImage(i).sum(axis=(1, 2), dtype=np.float64) for i in (image, truth)]
    return per_slice[0] / per_slice[1]


def field_activity_ratio(image: sitk.Image, truth_dir: Path) -> float:
    """Activity in the whole reconstructed field / the truth's activity in the same box [MBq / MBq]."""
    activity = sitk.ReadImage(str(truth_dir / "activity.nii.gz"))
    reconstructed = float(sitk.GetArrayFromImage(image).sum(dtype=np.float64)) * float(np.prod(image.GetSpacing()))
    lower = np.array(image.GetOrigin()) - np.array(image.GetSpacing()) / 2
    upper = lower + np.array(image.GetSize()) * np.array(image.GetSpacing())
    xyz = physical_coordinates(activity)
    inside = np.all((xyz >= lower) & (xyz < upper), axis=-1)
    true = float(sitk.GetArrayFromImage(activity)[inside].sum(dtype=np.float64)) * float(np.prod(activity.GetSpacing()))
    return reconstructed / true
