"""Common reader for NM tomographic projections (multi-frame NM Image Storage, ImageType TOMO).

Frames are identified by their EnergyWindowVector / DetectorVector / RotationVector /
AngularViewVector entries, never by their position in the file. Vendor conventions come from
one adapter each (``recon.io.vendors``). Counts are returned after RescaleSlope/Intercept.

Geometry convention (PyTomography's reading of GE and Siemens files, checked on real data):
for a detector at DICOM angle θ the unit vector from the axis of rotation to the detector is
n(θ) = (sin θ, cos θ, 0) in LPS, pixel columns run along u(θ) = (−cos θ, sin θ, 0) and rows run
along −z. Angles grow with the view number for RotationDirection 'CC' and shrink for 'CW'.
A view's detector may be offset sideways: the centre of its columns then lies at
``lateral_offset · u(θ)`` from the axis (zero for rotating-gantry cameras; the GE StarGuide's
swivelling detector columns, ``recon.io.starguide``).

Cameras that write one file per detector (the StarGuide) are read with ``read_acquisition``,
which merges the files of one bed position into one set of views before stitching beds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from recon.errors import InputError
from recon.io import dicom_time
from recon.io.vendors import FrameGeometry, VendorAdapter, adapter_for
from recon.nuclides import Nuclide, find_nuclide
from recon.spect.windows import EnergyWindow, guess_nuclide, named_nuclide

NM_STORAGE = "1.2.840.10008.5.1.4.1.1.20"


@dataclass(frozen=True)
class ProjectionGeometry:
    """Where each projection pixel is: angles in degrees (DICOM), distances in mm (LPS).

    Column ``j`` of view ``v`` is centred at ``axis + s·u(θ_v)`` with
    ``s = (j − (n_cols − 1)/2)·pixel_mm + lateral_offsets_mm[v]`` (offsets None: all zero)."""

    angles_deg: np.ndarray          # per view, DICOM detector angle in [0, 360)
    radii_mm: np.ndarray            # per view, axis of rotation to collimator face
    pixel_mm: float                 # pixel size, lateral = axial
    n_rows: int                     # axial pixels
    n_cols: int                     # lateral pixels
    axis_xy_mm: tuple[float, float] # axis of rotation (x, y) in LPS
    z_first_row_mm: float           # z of the centre of row 0; row i is at z_first_row - i * pixel
    lateral_offsets_mm: np.ndarray | None = None  # per view, centre of the columns along u(θ)

    @property
    def z_last_row_mm(self) -> float:
        return self.z_first_row_mm - (self.n_rows - 1) * self.pixel_mm

    @property
    def offsets_mm(self) -> np.ndarray:
        """Per-view lateral offsets [mm] (zeros for centred detectors)."""
        if self.lateral_offsets_mm is None:
            return np.zeros(self.angles_deg.size)
        return np.asarray(self.lateral_offsets_mm, dtype=np.float64)

    @property
    def grid_cols(self) -> int:
        """Width in pixels of the square transaxial reconstruction grid centred on the axis: the
        detector width for centred detectors; otherwise the smallest even width holding every
        view's columns (voxels outside them are seen by no view)."""
        if self.lateral_offsets_mm is None:
            return self.n_cols
        half = float(np.max(np.abs(self.offsets_mm))) / self.pixel_mm + self.n_cols / 2
        return max(self.n_cols, 2 * int(np.ceil(half - 1e-6)))


@dataclass
class NMProjections:
    """Projections of one SPECT acquisition (or several beds stitched into one).

    ``counts[w, v, i, j]``: counts in window ``windows[w]``, view ``v`` (sorted by angle), row
    ``i``, column ``j``, for a frame duration of ``frame_duration_s`` seconds per view.
    """

    paths: list[Path]
    sop_instance_uids: list[str]
    header: Dataset                 # the first file's header, without pixel data
    vendor: str
    collimator: str
    windows: list[EnergyWindow]
    counts: np.ndarray
    geometry: ProjectionGeometry
    frame_duration_s: float
    acquisition_start: datetime | None
    nuclide: Nuclide | None
    administered_MBq: float | None
    injection_time: datetime | None
    notes: list[str] = field(default_factory=list)
    view_durations_s: np.ndarray | None = None  # per view when views last differently long
    acquisition_duration_s: float | None = None  # start of the first to end of the last frame, when known
    nuclide_named: bool = False     # the header names the nuclide (radiopharmaceutical, window names), not guessed from energies

    def window_counts(self, window: EnergyWindow) -> np.ndarray:
        """[view, row, col] counts of one window."""
        return self.counts[self.windows.index(window)]

    def view_weights(self) -> np.ndarray | None:
        """Each view's duration relative to ``frame_duration_s`` (None: all equal)."""
        if self.view_durations_s is None:
            return None
        return np.asarray(self.view_durations_s, dtype=np.float64) / self.frame_duration_s


