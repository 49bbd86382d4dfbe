"""NEMA IEC body-phantom quality control for PET and SPECT: recovery coefficients per sphere
(RCmean, RCmax, RCpeak), background variability (NEMA NU 2 style), and EARL1/EARL2 acceptance
for PET.

Units: concentrations in the image's units (Bq/mL for theraflow reconstructions and BQML PET);
the phantom description gives true concentrations in Bq/mL at its ``reference_datetime``;
lengths and positions in mm (LPS); volumes in mL; background variability in %.

Definitions (settings in ``quant/data/phantom_qc.json``):

- RCmean (sphere): mean in the physical sphere (voxel centres within the true radius) / true.
- RCmean (A50): mean in the connected region around the hottest voxel with values ≥ bg + 0.5 ×
  (max − bg), bg the measured background (EARL's VOI); the EARL check uses this one by default.
- RCmax: hottest voxel within the true radius + a small search margin / true.
- RCpeak: largest mean in a 1 mL sphere centred inside the physical sphere / true.
- Background variability for ROI size d: 12 circular ROIs of diameter d on the spheres'
  central slice and on slices at ±10 and ±20 mm (60 ROIs), placed at least 15 mm from the
  phantom wall, the spheres and the lung insert (ROIs of every size share the centres of the
  37 mm ones, NEMA NU 2); BV = SD / mean of the 60 ROI means × 100 %.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from scipy import ndimage

from quant.jsonfile import read_json_object
from quant.voi import peak_kernel, suv_peak
from recon.errors import InputError

DEFAULT_SETTINGS = Path(__file__).resolve().parent / "data" / "phantom_qc.json"
MODALITIES = ("pet", "spect")


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Sphere:
    """One fillable sphere: label, inner diameter (mm), centre (mm, LPS), true concentration (Bq/mL at the reference time)."""

    label: int
    diameter_mm: float
    centre_mm: tuple[float, float, float]
    concentration: float


@dataclass(frozen=True)
class Phantom:
    """The phantom as filled: spheres, background concentration (Bq/mL), reference time and
    half-life (s) of the concentrations (None when not given), and the optional geometry of
    the interior cross-section and lung insert (mm) from the phantom description."""

    spheres: list[Sphere]
    background_concentration: float
    reference_datetime: datetime | None
    half_life_s: float | None
    geometry: dict[str, Any] | None
    source: Path | None = None


def load_phantom(path: str | Path) -> Phantom:
    """Read a phantom description (``data-samples/lu177-iec/truth/phantom.json`` layout:
    ``spheres`` with diameter_mm, centre_mm, concentration_Bq_per_mL; ``background_concentration_Bq_per_mL``;
    optional ``reference_datetime``, ``nuclide.half_life_s`` and ``phantom`` geometry)."""
    path = Path(path)
    data = read_json_object(path, "phantom description")
    try:
        spheres = [Sphere(int(s.get("label", k + 1)), float(s["diameter_mm"]), tuple(float(v) for v in s["centre_mm"]),
                          float(s["concentration_Bq_per_mL"])) for k, s in enumerate(data["spheres"])]
        background = float(data["background_concentration_Bq_per_mL"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"phantom description lacks sphere diameters, centres or concentrations ({exc!r})") from None
    if not spheres or background <= 0 or any(s.concentration <= 0 or s.diameter_mm <= 0 or len(s.centre_mm) != 3 for s in spheres):
        raise InputError(path, "phantom description needs spheres with positive diameters and concentrations and a positive background")
    reference = data.get("reference_datetime")
    half_life = (data.get("nuclide") or {}).get("half_life_s")
    geometry = data.get("phantom") if isinstance(data.get("phantom"), dict) else None
    return Phantom(spheres, background, datetime.fromisoformat(reference) if reference else None,
                   float(half_life) if half_life else None, geometry, path)


def load_settings(path: str | Path | None = None) -> dict[str, Any]:
    """QC settings and acceptance bands (``quant/data/phantom_qc.json`` by default)."""
    path = Path(path) if path is not None else DEFAULT_SETTINGS
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "no such QC settings file") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"QC settings are not JSON ({exc})") from None


@dataclass(frozen=True)
class LoadedImage:
    """An image to analyse, its modality ('pet' or 'spect'), the time its values refer to (None
    when unknown) and how that was found."""

    image: sitk.Image
    modality: str | None
    reference_datetime: datetime | None
    rule: str


def read_image(path: str | Path) -> LoadedImage:
    """A NIfTI file, a PET DICOM series folder (modality values: Bq/mL for BQML) or an NM
    RECON TOMO multi-frame file (stored values × RescaleSlope, as theraflow writes them)."""
    path = Path(path)
    if path.is_dir():
        from quant import suv

        series = suv.read_pet_series(path)
        ds = series.first
        when = _dicom_datetime(ds, "SeriesDate", "SeriesTime") or _dicom_datetime(ds, "AcquisitionDate", "AcquisitionTime")
        units = str(ds.get("Units", ""))
        if units != "BQML":
            raise InputError(path, f"PET Units {units or 'missing'}: phantom QC needs BQML (Bq/mL) values")
        return LoadedImage(series.image, "pet", when, "PET series: values refer to SeriesDate/SeriesTime (DecayCorrection START)")
    if not path.is_file():
        raise InputError(path, "no such image file or folder")
    if path.name.endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")):
        try:
            image = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
        except RuntimeError as exc:
            raise InputError(path, "image unreadable") from exc
        if image.GetDimension() != 3:
            raise InputError(path, f"{image.GetDimension()}-D image: a 3-D image is needed")
        return LoadedImage(image, None, None, "image file without time: concentrations taken at the phantom's reference time")
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        raise InputError(path, "neither an image file (NIfTI…) nor DICOM") from exc
    if ds.get("Modality") != "NM" or "RECON" not in " ".join(ds.get("ImageType", [])).upper():
        raise InputError(path, f"DICOM file with Modality {ds.get('Modality', '?')}, ImageType {list(ds.get('ImageType', []))}: "
                         "give an NM RECON TOMO file or a PET series folder")
    return LoadedImage(_nm_recon_image(path, ds), "spect", _dicom_datetime(ds, "AcquisitionDate", "AcquisitionTime"),
                       "NM RECON: values refer to AcquisitionDate/AcquisitionTime (acquisition start)")


def _dicom_datetime(ds: pydicom.Dataset, date_kw: str, time_kw: str) -> datetime | None:
    day, clock = ds.get(date_kw), ds.get(time_kw)
    if not day or not clock:
        return None
    clock = str(clock).split(".")[0].ljust(6, "0")
    return datetime.strptime(f"{day}{clock[:6]}", "%Y%m%d%H%M%S")


def _nm_recon_image(path: Path, ds: pydicom.Dataset) -> sitk.Image:
    try:
        detector = ds.DetectorInformationSequence[0]
        origin = [float(v) for v in detector.ImagePositionPatient]
        orientation = np.asarray(detector.ImageOrientationPatient, float).reshape(2, 3)
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        dz = float(ds.get("SpacingBetweenSlices") or ds.SliceThickness)
        stored = ds.pixel_array.astype(np.float64).reshape(int(ds.get("NumberOfFrames", 1)), int(ds.Rows), int(ds.Columns))
    except (AttributeError, IndexError, KeyError, ValueError, TypeError) as exc:
        raise InputError(path, f"NM RECON geometry or pixel data missing ({exc})") from None
    values = stored * float(ds.get("RescaleSlope", 1.0) or 1.0) + float(ds.get("RescaleIntercept", 0.0) or 0.0)
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.SetOrigin(origin)
    image.SetSpacing((col_spacing, row_spacing, dz))
    image.SetDirection(tuple(np.column_stack([orientation[0], orientation[1], np.cross(orientation[0], orientation[1])]).ravel()))
    return image


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SphereQC:
    """Recovery of one sphere (RC unit-free; concentrations in image units; A50 volume in mL)
    and its acceptance per standard: {'EARL1': {'rc_mean': 'pass'|'fail', 'rc_max': ...}}."""

    label: int
    diameter_mm: float
    true_concentration: float
    mean_sphere: float
    rc_mean_sphere: float
    rc_mean_a50: float
    a50_volume_mL: float
    rc_max: float
    rc_peak: float
    bv_percent: float | None
    acceptance: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class PhantomQC:
    """The whole analysis: spheres, background (true and measured mean, image units),
    background variability per ROI diameter (%), overall acceptance per standard, notes."""

    modality: str
    spheres: list[SphereQC]
    background_true: float
    background_measured: float
    background_variability: dict[str, float]
    background_rois: int
    acceptance: dict[str, str]
    decay_factor: float
    notes: list[str]
    rc_mean_voi: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self) -> list[dict[str, Any]]:
        """One row per sphere for a CSV table."""
        out = []
        for sphere in self.spheres:
            row = {k: v for k, v in asdict(sphere).items() if k != "acceptance"}
            for standard, checks in sphere.acceptance.items():
                for name, outcome in checks.items():
                    row[f"{standard}_{name}"] = outcome
            out.append(row)
        return out


# --------------------------------------------------------------------------- analysis


def analyse_phantom(image: sitk.Image, phantom: Phantom, modality: str, settings: Mapping[str, Any] | None = None,
                    image_time: datetime | None = None) -> PhantomQC:
    """RCs per sphere, background variability and acceptance for ``image`` (values in Bq/mL)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality {modality!r}: one of {MODALITIES}")
    settings = settings or load_settings()
    notes: list[str] = []
    decay = _decay_factor(phantom, image_time, notes)
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    _check_inside(image, phantom)
    bg_true = phantom.background_concentration * decay
    roi_means, n_rois = _background_rois(image, values, phantom, settings["background"], notes, bg_true)
    bg_measured = float(np.mean(roi_means[max(roi_means)])) if roi_means else float("nan")
    if not roi_means:
        notes.append("no background ROI position found: background variability and A50 background not available")
    bv = {f"{d:g}": float(100.0 * np.std(m, ddof=1) / np.mean(m)) for d, m in roi_means.items() if len(m) > 1}
    kernel = peak_kernel(image.GetSpacing(), float(settings.get("peak_volume_mL", 1.0)))
    spheres = []
    for sphere in phantom.spheres:
        true = sphere.concentration * decay
        spheres.append(_sphere_qc(image, values, sphere, true, bg_measured if math.isfinite(bg_measured) else bg_true,
                                  float(settings.get("max_search_margin_mm", 4.0)), kernel, bv.get(f"{sphere.diameter_mm:g}")))
    voi = str(settings.get("rc_mean_voi", "a50"))
    spheres, acceptance = _acceptance(spheres, modality, settings, voi, notes)
    return PhantomQC(modality, spheres, bg_true, bg_measured, bv, n_rois, acceptance, decay, notes, voi)


