"""Small PETSIRD files for the PET tests: a toy ring scanner and a Monte Carlo point source.

The events are made by throwing back-to-back photon pairs from the source and finding the
crystals their line enters (cylinder intersection): independent of the reconstruction's projector.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import numpy as np
import petsird


def _box(length: tuple[float, float, float]) -> petsird.BoxSolidVolume:
    x, y, z = length
    corners = [(0, -y / 2, -z / 2), (0, -y / 2, z / 2), (0, y / 2, z / 2), (0, y / 2, -z / 2),
               (x, -y / 2, -z / 2), (x, -y / 2, z / 2), (x, y / 2, z / 2), (x, y / 2, -z / 2)]
    return petsird.BoxSolidVolume(shape=petsird.BoxShape(corners=[petsird.Coordinate(c=np.array(c, dtype=np.float32)) for c in corners]),
                                  material_id=0)


def _transform(matrix: np.ndarray) -> petsird.RigidTransformation:
    return petsird.RigidTransformation(matrix=np.asarray(matrix, dtype=np.float32))


class ToyScanner:
    """A ring of ``n_modules`` columns of ``rings`` crystals (``pitch`` mm), inner radius ``radius`` mm,
    crystals ``depth`` mm deep (thin: the events are made where lines cross the inner face, the
    reconstruction puts them at box centres); gantry z = 0 at LPS z = ``z_offset``."""

    def __init__(self, n_modules: int = 64, rings: int = 4, radius: float = 120.0, pitch: float = 4.0,
                 depth: float = 1.0, z_offset: float = 0.0, tof_fwhm_mm: float = 30.0, n_tof: int = 21) -> None:
        self.n_modules, self.rings, self.radius, self.pitch, self.depth = n_modules, rings, radius, pitch, depth
        self.z_offset = z_offset
        self.tof_fwhm_mm = tof_fwhm_mm
        self.tof_edges = np.linspace(-radius * 1.05, radius * 1.05, n_tof + 1)
        self.angles = 2 * np.pi * np.arange(n_modules) / n_modules
        self.ring_z = (np.arange(rings) - (rings - 1) / 2) * pitch

    def header(self, exam: petsird.ExamInformation | None) -> petsird.Header:
        tangential = 2 * np.pi * self.radius / self.n_modules
        element = _box((self.depth, tangential, self.pitch))
        elements = petsird.ReplicatedBoxSolidVolume(object=element, transforms=[
            _transform([[1, 0, 0, self.radius], [0, 1, 0, 0], [0, 0, 1, z]]) for z in self.ring_z])
        module = petsird.ReplicatedDetectorModule(object=petsird.DetectorModule(detecting_elements=elements), transforms=[
            _transform([[math.cos(a), -math.sin(a), 0, 0], [math.sin(a), math.cos(a), 0, 0], [0, 0, 1, 0]]) for a in self.angles])
        scanner = petsird.ScannerInformation(model_name="TOY", scanner_geometry=petsird.ScannerGeometry(replicated_modules=[module]))
        scanner.gantry_alignment = _transform([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, self.z_offset]])
        scanner.tof_bin_edges = [[petsird.BinEdges(edges=self.tof_edges.astype(np.float32))]]
        scanner.tof_resolution = [[self.tof_fwhm_mm]]
        scanner.event_energy_bin_edges = [petsird.BinEdges(edges=np.array([435.0, 585.0], dtype=np.float32))]
        scanner.energy_resolution_at_511 = [0.1]
        scanner.detection_efficiencies = petsird.DetectionEfficiencies(calibration_factor=1.0)
        scanner.prompt_event_policy = petsird.CoincidencePolicy.REJECT_HIGHER_MULTIPLES
        scanner.delayed_event_policy = petsird.CoincidencePolicy.REJECT_HIGHER_MULTIPLES
        return petsird.Header(scanner=scanner, exam=exam)

    def element_of(self, points: np.ndarray) -> np.ndarray:
        """Element index (ring + rings * module) of points on the inner cylinder; -1 outside the rings."""
        module = np.rint(np.arctan2(points[:, 1], points[:, 0]) / (2 * np.pi / self.n_modules)).astype(int) % self.n_modules
        ring = np.floor((points[:, 2] - self.ring_z[0]) / self.pitch + 0.5).astype(int)
        ok = (ring >= 0) & (ring < self.rings)
        return np.where(ok, ring + self.rings * module, -1)

    def point_source_events(self, source_gantry_mm: np.ndarray, n_pairs: int, rng: np.random.Generator) -> list[petsird.CoincidenceEvent]:
        """Coincidences of ``n_pairs`` isotropic photon pairs from a point (gantry mm); TOF blurred."""
        u = rng.normal(size=(n_pairs, 3))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        s = np.asarray(source_gantry_mm, dtype=float)
        hits = []
        for sign in (1.0, -1.0):
            d = sign * u
            a = d[:, 0] ** 2 + d[:, 1] ** 2
            b = 2 * (s[0] * d[:, 0] + s[1] * d[:, 1])
            c = s[0] ** 2 + s[1] ** 2 - self.radius ** 2
            t = (-b + np.sqrt(b * b - 4 * a * c)) / (2 * a)
            hits.append((s + t[:, None] * d, t))
        (q1, t1), (q2, t2) = hits
        e1, e2 = self.element_of(q1), self.element_of(q2)
        ok = (e1 >= 0) & (e2 >= 0) & (e1 // self.rings != e2 // self.rings)
        # PETSIRD TOF coordinate (t1 - t2) c / 2 = (path1 - path2) / 2, blurred by the CTR
        tof = (t1 - t2) / 2 + rng.normal(scale=self.tof_fwhm_mm / 2.3548, size=n_pairs)
        first, second, tof = np.where(e1 >= e2, e1, e2)[ok], np.where(e1 >= e2, e2, e1)[ok], np.where(e1 >= e2, tof, -tof)[ok]
        tof_idx = np.clip(np.searchsorted(self.tof_edges, tof) - 1, 0, self.tof_edges.size - 2)
        return [petsird.CoincidenceEvent(detection_bins=[int(a), int(b)], tof_idx=int(k)) for a, b, k in zip(first, second, tof_idx)]


def exam(start: datetime = datetime(2026, 11, 2, 11, 0, 0), nuclide: str = "^68^Gallium") -> petsird.ExamInformation:
    pharma = petsird.DICOMRadiopharmaceuticalInformation(
        radionuclide_total_dose=150.0,  # MBq (PETSIRD)
        radiopharmaceutical_start_date_time=petsird.DateTime(np.datetime64(datetime(2026, 11, 2, 10, 0, 0), "ns")),
        radionuclide_code_sequence=petsird.DICOMBasicCodeSequence(code_value="C-131A3", coding_scheme_designator="SRT", code_meaning=nuclide),
        radiopharmaceutical_code_sequence=petsird.DICOMBasicCodeSequence(code_meaning="Ga-68 PSMA-11"),
    )
    patient = petsird.DICOMPatientInformation(patient_id="TOY", patients_sex="M", patients_weight=75.0, patients_size=1.75)
    return petsird.ExamInformation(modality="PT", study_instance_uid="1.2.3.4", series_instance_uid="1.2.3.4.1",
                                   sop_instance_uid="1.2.3.4.1.1", frame_of_reference_uid="1.2.3.4.9",
                                   start_of_study=petsird.DateTime(np.datetime64(start, "ns")),
                                   start_of_acquisition=petsird.DateTime(np.datetime64(start, "ns")),
                                   patient=patient, radiopharmaceuticals=[pharma])


def write_listmode(path: Path, scanner: ToyScanner, prompts: list, delayeds: list | None = None,
                   exam_info: petsird.ExamInformation | None = None, duration_ms: int = 10_000) -> Path:
    """Write one event time block holding ``prompts`` (and ``delayeds``)."""
    with petsird.BinaryPETSIRDWriter(str(path)) as writer:
        writer.write_header(scanner.header(exam() if exam_info is None else exam_info))
        block = petsird.EventTimeBlock(time_interval=petsird.TimeInterval(start=0, stop=duration_ms),
                                       prompt_events=[[prompts]], delayed_events=[[delayeds]] if delayeds else [])
        writer.write_time_blocks([petsird.TimeBlock.EventTimeBlock(block)])
    return path
