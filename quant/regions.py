"""Organs and reference regions from the segmentations a study holds (DICOM SEG or RTSTRUCT, as a
segmentation server or a person leaves them), under theraflow's names, on any image grid.

Names are mapped through a table (``quant/data/region_names.json``, or a JSON file of the same
form given by the user): keys are names as found in the wild (TotalSegmentator's, common
clinical ones), compared without case, spaces, hyphens and laterality (``parotid_gland_left``,
``Parotid R`` and ``PAROTID-GLAND`` all read as ``parotid_gland``); values are theraflow's
canonical names (``liver``, ``parotid``, ``blood_pool``, ``spleen``, ``kidney``…). Left and
right parts of one canonical region are united. Segments whose names the table does not know
are reported, not guessed.

Masks are carried onto the target grid (a PET or SPECT image, same frame of reference required)
by linear interpolation of the binary mask, kept where > 0.5 (a voxel whose centre lies
half-way between inside and outside is left out: reference regions should not take in edges).
Units: mm, LPS.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from recon.errors import InputError

_LATERALITY = re.compile(r"(^|_)(left|right|l|r|lt|rt|sin|dx)(_|$)")
_CANONICAL = re.compile(r"[a-z][a-z0-9_]{0,63}")   # canonical names also name files


def load_name_table(path: str | Path | None = None) -> dict[str, str]:
    """The name table: the shipped one, updated by ``path`` (JSON object name → canonical name)."""
    table = json.loads(resources.files("quant").joinpath("data/region_names.json").read_text())
    table.pop("_comment", None)
    if path is not None:
        from quant.jsonfile import read_json_object

        extra = read_json_object(Path(path), "region name table")
        if not all(isinstance(v, str) and _CANONICAL.fullmatch(v) for v in extra.values()):
            raise InputError(path, "region name table must map names to canonical names (lower-case letters, digits, '_')")
        table.update(extra)
    return {normalised_name(k): v for k, v in table.items()}


def normalised_name(name: str) -> str:
    """Lower case, words joined by '_', laterality words removed: 'Parotid Gland Left' → 'parotid_gland'."""
    key = re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")
    previous = None
    while previous != key:
        previous, key = key, _LATERALITY.sub("_", key).strip("_")
    return key


def canonical_region(name: str, table: Mapping[str, str]) -> str | None:
    """The canonical name of a segment or ROI name, or None when the table does not know it."""
    return table.get(normalised_name(name))


@dataclass
class StudyRegions:
    """Masks (uint8, target grid) by canonical name, where each came from (``SEG <SOP Instance
    UID>: <segment label>``), and names not known."""

    masks: dict[str, sitk.Image] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    other_frames: list[str] = field(default_factory=list)   # files of another frame of reference, left out


def _modality(path: Path) -> str:
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality", ""))
    except (pydicom.errors.InvalidDicomError, OSError) as exc:
        raise InputError(path, f"unreadable segmentation file ({exc})") from None


def _seg_segments(path: Path) -> dict[str, sitk.Image]:
    """Every segment of a DICOM SEG on its own grid (uint8 0/1), by segment label."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
        segments = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
        out = {}
        for number, label in segments.items():
            volume = seg.get_volume(segment_numbers=[number], combine_segments=True, dtype=np.uint8)
            out[label] = sitk.Cast(volume.to_simpleitk() > 0, sitk.sitkUInt8)
        return out
    except (ValueError, AttributeError, KeyError, RuntimeError) as exc:
        raise InputError(path, f"DICOM SEG not readable as a volume ({exc})") from None


