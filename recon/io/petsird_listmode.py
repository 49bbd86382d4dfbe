"""Read a PETSIRD list-mode file (binary, ``petsird`` package) into arrays the PET reconstruction uses.

What is read
------------
* Scanner geometry: every detecting element's box, placed by its module and element transforms;
  the element's position is the centre of its box (mean of the 8 corners), moved into DICOM
  patient coordinates (LPS, mm) with ``gantry_alignment`` (identity when absent).
* Detection bins: ``bin = energy + n_energy * (element + n_elements_per_module * module)`` (the
  PETSIRD layout); events of all energy bins are kept and mapped to their detecting element.
* Efficiencies (PETSIRD ``DetectionEfficiencies``): calibration factor x per-bin efficiencies x
  module-pair (geometric) efficiencies looked up through the SGID table. With them, by PETSIRD's
  definition, the mean true unscattered coincidences of a pair = efficiency x attenuation factor x
  line integral [mm] of the number of annihilations per mm^3.
* TOF: bin edges and CTR (FWHM) in mm of (t1 - t2) c / 2, the first detection bin's arrival time t1.
* Prompt and delayed coincidences of all event time blocks; the acquisition duration [s] is
  the span of the time blocks (TimeInterval in ms).
* Exam: UIDs, start of acquisition, patient weight/size/sex, radiopharmaceutical and dose (MBq
  in PETSIRD, Bq here).

Only scanners with one module type are supported (every current digital PET is one).
Anything unreadable or inconsistent raises :class:`recon.errors.InputError` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from recon.errors import InputError


@dataclass(frozen=True)
class Coincidences:
    """Coincidence events as arrays: detecting-element indices (first, second) and TOF bin index."""

    first: np.ndarray  # int64, element index of detection_bins[0]
    second: np.ndarray  # int64, element index of detection_bins[1]
    tof_bin: np.ndarray  # int64
    efficiency: np.ndarray  # float64, PETSIRD detection efficiency of each event's pair

    def __len__(self) -> int:
        return int(self.first.size)


@dataclass(frozen=True)
class Exam:
    """Exam information carried by the file (naive local datetimes, as DICOM)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    frame_of_reference_uid: str
    patient_id: str
    patient_sex: str
    patient_weight_kg: float | None
    patient_size_m: float | None
    start_of_study: datetime | None
    start_of_acquisition: datetime | None
    radiopharmaceutical: str
    radionuclide: str
    injected_activity_bq: float | None
    injection_datetime: datetime | None


@dataclass(frozen=True)
class ListModeAcquisition:
    """A PETSIRD list-mode acquisition ready for reconstruction (positions in LPS mm, times in s)."""

    path: Path
    model_name: str
    element_positions_mm: np.ndarray  # (n_elements, 3) box centres in patient LPS
    tof_edges_mm: np.ndarray  # (n_tof_bins + 1,)
    tof_fwhm_mm: float
    energy_window_keV: tuple[float, float]
    prompts: Coincidences
    delayeds: Coincidences | None
    duration_s: float
    exam: Exam
    pair_efficiency: "PairEfficiency" = field(repr=False)
    energy_resolution_at_511: float = 0.0  # FWHM / 511 keV (PETSIRD; 0 when the file does not say)

    @property
    def n_elements(self) -> int:
        return int(self.element_positions_mm.shape[0])


