"""PETSIRD list-mode to Bq/mL: read, correct, reconstruct (TOF OSEM through PyTomography).

Order of work: read the file (:mod:`recon.io.petsird_listmode`); image grid over the scanner's
field of view; mu-map at 511 keV from the CT (bilinear HU -> mu, as for SPECT); one streamed pass
over every (grouped) LOR of the scanner, chunk by chunk, for the sensitivity image and the sums
over LOR space that randoms and scatter need (:func:`_lor_space_sums`: nothing of the size of the
LOR set is held); attenuation factors of every event; randoms from delayeds
(or the TOF-margin estimate); with a CT, a first OSEM pass without scatter, then the
tail-fitted scatter; the final OSEM. The image is activity concentration [Bq/mL] at the start
of the acquisition (decay during the acquisition and positron fraction accounted for in the
system model, see :mod:`recon.pet.system`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from recon.errors import InputError
from recon.io.ct import check_ct_alignment, read_ct_series
from recon.io.petsird_listmode import Coincidences, ListModeAcquisition, read_listmode
from recon.nuclides import Nuclide, find_nuclide
from recon.pet.projector import ImageGrid, ListModeProjector, TOFBins
from recon.pet.randoms import FanSumRandoms, outside_tof_bins, randoms_from_tof_margins
from recon.pet.scatter import (TailFit, coarse_detectors, extend_axially, fit_tails, in_near_tails, near_object, nearest,
                               scatter_shape_image, single_scatter)
from recon.pet.sensitivity import DEFAULT_GROUP_MM, LORSpace, lor_space, refine, sensitivity_image
from recon.pet.system import ListModeSystemMatrix
from recon.provenance import versions
from recon.spect import attenuation
from recon.spect.reconstruct import Algorithm, Progress, reconstruct

PET_ENERGY_KEV = 511.0


@dataclass(frozen=True)
class PetParameters:
    """Reconstruction settings. Sizes in mm; ``fov_mm``: transaxial side of the image box."""

    algorithm: Algorithm = Algorithm(iterations=2, subsets=4)
    tof: bool = True
    voxel_mm: float = 4.0
    axial_voxel_mm: float = 4.0
    fov_mm: float = 400.0
    scatter: bool = True
    scatter_method: str = "tail"  # "tail": blurred activity; "sss": single-scatter simulation (recon.pet.scatter)
    scatter_sigma_mm: float = 40.0
    scatter_axial_extension_mm: float = 100.0  # activity and matter beyond the axial FOV that scatter into it
    sss_pitch_mm: float = 30.0  # spacing of the SSS scatter points
    sss_detector_mm: float = 20.0  # SSS detectors: elements merged in cubes of this side
    tail_mu: float = 0.02
    tail_margin_mm: float = 50.0
    lor_group_mm: tuple[float, float] = DEFAULT_GROUP_MM
    sensitivity_step_mm: float = 4.0
    support_fraction: float = 0.02
    nuclide: str | None = None
    seed: int = 0
    ct_registered: bool = False   # the user states a CT of another frame of reference is registered to the PET

    def __post_init__(self) -> None:
        if min(self.voxel_mm, self.axial_voxel_mm, self.fov_mm) <= 0:
            raise ValueError("voxel sizes and field of view must be positive")
        if self.scatter_method not in ("tail", "sss"):
            raise ValueError(f"scatter method {self.scatter_method!r}: use 'tail' or 'sss'")


@dataclass
class PetResult:
    """Reconstruction [Bq/mL at acquisition start] with its provenance and the acquisition read."""

    image: sitk.Image
    provenance: dict
    acquisition: ListModeAcquisition
    nuclide: Nuclide
    acquisition_start: datetime


def _nuclide(acq: ListModeAcquisition, override: str | None) -> Nuclide:
    text = override or acq.exam.radionuclide or acq.exam.radiopharmaceutical
    nuclide = find_nuclide(text) if text else None
    if nuclide is None or nuclide.positron_fraction <= 0:
        raise InputError(acq.path, f"no positron-emitting radionuclide identified (file says {text!r}); give --nuclide")
    return nuclide


def image_grid(acq: ListModeAcquisition, params: PetParameters) -> ImageGrid:
    """Axis-aligned grid centred on the scanner: ``fov_mm`` square transaxially, the detector's
    axial extent axially (LPS, voxel centres)."""
    positions = acq.element_positions_mm
    centre = positions.mean(axis=0)
    z_lo, z_hi = positions[:, 2].min(), positions[:, 2].max()
    n_xy = int(round(params.fov_mm / params.voxel_mm))
    n_z = max(1, int(round((z_hi - z_lo) / params.axial_voxel_mm)) + 1)
    spacing = (params.voxel_mm, params.voxel_mm, params.axial_voxel_mm)
    origin = tuple(float(c - (n - 1) * s / 2) for c, n, s in zip(centre, (n_xy, n_xy, n_z), spacing))
    return ImageGrid((n_xy, n_xy, n_z), spacing, origin)


def axially_extended(grid: ImageGrid, extension_mm: float) -> ImageGrid:
    """``grid`` with ``round(extension_mm / axial spacing)`` more slices at both ends."""
    pad = int(round(extension_mm / grid.spacing_mm[2]))
    origin = (grid.origin_mm[0], grid.origin_mm[1], grid.origin_mm[2] - pad * grid.spacing_mm[2])
    return ImageGrid((grid.shape[0], grid.shape[1], grid.shape[2] + 2 * pad), grid.spacing_mm, origin)


def _mu_map(ct_dir: Path, grid: ImageGrid, frame_uid: str, registered: bool,
            extension_mm: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, list[str], str]:
    """mu [1/mm] at 511 keV on ``grid`` [x, y, z] and on the grid extended axially by
    ``extension_mm`` (air beyond the CT), the CT's SOP instance UIDs and how it is aligned to the
    PET (``check_ct_alignment``). The CT must cover ``grid``."""
    ct, header, uids = read_ct_series(ct_dir)
    alignment = check_ct_alignment(ct_dir, header, frame_uid, "", registered, "PET")
    lower, upper = grid.box_mm()
    attenuation.check_ct_covers(ct, (float(lower[2]), float(upper[2])), ct_dir)
    wide = axially_extended(grid, extension_mm)
    mu_per_cm = attenuation.mu_map_on_grid(ct, attenuation.tube_voltage_kvp(header), wide.reference_image(), PET_ENERGY_KEV)
    array = _tensor(np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(mu_per_cm), (2, 1, 0)) / 10.0))
    pad = (wide.shape[2] - grid.shape[2]) // 2
    return array[:, :, pad:pad + grid.shape[2]].contiguous(), array, uids, alignment


def annihilations_per_bq_ml(nuclide: Nuclide, duration_s: float) -> float:
    """q: annihilations per mm^3 during [0, duration] per Bq/mL at time 0 (1 mL = 1000 mm^3)."""
    lam = nuclide.decay_constant_per_s
    return 1e-3 * nuclide.positron_fraction * (1.0 - math.exp(-lam * duration_s)) / lam


def _device() -> torch.device:
    from recon.ptomo import pytomography

    return pytomography.device  # CUDA when present, else CPU


def _tensor(values: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.as_tensor(values, dtype=dtype, device=_device())


def _lors(positions: torch.Tensor, events: Coincidences) -> tuple[torch.Tensor, torch.Tensor]:
    return positions[_tensor(events.first, torch.long)], positions[_tensor(events.second, torch.long)]


@dataclass(frozen=True)
class _Randoms:
    per_event: torch.Tensor  # expected randoms in each prompt's (LOR, TOF bin) [counts]
    method: str  # DLYD or TOFM
    tof_margin_level: float | None  # TOFM: counts per element pair and TOF bin


@dataclass(frozen=True)
class _LORSpaceSums:
    """What the reconstruction needs of the sums over every LOR of the scanner (the grouped LORs of
    :mod:`recon.pet.sensitivity`), gathered in one streamed pass (:func:`_lor_space_sums`).

    Images [x, y, z] (back-projected together, :func:`recon.pet.sensitivity.sensitivity_image`):
    ``sensitivity`` = q A^T(efficiency x attenuation) [expected counts per Bq/mL];
    ``geometric`` = A^T(efficiency) [mm^3]; and,
    for the tail-fitted scatter, ``tail_efficiency`` = A^T(efficiency on near-tail LORs), so that a
    shape's expected counts summed over all LORs or over the near-tail ones are <geometric, shape>
    and <tail_efficiency, shape> (A exactly adjoint). Sums [counts or pairs] over all LORs and over
    the near-tail ones: DLYD randoms, element pairs; ``outside_cells``: element pairs x TOF bins
    wholly outside the image box (TOFM randoms). For SSS, element pairs summed per pair of coarse
    detectors nearest the LOR's ends, (k, k), over all LORs and over the near-tail ones."""

    sensitivity: torch.Tensor
    geometric: torch.Tensor
    tail_efficiency: torch.Tensor | None
    randoms: float
    randoms_tail: float
    pairs: float
    pairs_tail: float
    outside_cells: float
    detector_pairs: torch.Tensor | None
    detector_pairs_tail: torch.Tensor | None