def _on_grid(mask: sitk.Image, reference: sitk.Image) -> sitk.Image:
    moved = sitk.Resample(sitk.Cast(mask, sitk.sitkFloat32), reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.Cast(moved > 0.5, sitk.sitkUInt8)


def _contour_grid(ds: pydicom.Dataset, reference: sitk.Image) -> sitk.Image:
    """A grid for an RTSTRUCT's contours: their own planes (regular spacing along z, as drawn on
    the CT), in-plane twice as fine as ``reference``'s, over its transaxial extent."""
    planes = sorted({round(float(c.ContourData[2]), 3) for item in ds.get("ROIContourSequence", [])
                     for c in item.get("ContourSequence") or [] if c.get("ContourData")})
    gaps = np.diff(planes)
    dz = float(gaps[gaps > 0.01].min()) if len(planes) > 1 else reference.GetSpacing()[2]
    size = (2 * reference.GetSize()[0], 2 * reference.GetSize()[1], int(round((planes[-1] - planes[0]) / dz)) + 1 if planes else 1)
    spacing = (reference.GetSpacing()[0] / 2, reference.GetSpacing()[1] / 2, dz)
    corner = np.asarray(reference.TransformContinuousIndexToPhysicalPoint((-0.25, -0.25, 0.0)))
    grid = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    grid.SetSpacing(spacing)
    grid.SetOrigin((float(corner[0]), float(corner[1]), planes[0] if planes else float(corner[2])))
    return grid


def _rtstruct_rois(path: Path, ds: pydicom.Dataset, reference: sitk.Image, frame_uid: str) -> dict[str, sitk.Image]:
    """Every ROI of an RTSTRUCT rasterised on the grid of its own contour planes (``_contour_grid``),
    to be resampled like a SEG."""
    from quant.suv import PetSeries, _rtstruct_mask

    header = pydicom.Dataset()
    header.FrameOfReferenceUID = frame_uid
    grid = PetSeries(path.parent, (), (header,), _contour_grid(ds, reference), label="contour planes")
    out = {}
    for item in ds.get("StructureSetROISequence", []):
        name = str(item.ROIName)
        try:
            out[name] = _rtstruct_mask(path, ds, grid, name)
        except InputError as exc:
            if "enclose no" not in exc.problem:
                raise
    return out


def regions_from_files(files: Iterable[str | Path], reference: sitk.Image, frame_uid: str,
                       table: Mapping[str, str] | None = None) -> StudyRegions:
    """Canonical regions of the SEG and RTSTRUCT ``files`` on ``reference``'s grid. Files in
    another frame of reference than ``frame_uid`` (the image's) are left out and named in
    ``other_frames``; an empty region is left out."""
    table = load_name_table() if table is None else table
    found = StudyRegions()
    for path in map(Path, files):
        modality = _modality(path)
        ds = pydicom.dcmread(path, stop_before_pixels=modality != "SEG")
        if modality == "SEG":
            frame = str(ds.get("FrameOfReferenceUID", ""))
            segments = _seg_segments(path) if frame == frame_uid else {}
        elif modality == "RTSTRUCT":
            frames = {str(item.get("ReferencedFrameOfReferenceUID", "")) for item in ds.get("StructureSetROISequence", [])}
            frame = frame_uid if frame_uid in frames else next(iter(frames), "")
            segments = _rtstruct_rois(path, ds, reference, frame_uid) if frame == frame_uid else {}
        else:
            raise InputError(path, f"Modality {modality or 'missing'}: not a SEG or RTSTRUCT")
        if frame != frame_uid:
            found.other_frames.append(f"{modality} {ds.get('SOPInstanceUID', path.name)} (frame of reference {frame or 'missing'})")
            continue
        for label, mask in segments.items():
            canonical = canonical_region(label, table)
            if canonical is None:
                found.unknown.append(label)
                continue
            on_grid = _on_grid(mask, reference)
            if not sitk.GetArrayViewFromImage(on_grid).any():
                continue
            if canonical in found.masks:
                on_grid = sitk.Cast(found.masks[canonical] | on_grid, sitk.sitkUInt8)
            found.masks[canonical] = on_grid
            found.sources.setdefault(canonical, []).append(f"{modality} {ds.get('SOPInstanceUID', path.name)}: {label}")
    return found
