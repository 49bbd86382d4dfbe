"""GE StarGuide: the CZT ring camera's projection files, mapped onto the common geometry.

The StarGuide has 12 CZT detector columns on a ring. Each column moves radially, swivels about
its own axis and steps with the gantry, so every frame has its own detector angle, radius and
sideways position, and its own duration (the columns sweep continuously; data are binned into
frames). The camera writes one multi-frame NM TOMO file per detector column, frames by energy
window (EnergyWindowVector), and the per-frame geometry in private attributes. What is known of
them comes from PyTomography's StarGuide reader and projector (PyTomography 3.4.0,
``src/pytomography/io/SPECT/dicom.py`` ``get_starguide_projections`` (l. 881–909) and
``get_starguide_metadata`` (l. 911–954); ``src/pytomography/projectors/SPECT/
starguide_system_matrix.py``), checked there against the vendor's reconstruction of a phantom
(``docs/source/notebooks/t_starguide.ipynb``):

* (0099,1051), (0099,1052): detector position x, y, one value per frame, in **cm** (PyTomography
  divides the derived offsets by the voxel size in cm and uses the derived radii as PSF radii in
  cm);
* (0099,1053): detector angle θ in degrees, one per frame;
* (0009,1003): frame durations in **ms**, one per frame (PyTomography multiplies each view's
  forward projection by them / 1000, reconstructing counts per second);
* (0011,103B): factor from stored pixel values to counts (PyTomography multiplies the pixel
  data by it; RescaleSlope is used only when it is absent);
* radius r = x·sin θ + y·cos θ and sideways offset l = x·cos θ − y·sin θ (dicom.py l. 934–935).

In PyTomography's projector the view sits at its internal angle θ (its standard reader uses
DICOM angle + 180°), the object is translated by ``l / dx`` along the projection's lateral axis
before the central 16 columns are summed, and rows are not flipped (row 0 is the most superior
one; the CT is flipped in z instead). Expressed in theraflow's convention (n(φ) = (sin φ, cos φ, 0)
in LPS, columns along u(φ) = (−cos φ, sin φ, 0), rows along −z) that is:

* angle φ = θ + 180° (the (x, y) of the private attributes are −x, −y of LPS);
* radius r (mm = 10 × cm);
* the centre of the detector's columns at −l along u(φ) (lateral offset −10·l mm).

PyTomography aligns the StarGuide volume with the CT by their centres and ignores the
NM file's patient position; here the axis of rotation is taken at x = y = 0 of the patient
coordinates (the gantry isocentre, which GE's CT of the same frame of reference uses as its
origin) and row 0 at the z of the first detector's ImagePositionPatient, or, when the file has
none, at the z that centres the rows on z = 0 (PyTomography's alignment).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.tag import BaseTag, Tag

from recon.errors import InputError
from recon.io.vendors import FrameGeometry, VendorAdapter

X_CM = Tag(0x0099, 0x1051)
Y_CM = Tag(0x0099, 0x1052)
THETA_DEG = Tag(0x0099, 0x1053)
DURATION_MS = Tag(0x0009, 0x1003)
PIXEL_SCALE = Tag(0x0011, 0x103B)

#: Added to the private detector angle to give theraflow's (DICOM-convention) angle.
ANGLE_OFFSET_DEG = 180.0


def is_starguide(ds: Dataset) -> bool:
    """A GE file from a StarGuide: the model name says so, or the per-frame detector angles of
    the StarGuide's private attributes are there."""
    model = "".join(ch for ch in str(ds.get("ManufacturerModelName", "")).upper() if ch.isalnum())
    if "STARGUIDE" in model:
        return True
    return str(ds.get("Manufacturer", "")).upper().startswith("GE") and THETA_DEG in ds