def _lor_space_sums(space: LORSpace, coarse: ListModeProjector, mu: torch.Tensor | None, near: torch.Tensor | None,
                    tof: TOFBins, acq: ListModeAcquisition, params: PetParameters, q: float,
                    group_detector: torch.Tensor | None, n_detectors: int) -> _LORSpaceSums:
    """One pass over the chunks of ``space`` (see :class:`_LORSpaceSums`): ``near`` the object's
    neighbourhood (None without scatter correction); ``group_detector`` the SSS coarse detector of
    each element group (None without SSS)."""
    device = coarse.device
    images = torch.zeros((*coarse.grid.shape, 3), device=device)  # geometric, attenuated, near-tail efficiency
    lines = None if mu is None else (mu if near is None else torch.stack([mu, near], 3))  # projected together
    tables = [torch.zeros(n_detectors * n_detectors, dtype=torch.float64, device=device) for _ in range(2)]
    totals = np.zeros(5)  # randoms, randoms_tail, pairs, pairs_tail, outside_cells
    edges = _tensor(acq.tof_edges_mm)
    for chunk in space:
        ones = torch.ones(len(chunk), device=device)
        attenuation, tail = ones, torch.zeros(len(chunk), dtype=torch.bool, device=device)
        if lines is not None:
            integrals = coarse.forward(lines, chunk.p1, chunk.p2)
            chunk_mu = integrals if near is None else integrals[:, 0]
            attenuation = torch.exp(-chunk_mu)
            if near is not None:
                tail = in_near_tails(chunk_mu, integrals[:, 1], params.tail_mu)
        images += sensitivity_image(chunk, torch.stack([ones, attenuation, tail.float()], 1), coarse, 1.0)
        if group_detector is not None:
            cell = group_detector[chunk.first] * n_detectors + group_detector[chunk.second]
            tables[0].index_add_(0, cell, chunk.pairs.double())
            tables[1].index_add_(0, cell[tail], chunk.pairs[tail].double())
        _, _, l_in, l_out = coarse.clip(chunk.p1, chunk.p2)
        outside = outside_tof_bins(edges, tof.sigma_mm, l_in, l_out).sum(1)
        totals += [float(chunk.randoms.double().sum()), float(chunk.randoms[tail].double().sum()), float(chunk.pairs.double().sum()),
                   float(chunk.pairs[tail].double().sum()), float((chunk.pairs.double() * outside).sum())]
    detector_pairs = [t.reshape(n_detectors, n_detectors) if group_detector is not None else None for t in tables]
    images = refine(space, images)  # coarser groups per study (large scanners): times fine / coarse geometric image
    return _LORSpaceSums(q * images[..., 1], images[..., 0], images[..., 2] if near is not None else None, *totals, *detector_pairs)


