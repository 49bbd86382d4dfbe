"""Camera sensitivity: the calibration registry, its derivation from a planar acquisition of a
known source, the checks that a calibration may be trusted for a study, and the conversion of
reconstructed counts to Bq/mL.

Sensitivity S [cps/MBq] is the planar sensitivity of ONE detector head for primary photons in
the photopeak window, source in air (NEMA NU 1 style). The SPECT system matrix keeps the sum of
an unattenuated object in every view, so a voxel value v (counts per view) means
v / (S · T_view) MBq, i.e. C = v / (S · T_view) · 1e6 / V_voxel[mL] Bq/mL.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from importlib import resources
from pathlib import Path

import numpy as np
import pydicom

from recon.errors import InputError
from recon.io import dicom_time
from recon.io.nm_projections import NM_STORAGE, energy_windows, frame_counts, frame_vector
from recon.io.vendors import adapter_for
from recon.nuclides import Nuclide
from recon.spect.scatter import energy_window_scatter
from recon.spect.windows import EnergyWindow, guess_nuclide, photopeak_windows

REGISTRY_ENV = "THERAFLOW_SENSITIVITY_REGISTRY"
ORIGINS = ("measured", "simulated", "vendor")
DEFAULT_MAX_AGE_DAYS = 365


@dataclass(frozen=True)
class SensitivityEntry:
    """One registry line: a camera model, collimator, nuclide and photopeak window [keV], the
    sensitivity, and where it came from.

    ``origin``: 'measured' (``date`` of the measurement, ``source_activity_MBq`` at
    ``source_activity_time``, ``by`` whom, ``input`` the planar acquisition's SOP Instance UID),
    'simulated' (``simulator``: the program that made the projections, as their Software
    Versions (0018,1020) name it; the entry applies only to projections it made) or 'vendor'
    (``reference``: the publication); empty for an entry of unknown origin. ``date`` and
    ``valid_until`` are ISO dates (YYYY-MM-DD); ``source`` is a free note."""

    camera_model: str
    collimator: str
    nuclide: str
    window_keV: tuple[float, float]
    cps_per_MBq: float
    source: str = ""
    origin: str = ""
    date: str = ""
    valid_until: str = ""
    by: str = ""
    input: str = ""
    source_activity_MBq: float | None = None
    source_activity_time: str = ""
    simulator: str = ""
    reference: str = ""

    def matches(self, camera_model: str, collimator: str, nuclide: str, window: EnergyWindow) -> bool:
        return (
            self.camera_model.strip().lower() == camera_model.strip().lower()
            and self.collimator.strip().upper() == collimator.strip().upper()
            and self.nuclide == nuclide
            and abs(self.window_keV[0] - window.lower_keV) <= 1.0
            and abs(self.window_keV[1] - window.upper_keV) <= 1.0
        )


def default_registry() -> Path:
    """The registry file: $THERAFLOW_SENSITIVITY_REGISTRY, else the one shipped with theraflow."""
    env = os.environ.get(REGISTRY_ENV)
    return Path(env) if env else Path(str(resources.files("recon.spect").joinpath("data/sensitivity.json")))


def _checked(entry: SensitivityEntry) -> SensitivityEntry:
    """``entry`` when its fields have their types and sensible ranges, else ValueError: a camera
    model, collimator and nuclide as text; a window 0 ≤ lower < upper keV; a sensitivity that is a
    finite positive number of cps/MBq."""
    if not all(isinstance(v, str) for v in (entry.camera_model, entry.collimator, entry.nuclide, entry.source)):
        raise ValueError("camera_model, collimator, nuclide and source must be text")
    numbers = (*entry.window_keV, entry.cps_per_MBq)
    if len(entry.window_keV) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
        raise ValueError("window_keV must be two numbers and cps_per_MBq a number, all finite")
    if not 0 <= entry.window_keV[0] < entry.window_keV[1]:
        raise ValueError(f"window_keV {list(entry.window_keV)} is not 0 <= lower < upper")
    if entry.cps_per_MBq <= 0:
        raise ValueError(f"cps_per_MBq {entry.cps_per_MBq} is not positive")
    return entry


def load_registry(path: Path | None = None) -> list[SensitivityEntry]:
    """The entries of the registry file, each checked (``_checked``); InputError for a file that
    cannot be read or whose content is not a registry."""
    path = path or default_registry()
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))["entries"]
        if not isinstance(rows, list):
            raise TypeError("'entries' is not a list")
        entries = []
        for number, row in enumerate(rows, start=1):
            try:
                entries.append(_checked(SensitivityEntry(**{**row, "window_keV": tuple(row["window_keV"])})))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"entry {number}: {exc}") from None
        return entries
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(path, f"not a sensitivity registry ({exc.__class__.__name__}: {exc})") from None


def find_sensitivity(
    camera_model: str, collimator: str, nuclide: Nuclide, window: EnergyWindow, path: Path | None = None
) -> SensitivityEntry | None:
    """The registry entry for this camera, collimator, nuclide and photopeak window, if any."""
    return next((e for e in load_registry(path) if e.matches(camera_model, collimator, nuclide.name, window)), None)


def add_to_registry(entry: SensitivityEntry, path: Path | None = None) -> Path:
    """Add (or replace) ``entry`` in the registry, written atomically; returns the file."""
    path = Path(path or default_registry())
    try:
        _checked(entry)
    except ValueError as exc:
        raise InputError(path, f"refused to write: {exc}") from None
    entries = load_registry(path) if path.exists() else []
    window = EnergyWindow(0, *entry.window_keV)
    entries = [e for e in entries if not e.matches(entry.camera_model, entry.collimator, entry.nuclide, window)] + [entry]
    text = json.dumps({"entries": [asdict(e) for e in entries]}, indent=2, allow_nan=False) + "\n"
    handle = None
    try:
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
            handle.write(text)
        os.replace(handle.name, path)
    except OSError as exc:
        if handle is not None:
            Path(handle.name).unlink(missing_ok=True)
        raise InputError(path, f"cannot write the registry ({exc.strerror or exc})") from None
    return path


def _iso_date(text: str) -> date | None:
    try:
        return date.fromisoformat(text[:10]) if text else None
    except ValueError:
        return None


def _missing_provenance(entry: SensitivityEntry) -> list[str]:
    """The provenance fields an entry of its origin lacks (all of them for an unknown origin)."""
    needed = {
        "measured": ("date", "valid_until", "by", "input", "source_activity_MBq", "source_activity_time"),
        "simulated": ("date", "valid_until", "simulator"),
        "vendor": ("date", "valid_until", "reference"),
    }.get(entry.origin, ("origin",))
    return [name for name in needed if getattr(entry, name) in ("", None)]


def calibration_warnings(
    entry: SensitivityEntry, acquired: datetime | None, software_versions: list[str], max_age_days: float = DEFAULT_MAX_AGE_DAYS
) -> list[str]:
    """Why ``entry`` cannot be trusted for projections acquired at ``acquired`` whose Software
    Versions (0018,1020) are ``software_versions``; empty when it can.

    Untrusted: an entry of unknown origin or with incomplete provenance; a simulated entry for
    projections its simulator did not make (a real camera); an entry whose validity ended
    before the acquisition; an entry dated more than ``max_age_days`` days from the acquisition
    (either side); an acquisition of unknown date."""
    warnings = []
    missing = _missing_provenance(entry)
    if missing:
        what = "of unknown origin" if entry.origin not in ORIGINS else f"{entry.origin} without {', '.join(missing)}"
        warnings.append(f"calibration entry {what}")
    if entry.origin == "simulated" and entry.simulator and entry.simulator not in software_versions:
        warnings.append(f"SIMULATED calibration (by {entry.simulator}) for a real camera (projections made by "
                        f"{', '.join(software_versions) or 'unnamed software'})")
    dated, valid_until = _iso_date(entry.date), _iso_date(entry.valid_until)
    if acquired is None:
        warnings.append("acquisition date unknown: calibration validity and age not checked")
        return warnings
    if (entry.valid_until and valid_until is None) or (entry.date and dated is None):
        warnings.append(f"calibration dates not ISO dates (date {entry.date!r}, valid until {entry.valid_until!r})")
    if valid_until is not None and acquired.date() > valid_until:
        warnings.append(f"calibration EXPIRED: valid until {valid_until}, acquisition on {acquired.date()}")
    if dated is not None and abs((acquired.date() - dated).days) > max_age_days:
        warnings.append(f"calibration of {dated} is {abs((acquired.date() - dated).days)} days from the acquisition "
                        f"on {acquired.date()} (more than {max_age_days:g} days)")
    return warnings


def bq_per_ml_scale(cps_per_MBq: float, frame_duration_s: float, voxel_mL: float, decay_factor: float) -> float:
    """Factor turning reconstructed counts per view into Bq/mL at the reference time.

    ``decay_factor``: mean fraction of the reference-time activity present during the
    acquisition (1 for no decay correction)."""
    return 1e6 / (cps_per_MBq * frame_duration_s * voxel_mL * decay_factor)


@dataclass(frozen=True)
class SensitivityMeasurement:
    """Result of a planar calibration acquisition."""

    camera_model: str
    collimator: str
    nuclide: str
    window_keV: tuple[float, float]
    per_head_cps_per_MBq: list[float]
    activity_MBq: float
    activity_time: str
    acquisition_start: str
    frame_duration_s: float
    input_sop_instance_uid: str

    @property
    def cps_per_MBq(self) -> float:
        return float(np.mean(self.per_head_cps_per_MBq))

    def entry(self, by: str, valid_days: int, note: str = "") -> SensitivityEntry:
        """The registry entry this measurement makes: measured on the acquisition's date by
        ``by``, valid for ``valid_days`` days."""
        measured_on = datetime.fromisoformat(self.acquisition_start).date()
        return SensitivityEntry(
            self.camera_model, self.collimator, self.nuclide, self.window_keV, round(self.cps_per_MBq, 4), source=note,
            origin="measured", date=measured_on.isoformat(), valid_until=(measured_on + timedelta(days=valid_days)).isoformat(),
            by=by, input=self.input_sop_instance_uid, source_activity_MBq=self.activity_MBq, source_activity_time=self.activity_time,
        )


def measure_sensitivity(path: str | Path, activity_MBq: float | None = None, activity_time: datetime | None = None) -> SensitivityMeasurement:
    """Sensitivity [cps/MBq] of the most abundant windowed photopeak (see ``measure_sensitivities``)."""
    return measure_sensitivities(path, activity_MBq, activity_time)[0]


def measure_sensitivities(
    path: str | Path, activity_MBq: float | None = None, activity_time: datetime | None = None, photopeaks: str = "main"
) -> list[SensitivityMeasurement]:
    """Sensitivity from a planar (STATIC) NM acquisition of a source of known activity in air, for
    the most abundant windowed photopeak of the nuclide (``photopeaks`` 'main') or for each
    windowed photopeak, most abundant first ('all': a multi-window acquisition, one registry
    entry per window, as the joint reconstruction needs).

    Per head: (photopeak counts − triple-energy-window scatter) / (frame duration · mean activity
    during the frame). Activity and its reference time default to the file's
    RadionuclideTotalDose (MBq) and RadiopharmaceuticalStartDateTime."""
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception:  # noqa: BLE001 - any unreadable file is bad input
        raise InputError(path, "not a readable DICOM file") from None
    if str(ds.get("SOPClassUID", "")) != NM_STORAGE:
        raise InputError(path, "not an NM image")
    windows = energy_windows(path, ds)
    nuclide = guess_nuclide(windows)
    sets = photopeak_windows(windows, nuclide) if nuclide else []
    sets = sets if photopeaks == "all" else sets[:1]
    if not sets or any(s.lower is None for s in sets):
        raise InputError(path, "no photopeak window with an adjacent scatter window for a known nuclide"
                         + (f" ({', '.join(f'{s.photopeak_keV:.1f} keV' for s in sets if s.lower is None)} without one)" if sets else ""))
    item = (ds.get("RadiopharmaceuticalInformationSequence") or [None])[0]
    if activity_MBq is None:
        activity_MBq = float(item.get("RadionuclideTotalDose", 0) or 0) if item else 0.0
    if activity_time is None and item is not None:
        activity_time = dicom_time.injection_time(ds, item)
    start = dicom_time.acquisition_start(ds)
    duration = float(ds.get("ActualFrameDuration", 0) or 0) / 1000.0
    if activity_MBq <= 0:
        raise InputError(path, "no source activity (RadionuclideTotalDose) and none given")
    if activity_time is None or start is None or duration <= 0:
        raise InputError(path, "missing acquisition or source reference time, or frame duration")
    counts = frame_counts(path, ds, adapter_for(ds))
    pixels = counts.reshape(counts.shape[0], -1).sum(axis=1, dtype=np.float64)
    window_vec = frame_vector(path, ds, "EnergyWindowVector", counts.shape[0])
    detector_vec = frame_vector(path, ds, "DetectorVector", counts.shape[0])
    mean_activity = activity_MBq * nuclide.mean_decay_factor((start - activity_time).total_seconds(), duration)

    def total(window: EnergyWindow | None, head: int) -> float | None:
        if window is None:
            return None
        return float(pixels[(window_vec == window.index + 1) & (detector_vec == head)].sum())

    measurements = []
    for chosen in sets:
        per_head = []
        for head in np.unique(detector_vec):
            scatter = float(energy_window_scatter(np.float64(total(chosen.lower, head)), total(chosen.upper, head), chosen))
            per_head.append((total(chosen.photopeak, head) - scatter) / (duration * mean_activity))
        measurements.append(SensitivityMeasurement(
            camera_model=str(ds.get("ManufacturerModelName", "")),
            collimator=str(ds.DetectorInformationSequence[0].get("CollimatorGridName", "")),
            nuclide=nuclide.name,
            window_keV=(chosen.photopeak.lower_keV, chosen.photopeak.upper_keV),
            per_head_cps_per_MBq=per_head,
            activity_MBq=activity_MBq,
            activity_time=activity_time.isoformat(),
            acquisition_start=start.isoformat(),
            frame_duration_s=duration,
            input_sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        ))
    return measurements
