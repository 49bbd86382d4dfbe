"""Quantitative SPECT, end to end: NM projections (+ CT) → activity concentration in Bq/mL.

Plain functions, no orchestration: usable from a notebook, the command line or a flow.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
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
from recon.spect.penetration import penetration_response
from recon.spect.psf import collimator_response
from recon.spect.priors import counts_per_body_pixel, rdp_beta
from recon.spect.reconstruct import Algorithm, Progress, reconstruct
from recon.spect.scatter import energy_window_scatter
from recon.spect.system import PROJECTORS, axial_extent, from_projections, reconstruction_grid, system_matrix, to_image, to_projections, z_range_mm
from recon.spect.multiwindow import reconstruct_windows
from recon.spect.uncertainty import SEED, poisson_bootstrap, voi_uncertainty
from recon.spect.windows import EnergyWindow, WindowSet, photopeak_windows, select_windows


# Rows whose counts exceed this fraction of the brightest row hold the body: the CT must cover them.
_BODY_FRACTION = 0.1
# σ [mm] of the smoothing of energy-window scatter estimates (FWHM ≈ 2 cm), at every count level:
# much narrower than the scatter's projected spread in water, so it removes noise, not shape.
_SCATTER_SMOOTHING_MM = 8.5


@dataclass(frozen=True)
class SpectParameters:
    """Everything that changes a SPECT reconstruction besides its input files."""

    algorithm: Algorithm = field(default_factory=Algorithm)
    scatter: str = "tew"                 # 'tew', 'dew' or 'none'
    scatter_smoothing_mm: float = _SCATTER_SMOOTHING_MM  # σ [mm] of the Gaussian smoothing of each view's scatter estimate (0: raw)
    projector: str = "native"            # 'native' (theraflow's) or 'pytomography'
    psf: bool = True                     # collimator-detector response modelling
    penetration: bool = True             # septal-penetration tail where the collimator and energy call for it
    sensitivity_cps_per_MBq: float | None = None  # overrides the registry
    nuclide: str | None = None           # names the nuclide when the file does not (must agree when it does)
    since_separation_h: float | None = None  # hours since the parent was separated from its progeny (None: equilibrium)
    registry: Path | None = None         # sensitivity registry file (default: calibration.default_registry())
    strict: bool = False                 # refuse a calibration that cannot be trusted instead of warning
    max_calibration_age_days: float = calibration.DEFAULT_MAX_AGE_DAYS  # calibration date to acquisition date
    ct_registered: bool = False          # the user states a CT of another frame of reference is registered to the NM
    photopeaks: str = "main"             # 'main': the most abundant windowed photopeak; 'all': every windowed photopeak, jointly
    bootstrap: int = 0                   # Poisson bootstrap replicates for the VOIs' standard uncertainty (0: none)
    vois: tuple[tuple[str, Path], ...] = ()  # (name, mask image file): activity (and uncertainty) reported per VOI

    def __post_init__(self) -> None:
        if self.scatter not in ("tew", "dew", "none"):
            raise ValueError(f"unknown scatter correction {self.scatter!r} (tew, dew or none)")
        if not (math.isfinite(self.scatter_smoothing_mm) and self.scatter_smoothing_mm >= 0):
            raise ValueError(f"scatter smoothing {self.scatter_smoothing_mm!r} mm must be finite and not negative")
        if self.bootstrap != 0 and self.bootstrap < 2:
            raise ValueError(f"bootstrap replicates {self.bootstrap!r}: 0 (none) or at least 2")
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


def _scatter(counts: Callable[[EnergyWindow], np.ndarray], pixel_mm: float, windows: WindowSet, mode: str, smoothing_mm: float,
             notes: list[str]) -> np.ndarray | None:
    """Expected scatter counts in the photopeak window of ``windows`` from the ``counts`` of its
    scatter windows (``mode`` tew, dew or none), smoothed with a Gaussian of σ ``smoothing_mm``."""
    if mode == "none":
        return None
    if windows.lower is None:
        notes.append("no lower scatter window: no scatter correction")
        return None
    upper = counts(windows.upper) if (mode == "tew" and windows.upper is not None) else None
    if mode == "tew" and upper is None:
        notes.append("no upper scatter window: dual-energy-window scatter estimate")
    return energy_window_scatter(counts(windows.lower), upper, windows, smoothing_mm / pixel_mm)


def _voi_mask(path: Path, grid: sitk.Image) -> np.ndarray:
    """The VOI mask file ``path`` (non-zero inside; any grid in LPS) on the reconstruction
    ``grid`` (nearest neighbour) as a boolean [z, y, x] array; InputError if unreadable or
    empty there."""
    try:
        mask = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(path, "VOI mask not readable as an image") from None
    on_grid = sitk.Resample(sitk.Cast(mask != 0, sitk.sitkUInt8), grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    inside = sitk.GetArrayFromImage(on_grid) > 0
    if not inside.any():
        raise InputError(path, "VOI mask holds no voxel of the reconstructed field of view")
    return inside


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
                  penetrations: list, nuclide: Nuclide, scatter_mode: str) -> dict[str, Any]:
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
            "septal_penetration": None if penetration is None else asdict(penetration),
            "sensitivity_cps_per_MBq": cps,
            "relative_sensitivity": cps / reference,
            "calibration": record,
        } for s, (cps, record), scatter, response, penetration in zip(sets, calibrations, scatters, responses, penetrations)],
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
    scatters = [_scatter(acq.window_counts, acq.geometry.pixel_mm, s, params.scatter, params.scatter_smoothing_mm, notes) for s in sets]
    penetrations = [penetration_response(acq.vendor, acq.collimator, s.photopeak_keV, acq.paths[0])
                    if params.psf and params.penetration else None for s in sets]
    responses = [collimator_response(acq.vendor, acq.collimator, s.photopeak_keV, acq.paths[0], penetration_in_length=pen is None)
                 if params.psf else None for s, pen in zip(sets, penetrations)]
    calibrations = [_sensitivity(acq, nuclide, s, params) for s in sets]
    sensitivity, sensitivity_record = calibrations[0]
    rows = axial_extent(np.sum(photopeaks, axis=0))
    grid = reconstruction_grid(acq.geometry, rows)
    vois = {"whole_image": np.ones(sitk.GetArrayViewFromImage(grid).shape, dtype=bool)}
    vois.update({name: _voi_mask(path, grid) for name, path in params.vois})
    timings["read_s"] = time.perf_counter() - t0

    def ct_attenuation() -> tuple[list[sitk.Image], list[str], str]:
        """Each window's μ-map from the CT, the CT's SOP Instance UIDs and how it aligns with the NM."""
        t1 = time.perf_counter()
        ct, ct_header, ct_uids = read_ct_series(ct_dir)
        ct_alignment = check_ct_alignment(ct_dir, ct_header, str(acq.header.get("FrameOfReferenceUID", "") or ""),
                                          str(acq.header.get("PatientID", "") or ""), params.ct_registered, "NM")
        # the body's rows from the windows without a septal-penetration tail where there are any: a tail
        # spreads counts tens of mm beyond the body (440 keV through MEGP: 10 % of the peak row 32 mm out).
        # Otherwise a row beyond the body's edge receives at most half the tail (share f) of the rows inside.
        compact = [p for p, pen in zip(photopeaks, penetrations) if pen is None]
        fraction = _BODY_FRACTION if compact else _BODY_FRACTION + max(pen.fraction for pen in penetrations) / 2
        body = axial_extent(np.sum(compact or photopeaks, axis=0), fraction=fraction, margin=0)
        attenuation.check_ct_covers(ct, z_range_mm(acq.geometry, body), Path(ct_dir))
        mu_maps = [attenuation.mu_map_on_grid(ct, attenuation.tube_voltage_kvp(ct_header), grid, s.photopeak_keV) for s in sets]
        timings["attenuation_map_s"] = time.perf_counter() - t1
        return mu_maps, ct_uids, ct_alignment

    ct_maps = None
    if ct_dir is None:
        notes.append("no CT given: reconstructed WITHOUT attenuation correction")
    else:  # read and mapped in a thread of its own while the system matrices build what needs no CT (the
        # native projector's rotation operators); a bad CT is refused when its μ-map is asked for
        background = ThreadPoolExecutor(1)
        ct_maps = background.submit(ct_attenuation)
        background.shutdown(wait=False)

    algorithm = params.algorithm
    if algorithm.name == "bsrem" and algorithm.beta is None:
        counts = counts_per_body_pixel(photopeaks)
        algorithm = replace(algorithm, beta=rdp_beta(counts))
        notes.append(f"relative-difference prior weight beta {algorithm.beta:.3g} set from {counts:.0f} photopeak counts per "
                     "body pixel (recon.spect.priors.rdp_beta)")
    t2 = time.perf_counter()
    systems = [system_matrix(acq.geometry, rows, None if ct_maps is None else lambda i=i: ct_maps.result()[0][i], response,
                             params.projector, view_weights=acq.view_weights(), penetration=pen)
               for i, (response, pen) in enumerate(zip(responses, penetrations))]
    mu_maps, ct_uids, ct_alignment = ct_maps.result() if ct_maps is not None else ([None] * len(sets), [], None)
    projections = [to_projections(p, rows) for p in photopeaks]
    additive = [to_projections(s, rows) if s is not None else None for s in scatters]
    relative = [c[0] / sensitivity for c in calibrations]

    def solve(projections: list[torch.Tensor], additive: list[torch.Tensor | None], progress: Progress | None = None) -> torch.Tensor:
        if len(sets) == 1:
            return reconstruct(systems[0], projections[0], additive[0], algorithm, progress)
        # one image in the reference window's units; each window weighted by its sensitivity relative to it
        return reconstruct_windows(systems, relative, projections, additive, algorithm, progress)

    obj = solve(projections, additive, progress)
    timings["reconstruction_s"] = time.perf_counter() - t2

    def model_photopeak() -> np.ndarray:
        with torch.no_grad():
            return from_projections(systems[0].forward(obj) + (additive[0] if additive[0] is not None else 0.0))

    decay = nuclide.mean_decay_factor(0.0, _acquisition_duration_s(acq))
    voxel_mL = float(np.prod(grid.GetSpacing())) / 1000.0
    scale = calibration.bq_per_ml_scale(sensitivity, acq.frame_duration_s, voxel_mL, decay)
    image = to_image(obj * scale, grid)
    total_MBq = float(sitk.GetArrayViewFromImage(image).sum(dtype=np.float64)) * voxel_mL / 1e6

    def replicate(counts: Callable[[EnergyWindow], np.ndarray]) -> np.ndarray:
        """One bootstrap replicate: the image [z, y, x] in Bq/mL from redrawn counts of every window."""
        scatter = [_scatter(counts, acq.geometry.pixel_mm, s, params.scatter, params.scatter_smoothing_mm, []) for s in sets]
        redone = solve([to_projections(counts(s.photopeak), rows) for s in sets],
                       [None if x is None else to_projections(x, rows) for x in scatter])
        return sitk.GetArrayFromImage(to_image(redone * scale, grid))

    uncertainty, u = None, {}
    if params.bootstrap:
        t3 = time.perf_counter()
        u = voi_uncertainty(poisson_bootstrap(replicate, acq.window_counts, params.bootstrap), vois, voxel_mL)
        timings["bootstrap_s"] = time.perf_counter() - t3
        uncertainty = {"method": "Poisson bootstrap of every window's counts (recon.spect.uncertainty): standard deviation "
                                 "over replicates; count noise only (no partial-volume, model or calibration error)",
                       "replicates": params.bootstrap, "seed": SEED, "time_s": timings["bootstrap_s"]}
    array = sitk.GetArrayViewFromImage(image)
    voi_record = {name: {"activity_MBq": float(array[mask].sum(dtype=np.float64)) * voxel_mL / 1e6, "u_MBq": u.get(name),
                         "volume_mL": float(mask.sum()) * voxel_mL, "mean_Bq_per_mL": float(array[mask].mean())}
                  for name, mask in vois.items()}
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
            "scatter_smoothing_sigma_mm": params.scatter_smoothing_mm if scatters[0] is not None else None,
            "collimator_response": None if responses[0] is None else asdict(responses[0]),
            **({"septal_penetration": asdict(penetrations[0])} if penetrations[0] is not None else {}),
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
            "algorithm": asdict(algorithm),
            "projector": params.projector,
            "rows_reconstructed": [rows.first, rows.stop],
            "voxel_mm": list(grid.GetSpacing()),
            "shape_xyz": list(grid.GetSize()),
            "device": str(obj.device),
        },
        **({"joint_photopeaks": _joint_record(sets, calibrations, scatters, responses, penetrations, nuclide, params.scatter)} if len(sets) > 1 else {}),
        "units": "Bq/mL",
        "total_activity_MBq": total_MBq,
        "vois": voi_record,
        "uncertainty": uncertainty,
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