def _randoms(acq: ListModeAcquisition, p1: torch.Tensor, p2: torch.Tensor, tof: TOFBins, sums: _LORSpaceSums,
             projector: ListModeProjector, notes: list[str]) -> _Randoms:
    """Randoms from the delayeds, else the uniform TOF-margin estimate (see recon.pet.randoms)."""
    if acq.delayeds is not None:
        return _Randoms(_tensor(FanSumRandoms(acq).per_tof_bin(acq.prompts)), "DLYD", None)
    edges = _tensor(acq.tof_edges_mm)
    _, _, l_in, l_out = projector.clip(p1, p2)
    tof_bin = _tensor(acq.prompts.tof_bin, torch.long)
    outside = outside_tof_bins(edges, tof.sigma_mm, l_in, l_out)[torch.arange(len(acq.prompts), device=edges.device), tof_bin]
    level = randoms_from_tof_margins(int(outside.sum()), sums.outside_cells)
    notes.append(f"no delayed coincidences: randoms estimated as uniform, {level:.3g} per pair and TOF bin, "
                 "from the prompts outside the object in TOF")
    return _Randoms(torch.full((len(acq.prompts),), level, device=edges.device), "TOFM", level)


def _total_randoms(acq: ListModeAcquisition, sums: _LORSpaceSums, estimate: _Randoms, tail: bool = False) -> float:
    """Expected randoms [counts] over all LORs crossing the image, or over the near-tail ones."""
    if estimate.method == "DLYD":
        return sums.randoms_tail if tail else sums.randoms
    return estimate.tof_margin_level * (acq.tof_edges_mm.size - 1) * (sums.pairs_tail if tail else sums.pairs)