def _decay_factor(phantom: Phantom, image_time: datetime | None, notes: list[str]) -> float:
    if image_time is None or phantom.reference_datetime is None:
        notes.append("true concentrations taken at the phantom's reference time (no image time or no phantom reference time)")
        return 1.0
    if phantom.half_life_s is None:
        raise InputError(phantom.source, "phantom description gives a reference time but no nuclide half-life")
    elapsed = (image_time - phantom.reference_datetime).total_seconds()
    factor = 0.5 ** (elapsed / phantom.half_life_s)
    notes.append(f"true concentrations decayed from {phantom.reference_datetime.isoformat()} to the image time "
                 f"{image_time.isoformat()} ({elapsed:.0f} s): × {factor:.6f}")
    return factor


def _check_inside(image: sitk.Image, phantom: Phantom) -> None:
    size = np.asarray(image.GetSize())
    for sphere in phantom.spheres:
        index = np.asarray(image.TransformPhysicalPointToContinuousIndex(sphere.centre_mm))
        if np.any(index < 0) or np.any(index > size - 1):
            raise InputError(phantom.source, f"sphere {sphere.label} centre {sphere.centre_mm} lies outside the image: wrong phantom description or image")


def _box(image: sitk.Image, centre_mm: Sequence[float], radius_mm: float) -> tuple[tuple[slice, ...], np.ndarray]:
    """Array slices (z, y, x) of a box around ``centre_mm`` and the voxel-centre distances (mm) to it."""
    index = np.asarray(image.TransformPhysicalPointToContinuousIndex(tuple(float(c) for c in centre_mm)))
    half = np.ceil(radius_mm / np.asarray(image.GetSpacing())).astype(int) + 1
    lo = np.maximum(np.floor(index).astype(int) - half, 0)
    hi = np.minimum(np.ceil(index).astype(int) + half + 1, np.asarray(image.GetSize()))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo[::-1], hi[::-1]))
    grids = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij")  # x, y, z index
    idx = np.stack(grids, axis=-1).reshape(-1, 3).astype(float)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    points = np.asarray(image.GetOrigin()) + (idx * np.asarray(image.GetSpacing())) @ direction.T
    distance = np.linalg.norm(points - np.asarray(centre_mm), axis=1).reshape(*(hi - lo)).transpose(2, 1, 0)
    return box, distance