@dataclass(frozen=True)
class PairEfficiency:
    """PETSIRD detection efficiency of element pairs: cal x eps_i x eps_j x module-pair factor.

    ``element_efficiency``: per element (energy bins combined by their mean); ``sgid``: full
    symmetric (n_modules, n_modules) SGID table, -1 where not in coincidence; ``module_pair``:
    (n_sgid, n_el_per_module, n_el_per_module) geometric factors (energy bin 0).
    """

    calibration: float
    element_efficiency: np.ndarray
    elements_per_module: int
    sgid: np.ndarray
    module_pair: np.ndarray

    def __call__(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Efficiency of each (first, second) element pair (arrays of equal length)."""
        eff = self.calibration * self.element_efficiency[first] * self.element_efficiency[second]
        if self.module_pair.size:
            m1, e1 = np.divmod(first, self.elements_per_module)
            m2, e2 = np.divmod(second, self.elements_per_module)
            sgid = self.sgid[m1, m2]
            ok = sgid >= 0
            # the table is stored for (higher module, lower module): order the pair accordingly
            swap = m1 < m2
            a = np.where(swap, e2, e1)
            b = np.where(swap, e1, e2)
            factor = np.zeros(first.shape, dtype=np.float64)
            factor[ok] = self.module_pair[sgid[ok], a[ok], b[ok]]
            eff = eff * factor
        return eff

    def module_pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Module pairs (a, b), a >= b, in increasing a (then b), that hold element pairs in
        coincidence, with the factor tables and the full SGID table: ``table[sgid[a, b]][i, j]`` is
        the factor of element i of module a with element j of module b. Without a module-pair
        table every pair is in coincidence with factor 1 (one table of ones, SGID 0 everywhere)."""
        per_module = self.elements_per_module
        n_modules = self.element_efficiency.size // per_module
        if self.module_pair.size:
            table, sgid = self.module_pair, self.sgid
        else:
            table, sgid = np.ones((1, per_module, per_module)), np.zeros((n_modules, n_modules), dtype=np.int64)
        a, b = np.tril_indices(n_modules)
        keep = sgid[a, b] >= 0
        return a[keep], b[keep], table, sgid


def read_listmode(path: str | Path) -> ListModeAcquisition:
    """Read the PETSIRD file at ``path`` (see module docstring). Raises InputError."""
    import petsird

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        with petsird.BinaryPETSIRDReader(str(path)) as reader:
            header = reader.read_header()
            blocks = list(reader.read_time_blocks())
    except InputError:
        raise
    except Exception as exc:  # yardl raises plain exceptions for wrong magic, schema or truncation
        raise InputError(path, f"not a readable PETSIRD {_petsird_version()} list-mode file ({_short(exc)})") from None
    scanner = header.scanner
    if scanner.scanner_geometry.number_of_module_types() != 1:
        raise InputError(path, f"{scanner.scanner_geometry.number_of_module_types()} module types; only scanners with one are supported")
    n_energy = scanner.event_energy_bin_edges[0].number_of_bins()
    positions, per_module = _element_positions(scanner)
    efficiency = _pair_efficiency(scanner, n_energy, per_module, positions.shape[0], path)
    prompts, delayeds, duration_s = _events(blocks, n_energy, efficiency, positions.shape[0], path)
    tof_edges = np.asarray(scanner.tof_bin_edges[0][0].edges, dtype=np.float64)
    if prompts.tof_bin.size and prompts.tof_bin.max() >= tof_edges.size - 1:
        raise InputError(path, "TOF bin index beyond the scanner's TOF bins")
    energy_edges = np.asarray(scanner.event_energy_bin_edges[0].edges, dtype=np.float64)
    return ListModeAcquisition(
        path=path,
        model_name=scanner.model_name,
        element_positions_mm=positions,
        tof_edges_mm=tof_edges,
        tof_fwhm_mm=float(scanner.tof_resolution[0][0]),
        energy_window_keV=(float(energy_edges[0]), float(energy_edges[-1])),
        prompts=prompts,
        delayeds=delayeds,
        duration_s=duration_s,
        exam=_exam(header.exam),
        pair_efficiency=efficiency,
        energy_resolution_at_511=float(scanner.energy_resolution_at_511[0]) if len(scanner.energy_resolution_at_511) else 0.0,
    )


def _petsird_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("petsird")


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]