def _scatter(system: ListModeSystemMatrix, randoms: torch.Tensor, mu_wide: torch.Tensor,
             acq: ListModeAcquisition, prompt_lors: tuple[torch.Tensor, torch.Tensor], sums: _LORSpaceSums,
             event_mu_all: torch.Tensor, near: torch.Tensor, random_estimate: _Randoms, params: PetParameters,
             kept_efficiency: torch.Tensor, keep: torch.Tensor, q: float) -> tuple[torch.Tensor, TailFit]:
    """Tail-fitted scatter per reconstructed event [counts] (see recon.pet.scatter)."""
    grid = system.projector.grid
    non_tof = ListModeProjector(grid, device=near.device)
    system.start_from_counts(len(acq.prompts) - _total_randoms(acq, sums, random_estimate))
    first_pass = reconstruct(system, None, randoms, Algorithm(iterations=1, subsets=params.algorithm.subsets))
    tail_events = in_near_tails(event_mu_all, non_tof.forward(near, *prompt_lors), params.tail_mu)
    tail_randoms = _total_randoms(acq, sums, random_estimate, tail=True)
    if params.scatter_method == "sss":
        tail_shape, total_shape, per_event = _single_scatter(first_pass, mu_wide, grid, acq, sums, system, keep, q, params)
    else:
        shape = scatter_shape_image(first_pass, grid, params.scatter_sigma_mm, params.scatter_axial_extension_mm)
        tail_shape, total_shape = float((sums.tail_efficiency * shape).sum()), float((sums.geometric * shape).sum())

        def per_event() -> torch.Tensor:
            return kept_efficiency * system.line_integrals(shape)
    tail = fit_tails(tail_shape, total_shape, int(tail_events.sum()), tail_randoms, len(acq.prompts))
    return tail.scale * per_event(), tail


def _single_scatter(first_pass: torch.Tensor, mu_wide: torch.Tensor, grid: ImageGrid, acq: ListModeAcquisition,
                    sums: _LORSpaceSums, system: ListModeSystemMatrix, keep: torch.Tensor, q: float, params: PetParameters):
    """SSS shape summed over the near-tail LORs and over all LORs, and a callable giving that of
    each reconstructed event (its TOF bin)."""
    wide = axially_extended(grid, params.scatter_axial_extension_mm)
    annihilations = _tensor(extend_axially(first_pass, grid, params.scatter_axial_extension_mm)) * q  # per mm^3
    coarse, element_detector = coarse_detectors(acq.element_positions_mm, params.sss_detector_mm)
    detectors = _tensor(coarse)
    model = single_scatter(mu_wide, annihilations, wide, detectors, acq.element_positions_mm, acq.energy_window_keV,
                           acq.energy_resolution_at_511, params.sss_pitch_mm, params.seed)
    crystal = acq.pair_efficiency.element_efficiency
    # pair efficiency without the geometric factor (SSS has its own): cal x eps_i x eps_j, a group's mean for groups
    pair_efficiency = acq.pair_efficiency.calibration * float(np.mean(crystal)) ** 2
    tail_shape, total_shape = (pair_efficiency * float((model.total.double() * table).sum())
                               for table in (sums.detector_pairs_tail, sums.detector_pairs))

    def per_event() -> torch.Tensor:
        kept = keep.cpu().numpy()
        first, second = acq.prompts.first[kept], acq.prompts.second[kept]
        efficiency = _tensor(acq.pair_efficiency.calibration * crystal[first] * crystal[second])
        tof = None if system.tof_bin is None else (_tensor(acq.tof_edges_mm), system.tof_bin, system.projector.tof.sigma_mm)
        return model.lors(_tensor(element_detector[first], torch.long), _tensor(element_detector[second], torch.long),
                          efficiency, tof)

    return tail_shape, total_shape, per_event


