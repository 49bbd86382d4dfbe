"""Vendor conventions for NM tomographic projections, one small adapter per vendor.

The common reader (``recon.io.nm_projections``) asks an adapter only what the DICOM standard
leaves to the vendor: where the axis of rotation lies in patient coordinates, any private
radial-position offsets and, for cameras whose views are not described by the standard
StartAngle/AngularStep/RadialPosition attributes (the GE StarGuide ring, ``recon.io.starguide``),
the geometry of every frame and the scale of its pixel values. Everything else is read the
same way for every camera.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from pydicom import Dataset


@dataclass(frozen=True)
class FrameGeometry:
    """Where every frame of a file was acquired, from a vendor's own attributes.

    All arrays have one entry per frame, in file order. Angles in degrees in the common
    convention of ``recon.io.nm_projections`` (detector normal n(θ) = (sin θ, cos θ, 0) in LPS);
    ``radii_mm``: distance from the axis of rotation to the detector face along n(θ);
    ``lateral_offsets_mm``: position of the centre of the detector's columns along
    u(θ) = (−cos θ, sin θ, 0) relative to the axis; ``durations_s``: acquisition time of each
    frame; ``detectors``: which detector acquired it (frames of one detector are sequential)."""

    angles_deg: np.ndarray
    radii_mm: np.ndarray
    lateral_offsets_mm: np.ndarray
    durations_s: np.ndarray
    detectors: np.ndarray


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


def _first_row_z_standard(ds: Dataset) -> float:
    """z [mm, LPS] of the centre of row 0: the first detector's ImagePositionPatient."""
    return _first_pixel_position(ds)[2]


def _no_offsets(ds: Dataset, n_views: int) -> np.ndarray:
    return np.zeros(n_views)


def _ge_xeleris_offsets(ds: Dataset, n_views: int) -> np.ndarray:
    """GE Xeleris stores per-view radial corrections (mm) in private (0055,1022)>(0013,101E)."""
    try:
        values = np.asarray(ds[0x0055, 0x1022][0][0x0013, 0x101E].value, dtype=float).reshape(-1, 3)[:, -1]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return np.zeros(n_views)
    return values if values.size == n_views else np.zeros(n_views)


def _rescale_slope(ds: Dataset) -> float:
    value = ds.get("RescaleSlope")
    return 1.0 if value in (None, "") else float(value)   # a slope of 0 is refused, not taken for 1


STANDARD_SEQUENCES = ("EnergyWindowInformationSequence", "DetectorInformationSequence", "RotationInformationSequence")


@dataclass(frozen=True)
class VendorAdapter:
    """What one vendor does its own way. ``name`` is recorded in the provenance and selects the
    collimator table (``recon/spect/data/collimators.json``).

    ``matches``: whether a file is this vendor's (default: a ``manufacturer_keys`` entry occurs
    in Manufacturer). ``frame_geometry``: per-frame geometry from the vendor's own attributes,
    replacing the standard StartAngle/AngularStep/RadialPosition reading (None: standard).
    ``pixel_scale``: factor from stored pixel values to counts (per frame or one value)."""

    name: str
    manufacturer_keys: tuple[str, ...]
    rotation_axis_xy: Callable[[Dataset], tuple[float, float]]
    radial_offsets_mm: Callable[[Dataset, int], np.ndarray]
    first_row_z_mm: Callable[[Dataset], float] = _first_row_z_standard
    frame_geometry: Callable[[Path, Dataset], FrameGeometry] | None = None
    pixel_scale: Callable[[Dataset], float | np.ndarray] = _rescale_slope
    required_sequences: tuple[str, ...] = STANDARD_SEQUENCES
    matches: Callable[[Dataset], bool] | None = None

    def is_for(self, ds: Dataset) -> bool:
        if self.matches is not None:
            return self.matches(ds)
        manufacturer = str(ds.get("Manufacturer", "")).upper()
        return any(key in manufacturer for key in self.manufacturer_keys)


GE = VendorAdapter("GE", ("GE MEDICAL", "GE HEALTHCARE"), _axis_standard, _ge_xeleris_offsets)
SIEMENS = VendorAdapter("Siemens", ("SIEMENS",), _axis_standard, _no_offsets)
MEDISO = VendorAdapter("Mediso", ("MEDISO",), _axis_mediso, _no_offsets)
PHILIPS = VendorAdapter("Philips", ("PHILIPS", "ADAC"), _axis_standard, _no_offsets)
GENERIC = VendorAdapter("DICOM standard", (), _axis_standard, _no_offsets)
ADAPTERS: tuple[VendorAdapter, ...] = (GE, SIEMENS, MEDISO, PHILIPS)


def adapter_for(ds: Dataset) -> VendorAdapter:
    """The adapter for the file (the standard reading when none matches). Camera models with
    their own module are tried before their manufacturer's general adapter."""
    from recon.io.starguide import STARGUIDE  # its own module; imported here to avoid an import cycle

    for adapter in (STARGUIDE, *ADAPTERS):
        if adapter.is_for(ds):
            return adapter
    return GENERIC
