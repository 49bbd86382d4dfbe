"""Vendor conventions for NM tomographic projections, one small adapter per vendor.

The common reader (``recon.io.nm_projections``) asks an adapter only what the DICOM standard
leaves to the vendor: where the axis of rotation lies in patient coordinates and any private
radial-position offsets. Everything else is read the same way for every camera.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from pydicom import Dataset


def _first_pixel_position(ds: Dataset) -> tuple[float, float, float]:
    detector = ds.DetectorInformationSequence[0]
    if "ImagePositionPatient" not in detector:
        raise ValueError("DetectorInformationSequence has no ImagePositionPatient")
    x, y, z = (float(v) for v in detector.ImagePositionPatient)
    return x, y, z


def _half_width_mm(ds: Dataset) -> float:
    return (int(ds.Columns) - 1) / 2 * float(ds.PixelSpacing[1])


def _axis_standard(ds: Dataset) -> tuple[float, float]:
    """Axis of rotation (x, y) in LPS from the first detector's ImagePositionPatient.

    Usual reading (GE and most cameras): (x, y) is the corner of a square transaxial grid
    centred on the axis. When y is exactly 0 (Siemens Symbia/Intevo), x is the axis itself and
    the axis lies TableHeight below the table reference. Both as in PyTomography's reader."""
    x, y, _ = _first_pixel_position(ds)
    if y == 0.0:
        table_height = float(ds.RotationInformationSequence[0].get("TableHeight", 0.0) or 0.0)
        return x, -table_height
    half = _half_width_mm(ds)
    return x + half, y + half


def _axis_mediso(ds: Dataset) -> tuple[float, float]:
    """Mediso AnyScan: x as usual; the axis sits at y = 0."""
    x, _, _ = _first_pixel_position(ds)
    return x + _half_width_mm(ds), 0.0


def _no_offsets(ds: Dataset, n_views: int) -> np.ndarray:
    return np.zeros(n_views)


def _ge_xeleris_offsets(ds: Dataset, n_views: int) -> np.ndarray:
    """GE Xeleris stores per-view radial corrections (mm) in private (0055,1022)>(0013,101E)."""
    try:
        values = np.asarray(ds[0x0055, 0x1022][0][0x0013, 0x101E].value, dtype=float).reshape(-1, 3)[:, -1]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return np.zeros(n_views)
    return values if values.size == n_views else np.zeros(n_views)


@dataclass(frozen=True)
class VendorAdapter:
    """What one vendor does its own way. ``name`` is recorded in the provenance."""

    name: str
    manufacturer_keys: tuple[str, ...]
    rotation_axis_xy: Callable[[Dataset], tuple[float, float]]
    radial_offsets_mm: Callable[[Dataset, int], np.ndarray]


GE = VendorAdapter("GE", ("GE MEDICAL", "GE HEALTHCARE"), _axis_standard, _ge_xeleris_offsets)
SIEMENS = VendorAdapter("Siemens", ("SIEMENS",), _axis_standard, _no_offsets)
MEDISO = VendorAdapter("Mediso", ("MEDISO",), _axis_mediso, _no_offsets)
PHILIPS = VendorAdapter("Philips", ("PHILIPS", "ADAC"), _axis_standard, _no_offsets)
GENERIC = VendorAdapter("DICOM standard", (), _axis_standard, _no_offsets)
ADAPTERS: tuple[VendorAdapter, ...] = (GE, SIEMENS, MEDISO, PHILIPS)


def adapter_for(ds: Dataset) -> VendorAdapter:
    """The adapter for the file's Manufacturer (the standard reading when none matches)."""
    manufacturer = str(ds.get("Manufacturer", "")).upper()
    for adapter in ADAPTERS:
        if any(key in manufacturer for key in adapter.manufacturer_keys):
            return adapter
    return GENERIC