def _sphere_qc(image: sitk.Image, values: np.ndarray, sphere: Sphere, true: float, background: float, margin: float,
               kernel: np.ndarray, bv: float | None) -> SphereQC:
    radius = sphere.diameter_mm / 2.0
    box, distance = _box(image, sphere.centre_mm, radius + 16.0)
    local = values[box]
    inside = distance <= radius
    if not inside.any():
        raise InputError(None, f"sphere {sphere.label} ({sphere.diameter_mm:g} mm) holds no voxel centre")
    mean_sphere = float(local[inside].mean())
    search = distance <= radius + margin
    hottest = np.unravel_index(int(np.argmax(np.where(search, local, -np.inf))), local.shape)
    maximum = float(local[hottest])
    threshold = background + 0.5 * (maximum - background)
    grown, _ = ndimage.label((local >= threshold) & (distance <= radius + 10.0), structure=np.ones((3, 3, 3)))
    a50 = grown == grown[hottest]
    peak, _ = suv_peak(local, inside, kernel)
    voxel_mL = float(np.prod(image.GetSpacing())) / 1000.0
    return SphereQC(sphere.label, sphere.diameter_mm, true, mean_sphere, mean_sphere / true, float(local[a50].mean()) / true,
                    float(a50.sum()) * voxel_mL, maximum / true, peak / true, bv)