def _mat44(transform) -> np.ndarray:
    return np.vstack([np.asarray(transform.matrix, dtype=np.float64), [0.0, 0.0, 0.0, 1.0]])


def _element_positions(scanner) -> tuple[np.ndarray, int]:
    """Box centres (n_elements, 3) in LPS mm, element-major within module; and elements per module."""
    module = scanner.scanner_geometry.replicated_modules[0]
    elements = module.object.detecting_elements
    corners = np.array([c.c for c in elements.object.shape.corners], dtype=np.float64)
    centre = np.append(corners.mean(axis=0), 1.0)
    in_module = np.array([_mat44(t) @ centre for t in elements.transforms])  # (n_el, 4)
    module_mats = np.array([_mat44(t) for t in module.transforms])  # (n_mod, 4, 4)
    placed = np.einsum("mij,ej->mei", module_mats, in_module)  # (n_mod, n_el, 4)
    if scanner.gantry_alignment is not None:
        placed = np.einsum("ij,mej->mei", _mat44(scanner.gantry_alignment), placed)
    return placed[..., :3].reshape(-1, 3), len(elements.transforms)


def _pair_efficiency(scanner, n_energy: int, per_module: int, n_elements: int, path: Path) -> PairEfficiency:
    eff = scanner.detection_efficiencies
    calibration = float(eff.calibration_factor) if eff.calibration_factor else 1.0
    if eff.detection_bin_efficiencies:
        per_bin = np.asarray(eff.detection_bin_efficiencies[0], dtype=np.float64)
        if per_bin.size != n_elements * n_energy:
            raise InputError(path, f"{per_bin.size} detection-bin efficiencies for {n_elements * n_energy} detection bins")
        per_element = per_bin.reshape(n_elements, n_energy).mean(axis=1)
    else:
        per_element = np.ones(n_elements)
    n_modules = n_elements // per_module
    if eff.module_pair_sgidlut and eff.module_pair_efficiencies_vectors:
        lut = eff.module_pair_sgidlut[0][0]
        sgid = np.full((n_modules, n_modules), -1, dtype=np.int64)
        for m1, row in enumerate(lut):
            values = np.asarray(row, dtype=np.int64)
            sgid[m1, : values.size] = values
        lower = np.tril(sgid)
        sgid = np.where(np.tri(n_modules, dtype=bool), lower, lower.T)
        vectors = sorted(eff.module_pair_efficiencies_vectors[0][0], key=lambda v: v.sgid)
        module_pair = np.array([np.asarray(v.values, dtype=np.float64) for v in vectors])
        # energy bins: keep the first energy bin's geometric factors for each element pair
        module_pair = module_pair[:, ::n_energy, ::n_energy]
        if module_pair.shape[1:] != (per_module, per_module) or sgid.max() >= module_pair.shape[0]:
            raise InputError(path, "module-pair efficiencies do not match the scanner geometry")
    else:
        sgid = np.zeros((0, 0), dtype=np.int64)
        module_pair = np.zeros((0, 0, 0))
    return PairEfficiency(calibration, per_element, per_module, sgid, module_pair)


def _coincidences(lists: list, n_energy: int, efficiency: PairEfficiency) -> Coincidences:
    events = [e for chunk in lists for e in chunk]
    if not events:
        empty = np.zeros(0, dtype=np.int64)
        return Coincidences(empty, empty, empty, np.zeros(0))
    bins = np.fromiter((b for e in events for b in e.detection_bins), dtype=np.int64, count=2 * len(events)).reshape(-1, 2)
    tof = np.fromiter((e.tof_idx for e in events), dtype=np.int64, count=len(events))
    first, second = bins[:, 0] // n_energy, bins[:, 1] // n_energy
    return Coincidences(first, second, tof, efficiency(first, second))


