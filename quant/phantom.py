"""Phantom analysis on images with geometry: sphere VOIs and recovery coefficients.

Concentrations in the image's units (Bq/mL for theraflow reconstructions); positions in mm (LPS).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk


def physical_coordinates(image: sitk.Image) -> np.ndarray:
    """Voxel-centre coordinates [z, y, x, 3] in mm (LPS), in SimpleITK array order."""
    size = image.GetSize()
    index = np.stack(np.meshgrid(*(np.arange(n) for n in size), indexing="ij"), axis=-1).reshape(-1, 3)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    points = np.asarray(image.GetOrigin()) + (index * np.asarray(image.GetSpacing())) @ direction.T
    return points.reshape(*size, 3).transpose(2, 1, 0, 3)


def sphere_mask(image: sitk.Image, centre_mm: Sequence[float], diameter_mm: float) -> np.ndarray:
    """Boolean array (SimpleITK order) of voxels whose centres lie inside the sphere."""
    distance = np.linalg.norm(physical_coordinates(image) - np.asarray(centre_mm), axis=-1)
    return distance <= diameter_mm / 2.0


def sphere_weights(image: sitk.Image, centre_mm: Sequence[float], diameter_mm: float, subsamples: int = 5) -> np.ndarray:
    """Fraction of each voxel's volume inside the sphere (SimpleITK order), estimated on a
    ``subsamples``³ grid of points per voxel (axis-aligned voxels)."""
    points = physical_coordinates(image)
    spacing = np.asarray(image.GetSpacing())
    offsets = (np.arange(subsamples) + 0.5) / subsamples - 0.5
    inside = np.zeros(points.shape[:3])
    for ox in offsets:
        for oy in offsets:
            for oz in offsets:
                shifted = points + np.array([ox, oy, oz]) * spacing
                inside += np.linalg.norm(shifted - np.asarray(centre_mm), axis=-1) <= diameter_mm / 2.0
    return inside / subsamples**3


def mean_in(image: sitk.Image, mask: np.ndarray) -> float:
    return float(sitk.GetArrayViewFromImage(image)[mask].mean())


def recovery_coefficients(image: sitk.Image, centres_mm: Sequence[Sequence[float]], diameters_mm: Sequence[float], true_concentration: float) -> list[float]:
    """RCmean of each sphere: mean inside its physical volume / true concentration."""
    return [mean_in(image, sphere_mask(image, c, d)) / true_concentration for c, d in zip(centres_mm, diameters_mm)]


def centroid_mm(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    """Intensity-weighted centroid (mm, LPS) of the image inside ``mask``."""
    weights = sitk.GetArrayViewFromImage(image)[mask].astype(np.float64)
    return (physical_coordinates(image)[mask] * weights[:, None]).sum(axis=0) / weights.sum()