def _per_frame(path: Path, ds: Dataset, tag: BaseTag, what: str, n_frames: int) -> np.ndarray:
    """One float per frame from private attribute ``tag``."""
    if tag not in ds:
        raise InputError(path, f"StarGuide file without {what} ({tag.group:04X},{tag.element:04X})")
    element = ds[tag]
    if element.VR in ("UN", "OB", None) or isinstance(element.value, (bytes, bytearray)):
        raise InputError(path, f"StarGuide {what} ({tag.group:04X},{tag.element:04X}) has no readable value representation")
    try:
        values = np.atleast_1d(np.asarray(element.value, dtype=np.float64))
    except (TypeError, ValueError):
        raise InputError(path, f"StarGuide {what} ({tag.group:04X},{tag.element:04X}) is not numeric") from None
    if values.size != n_frames or not np.all(np.isfinite(values)):
        raise InputError(
            path, f"StarGuide {what} ({tag.group:04X},{tag.element:04X}) has {values.size} values for {n_frames} frames"
        )
    return values


def frame_geometry(path: Path, ds: Dataset) -> FrameGeometry:
    """Angle, radius, lateral offset and duration of every frame (see the module docstring)."""
    n_frames = int(ds.NumberOfFrames)
    x_cm = _per_frame(path, ds, X_CM, "detector x position", n_frames)
    y_cm = _per_frame(path, ds, Y_CM, "detector y position", n_frames)
    theta = _per_frame(path, ds, THETA_DEG, "detector angle", n_frames)
    if DURATION_MS not in ds:
        raise InputError(path, "missing acquisition time: StarGuide file without frame durations (0009,1003)")
    duration_ms = _per_frame(path, ds, DURATION_MS, "frame durations", n_frames)
    if np.any(duration_ms <= 0):
        raise InputError(path, "missing acquisition time: a StarGuide frame duration (0009,1003) is not positive")
    t = np.radians(theta)
    radius_cm = x_cm * np.sin(t) + y_cm * np.cos(t)
    sideways_cm = x_cm * np.cos(t) - y_cm * np.sin(t)
    if np.any(radius_cm <= 0):
        raise InputError(path, "a StarGuide detector position lies behind its own detector (radius ≤ 0)")
    detectors = ds.get("DetectorVector")
    detectors = np.ones(n_frames, dtype=int) if detectors is None else np.atleast_1d(np.asarray(detectors, dtype=int))
    if detectors.size != n_frames:
        detectors = np.ones(n_frames, dtype=int)
    return FrameGeometry(
        angles_deg=(theta + ANGLE_OFFSET_DEG) % 360.0,
        radii_mm=10.0 * radius_cm,
        lateral_offsets_mm=-10.0 * sideways_cm,
        durations_s=duration_ms / 1000.0,
        detectors=detectors,
    )


def pixel_scale(ds: Dataset) -> float | np.ndarray:
    """(0011,103B), which PyTomography multiplies into the StarGuide's pixel data; RescaleSlope
    when it is absent."""
    if PIXEL_SCALE in ds:
        value = ds[PIXEL_SCALE].value
        if isinstance(value, (bytes, bytearray)):
            raise ValueError("(0011,103B) has no readable value representation")
        return np.asarray(value, dtype=np.float64)
    return float(ds.get("RescaleSlope", 1.0) or 1.0)


def rotation_axis_xy(ds: Dataset) -> tuple[float, float]:
    """The ring's axis in LPS: the isocentre, x = y = 0 (see the module docstring)."""
    return 0.0, 0.0


def first_row_z_mm(ds: Dataset) -> float:
    """z of row 0: the first detector's ImagePositionPatient, else rows centred on z = 0."""
    items = ds.get("DetectorInformationSequence") or []
    if items and "ImagePositionPatient" in items[0]:
        return float(items[0].ImagePositionPatient[2])
    return (int(ds.Rows) - 1) / 2 * float(ds.PixelSpacing[0])


def _no_radial_offsets(ds: Dataset, n_views: int) -> np.ndarray:
    return np.zeros(n_views)


STARGUIDE = VendorAdapter(
    name="GE StarGuide",
    manufacturer_keys=("GE MEDICAL", "GE HEALTHCARE"),
    rotation_axis_xy=rotation_axis_xy,
    radial_offsets_mm=_no_radial_offsets,
    first_row_z_mm=first_row_z_mm,
    frame_geometry=frame_geometry,
    pixel_scale=pixel_scale,
    required_sequences=("EnergyWindowInformationSequence",),
    matches=is_starguide,
)
