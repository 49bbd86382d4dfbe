"""``theraflow dose``: post-therapy dosimetry of one administration from 1–6 SPECT/CT time points,
as one plain function (:func:`run_dose`) that reads and checks the inputs, computes and writes
one result folder atomically.

Time points: theraflow SPECT reconstructions (a recon output folder or its NM RECON DICOM file),
or a NIfTI image beside the recon.json that says it is Bq/mL, each with the time its Bq/mL refer
to (the acquisition start, from DICOM or ``at``). Activities are **not** decay-corrected: each
image's activity refers to its own acquisition start and times are counted in hours from the
administration (from the NM header's radiopharmaceutical item, or given), so the time–activity
curves contain physical decay and their integrals are the numbers of decays.

Geometry: the reference time point (the first by default) defines the grid. Every other time
point's CT is registered rigidly (optionally + B-spline) onto the reference CT
(quant.registration, quality recorded and checked) and its SPECT resampled through the same
transform onto the reference SPECT grid; a time point without CT must share the reference's
frame of reference. Masks (NIfTI on the grid of one time point's CT, by default the reference's,
or RTSTRUCT/SEG in its frame of reference; without CT: on that time point's SPECT) are carried
onto the reference SPECT grid by that time point's registration (nearest neighbour).

Per organ VOI and time point: activity (quant.activity) on the reference grid and mass from the
CT (HU → density). Lesions (quant.dosimetry.lesion): each time point measured on its own SPECT
grid (no resampling of the image), the drawn mask carried there by the registrations' rigid
transforms as partial-volume fractions; concentration = local background + (weighted mean −
background)/RC₀(volume, lesion-to-background ratio), RC₀ the background-corrected recovery
measured the same way on separate phantom acquisitions (``recovery_phantom_qc``: ``quant
phantom`` results, one per filling ratio) or configured;
activity = that concentration × the lesion's volume as drawn (voxels of the mask's own grid,
e.g. the CT's: counted on the coarse SPECT grid a small lesion's volume is off by tens of %). Then
quant.dosimetry.study (fits, TIA, organ doses — MIRD with the user's S-value table, or without
one the electron self-dose only — and sphere doses for lesions, BED, uncertainty budgets, Monte
Carlo check) and the voxel dose map (kernel convolution per time point, density-scaled,
voxel-wise time integration) with DVHs.

Outputs: dose.json (inputs, times, registration, fits, TIA, doses ± uncertainty with shares,
methods, data sources, versions), dose.csv, dvh.csv, dose.nii.gz (Gy), rtdose.dcm (RT Dose on
the reference CT's frame of reference, when a reference CT is given) and report.html.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from quant import activity, voi
from quant import registration as reg
from quant.dosimetry import kernel, lesion, organ, report, rtdose, study, tac
from quant.jsonfile import read_json_object
from quant.suv import MBQ_DOSE_LIMIT, PetSeries
from recon.errors import InputError
from recon.io.ct import read_ct_series
from recon.io.dicom_time import acquisition_start, injection_time
from recon.io.outputs import atomic_folder, check_output_folder, write_nifti
from recon.provenance import versions

MARKER = "dose.json"
MAX_TIMEPOINTS = 6
# Mattes MI on 5 % of the voxels (quant.registration's default: 25 %): on the clinical-size
# benchmark study 3× faster with the same accuracy (target registration error 0.26 mm)
REGISTRATION_DEFAULTS = {"sampling_fraction": 0.05}


@dataclass(frozen=True)
class TimePoint:
    """One acquisition: ``spect`` (recon output folder, NM RECON file, or NIfTI beside a recon.json),
    ``ct`` (CT series folder of the same SPECT/CT, or that CT as NIfTI in HU — e.g. the
    ``ct.nii.gz`` an after-scan result keeps —, which registers but cannot be referenced by an
    RT Dose; optional), ``at`` (the time the Bq/mL refer to; default the DICOM acquisition start)."""

    spect: Path
    ct: Path | None = None
    at: datetime | None = None


@dataclass(frozen=True)
class PipelineSettings:
    """``dose``: quant.dosimetry.study.DoseSettings; ``registration``: quant.registration
    settings (with :data:`REGISTRATION_DEFAULTS`); ``reference``: index of the reference time point (0-based); ``voxel_method``:
    'kernel' or 'local'; ``voxel_tail``: 'mono' or 'physical' (after the last time point);
    ``masks_on``: index of the time point whose CT the masks are drawn on (carried onto the
    reference by its registration); ``recovery_curve``: [(volume mL, lesion-to-background ratio
    or None, RC₀)] for lesions, the background-corrected recovery of quant.dosimetry.lesion (not
    quant phantom's RCmean; see lesion.RecoveryCurve) (empty: no recovery correction);
    ``lesion_background_shell_mm``: (inner, outer) distance outside a lesion's surface of the
    voxels whose median is its local background; ``recovery_relative_sd``; ``organ_mass_relative_sd``
    and ``lesion_volume_relative_sd`` (assumed 5 % and 10 %: delineation); ``monte_carlo_repetitions``
    (0: no check); ``pdf``: print the report to PDF with headless Chromium."""

    dose: study.DoseSettings = field(default_factory=study.DoseSettings)
    registration: reg.RegistrationSettings = field(default_factory=lambda: reg.RegistrationSettings(**REGISTRATION_DEFAULTS))
    reference: int = 0
    masks_on: int = 0
    voxel_method: str = "kernel"
    voxel_tail: str = "mono"
    recovery_curve: tuple[tuple[float, float | None, float], ...] = ()
    lesion_background_shell_mm: tuple[float, float] = lesion.DEFAULT_SHELL_MM
    recovery_relative_sd: float = 0.05
    organ_mass_relative_sd: float = 0.05
    lesion_volume_relative_sd: float = 0.10
    monte_carlo_repetitions: int = 200
    pdf: bool = True

    @classmethod
    def from_file(cls, path: str | Path | None) -> PipelineSettings:
        """Settings from JSON: {"dose": {...}, "registration": {...}, "recovery_phantom_qc": "phantom_qc.json" or a list of them
        (one per filling ratio), "recovery_curve": [[mL, RC₀], ...] or [[mL, ratio, RC₀], ...], other fields}."""
        if path is None:
            return cls()
        path = Path(path)
        data = dict(read_json_object(path, "dose settings file"))
        try:
            values: dict[str, Any] = {}
            if "dose" in data:
                dose = dict(data.pop("dose"))
                if dose.get("s_values"):  # relative to the settings file
                    dose["s_values"] = str(path.parent / dose["s_values"])
                values["dose"] = study.DoseSettings.from_dict(dose)
            if "registration" in data:
                values["registration"] = reg.RegistrationSettings.from_dict({**REGISTRATION_DEFAULTS, **data.pop("registration")})
            if "lesion_background_shell_mm" in data:
                values["lesion_background_shell_mm"] = tuple(float(v) for v in data.pop("lesion_background_shell_mm"))
            if "recovery_phantom_qc" in data:
                given = data.pop("recovery_phantom_qc")
                values["recovery_curve"] = recovery_curve_from_phantom_qc([path.parent / q for q in ([given] if isinstance(given, str) else given)],
                                                                          values.get("lesion_background_shell_mm", lesion.DEFAULT_SHELL_MM))
            if "recovery_curve" in data:
                values["recovery_curve"] = tuple((float(p[0]), None, float(p[1])) if len(p) == 2 else (float(p[0]), float(p[1]), float(p[2]))
                                                 for p in data.pop("recovery_curve"))
                lesion.RecoveryCurve(values["recovery_curve"])
            unknown = set(data) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown settings {sorted(unknown)}")
            return cls(**values, **data)
        except (TypeError, ValueError) as exc:
            raise InputError(path, f"dose settings: {exc}") from None


def recovery_curve_from_phantom_qc(paths: Sequence[Path], shell_mm: Sequence[float] = lesion.DEFAULT_SHELL_MM) -> tuple[tuple[float, float, float], ...]:
    """(sphere volume mL, sphere-to-background ratio, RC₀) measured by quant.dosimetry.lesion on
    the images of ``theraflow quant phantom`` results (phantom_qc.json: the image and phantom
    description it names)."""
    curve = []
    for path in paths:
        try:
            curve += [(r.volume_mL, r.ratio, r.rc0) for r in lesion.phantom_recovery_from_qc(path, shell_mm)]
        except ValueError as exc:
            raise InputError(path, str(exc)) from None
    return tuple(curve)


# --------------------------------------------------------------------------- inputs


@dataclass
class _Loaded:
    index: int
    source: Path
    image: sitk.Image
    header: pydicom.Dataset | None
    acquired: datetime
    ct: tuple[sitk.Image, pydicom.Dataset | None, list[str]] | None  # image (HU), DICOM header and SOP UIDs (None, [] for NIfTI)
    ct_dir: Path | None


def _read_timepoint(index: int, point: TimePoint) -> _Loaded:
    path = Path(point.spect)
    if path.is_dir():
        candidate = path / "dicom" / "NM_RECON.dcm"
        if not candidate.is_file():
            raise InputError(path, "not a theraflow SPECT result folder (no dicom/NM_RECON.dcm)")
        path = candidate
    if not path.is_file():
        raise InputError(path, "no such SPECT file or folder")
    header = None
    if path.name.endswith((".nii", ".nii.gz")):
        recon_json = path.parent / "recon.json"
        units = read_json_object(recon_json, "recon.json").get("units") if recon_json.is_file() else None
        if units != "Bq/mL":
            raise InputError(path, "no calibration: a NIfTI time point needs the recon.json beside it saying its values are Bq/mL")
        try:
            image = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
        except RuntimeError:
            raise InputError(path, "image unreadable") from None
    else:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            raise InputError(path, "neither NIfTI nor DICOM") from None
        if header.get("Modality") != "NM" or "RECON" not in " ".join(header.get("ImageType", [])).upper():
            raise InputError(path, "not an NM RECON TOMO image (give a reconstruction, not projections)")
        units = [str(code.CodeValue) for item in header.get("RealWorldValueMappingSequence", []) for code in item.get("MeasurementUnitsCodeSequence", [])]
        if "Bq/ml" not in units and str(header.get("Units", "")) != "BQML":
            raise InputError(path, "no calibration: the image's values are not declared in Bq/mL (Real World Value Mapping)")
        from quant.phantom_qc import read_image

        image = read_image(path).image
    acquired = point.at or (acquisition_start(header) if header is not None else None)
    if acquired is None:
        raise InputError(path, "no acquisition time: give it with --at")
    ct = None
    if point.ct is not None and Path(point.ct).name.endswith((".nii", ".nii.gz")):
        try:
            ct = (sitk.Cast(sitk.ReadImage(str(point.ct)), sitk.sitkFloat32), None, [])
        except RuntimeError:
            raise InputError(point.ct, "CT image unreadable") from None
    elif point.ct is not None:
        ct = read_ct_series(point.ct)
        frame = str(header.get("FrameOfReferenceUID", "")) if header is not None else ""
        if frame and str(ct[1].get("FrameOfReferenceUID", "")) != frame:
            raise InputError(point.ct, f"time point {index + 1}: the CT is not in the SPECT's frame of reference (not the same SPECT/CT)")
    return _Loaded(index, path, image, header, acquired, ct, point.ct)


def _identity(loaded: _Loaded) -> tuple[str, str] | None:
    headers = [h for h in (loaded.header, loaded.ct[1] if loaded.ct else None) if h is not None]
    ids = {(str(h.get("PatientID", "")), str(h.get("PatientBirthDate", ""))) for h in headers}
    if len(ids) > 1:
        raise InputError(loaded.source, f"time point {loaded.index + 1}: the SPECT and its CT are of different patients")
    return ids.pop() if ids else None


def _administration(points: Sequence[_Loaded], administered_MBq: float | None, administered_at: datetime | None) -> tuple[float | None, datetime, str]:
    found = []
    for point in points:
        items = point.header.get("RadiopharmaceuticalInformationSequence") if point.header is not None else None
        if items:
            when = injection_time(point.header, items[0])
            dose = items[0].get("RadionuclideTotalDose")
            mbq = None if dose in (None, "") else float(dose) / (1.0 if float(dose) < MBQ_DOSE_LIMIT else 1e6)
            found.append((point, when, mbq))
    for point, when, _ in found:
        if when is not None and found[0][1] is not None and abs((when - found[0][1]).total_seconds()) > 60:
            raise InputError(point.source, f"time point {point.index + 1} belongs to another administration ({when.isoformat()} vs {found[0][1].isoformat()})")
    when = administered_at or next((w for _, w, _ in found if w is not None), None)
    if when is None:
        raise InputError(points[0].source, "no administration time in the headers: give --administration ISO_TIME")
    mbq = administered_MBq if administered_MBq is not None else next((m for _, _, m in found if m), None)
    rule = "given" if administered_at else "RadiopharmaceuticalStartDateTime of the NM header"
    return mbq, when, rule


def _check_order(points: Sequence[_Loaded], administered_at: datetime) -> list[float]:
    times = []
    for point in points:
        hours = (point.acquired - administered_at).total_seconds() / 3600.0
        if hours <= 0:
            raise InputError(point.source, f"time point {point.index + 1} ({point.acquired.isoformat()}) is not after the administration ({administered_at.isoformat()})")
        if times and hours <= times[-1]:
            raise InputError(point.source, f"time points out of order: time point {point.index + 1} ({hours:.1f} h) is not after time point {point.index} ({times[-1]:.1f} h)")
        times.append(hours)
    return times


def _frame(point: _Loaded) -> str:
    return str(point.header.get("FrameOfReferenceUID", "")) if point.header is not None else ""


def _masks(named: Mapping[str, Path | sitk.Image], point: _Loaded) -> dict[str, sitk.Image]:
    """Masks as drawn on time point ``point``: files on its CT (NIfTI on the CT grid,
    RTSTRUCT/SEG in its frame), or on its SPECT when it has no CT; images on its SPECT grid."""
    header = point.header if point.header is not None else pydicom.Dataset()
    if "FrameOfReferenceUID" not in header:
        header.FrameOfReferenceUID = ""
    spect = PetSeries(point.source.parent, (), (header,), point.image, label=f"time point {point.index + 1} SPECT")
    space = spect
    if point.ct is not None:
        image, ct_header, _ = point.ct
        space = PetSeries(Path(point.ct_dir), (), (ct_header or header,), image, label=f"time point {point.index + 1} CT")
    images = {name: mask for name, mask in named.items() if isinstance(mask, sitk.Image)}
    files = {name: path for name, path in named.items() if name not in images}
    try:
        return voi.load_masks(images, spect) | voi.load_masks(files, space)
    except InputError as exc:
        if any(p in exc.problem for p in ("frame of reference", "another grid", "differs from")):
            raise InputError(exc.path, f"{exc.problem} (masks must be drawn on the CT of the time point they are said to be on, "
                             "or its SPECT without CT)") from None
        raise


def _carried(masks: Mapping[str, sitk.Image], named: Mapping[str, Path | sitk.Image], reference: sitk.Image, transform: sitk.Transform | None) -> dict[str, sitk.Image]:
    """``masks`` on the reference SPECT grid through ``transform`` (reference point → the masks'
    frame; None: same frame), nearest neighbour."""
    out = {}
    for name, mask in masks.items():
        moved = sitk.Cast(reg.resample_mask(mask, reference, transform) != 0, sitk.sitkUInt8)
        if not sitk.GetArrayViewFromImage(moved).any():
            raise InputError(named[name] if isinstance(named[name], Path) else None, f"mask {name!r} lies outside the reference SPECT's field of view")
        out[name] = moved
    return out


# --------------------------------------------------------------------------- result


@dataclass
class DoseResult:
    """Everything :func:`run_dose` computed (and wrote): per-VOI results, times (h after the
    administration), administration, DVHs, the Monte Carlo check, files written, notes."""

    vois: list[study.VoiResult]
    times_h: list[float]
    administered_MBq: float | None
    administration_time: datetime
    dvhs: dict[str, kernel.Dvh]
    monte_carlo: study.MonteCarloCheck | None
    registrations: list[dict[str, Any]]
    files: list[str]
    timings_s: dict[str, float]
    notes: list[str] = field(default_factory=list)


def run_dose(timepoints: Sequence[TimePoint], masks: Mapping[str, str | Path | sitk.Image], out_dir: str | Path,
             settings: PipelineSettings | None = None, *, lesions: Mapping[str, str | Path | sitk.Image] | None = None,
             administered_MBq: float | None = None, administration_time: datetime | None = None) -> DoseResult:
    """The whole dosimetry of one administration (see the module docstring). Bad input raises
    ``InputError`` before anything is written; the result folder is written atomically. Masks
    and lesions: files (see :func:`_masks`) or images on the SPECT grid of time point
    ``settings.masks_on``."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    settings = settings or PipelineSettings()
    check_output_folder(out_dir, MARKER)
    table = _s_table(settings.dose)
    try:
        recovery = lesion.RecoveryCurve(settings.recovery_curve) if settings.recovery_curve else None
    except ValueError as exc:
        raise InputError(None, str(exc)) from None
    if not 1 <= len(timepoints) <= MAX_TIMEPOINTS:
        raise InputError(None, f"{len(timepoints)} time points: give 1 to {MAX_TIMEPOINTS}")
    if not 0 <= settings.reference < len(timepoints):
        raise InputError(None, f"reference time point {settings.reference + 1} does not exist")
    named = {k: v if isinstance(v, sitk.Image) else Path(v) for k, v in (*masks.items(), *(lesions or {}).items())}
    if len(named) != len(masks) + len(lesions or {}):
        raise InputError(None, "a lesion mask has the name of an organ mask")
    if not named:
        raise InputError(None, "no masks: give organ masks (--masks) and/or lesion masks (--lesions)")
    points = [_read_timepoint(i, p) for i, p in enumerate(timepoints)]
    identities = {_identity(p) for p in points} - {None}
    if len(identities) > 1:
        first = next(p for p in points if _identity(p) is not None)
        other = next(p for p in points if _identity(p) not in (None, _identity(first)))
        raise InputError(other.source, f"time point {other.index + 1} is of another patient than time point {first.index + 1}")
    administered, administered_at, administration_rule = _administration(points, administered_MBq, administration_time)
    times = _check_order(points, administered_at)
    ref = points[settings.reference]
    if not 0 <= settings.masks_on < len(points):
        raise InputError(None, f"masks on time point {settings.masks_on + 1}: no such time point")
    drawn = _masks(named, points[settings.masks_on])
    timings["read_s"] = time.perf_counter() - started

    # ---- registration onto the reference time point
    t0 = time.perf_counter()
    on_ref: list[sitk.Image] = []
    registrations: list[dict[str, Any]] = []
    transforms: dict[int, sitk.Transform] = {}
    rigid: dict[int, sitk.Transform] = {}   # reference → time point, rigid part (invertible: lesions carried to own grids)
    for point in points:
        if point is ref:
            on_ref.append(point.image)
            registrations.append({"time_point": point.index + 1, "reference": True})
            continue
        if point.ct is not None and ref.ct is not None:
            result = reg.register_ct(ref.ct[0], point.ct[0], settings.registration)
            if not result.quality.acceptable:
                raise InputError(point.ct_dir, f"registration onto the reference CT failed its quality check ({result.quality.reason})")
            transform = result.transform
            transforms[point.index] = transform
            rigid[point.index] = result.rigid
            registrations.append({"time_point": point.index + 1, "registered": True, **result.as_dict()})
        elif _frame(point) and _frame(point) == _frame(ref):
            transform = None
            registrations.append({"time_point": point.index + 1, "registered": False, "reason": "same frame of reference as the reference"})
        else:
            raise InputError(point.source, f"time point {point.index + 1} is in another frame of reference than the reference time point "
                             "and has no CT to register (give --ct for both)")
        on_ref.append(reg.resample_emission(point.image, ref.image, transform))
    timings["registration_s"] = time.perf_counter() - t0
    voi_masks = _carried(drawn, named, ref.image, transforms.get(settings.masks_on))
    drawn_mL = {name: float(sitk.GetArrayViewFromImage(mask).astype(bool).sum()) * voi.voxel_volume_mL(mask) for name, mask in drawn.items()}

    # ---- VOIs
    density = kernel.density_from_hu(reg.resample_emission(ref.ct[0], ref.image, None, default_value=-1000.0)) if ref.ct is not None else None
    voxel_mL = voi.voxel_volume_mL(ref.image)
    vois = []
    lesion_names = set(lesions or {})
    lesion_measurements: dict[str, dict[str, Any]] = {}
    for name, mask in voi_masks.items():
        measured = [activity.voi_activity(image, mask, name) for image in on_ref]
        inside = sitk.GetArrayViewFromImage(mask) != 0
        volume = float(inside.sum()) * voxel_mL
        mass = float(sitk.GetArrayViewFromImage(density)[inside].sum()) * voxel_mL if density is not None else None
        activities = tuple(m.activity_MBq for m in measured)
        if name in lesion_names:
            volume = drawn_mL[name]
            samples = [_lesion_sample(point, drawn[name], rigid, settings, name) for point in points]
            corrected = [recovery.concentration(s, volume) if recovery else (s.mean, 1.0) for s in samples]
            lesion_measurements[name] = {"volume_mL": volume, "time_points": [
                asdict(s) | {"corrected_Bq_per_mL": c, "recovery_rc0": rc} for s, (c, rc) in zip(samples, corrected)]}
            activities = tuple(c * volume * 1e-6 for c, _ in corrected)
            vois.append(study.VoiData(name, "lesion", activities, 1.0, settings.recovery_relative_sd if settings.recovery_curve else 0.0,
                                      mass, settings.lesion_volume_relative_sd, volume))
        else:
            vois.append(study.VoiData(name, "organ", activities, mass_g=mass, mass_relative_sd=settings.organ_mass_relative_sd if mass else 0.0,
                                      volume_mL=volume))
    dose_settings = replace(settings.dose, administered_MBq=administered)
    t0 = time.perf_counter()
    try:
        results = study.dosimetry(times, vois, dose_settings)
    except ValueError as exc:
        raise InputError(None, f"dosimetry: {exc}") from None
    timings["organ_dosimetry_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    check = study.monte_carlo(times, vois, dose_settings, settings.monte_carlo_repetitions) if settings.monte_carlo_repetitions > 1 else None
    timings["monte_carlo_s"] = time.perf_counter() - t0

    # ---- voxel dosimetry
    t0 = time.perf_counter()
    voxel_kernel = kernel.voxel_s_values(ref.image.GetSpacing()) if settings.voxel_method == "kernel" else None
    rates = [kernel.dose_rate_map(image, voxel_kernel, density, settings.voxel_method) for image in on_ref]
    lam = tac.physical_decay_per_h(dose_settings.nuclide)
    dose_map = kernel.integrate_dose_rates(times, rates, lam, settings.voxel_tail) if len(times) > 1 else _single_time_point_map(rates[0], times[0], lam)
    dvhs = {name: kernel.dvh(dose_map, mask, name) for name, mask in voi_masks.items()}
    timings["voxel_dosimetry_s"] = time.perf_counter() - t0

    notes = [f"administration {administered_at.isoformat()} ({administration_rule}); activities at each acquisition start, not decay-corrected"]
    if not settings.recovery_curve and lesion_names:
        notes.append("no recovery curve configured: lesion activities are not recovery-corrected")
    if table is None:
        notes.append(f"organ doses: {organ.ELECTRON_ONLY}")
    if ref.ct is not None and ref.ct[1] is None:
        notes.append("the reference CT is a NIfTI image: no RT Dose written (it needs the CT's DICOM series)")
    if ref.ct is None:
        notes.append("no reference CT: organ masses from the phantom (ICRP-89 reference masses without an S-value table), "
                     "voxel doses for unit-density soft tissue, no RT Dose written")
    data = {
        "inputs": {"time_points": [{"spect": str(p.source), "ct": None if p.ct_dir is None else str(p.ct_dir),
                                    "acquisition_start": p.acquired.isoformat(), "hours_after_administration": t,
                                    "frame_of_reference_uid": _frame(p)} for p, t in zip(points, times)],
                   "reference_time_point": settings.reference + 1, "masks_on_time_point": settings.masks_on + 1,
                   "masks": {k: _mask_source(v) for k, v in masks.items()}, "lesions": {k: _mask_source(v) for k, v in (lesions or {}).items()},
                   "administered_MBq": administered, "administration_time": administered_at.isoformat(), "administration_rule": administration_rule},
        "decay_reference": "each time point's activity refers to its own acquisition start (physical decay in the curves); "
                           "times in hours after the administration",
        "registration": registrations,
        "lesion_measurements": lesion_measurements,
        "settings": _settings_dict(settings),
        "vois": [r.as_dict() | {"voxel_dvh": dvhs[r.name].as_dict() | {"dose_Gy": None, "volume_fraction": None}} for r in results],
        "monte_carlo_check": None if check is None else check.as_dict(),
        "voxel": {"method": settings.voxel_method, "tail": settings.voxel_tail,
                  "kernel": None if voxel_kernel is None else voxel_kernel.as_dict(),
                  "density": "CT HU → density, piecewise linear through " + str(list(zip(kernel.DENSITY_POINTS_HU, kernel.DENSITY_POINTS_G_PER_ML)))
                  if density is not None else "uniform soft tissue (1.04 g/mL)"},
        "data_sources": {"organ_s_values": None if table is None else {"file": settings.dose.s_values, "citation": table.citation,
                                                                       "phantom_masses": table.mass_source},
                         "organ_dose_model": organ.ELECTRON_ONLY if table is None else "MIRD with the given S-value table",
                         "decay_data": kernel.decay_data()["source"],
                         "voxel_kernel": kernel.__doc__.split("\n\n")[1].strip() if kernel.__doc__ else "",
                         "uncertainty": "EANM guidance, Gear et al. 2018, doi 10.1007/s00259-018-4136-7"},
        "units": {"time": "h", "activity": "MBq", "tia": "MBq·h", "tiac": "h", "dose": "Gy", "mass": "g", "volume": "mL"},
        "versions": versions(("theraflow", "SimpleITK", "pydicom", "numpy", "scipy")),
        "notes": notes,
    }
    files = ["dose.json", "dose.csv", "dvh.csv", "dose.nii.gz", "report.html"]
    with atomic_folder(out_dir, MARKER) as tmp:
        write_nifti(tmp / "dose.nii.gz", dose_map)
        if ref.ct is not None and ref.ct[1] is not None:
            rtdose.write_rt_dose(tmp / "rtdose.dcm", dose_map, ref.ct[1], ref.ct[2],
                                 comment=f"theraflow absorbed dose, {len(times)} time point(s), {settings.voxel_method} method")
            files.append("rtdose.dcm")
        for index, transform in transforms.items():
            sitk.WriteTransform(transform, str(tmp / f"registration_tp{index + 1}.tfm"))
            files.append(f"registration_tp{index + 1}.tfm")
        _write_csv(tmp / "dose.csv", results, dvhs)
        _write_dvh_csv(tmp / "dvh.csv", dvhs)
        (tmp / "report.html").write_text(report.html_report(data, results, times, dose_map, ref.ct[0] if ref.ct else None, voi_masks))
        if settings.pdf:
            problem = report.write_pdf(tmp / "report.html", tmp / "report.pdf")
            if problem:
                notes.append(problem)
            else:
                files.append("report.pdf")
        timings["total_s"] = time.perf_counter() - started
        data["timings_s"] = timings
        data["outputs"] = files
        (tmp / MARKER).write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    return DoseResult(results, times, administered, administered_at, dvhs, check, registrations, files, timings, notes)


def _lesion_sample(point: _Loaded, mask: sitk.Image, rigid: Mapping[int, sitk.Transform], settings: PipelineSettings,
                   name: str) -> lesion.LesionSample:
    """Lesion ``name`` (``mask`` as drawn on time point ``settings.masks_on``) measured on time
    point ``point``'s own SPECT grid: carried point → reference (inverse rigid) → drawn frame (rigid)."""
    parts = [] if point.index == settings.masks_on else [t for t in (rigid.get(settings.masks_on), rigid[point.index].GetInverse() if point.index in rigid else None) if t is not None]
    transform = sitk.CompositeTransform(parts) if parts else None
    try:
        return lesion.sample_lesion(point.image, mask, transform, settings.lesion_background_shell_mm, name)
    except ValueError as exc:
        raise InputError(None, f"time point {point.index + 1}: {exc}") from None


def _s_table(settings: study.DoseSettings) -> organ.SValueTable | None:
    """The organ S-value table of the settings, read to check it before anything else (None: none given)."""
    if not settings.s_values:
        return None
    try:
        return organ.read_s_table(settings.s_values, settings.s_values_source or "")
    except (OSError, ValueError) as exc:
        raise InputError(Path(settings.s_values), f"S-value table: {exc}") from None


def _single_time_point_map(rate: sitk.Image, time_h: float, lam: float) -> sitk.Image:
    """One time point: every voxel integrated as Hänscheid's mono-exponential (effective
    half-life = the imaging time): ∫ = Ḋ(t)·2t/ln 2."""
    dose = sitk.GetArrayFromImage(rate).astype(np.float64) * 3600.0 * 2.0 * time_h / math.log(2.0) * 1e-3
    out = sitk.GetImageFromArray(dose.astype(np.float32))
    out.CopyInformation(rate)
    return out


def _mask_source(mask: str | Path | sitk.Image) -> str:
    return "an image on the SPECT grid of the masks' time point" if isinstance(mask, sitk.Image) else str(mask)


def _settings_dict(settings: PipelineSettings) -> dict[str, Any]:
    out = asdict(settings)
    out["dose"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in out["dose"].items()}
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (datetime, Path)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _write_csv(path: Path, results: Sequence[study.VoiResult], dvhs: Mapping[str, kernel.Dvh]) -> None:
    columns = ["name", "kind", "method", "model", "mass_g", "tia_MBq_h", "tia_sd_MBq_h", "tiac_h", "dose_Gy", "dose_sd_Gy",
               "dose_relative_sd", "largest_uncertainty", "bed_Gy", "bed_sd_Gy", "voxel_mean_Gy", "voxel_D98_Gy", "voxel_D50_Gy", "voxel_D2_Gy"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for r in results:
            shares = r.dose.shares if r.dose is not None else r.tia.shares
            h = dvhs[r.name]
            row = {"name": r.name, "kind": r.kind, "method": r.method, "model": getattr(r.integration, "model", None) or r.integration.method,
                   "mass_g": r.mass_g, "tia_MBq_h": r.tia.value, "tia_sd_MBq_h": r.tia.sd, "tiac_h": r.tiac_h,
                   "dose_Gy": None if r.dose is None else r.dose.value, "dose_sd_Gy": None if r.dose is None else r.dose.sd,
                   "dose_relative_sd": None if r.dose is None else r.dose.relative_sd,
                   "largest_uncertainty": max(shares, key=shares.get) if shares else None,
                   "bed_Gy": None if r.bed is None else r.bed.value, "bed_sd_Gy": None if r.bed is None else r.bed.sd,
                   "voxel_mean_Gy": h.mean_Gy, "voxel_D98_Gy": h.d98_Gy, "voxel_D50_Gy": h.d50_Gy, "voxel_D2_Gy": h.d2_Gy}
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else "" if v is None else v) for k, v in row.items()})


def _write_dvh_csv(path: Path, dvhs: Mapping[str, kernel.Dvh]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["voi", "dose_Gy", "volume_fraction"])
        for name, h in dvhs.items():
            for d, v in zip(h.dose_Gy, h.volume_fraction):
                writer.writerow([name, f"{d:.6g}", f"{v:.6g}"])