def _fail(path: Path, problem: str) -> InputError:
    return InputError(path, problem)


def _read_header(path: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise _fail(path, f"not a readable DICOM file ({exc.__class__.__name__})") from None
    return ds


def _check_is_tomo(path: Path, ds: Dataset, required: tuple[str, ...]) -> None:
    if ds.get("Modality") != "NM" or str(ds.get("SOPClassUID", "")) != NM_STORAGE:
        raise _fail(path, f"not an NM image (Modality {ds.get('Modality', 'missing')!s}); expected NM projections")
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if "TOMO" not in image_type:
        shown = "/".join(image_type) or "missing"
        raise _fail(path, f"not tomographic projections (ImageType {shown})")
    if "RECON TOMO" in image_type or "RECON" in image_type:
        raise _fail(path, "a reconstructed volume, not raw projections")
    for keyword in required:
        if not ds.get(keyword):
            raise _fail(path, f"missing {keyword}")


def _count(path: Path, ds: Dataset, keyword: str) -> int:
    """A positive whole number of the header (NumberOfFrames, Rows, …)."""
    try:
        value = int(ds.get(keyword))
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise _fail(path, f"{keyword} {ds.get(keyword)!r} is not a positive whole number")
    return value


def frame_counts(path: Path, ds: Dataset, adapter: VendorAdapter) -> np.ndarray:
    """Counts per frame [frame, row, column] after the pixel scale (RescaleSlope/Intercept or the
    vendor's); InputError for inconsistent frame counts, truncated data or a slope that is not positive."""
    n_frames, rows, columns = (_count(path, ds, k) for k in ("NumberOfFrames", "Rows", "Columns"))
    expected = n_frames * rows * columns * _count(path, ds, "BitsAllocated") // 8
    raw = ds.get("PixelData")
    if raw is None:
        raise _fail(path, "no pixel data")
    if ds.file_meta.TransferSyntaxUID.is_compressed is False and len(raw) < expected:
        raise _fail(path, f"truncated pixel data ({len(raw)} of {expected} bytes)")
    try:
        array = ds.pixel_array.astype(np.float32)
    except Exception as exc:  # pydicom raises several types for damaged pixel data
        raise _fail(path, f"pixel data cannot be decoded ({exc})") from None
    if array.size != n_frames * rows * columns:
        raise _fail(path, f"pixel data holds {array.size} values, not NumberOfFrames × Rows × Columns = {n_frames * rows * columns}")
    array = array.reshape(n_frames, rows, columns)
    try:
        slope = np.asarray(adapter.pixel_scale(ds), dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise _fail(path, f"unusable pixel scale factor ({exc})") from None
    if slope.size not in (1, n_frames) or not np.all(np.isfinite(slope)) or np.any(slope <= 0):
        raise _fail(path, f"unusable pixel scale factor ({slope.size} values for {n_frames} frames, or not positive)")
    slope = slope.reshape(-1, 1, 1) if slope.size > 1 else float(slope)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return (array * slope + intercept).astype(np.float32)


def energy_windows(path: Path, ds: Dataset) -> list[EnergyWindow]:
    """The energy windows of EnergyWindowInformationSequence, in order [keV]."""
    windows = []
    try:
        for index, item in enumerate(ds.EnergyWindowInformationSequence):
            rng = item.EnergyWindowRangeSequence[0]
            lower, upper = float(rng.EnergyWindowLowerLimit), float(rng.EnergyWindowUpperLimit)
            if not (np.isfinite(lower) and np.isfinite(upper) and 0 <= lower < upper):
                raise ValueError(f"window {index + 1} {lower:g}-{upper:g} keV")
            windows.append(EnergyWindow(index, lower, upper, str(item.get("EnergyWindowName", ""))))
    except (AttributeError, IndexError, TypeError, ValueError) as exc:
        raise _fail(path, f"unusable EnergyWindowInformationSequence ({exc})") from None
    if not windows:
        raise _fail(path, "no energy window described")
    return windows


def frame_vector(path: Path, ds: Dataset, keyword: str, n_frames: int) -> np.ndarray:
    """A per-frame vector of the header (EnergyWindowVector, DetectorVector, …), all ones when
    absent; InputError when it does not hold one whole number ≥ 1 per frame."""
    values = ds.get(keyword)
    if values is None:
        return np.ones(n_frames, dtype=int)
    try:
        array = np.atleast_1d(np.asarray(values, dtype=int))
    except (TypeError, ValueError):
        raise _fail(path, f"{keyword} is not a list of whole numbers") from None
    if array.size != n_frames or array.min() < 1:
        raise _fail(path, f"{keyword} has {array.size} values (minimum {array.min()}) for NumberOfFrames {n_frames}")
    return array


def _frame_duration_s(path: Path, ds: Dataset) -> float:
    rotation = ds.RotationInformationSequence[0]
    value = rotation.get("ActualFrameDuration", ds.get("ActualFrameDuration"))
    if value in (None, "") or float(value) <= 0:
        raise _fail(path, "missing acquisition time: no ActualFrameDuration in RotationInformationSequence")
    return float(value) / 1000.0


def _angles_and_radii(path: Path, ds: Dataset, adapter: VendorAdapter, detector: np.ndarray, rotation: np.ndarray, view: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DICOM angle and radius of every frame from its detector, rotation and view numbers."""
    angles = np.zeros(detector.size)
    radii = np.zeros(detector.size)
    for d in np.unique(detector):
        det_item = ds.DetectorInformationSequence[min(d, len(ds.DetectorInformationSequence)) - 1]
        for r in np.unique(rotation):
            rot_item = ds.RotationInformationSequence[min(r, len(ds.RotationInformationSequence)) - 1]
            start = det_item.get("StartAngle", rot_item.get("StartAngle"))
            step = rot_item.get("AngularStep")
            if start is None or step is None:
                raise _fail(path, "missing StartAngle or AngularStep")
            sign = -1.0 if str(rot_item.get("RotationDirection", "CC")).upper() == "CW" else 1.0
            n_views = int(rot_item.get("NumberOfFramesInRotation", view.max()))
            radial = det_item.get("RadialPosition", rot_item.get("RadialPosition"))
            if radial is None:
                raise _fail(path, "missing RadialPosition")
            radial = np.atleast_1d(np.asarray(radial, dtype=float))
            radial = np.full(n_views, radial[0]) if radial.size == 1 else radial
            radial = radial + adapter.radial_offsets_mm(ds, radial.size)
            sel = (detector == d) & (rotation == r)
            k = view[sel] - 1
            if k.max() >= radial.size:
                raise _fail(path, f"RadialPosition has {radial.size} values for {k.max() + 1} views")
            angles[sel] = (float(start) + sign * float(step) * k) % 360.0
            radii[sel] = radial[k]
    return angles, radii


def _administered(ds: Dataset) -> tuple[Nuclide | None, float | None, datetime | None]:
    items = ds.get("RadiopharmaceuticalInformationSequence") or []
    if not items:
        return None, None, None
    item = items[0]
    texts = [str(item.get("Radiopharmaceutical", ""))]
    for code in item.get("RadionuclideCodeSequence", []) or []:
        texts += [str(code.get("CodeMeaning", "")), str(code.get("CodeValue", ""))]
    nuclide = next((n for n in map(find_nuclide, texts) if n is not None), None)
    dose = item.get("RadionuclideTotalDose")
    dose_mbq = float(dose) if dose not in (None, "") and float(dose) > 0 else None
    if dose_mbq is not None and dose_mbq > 1e5:  # NM stores MBq; a value this large was written in Bq
        dose_mbq /= 1e6
    return nuclide, dose_mbq, dicom_time.injection_time(ds, item)


def _standard_frame_geometry(path: Path, ds: Dataset, adapter: VendorAdapter, n_frames: int) -> FrameGeometry:
    """Per-frame geometry from the standard Detector/Rotation/AngularView vectors and the
    Detector and Rotation Information Sequences; every frame lasts ActualFrameDuration."""
    if ds.get("AngularViewVector") is None:
        raise _fail(path, "missing AngularViewVector")
    detector_vec = frame_vector(path, ds, "DetectorVector", n_frames)
    rotation_vec = frame_vector(path, ds, "RotationVector", n_frames)
    view_vec = frame_vector(path, ds, "AngularViewVector", n_frames)
    angles, radii = _angles_and_radii(path, ds, adapter, detector_vec, rotation_vec, view_vec)
    return FrameGeometry(
        angles_deg=angles,
        radii_mm=radii,
        lateral_offsets_mm=np.zeros(n_frames),
        durations_s=np.full(n_frames, _frame_duration_s(path, ds)),
        detectors=detector_vec,
    )


def _frame_geometry(path: Path, ds: Dataset, adapter: VendorAdapter, n_frames: int) -> FrameGeometry:
    if adapter.frame_geometry is None:
        return _standard_frame_geometry(path, ds, adapter, n_frames)
    frames = adapter.frame_geometry(path, ds)
    for name in ("angles_deg", "radii_mm", "lateral_offsets_mm", "durations_s", "detectors"):
        if np.shape(getattr(frames, name)) != (n_frames,):
            raise _fail(path, f"{adapter.name} frame geometry: {name} does not have one value per frame ({n_frames})")
    return frames


def _view_key(frames: FrameGeometry, sel: np.ndarray) -> np.ndarray:
    """Frames ``sel`` in view order: by angle, then lateral offset, then detector (stable)."""
    keys = (frames.detectors[sel], np.round(frames.lateral_offsets_mm[sel], 2), np.round(frames.angles_deg[sel], 3))
    return sel[np.lexsort(keys)]


def _same_views(frames: FrameGeometry, a: np.ndarray, b: np.ndarray) -> bool:
    return bool(
        np.allclose(frames.angles_deg[a], frames.angles_deg[b], atol=0.01)
        and np.allclose(frames.lateral_offsets_mm[a], frames.lateral_offsets_mm[b], atol=0.01)
    )


def _durations(durations: np.ndarray) -> tuple[float, np.ndarray | None]:
    """(reference frame duration, per-view durations or None when all are equal)."""
    reference = float(np.median(durations))
    if np.allclose(durations, reference, rtol=1e-6, atol=0.0):
        return reference, None
    return reference, np.asarray(durations, dtype=np.float64)


def read_nm_projections(path: str | Path) -> NMProjections:
    """Read one NM TOMO projection file. Raises InputError naming the file for bad input."""
    path = Path(path)
    ds = _read_header(path)
    adapter = adapter_for(ds)
    _check_is_tomo(path, ds, adapter.required_sequences)
    pixels = frame_counts(path, ds, adapter)
    n_frames = pixels.shape[0]
    windows = energy_windows(path, ds)
    window_vec = frame_vector(path, ds, "EnergyWindowVector", n_frames)
    if window_vec.max() > len(windows):
        raise _fail(path, "EnergyWindowVector refers to a window that is not described")
    frames = _frame_geometry(path, ds, adapter, n_frames)

    # Views of the first window define the view order; every window must have the same views.
    first = _view_key(frames, np.flatnonzero(window_vec == window_vec.min()))
    counts = np.zeros((len(windows), first.size, int(ds.Rows), int(ds.Columns)), dtype=np.float32)
    for w in range(len(windows)):
        sel = np.flatnonzero(window_vec == w + 1)
        if sel.size == 0:
            continue
        if sel.size != first.size:
            raise _fail(path, f"energy window {w + 1} has {sel.size} frames, expected {first.size}")
        sel = _view_key(frames, sel)
        if not _same_views(frames, sel, first):
            raise _fail(path, f"energy window {w + 1} has views at other angles than window 1")
        counts[w] = pixels[sel]

    try:
        axis = adapter.rotation_axis_xy(ds)
        z_first = float(adapter.first_row_z_mm(ds))
    except (ValueError, AttributeError, IndexError, TypeError) as exc:
        raise _fail(path, f"no usable detector position ({exc})") from None
    try:
        spacing = [float(v) for v in ds.PixelSpacing]
    except (AttributeError, TypeError, ValueError):
        spacing = []
    if len(spacing) != 2 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise _fail(path, f"PixelSpacing {ds.get('PixelSpacing')} is not two positive numbers (mm)")
    if abs(spacing[0] - spacing[1]) > 1e-3 * spacing[0]:
        raise _fail(path, f"non-square projection pixels {spacing} mm are not supported")
    offsets = frames.lateral_offsets_mm[first]
    geometry = ProjectionGeometry(
        angles_deg=frames.angles_deg[first],
        radii_mm=frames.radii_mm[first],
        pixel_mm=spacing[0],
        n_rows=int(ds.Rows),
        n_cols=int(ds.Columns),
        axis_xy_mm=axis,
        z_first_row_mm=z_first,
        lateral_offsets_mm=offsets if np.any(offsets != 0) else None,
    )
    frame_duration, view_durations = _durations(frames.durations_s[first])
    acquisition_duration = None
    if adapter.frame_geometry is not None:  # the standard reading leaves it to NumberOfFramesInRotation
        detectors = frames.detectors[first]
        acquisition_duration = max(float(frames.durations_s[first][detectors == d].sum()) for d in np.unique(detectors))
    named, dose, injected = _administered(ds)
    named = named or named_nuclide(windows)
    nuclide = named or guess_nuclide(windows)
    detector_items = ds.get("DetectorInformationSequence") or [Dataset()]
    collimator = str(detector_items[0].get("CollimatorGridName", "") or "").strip()
    del ds.PixelData
    return NMProjections(
        paths=[path],
        sop_instance_uids=[str(ds.SOPInstanceUID)],
        header=ds,
        vendor=adapter.name,
        collimator=collimator,
        windows=windows,
        counts=counts,
        geometry=geometry,
        frame_duration_s=frame_duration,
        acquisition_start=dicom_time.acquisition_start(ds),
        nuclide=nuclide,
        administered_MBq=dose,
        injection_time=injected,
        view_durations_s=view_durations,
        acquisition_duration_s=acquisition_duration,
        nuclide_named=named is not None,
    )


def _same_windows(a: list[EnergyWindow], b: list[EnergyWindow]) -> bool:
    key = lambda ws: sorted((round(w.lower_keV, 1), round(w.upper_keV, 1)) for w in ws)  # noqa: E731
    return key(a) == key(b)


def stitch_beds(beds: list[NMProjections]) -> NMProjections:
    """Stitch bed positions into one axial field of view.

    Beds are ordered head to feet; in an overlap each row is taken from the bed whose centre is
    nearer (the midway rule); bed offsets are rounded to whole pixels. Each bed is scaled to the first bed's frame duration and, when
    acquisition times are known, decay-corrected to the first bed's start. Radii of the top bed
    are used for all beds (recorded in ``notes``).
    """
    if len(beds) == 1:
        return beds[0]
    beds = sorted(beds, key=lambda b: -b.geometry.z_first_row_mm)
    ref = beds[0]
    g0 = ref.geometry
    for bed in beds[1:]:
        g = bed.geometry
        path = bed.paths[0]
        if not _same_windows(bed.windows, ref.windows):
            raise _fail(path, "energy windows differ from the other bed positions")
        if g.n_cols != g0.n_cols or abs(g.pixel_mm - g0.pixel_mm) > 1e-3 or g.angles_deg.size != g0.angles_deg.size:
            raise _fail(path, "projection matrix, pixel size or number of views differs from the other bed positions")
        if not np.allclose(g.angles_deg, g0.angles_deg, atol=0.5):
            raise _fail(path, "view angles differ from the other bed positions")
        if not np.allclose(g.offsets_mm, g0.offsets_mm, atol=0.5):
            raise _fail(path, "detector lateral offsets differ from the other bed positions")
        if bed.view_durations_s is not None or ref.view_durations_s is not None:
            raise _fail(path, "several bed positions with views of different durations are not supported")
    offsets = [round((g0.z_first_row_mm - b.geometry.z_first_row_mm) / g0.pixel_mm) for b in beds]
    n_rows = max(o + b.geometry.n_rows for o, b in zip(offsets, beds))
    centres = [o + (b.geometry.n_rows - 1) / 2 for o, b in zip(offsets, beds)]
    counts = np.zeros((len(ref.windows), g0.angles_deg.size, n_rows, g0.n_cols), dtype=np.float32)
    notes = list(ref.notes)
    for bed, offset in zip(beds, offsets):
        residual_mm = (g0.z_first_row_mm - bed.geometry.z_first_row_mm) - offset * g0.pixel_mm
        if abs(residual_mm) > 0.01:
            notes.append(f"bed {bed.paths[0].name}: axial offset rounded to whole pixels ({residual_mm:+.2f} mm)")
    for bed, offset in zip(beds, offsets):
        scale = ref.frame_duration_s / bed.frame_duration_s
        if ref.nuclide and ref.acquisition_start and bed.acquisition_start:
            elapsed = (bed.acquisition_start - ref.acquisition_start).total_seconds()
            scale /= ref.nuclide.decay_factor(elapsed)
        elif bed is not ref:
            notes.append(f"bed {bed.paths[0].name}: no acquisition times, not decay-corrected to the first bed")
        window_order = [next(i for i, w in enumerate(bed.windows) if _same_windows([w], [rw])) for rw in ref.windows]
        for row in range(bed.geometry.n_rows):
            z = offset + row
            nearest = min(range(len(beds)), key=lambda k: (abs(z - centres[k]) if 0 <= z - offsets[k] < beds[k].geometry.n_rows else np.inf))
            if beds[nearest] is bed:
                counts[:, :, z, :] = bed.counts[window_order, :, row, :] * scale
    notes.append("beds stitched by the midway rule; radii of the top bed used for all beds")
    geometry = replace(g0, n_rows=n_rows)
    return replace(
        ref,
        paths=[p for b in beds for p in b.paths],
        sop_instance_uids=[u for b in beds for u in b.sop_instance_uids],
        counts=counts,
        geometry=geometry,
        notes=notes,
    )


def merge_views(parts: list[NMProjections]) -> NMProjections:
    """Merge files holding different views of one bed position (one file per detector, as the
    GE StarGuide writes them) into one set of views, sorted by angle then lateral offset.

    The files must share study, energy windows, projection matrix, pixel size, axis of rotation
    and first-row position; counts are not rescaled (each view keeps its own duration)."""
    if len(parts) == 1:
        return parts[0]
    ref = parts[0]
    g0 = ref.geometry
    seen: dict[str, Path] = {}
    for part in parts:
        g, path = part.geometry, part.paths[0]
        uid = part.sop_instance_uids[0]
        if uid in seen:
            raise _fail(path, f"the same projections as {seen[uid].name} (SOP Instance UID {uid})")
        seen[uid] = path
        if part.header.get("StudyInstanceUID") != ref.header.get("StudyInstanceUID"):
            raise _fail(path, f"belongs to another study than {ref.paths[0].name}")
        if not _same_windows(part.windows, ref.windows) or len(part.windows) != len(ref.windows):
            raise _fail(path, f"energy windows differ from {ref.paths[0].name}")
        if (g.n_rows, g.n_cols) != (g0.n_rows, g0.n_cols) or abs(g.pixel_mm - g0.pixel_mm) > 1e-3:
            raise _fail(path, f"projection matrix or pixel size differs from {ref.paths[0].name}")
        if not np.allclose(g.axis_xy_mm, g0.axis_xy_mm, atol=0.01) or abs(g.z_first_row_mm - g0.z_first_row_mm) > 0.01:
            raise _fail(path, f"detector position differs from {ref.paths[0].name}")
    window_orders = [
        [next(i for i, w in enumerate(part.windows) if _same_windows([w], [rw])) for rw in ref.windows] for part in parts
    ]
    counts = np.concatenate([part.counts[order] for part, order in zip(parts, window_orders)], axis=1)
    angles = np.concatenate([part.geometry.angles_deg for part in parts])
    radii = np.concatenate([part.geometry.radii_mm for part in parts])
    offsets = np.concatenate([part.geometry.offsets_mm for part in parts])
    durations = np.concatenate([
        part.view_durations_s if part.view_durations_s is not None else np.full(part.geometry.angles_deg.size, part.frame_duration_s)
        for part in parts
    ])
    order = np.lexsort((np.round(offsets, 2), np.round(angles, 3)))
    frame_duration, view_durations = _durations(durations[order])
    known = [part.acquisition_duration_s for part in parts if part.acquisition_duration_s is not None]
    geometry = replace(
        g0,
        angles_deg=angles[order],
        radii_mm=radii[order],
        lateral_offsets_mm=offsets[order] if np.any(offsets != 0) else None,
    )
    return replace(
        ref,
        paths=[p for part in parts for p in part.paths],
        sop_instance_uids=[u for part in parts for u in part.sop_instance_uids],
        counts=np.ascontiguousarray(counts[:, order]),
        geometry=geometry,
        frame_duration_s=frame_duration,
        view_durations_s=view_durations,
        acquisition_duration_s=max(known) if known else None,
        notes=list(ref.notes) + [f"{len(parts)} files merged as the detectors of one bed position"],
    )


def read_acquisition(paths: list[str | Path]) -> NMProjections:
    """Read one or more files of one acquisition: files at the same bed position (one per
    detector) are merged, then bed positions are stitched."""
    parts = [read_nm_projections(p) for p in paths]
    beds: dict[float, list[NMProjections]] = {}
    for part in parts:
        beds.setdefault(round(part.geometry.z_first_row_mm, 1), []).append(part)
    return stitch_beds([merge_views(group) for group in beds.values()])