def _acceptance(spheres: list[SphereQC], modality: str, settings: Mapping[str, Any], voi: str,
                notes: list[str]) -> tuple[list[SphereQC], dict[str, str]]:
    diameters = [float(d) for d in settings["diameters_mm"]]
    overall: dict[str, str] = {}
    standards = {name: s for name, s in settings["standards"].items() if s.get("modality") == modality}
    if not standards:
        notes.append(settings.get("spect_note", f"no acceptance standard for {modality}") if modality == "spect" else f"no acceptance standard for {modality}")
    out = []
    for sphere in spheres:
        checks: dict[str, dict[str, str]] = {}
        position = next((k for k, d in enumerate(diameters) if abs(d - sphere.diameter_mm) <= 0.5), None)
        for name, standard in standards.items():
            if position is None:
                checks[name] = {"rc_mean": "n/a", "rc_max": "n/a"}
                continue
            rc_mean = sphere.rc_mean_a50 if voi == "a50" else sphere.rc_mean_sphere
            checks[name] = {
                "rc_mean": _band(rc_mean, standard["rc_mean"][position]),
                "rc_max": _band(sphere.rc_max, standard["rc_max"][position]),
            }
        out.append(SphereQC(**{**asdict(sphere), "acceptance": checks}))
    for name in standards:
        outcomes = [v for sphere in out for v in sphere.acceptance[name].values() if v != "n/a"]
        overall[name] = "pass" if outcomes and all(v == "pass" for v in outcomes) else ("n/a" if not outcomes else "fail")
    return out, overall


def _band(value: float, band: Sequence[float]) -> str:
    low, high = band
    return "pass" if low <= value <= high else "fail"


# --------------------------------------------------------------------------- background ROIs


def _background_rois(image: sitk.Image, values: np.ndarray, phantom: Phantom, settings: Mapping[str, Any],
                     notes: list[str], background: float) -> tuple[dict[float, list[float]], int]:
    """Means of the background ROIs by ROI diameter (mm)."""
    diameters = sorted((float(d) for d in settings["roi_diameters_mm"]), reverse=True)
    largest = diameters[0]
    z_centre = float(np.mean([s.centre_mm[2] for s in phantom.spheres]))
    xy = np.mean([s.centre_mm[:2] for s in phantom.spheres], axis=0)
    k0 = _slice_index(image, (xy[0], xy[1], z_centre))
    centres = _roi_centres(image, values, k0, phantom, largest, settings, notes, background)
    means: dict[float, list[float]] = {d: [] for d in diameters}
    if not centres:
        return {}, 0
    spacing = np.asarray(image.GetSpacing())
    for offset in settings["slice_offsets_mm"]:
        k = _slice_index(image, (xy[0], xy[1], z_centre + float(offset)))
        if not 0 <= k < values.shape[0]:
            notes.append(f"background slice at {offset:+g} mm lies outside the image: skipped")
            continue
        plane = values[k]
        jj, ii = np.mgrid[0 : plane.shape[0], 0 : plane.shape[1]]
        for ci, cj in centres:
            distance = np.hypot((ii - ci) * spacing[0], (jj - cj) * spacing[1])
            for d in diameters:
                roi = distance <= d / 2.0
                means[d].append(float(plane[roi].mean()))
    return means, len(means[largest])


def _slice_index(image: sitk.Image, point: Sequence[float]) -> int:
    return int(round(image.TransformPhysicalPointToContinuousIndex(tuple(float(p) for p in point))[2]))


