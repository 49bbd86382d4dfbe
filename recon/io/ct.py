"""Reading a CT series (HU, LPS geometry) for attenuation maps and fused displays."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.multival import MultiValue

from recon.errors import InputError


def read_ct_series(folder: str | Path) -> tuple[sitk.Image, pydicom.Dataset, list[str]]:
    """Read the CT series in ``folder`` (HU, LPS geometry), its first slice's dataset and its SOP
    Instance UIDs, slices ordered along the slice normal.

    The folder must hold exactly one CT series (other files are ignored). Each file is read once
    (pydicom); the pixels are decoded by pydicom where it can (uncompressed, RLE and the like), by
    SimpleITK's GDCM otherwise (JPEG Lossless, JPEG-LS, JPEG 2000)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "CT folder does not exist")
    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        ds = _ct_slice(path)
        if ds is not None:
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if not series:
        raise InputError(folder, "no CT series found (need DICOM files with Modality CT)")
    if len(series) > 1:
        raise InputError(folder, f"{len(series)} CT series found; give a folder with one")
    slices = next(iter(series.values()))
    if len(slices) < 2:
        raise InputError(folder, "the CT series has a single slice")
    positions = _check_slices(folder, slices)
    slices = [slices[i] for i in np.argsort(positions, kind="stable")]
    image = _volume(folder, slices)
    return image, slices[0][1], [str(ds.SOPInstanceUID) for _, ds in slices]


def _ct_slice(path: Path) -> pydicom.Dataset | None:
    """The file's dataset if it is a CT image, None if it is something else (not DICOM, another
    modality); refused when it is a CT slice whose pixel data is missing or cut short."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - unreadable: refused below if its header says CT
            ds = None
    if ds is None:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM: not part of the series
            return None
        if header.get("Modality") == "CT":
            raise InputError(path, "CT slice is truncated or unreadable")
        return None
    if ds.get("Modality") != "CT":
        return None
    if any("End of file" in str(w.message) for w in caught) or "PixelData" not in ds:
        raise InputError(path, "CT slice is truncated (pixel data missing or cut short)")
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
        if len(ds.PixelData) < expected:
            raise InputError(path, f"CT slice is truncated ({len(ds.PixelData)} of {expected} bytes of pixel data)")
    return ds


def _volume(folder: Path, slices: list[tuple[Path, pydicom.Dataset]]) -> sitk.Image:
    """The HU volume (float32) of ``slices`` ordered along their normal, with ITK's geometry: origin
    at the first slice's ImagePositionPatient, slice spacing and third direction from the first
    to the last slice."""
    try:
        hu = np.stack([_hu(ds) for _, ds in slices])
    except (NotImplementedError, RuntimeError, ValueError):  # no pydicom decoder for this transfer syntax
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(path) for path, _ in slices])
        try:
            return sitk.Cast(reader.Execute(), sitk.sitkFloat32)
        except RuntimeError as exc:
            raise InputError(folder, f"CT series cannot be read ({str(exc).strip().splitlines()[-1]})") from None
    first, last = (np.asarray(_numbers(ds, "ImagePositionPatient")) for ds in (slices[0][1], slices[-1][1]))
    row, column = np.split(np.asarray(_numbers(slices[0][1], "ImageOrientationPatient")), 2)
    step = (last - first) / (len(slices) - 1)
    pixel = _numbers(slices[0][1], "PixelSpacing")  # (between rows, between columns)
    image = sitk.GetImageFromArray(hu)
    image.SetOrigin(first.tolist())
    image.SetSpacing([pixel[1], pixel[0], float(np.linalg.norm(step))])
    image.SetDirection(np.column_stack([row, column, step / np.linalg.norm(step)]).ravel().tolist())
    return image


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    """One slice's pixels rescaled to HU, float32 (computed in float64, as GDCM)."""
    return (ds.pixel_array * _numbers(ds, "RescaleSlope", 1.0)[0] + _numbers(ds, "RescaleIntercept", 0.0)[0]).astype(np.float32)


def _numbers(ds: pydicom.Dataset, keyword: str, default: float | None = None) -> list[float]:
    """The attribute's values as floats; [nan] when one is not a number or it is absent without default."""
    value = ds.get(keyword, default)
    try:
        return [float(v) for v in (value if isinstance(value, (list, tuple, MultiValue)) else [value])]
    except (TypeError, ValueError):
        return [math.nan]


def _check_slices(folder: Path, slices: list[tuple[Path, pydicom.Dataset]]) -> list[float]:
    """Refuse slices that cannot make one regular volume: without position, another orientation,
    a rescale slope or pixel spacing that is not a positive number, two slices at one position,
    or gaps (spacing more than 10 % from the median). Returns each slice's position [mm] along
    the normal of the first slice's orientation."""
    positions = []
    orientation = None
    for path, ds in slices:
        slope = _numbers(ds, "RescaleSlope", 1.0)[0]
        spacing = _numbers(ds, "PixelSpacing")
        if not (math.isfinite(slope) and slope > 0):
            raise InputError(path, f"CT RescaleSlope {ds.get('RescaleSlope')} is not a positive number")
        if len(spacing) != 2 or not all(math.isfinite(v) and v > 0 for v in spacing):
            raise InputError(path, f"CT PixelSpacing {ds.get('PixelSpacing')} is not two positive numbers")
        ipp, iop = _numbers(ds, "ImagePositionPatient"), _numbers(ds, "ImageOrientationPatient")
        if len(ipp) != 3 or len(iop) != 6 or not all(map(math.isfinite, ipp + iop)):
            raise InputError(path, "CT slice without a usable ImagePositionPatient/ImageOrientationPatient")
        if orientation is None:
            orientation = np.asarray(iop)
        elif not np.allclose(iop, orientation, atol=1e-3):
            raise InputError(path, "CT slices of different orientations in one series")
        normal = np.cross(orientation[:3], orientation[3:])
        positions.append(float(np.dot(ipp, normal)))
    steps = np.diff(np.sort(positions))
    if np.any(steps < 1e-3):
        raise InputError(folder, "CT series has two slices at the same position")
    median = float(np.median(steps))
    if np.any(np.abs(steps - median) > 0.1 * median):
        raise InputError(folder, f"CT slices are not evenly spaced (steps {steps.min():g} to {steps.max():g} mm): "
                                 "missing, extra or unreadable slices")
    return positions


def check_ct_alignment(ct_dir: str | Path, ct_header: pydicom.Dataset, frame_uid: str, patient_id: str, registered: bool, modality: str) -> str:
    """How a CT relates to the emission data it corrects (for the provenance), or an InputError:
    a CT of another patient (both PatientIDs known and different), or of another frame of
    reference unless the user states it is registered (``registered``)."""
    ct_patient = str(ct_header.get("PatientID", "") or "").strip()
    if patient_id.strip() and ct_patient and patient_id.strip() != ct_patient:
        raise InputError(ct_dir, f"the CT is of another patient (PatientID differs from the {modality}'s)")
    ct_frame = str(ct_header.get("FrameOfReferenceUID", "") or "")
    if not frame_uid or ct_frame == frame_uid:
        return "same frame of reference" if frame_uid else f"{modality} states no frame of reference"
    if not registered:
        raise InputError(ct_dir, f"the CT has another frame of reference than the {modality}; register it first "
                                 "and pass --ct-registered to state that it is")
    return "other frame of reference, stated registered (--ct-registered)"