def _events(blocks: list, n_energy: int, efficiency: PairEfficiency, n_elements: int,
            path: Path) -> tuple[Coincidences, Coincidences | None, float]:
    import petsird

    prompts: list = []
    delayeds: list = []
    start_ms, stop_ms = None, None
    for block in blocks:
        if not isinstance(block, petsird.TimeBlock.EventTimeBlock):
            continue
        value = block.value
        start_ms = value.time_interval.start if start_ms is None else min(start_ms, value.time_interval.start)
        stop_ms = value.time_interval.stop if stop_ms is None else max(stop_ms, value.time_interval.stop)
        if value.prompt_events:
            prompts.append(value.prompt_events[0][0])
        if value.delayed_events:
            delayeds.append(value.delayed_events[0][0])
    prompt_events = _coincidences(prompts, n_energy, efficiency)
    if len(prompt_events) == 0:
        raise InputError(path, "no prompt coincidences in the file")
    if max(prompt_events.first.max(), prompt_events.second.max()) >= n_elements:
        raise InputError(path, "detection bin beyond the scanner's detecting elements")
    if stop_ms is None or stop_ms <= start_ms:
        raise InputError(path, "event time blocks give no acquisition duration")
    delayed_events = _coincidences(delayeds, n_energy, efficiency) if delayeds else None
    return prompt_events, delayed_events if delayed_events and len(delayed_events) else None, (stop_ms - start_ms) / 1000.0


def _positive(value) -> float | None:
    return float(value) if value and float(value) > 0 else None


def _datetime(value) -> datetime | None:
    """PETSIRD (yardl) DateTime → naive datetime of its wall-clock value (DICOM times are local
    and naive; the file's value is taken as that wall clock); None for the epoch default."""
    if value is None:
        return None
    stamp = np.datetime64(getattr(value, "numpy_value", value), "us")
    if stamp == np.datetime64(0, "us"):
        return None
    return stamp.astype(datetime)


def read_exam(path: str | Path) -> Exam:
    """The exam information of a PETSIRD file, from its header alone (fast: no event is read).
    Raises InputError when the file is not a readable PETSIRD file."""
    import petsird

    try:
        reader = petsird.BinaryPETSIRDReader(str(path))
        try:
            header = reader.read_header()
        finally:
            try:
                reader.close()
            except Exception:  # noqa: BLE001 - yardl refuses to close before every event was read: expected here
                pass
    except Exception as exc:  # yardl raises plain exceptions for wrong magic, schema or truncation
        raise InputError(path, f"not a readable PETSIRD {_petsird_version()} list-mode file ({_short(exc)})") from None
    return _exam(header.exam)


def _exam(exam) -> Exam:
    if exam is None:
        return Exam("", "", "", "", "", "", None, None, None, None, "", "", None, None)
    pharma = exam.radiopharmaceuticals[0] if exam.radiopharmaceuticals else None
    return Exam(
        study_instance_uid=exam.study_instance_uid,
        series_instance_uid=exam.series_instance_uid,
        sop_instance_uid=exam.sop_instance_uid,
        frame_of_reference_uid=exam.frame_of_reference_uid,
        patient_id=exam.patient.patient_id,
        patient_sex=exam.patient.patients_sex,
        patient_weight_kg=_positive(exam.patient.patients_weight),
        patient_size_m=_positive(exam.patient.patients_size),
        start_of_study=_datetime(exam.start_of_study),
        start_of_acquisition=_datetime(exam.start_of_acquisition),
        radiopharmaceutical=pharma.radiopharmaceutical_code_sequence.code_meaning if pharma else "",
        radionuclide=pharma.radionuclide_code_sequence.code_meaning if pharma else "",
        # PETSIRD gives the dose in MBq (DICOM's RadionuclideTotalDose is in Bq)
        injected_activity_bq=_positive(pharma.radionuclide_total_dose * 1e6) if pharma and pharma.radionuclide_total_dose else None,
        injection_datetime=_datetime(pharma.radiopharmaceutical_start_date_time) if pharma else None,
    )
