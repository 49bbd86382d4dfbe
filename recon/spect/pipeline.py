"""Quantitative SPECT, end to end: NM projections (+ CT) → activity concentration in Bq/mL.

Plain functions, no orchestration: usable from a notebook, the command line or a flow.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from recon.errors import InputError
from recon.io.ct import check_ct_alignment, read_ct_series
from recon.provenance import versions
from recon.io.nm_projections import NMProjections, read_acquisition
from recon.nuclides import Nuclide, get_nuclide
from recon.spect import attenuation, calibration
from recon.spect.psf import collimator_response
from recon.spect.reconstruct import Algorithm, Progress, reconstruct
from recon.spect.scatter import energy_window_scatter
from recon.spect.system import PROJECTORS, axial_extent, from_projections, reconstruction_grid, system_matrix, to_image, to_projections, z_range_mm
from recon.spect.multiwindow import reconstruct_windows
from recon.spect.windows import WindowSet, photopeak_windows, select_windows


# Rows whose counts exceed this fraction of the brightest row hold the body: the CT must cover them.
_BODY_FRACTION = 0.1
# σ [mm] of the smoothing of energy-window scatter estimates (FWHM ≈ 2 cm).
_SCATTER_SMOOTHING_MM = 8.5


@dataclass(frozen=True)
class SpectParameters:
    """Everything that changes a SPECT reconstruction besides its input files."""

    algorithm: Algorithm = field(default_factory=Algorithm)
    scatter: str = "tew"                 # 'tew', 'dew' or 'none'
    projector: str = "native"            # 'native' (theraflow's) or 'pytomography'
    psf: bool = True                     # collimator-detector response modelling
    sensitivity_cps_per_MBq: float | None = None  # overrides the registry
    nuclide: str | None = None           # names the nuclide when the file does not (must agree when it does)
    since_separation_h: float | None = None  # hours since the parent was separated from its progeny (None: equilibrium)
    registry: Path | None = None         # sensitivity registry file (default: calibration.default_registry())
    strict: bool = False                 # refuse a calibration that cannot be trusted instead of warning
    max_calibration_age_days: float = calibration.DEFAULT_MAX_AGE_DAYS  # calibration date to acquisition date
    ct_registered: bool = False          # the user states a CT of another frame of reference is registered to the NM
    photopeaks: str = "main"             # 'main': the most abundant windowed photopeak; 'all': every windowed photopeak, jointly

    def __post_init__(self) -> None:
        if self.scatter not in ("tew", "dew", "none"):
            raise ValueError(f"unknown scatter correction {self.scatter!r} (tew, dew or none)")
        if self.photopeaks not in ("main", "all"):
            raise ValueError(f"unknown photopeak choice {self.photopeaks!r} (main or all)")
        if self.projector not in PROJECTORS:
            raise ValueError(f"unknown projector {self.projector!r} ({' or '.join(PROJECTORS)})")
        if not self.max_calibration_age_days >= 0:
            raise ValueError(f"maximum calibration age {self.max_calibration_age_days!r} days: must be 0 or more")
        if self.since_separation_h is not None and not (math.isfinite(self.since_separation_h) and self.since_separation_h >= 0):
            raise ValueError(f"time since separation {self.since_separation_h!r} h is not a non-negative number")
        if self.sensitivity_cps_per_MBq is not None and not (math.isfinite(self.sensitivity_cps_per_MBq) and self.sensitivity_cps_per_MBq > 0):
            raise ValueError(f"sensitivity {self.sensitivity_cps_per_MBq} is not a positive number (cps/MBq)")


@dataclass
class SpectResult:
    """A calibrated reconstruction and what produced it."""

    image: sitk.Image                    # Bq/mL at the reference time, LPS geometry
    total_activity_MBq: float
    provenance: dict[str, Any]
    acquisition: NMProjections
    windows: WindowSet                   # the reference (most abundant) photopeak window and its scatter windows
    measured_photopeak: np.ndarray       # measured counts [view, row, column] (rows reconstructed)
    _model_photopeak: Callable[[], np.ndarray] = field(repr=False)  # the expected counts, computed when asked

    @cached_property
    def expected_photopeak(self) -> np.ndarray:
        """The model's reference photopeak counts (forward projection of the estimate plus the
        scatter estimate), same layout as ``measured_photopeak``: one forward projection, run on
        first use only (the reconstruction's outputs do not need it)."""
        return self._model_photopeak()


def _nuclide(acq: NMProjections, params: SpectParameters) -> Nuclide:
    """The nuclide the header names or ``params.nuclide`` gives (InputError if unknown to the
    decay data, or if the two disagree), else the one the windows frame; progeny at equilibrium
    unless ``params.since_separation_h`` is given."""
    nuclide = acq.nuclide
    if params.nuclide:
        try:
            given = get_nuclide(params.nuclide)
        except KeyError as exc:
            raise InputError(None, str(exc.args[0])) from None
        if acq.nuclide_named and acq.nuclide is not None and acq.nuclide.name != given.name:
            raise InputError(acq.paths[0], f"the header names {acq.nuclide.name} but --nuclide says {given.name}")
        nuclide = given
    if nuclide is None:
        raise InputError(acq.paths[0], "radionuclide not identified from the header or energy windows; pass --nuclide")
    return nuclide if params.since_separation_h is None else nuclide.separated(params.since_separation_h * 3600.0)


def _windows(acq: NMProjections, nuclide: Nuclide, photopeaks: str, notes: list[str]) -> list[WindowSet]:
    """The photopeak window sets reconstructed: the most abundant windowed photopeak ('main'),
    or every windowed photopeak, most abundant (the reference) first ('all')."""
    if photopeaks == "all":
        sets = photopeak_windows(acq.windows, nuclide)
    else:
        sets = [s for s in (select_windows(acq.windows, nuclide),) if s is not None]
    if not sets:
        listed = ", ".join(f"{w.lower_keV:g}-{w.upper_keV:g}" for w in acq.windows)
        peaks = ", ".join(f"{e:.1f}" for e in nuclide.photopeaks_keV)
        raise InputError(acq.paths[0], f"no photopeak window for {nuclide.name}: no energy window fits its photopeaks ({peaks} keV; windows: {listed} keV)")
    for chosen in sets:
        if chosen.lower_in_tail:
            notes.append(f"lower scatter window {chosen.lower.lower_keV:g}-{chosen.lower.upper_keV:g} keV lies in the "
                         "low-energy tail of a narrow (CZT) photopeak window: it holds primary photons, the scatter estimate is high")
    if photopeaks == "all" and len(sets) == 1:
        notes.append(f"--photopeaks all: only the {sets[0].photopeak_keV:.1f} keV photopeak has a window; single-window reconstruction")
    return sets


def _scatter(acq: NMProjections, windows: WindowSet, mode: str, notes: list[str]) -> np.ndarray | None:
    if mode == "none":
        return None
    if windows.lower is None:
        notes.append("no lower scatter window: no scatter correction")
        return None
    upper = acq.window_counts(windows.upper) if (mode == "tew" and windows.upper is not None) else None
    if mode == "tew" and upper is None:
        notes.append("no upper scatter window: dual-energy-window scatter estimate")
    sigma = _SCATTER_SMOOTHING_MM / acq.geometry.pixel_mm
    return energy_window_scatter(acq.window_counts(windows.lower), upper, windows, sigma)


def _software_versions(acq: NMProjections) -> list[str]:
    value = acq.header.get("SoftwareVersions") or []
    return [str(v) for v in ([value] if isinstance(value, str) else value) if str(v)]


def _sensitivity(acq: NMProjections, nuclide, windows: WindowSet, params: SpectParameters) -> tuple[float, dict[str, Any]]:
    """The sensitivity [cps/MBq] and what recon.json says of it: its origin, the registry entry
    and the reasons not to trust it (warnings; InputError instead under ``params.strict``)."""
    if params.sensitivity_cps_per_MBq is not None:   # a positive number (SpectParameters checks)
        if params.photopeaks == "all" and len(photopeak_windows(acq.windows, nuclide)) > 1:
            raise InputError(acq.paths[0], "--sensitivity gives one window's sensitivity; the joint reconstruction of several "
                                           "photopeak windows needs each window's, from the registry")
        return params.sensitivity_cps_per_MBq, {"origin": "command line", "warnings": []}
    model = str(acq.header.get("ManufacturerModelName", ""))
    registry = params.registry or calibration.default_registry()
    entry = calibration.find_sensitivity(model, acq.collimator, nuclide, windows.photopeak, registry)
    if entry is None:
        raise InputError(
            acq.paths[0],
            f"no sensitivity for camera {model!r}, collimator {acq.collimator!r}, {nuclide.name} "
            f"{windows.photopeak.lower_keV:g}-{windows.photopeak.upper_keV:g} keV in {registry}; pass --sensitivity "
            "or derive one with 'theraflow calibrate spect'",
        )
    warnings = calibration.calibration_warnings(entry, acq.acquisition_start, _software_versions(acq), params.max_calibration_age_days)
    if warnings and params.strict:
        raise InputError(acq.paths[0], f"calibration not trusted, refused (strict): {'; '.join(warnings)} (registry {registry})")
    return entry.cps_per_MBq, {"origin": entry.origin or "unknown", "registry": str(Path(registry).absolute()), "entry": asdict(entry), "warnings": warnings}


def _joint_record(sets: list[WindowSet], calibrations: list[tuple[float, dict[str, Any]]], scatters: list, responses: list,
                  nuclide: Nuclide, scatter_mode: str) -> dict[str, Any]:
    """recon.json's account of a joint multi-photopeak reconstruction: each window, its yield,
    scatter estimate, collimator response and calibration, and the progeny assumption."""
    reference = calibrations[0][0]
    return {
        "method": "one activity image; Poisson likelihood summed over the photopeak windows, each with its own "
                  "attenuation map (mu at its energy), collimator response, scatter estimate and sensitivity "
                  "relative to the reference (first) window's",
        "progeny": nuclide.provenance()["progeny"],
        "windows": [{
            "photopeak_keV": round(s.photopeak_keV, 2),
            "yield_per_decay": round(s.yield_per_decay, 5),
            "photopeak_window_keV": [s.photopeak.lower_keV, s.photopeak.upper_keV],
            "lower_scatter_keV": None if s.lower is None else [s.lower.lower_keV, s.lower.upper_keV],
            "upper_scatter_keV": None if s.upper is None else [s.upper.lower_keV, s.upper.upper_keV],
            "scatter": "none" if scatter is None else scatter_mode,
            "collimator_response": None if response is None else asdict(response),
            "sensitivity_cps_per_MBq": cps,
            "relative_sensitivity": cps / reference,
            "calibration": record,
        } for s, (cps, record), scatter, response in zip(sets, calibrations, scatters, responses)],
    }


def _acquisition_duration_s(acq: NMProjections) -> float:
    if acq.acquisition_duration_s is not None:
        return acq.acquisition_duration_s
    frames = int(acq.header.RotationInformationSequence[0].get("NumberOfFramesInRotation", acq.geometry.angles_deg.size))
    return frames * acq.frame_duration_s


def reconstruct_spect(
    nm_files: list[str | Path],
    ct_dir: str | Path | None,
    params: SpectParameters = SpectParameters(),
    progress: Progress | None = None,
) -> SpectResult:
    """Reconstruct NM projection files (one per bed) with CT attenuation (if ``ct_dir``), the
    collimator response, energy-window scatter and OSEM/BSREM, calibrated to Bq/mL at the
    acquisition start. Raises InputError for bad input before any heavy work."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    acq = read_acquisition(nm_files)
    notes = list(acq.notes)
    nuclide = _nuclide(acq, params)
    sets = _windows(acq, nuclide, params.photopeaks, notes)
    windows = sets[0]
    photopeaks = [acq.window_counts(s.photopeak) for s in sets]
    scatters = [_scatter(acq, s, params.scatter, notes) for s in sets]
    responses = [collimator_response(acq.vendor, acq.collimator, s.photopeak_keV, acq.paths[0]) if params.psf else None for s in sets]
    calibrations = [_sensitivity(acq, nuclide, s, params) for s in sets]
    sensitivity, sensitivity_record = calibrations[0]
    rows = axial_extent(np.sum(photopeaks, axis=0))
    grid = reconstruction_grid(acq.geometry, rows)
    timings["read_s"] = time.perf_counter() - t0

    mu_maps, ct_uids, ct_alignment = [None] * len(sets), [], None
    if ct_dir is not None:
        t1 = time.perf_counter()
        ct, ct_header, ct_uids = read_ct_series(ct_dir)
        ct_alignment = check_ct_alignment(ct_dir, ct_header, str(acq.header.get("FrameOfReferenceUID", "") or ""),
                                          str(acq.header.get("PatientID", "") or ""), params.ct_registered, "NM")
        body = axial_extent(np.sum(photopeaks, axis=0), fraction=_BODY_FRACTION, margin=0)
        attenuation.check_ct_covers(ct, z_range_mm(acq.geometry, body), Path(ct_dir))
        mu_maps = [attenuation.mu_map_on_grid(ct, attenuation.tube_voltage_kvp(ct_header), grid, s.photopeak_keV) for s in sets]
        timings["attenuation_map_s"] = time.perf_counter() - t1
    else:
        notes.append("no CT given: reconstructed WITHOUT attenuation correction")

    t2 = time.perf_counter()
    systems = [system_matrix(acq.geometry, rows, mu, response, params.projector, view_weights=acq.view_weights())
               for mu, response in zip(mu_maps, responses)]
    projections = [to_projections(p, rows) for p in photopeaks]
    additive = [to_projections(s, rows) if s is not None else None for s in scatters]
    if len(sets) == 1:
        obj = reconstruct(systems[0], projections[0], additive[0], params.algorithm, progress)
    else:   # one image in the reference window's units; each window weighted by its sensitivity relative to it
        relative = [c[0] / sensitivity for c in calibrations]
        obj = reconstruct_windows(systems, relative, projections, additive, params.algorithm, progress)
    timings["reconstruction_s"] = time.perf_counter() - t2

    def model_photopeak() -> np.ndarray:
        with torch.no_grad():
            return from_projections(systems[0].forward(obj) + (additive[0] if additive[0] is not None else 0.0))

    decay = nuclide.mean_decay_factor(0.0, _acquisition_duration_s(acq))
    voxel_mL = float(np.prod(grid.GetSpacing())) / 1000.0
    scale = calibration.bq_per_ml_scale(sensitivity, acq.frame_duration_s, voxel_mL, decay)
    image = to_image(obj * scale, grid)
    total_MBq = float(sitk.GetArrayViewFromImage(image).sum(dtype=np.float64)) * voxel_mL / 1e6
    timings["total_s"] = time.perf_counter() - t0

    provenance = {
        "inputs": {
            "nm_files": [str(p) for p in acq.paths],
            "nm_sop_instance_uids": acq.sop_instance_uids,
            "study_instance_uid": str(acq.header.get("StudyInstanceUID", "")),
            "ct_dir": None if ct_dir is None else str(ct_dir),
            "ct_sop_instance_uids": ct_uids,
            "ct_alignment": ct_alignment,
        },
        "camera": {
            "manufacturer": str(acq.header.get("Manufacturer", "")),
            "model": str(acq.header.get("ManufacturerModelName", "")),
            "vendor_adapter": acq.vendor,
            "collimator": acq.collimator,
        },
        "nuclide": nuclide.name,
        "nuclide_data": nuclide.provenance(),
        "windows_keV": {
            name: None if w is None else [w.lower_keV, w.upper_keV]
            for name, w in (("photopeak", windows.photopeak), ("lower_scatter", windows.lower), ("upper_scatter", windows.upper))
        },
        "corrections": {
            "attenuation": mu_maps[0] is not None,
            "scatter": params.scatter if scatters[0] is not None else "none",
            "collimator_response": None if responses[0] is None else asdict(responses[0]),
            "decay": "to acquisition start",
        },
        "calibration": {
            "sensitivity_cps_per_MBq": sensitivity,
            **sensitivity_record,
            "warnings": [w for _, record in calibrations for w in record["warnings"]],
            "strict": params.strict,
            "max_age_days": params.max_calibration_age_days,
            "frame_duration_s": acq.frame_duration_s,
            "mean_decay_factor": decay,
            "reference_time": acq.acquisition_start.isoformat() if acq.acquisition_start else None,
        },
        "parameters": {
            "algorithm": asdict(params.algorithm),
            "projector": params.projector,
            "rows_reconstructed": [rows.first, rows.stop],
            "voxel_mm": list(grid.GetSpacing()),
            "shape_xyz": list(grid.GetSize()),
            "device": str(obj.device),
        },
        **({"joint_photopeaks": _joint_record(sets, calibrations, scatters, responses, nuclide, params.scatter)} if len(sets) > 1 else {}),
        "units": "Bq/mL",
        "total_activity_MBq": total_MBq,
        "timings_s": timings,
        "versions": versions(),
        "notes": notes,
    }
    return SpectResult(
        image=image,
        total_activity_MBq=total_MBq,
        provenance=provenance,
        acquisition=acq,
        windows=windows,
        measured_photopeak=photopeaks[0][:, rows.first : rows.stop, :],
        _model_photopeak=model_photopeak,
    )
