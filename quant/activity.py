"""Activity in volumes of interest of a calibrated emission image (SPECT or PET in Bq/mL).

Plain functions over SimpleITK images: the image holds activity concentration in Bq/mL at its
reference time (for theraflow's SPECT: the acquisition start), the masks lie on the image grid
(non-zero inside). Activities are in MBq at the same reference time; the percentage of injected
activity compares that activity with the administered activity *as administered* (no decay
correction: a %IA of a late time point includes physical decay, as in MIRD time–activity data).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from quant.voi import _check_same_grid, voxel_volume_mL
from recon.errors import InputError


@dataclass(frozen=True)
class VoiActivity:
    """One VOI of one image: volume (mL), activity (MBq), mean and maximum concentration (Bq/mL),
    activity as a percentage of the administered activity (None when that is unknown)."""

    name: str
    volume_mL: float
    activity_MBq: float
    mean_Bq_per_mL: float
    max_Bq_per_mL: float
    percent_injected: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def voi_activity(image: sitk.Image, mask: sitk.Image, name: str, administered_MBq: float | None = None) -> VoiActivity:
    """Activity of ``image`` (Bq/mL) inside ``mask`` (same grid). An empty mask is an error."""
    _check_same_grid(image, mask, f"mask {name!r}")
    inside = sitk.GetArrayViewFromImage(mask) != 0
    if not inside.any():
        raise InputError(None, f"mask {name!r} is empty on the image grid")
    values = sitk.GetArrayViewFromImage(image)[inside].astype(np.float64)
    voxel_mL = voxel_volume_mL(image)
    activity_MBq = float(values.sum()) * voxel_mL * 1e-6
    percent = None if not administered_MBq else 100.0 * activity_MBq / administered_MBq
    return VoiActivity(name, float(inside.sum()) * voxel_mL, activity_MBq, float(values.mean()), float(values.max()), percent)


def voi_activities(image: sitk.Image, masks: Mapping[str, sitk.Image], administered_MBq: float | None = None) -> list[VoiActivity]:
    """``voi_activity`` for every named mask, in the masks' order."""
    return [voi_activity(image, mask, name, administered_MBq) for name, mask in masks.items()]