def _interior_plane(image: sitk.Image, values: np.ndarray, k: int, phantom: Phantom, background: float) -> tuple[np.ndarray, str]:
    """Boolean [rows, columns] of the phantom's background compartment with the spheres (the
    lung insert excluded): from the described geometry, else where the smoothed slice reaches
    half the true ``background`` concentration."""
    rows, columns = values.shape[1:]
    jj, ii = np.mgrid[0:rows, 0:columns]
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    idx = np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k)], axis=1).astype(float)
    points = np.asarray(image.GetOrigin()) + (idx * np.asarray(image.GetSpacing())) @ direction.T
    g = phantom.geometry or {}
    keys = ("axis_xy_mm", "posterior_radius_mm", "corner_radius_mm", "half_flat_mm")
    if all(key in g for key in keys):
        u = points[:, 0] - float(g["axis_xy_mm"][0])
        v = points[:, 1] - float(g["axis_xy_mm"][1])
        upper = (v >= 0) & (u**2 + v**2 <= float(g["posterior_radius_mm"]) ** 2)
        du = np.clip(np.abs(u) - float(g["half_flat_mm"]), 0.0, None)
        lower = (v < 0) & (du**2 + v**2 <= float(g["corner_radius_mm"]) ** 2)
        inside = (upper | lower).reshape(rows, columns)
        lung = g.get("lung_insert") or {}
        if "radius_mm" in lung:
            axis = lung.get("axis_xy_mm", g["axis_xy_mm"])
            in_lung = ((points[:, 0] - float(axis[0])) ** 2 + (points[:, 1] - float(axis[1])) ** 2 <= float(lung["radius_mm"]) ** 2).reshape(rows, columns)
            inside &= ~in_lung
        return inside, "phantom geometry from the description"
    smooth = ndimage.gaussian_filter(values[k], 1.0)
    return smooth >= 0.5 * background, "interior from the image (≥ 50 % of the true background concentration; cold inserts excluded)"


def _roi_centres(image: sitk.Image, values: np.ndarray, k0: int, phantom: Phantom, diameter: float,
                 settings: Mapping[str, Any], notes: list[str], background: float) -> list[tuple[int, int]]:
    """Up to ``rois_per_slice`` in-plane voxel positions (i, j) for ROIs of ``diameter``,
    spread by farthest-point sampling over the allowed positions."""
    interior, how = _interior_plane(image, values, k0, phantom, background)
    notes.append(f"background ROIs: {how}")
    spacing = np.asarray(image.GetSpacing())
    wall = ndimage.distance_transform_edt(interior, sampling=(spacing[1], spacing[0]))
    r = diameter / 2.0
    allowed = wall >= r + float(settings["distance_from_wall_mm"])
    jj, ii = np.mgrid[0 : interior.shape[0], 0 : interior.shape[1]]
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    idx = np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k0)], axis=1).astype(float)
    points = (np.asarray(image.GetOrigin()) + (idx * spacing) @ direction.T).reshape(*interior.shape, 3)
    for sphere in phantom.spheres:
        d = np.hypot(points[..., 0] - sphere.centre_mm[0], points[..., 1] - sphere.centre_mm[1])
        allowed &= d >= sphere.diameter_mm / 2.0 + float(settings["distance_from_spheres_mm"]) + r
    lung = (phantom.geometry or {}).get("lung_insert") or {}
    if "radius_mm" in lung:
        axis = lung.get("axis_xy_mm", (phantom.geometry or {}).get("axis_xy_mm"))
        d = np.hypot(points[..., 0] - float(axis[0]), points[..., 1] - float(axis[1]))
        allowed &= d >= float(lung["radius_mm"]) + float(settings["distance_from_lung_mm"]) + r
    candidates = np.argwhere(allowed)  # (j, i)
    if candidates.size == 0:
        return []
    xy = candidates[:, ::-1] * spacing[:2]
    wanted = int(settings["rois_per_slice"])
    chosen = [int(np.lexsort((xy[:, 0], -xy[:, 1]))[0])]  # start at the most posterior position
    distance = np.linalg.norm(xy - xy[chosen[0]], axis=1)
    while len(chosen) < min(wanted, len(candidates)):
        nxt = int(np.argmax(distance))
        chosen.append(nxt)
        distance = np.minimum(distance, np.linalg.norm(xy - xy[nxt], axis=1))
    if len(chosen) < wanted:
        notes.append(f"only {len(chosen)} background ROI positions fit (NEMA asks for {wanted})")
    return [(int(candidates[c][1]), int(candidates[c][0])) for c in chosen]