def reconstruct_pet(listmode: str | Path, ct_dir: str | Path | None, params: PetParameters = PetParameters(),
                    progress: Progress | None = None) -> PetResult:
    """Reconstruct a PETSIRD list-mode file (see module docstring). Raises InputError for bad input."""
    torch.manual_seed(params.seed)
    timings: dict[str, float] = {}
    notes: list[str] = []
    t0 = time.perf_counter()
    acq = read_listmode(listmode)
    nuclide = _nuclide(acq, params.nuclide)
    if acq.exam.start_of_acquisition is None:
        raise InputError(acq.path, "missing acquisition start time (needed for the decay-correction reference)")
    grid = image_grid(acq, params)
    timings["read_s"] = time.perf_counter() - t0

    mu, mu_wide, ct_uids, ct_alignment = None, None, [], None
    if ct_dir is not None:
        t1 = time.perf_counter()
        extension = params.scatter_axial_extension_mm if params.scatter and params.scatter_method == "sss" else 0.0
        mu, mu_wide, ct_uids, ct_alignment = _mu_map(Path(ct_dir), grid, acq.exam.frame_of_reference_uid or "",
                                                     params.ct_registered, extension)
        if bool((mu[[0, -1], :, :] > 0.002).any() or (mu[:, [0, -1], :] > 0.002).any()):
            notes.append("the attenuating object reaches the edge of the image field: activity outside it is not modelled")
        timings["attenuation_map_s"] = time.perf_counter() - t1
    else:
        notes.append("no CT given: reconstructed WITHOUT attenuation or scatter correction")

    t2 = time.perf_counter()
    device = _device()
    tof = TOFBins(tuple(float(e) for e in acq.tof_edges_mm), acq.tof_fwhm_mm)
    non_tof = ListModeProjector(grid, device=device)
    projector = ListModeProjector(grid, tof if params.tof else None, device=device)
    positions = _tensor(acq.element_positions_mm)
    p1, p2 = _lors(positions, acq.prompts)
    tof_bin = _tensor(acq.prompts.tof_bin, torch.long)
    _, _, l_in, l_out = non_tof.clip(p1, p2)

    # sums over all LORs: grouped LORs, sampled at the voxel size (smooth quantities), streamed in chunks
    coarse = ListModeProjector(grid, step_mm=params.sensitivity_step_mm, device=device)
    singles = FanSumRandoms(acq).singles if acq.delayeds is not None else None
    space = lor_space(acq, coarse, params.lor_group_mm, singles)
    scatter = mu is not None and params.scatter
    near = near_object(mu, grid, params.tail_margin_mm) if scatter else None
    group_detector, n_detectors = None, 0
    if scatter and params.scatter_method == "sss":
        detectors = _tensor(coarse_detectors(acq.element_positions_mm, params.sss_detector_mm)[0])
        group_detector, n_detectors = nearest(detectors, _tensor(space.positions)), len(detectors)
    q = annihilations_per_bq_ml(nuclide, acq.duration_s)
    sums = _lor_space_sums(space, coarse, mu, near, tof, acq, params, q, group_detector, n_detectors)
    event_mu = non_tof.forward(mu, p1, p2) if mu is not None else torch.zeros(len(acq.prompts), device=device)
    # voxels seen by too few LORs (beyond the coincidence field) are not reconstructed; judged on
    # the geometric sensitivity, without attenuation: behind 20 cm of water the end planes of the
    # axial field keep under 2 % of the attenuated maximum, but their LORs measure them all the same
    sensitivity = sums.sensitivity * (sums.geometric > params.support_fraction * sums.geometric.max())
    timings["sensitivity_s"] = time.perf_counter() - t2

    random_estimate = _randoms(acq, p1, p2, tof, sums, non_tof, notes)
    n_tof = acq.tof_edges_mm.size - 1
    # a non-TOF event's cell is the whole coincidence window
    randoms = random_estimate.per_event * (1 if params.tof else n_tof)

    efficiency = _tensor(acq.prompts.efficiency)
    weights = q * efficiency * torch.exp(-event_mu)
    keep = (weights > 0) & (l_out > l_in)
    elements = torch.stack([_tensor(acq.prompts.first, torch.int32), _tensor(acq.prompts.second, torch.int32)], 1)
    system = ListModeSystemMatrix(projector, positions, elements[keep], tof_bin[keep] if params.tof else None, weights[keep], sensitivity)
    additive = randoms[keep]
    tail: TailFit | None = None
    if scatter:
        t3 = time.perf_counter()
        scatter_events, tail = _scatter(system, additive, mu_wide, acq, (p1, p2), sums, event_mu, near, random_estimate,
                                        params, efficiency[keep], keep, q)
        additive = additive + scatter_events
        timings["scatter_s"] = time.perf_counter() - t3
    elif mu is not None:
        notes.append("scatter correction switched off")

    t4 = time.perf_counter()
    scattered = 0.0 if tail is None else tail.scatter_fraction * len(acq.prompts)
    system.start_from_counts(len(acq.prompts) - _total_randoms(acq, sums, random_estimate) - scattered)
    obj = reconstruct(system, None, additive, params.algorithm, progress)
    timings["reconstruction_s"] = time.perf_counter() - t4
    image = grid.to_image(obj.cpu().numpy().astype(np.float32))
    total_mbq = float(obj.sum()) * grid.voxel_volume_ml / 1e6
    timings["total_s"] = time.perf_counter() - t0

    corrections = ["NORM", "DECY"] + (["ATTN"] if mu is not None else []) + (["SCAT"] if tail else []) + ["RAN"]
    provenance = {
        "inputs": {
            "listmode": str(acq.path),
            "listmode_sop_instance_uid": acq.exam.sop_instance_uid,
            "study_instance_uid": acq.exam.study_instance_uid,
            "ct_dir": None if ct_dir is None else str(ct_dir),
            "ct_sop_instance_uids": ct_uids,
            "ct_alignment": ct_alignment,
        },
        "scanner": {
            "model": acq.model_name,
            "detecting_elements": acq.n_elements,
            "tof_fwhm_mm": acq.tof_fwhm_mm,
            "tof_bins": n_tof,
            "energy_window_keV": list(acq.energy_window_keV),
        },
        "events": {"prompts": len(acq.prompts), "delayeds": 0 if acq.delayeds is None else len(acq.delayeds),
                   "reconstructed": int(keep.sum())},
        "nuclide": {"name": nuclide.name, "half_life_s": nuclide.half_life_s, "positron_fraction": nuclide.positron_fraction},
        "corrections": {
            "applied": corrections,
            "attenuation": "CT bilinear HU->mu at 511 keV" if mu is not None else "none",
            "normalisation": "PETSIRD detection efficiencies (calibration x bin x module-pair)",
            "randoms": random_estimate.method,
            "scatter": None if tail is None else {"method": {"tail": "tail-fitted Gaussian-blurred activity",
                                                            "sss": "tail-fitted single-scatter simulation"}[params.scatter_method],
                                                 **asdict(tail),
                                                 "sigma_mm": params.scatter_sigma_mm, "tail_margin_mm": params.tail_margin_mm},
            "decay": "to acquisition start",
        },
        "calibration": {
            "duration_s": acq.duration_s,
            "annihilations_per_mm3_per_Bq_per_mL": q,
            "petsird_calibration_factor": acq.pair_efficiency.calibration,
            "reference_time": acq.exam.start_of_acquisition.isoformat(),
        },
        "parameters": {
            "algorithm": asdict(params.algorithm),
            "tof": params.tof,
            "voxel_mm": list(grid.spacing_mm),
            "shape_xyz": list(grid.shape),
            "origin_mm": list(grid.origin_mm),
            "lor_group_mm": list(params.lor_group_mm),
            "seed": params.seed,
            "device": str(obj.device),
        },
        "units": "Bq/mL",
        "total_activity_MBq": total_mbq,
        "timings_s": timings,
        "versions": versions(("theraflow", "petsird", "pytomography", "torch", "SimpleITK", "pydicom", "numpy")),
        "notes": notes,
    }
    return PetResult(image, provenance, acq, nuclide, acq.exam.start_of_acquisition)
