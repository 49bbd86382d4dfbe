"""A synthetic multi-time-point Lu-177 SPECT/CT study with known biokinetics: a body with liver,
spleen and a spherical lesion, each organ a mono-exponential concentration, imaged at several
times with the patient repositioned (rigid) between scans; SPECT written as theraflow NM RECON
(Bq/mL, sampled at voxel centres, no blur: the images are the truth, not reconstructions), CT as
DICOM series (partial volume), masks as NIfTI on the first CT. Truth: TIA per VOI from the
analytic curves over the region as the first SPECT grid samples it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom import Dataset
from pydicom.uid import generate_uid

from quant import synthetic
from quant.dosimetry import tac
from recon.io.nm_recon_dicom import write_nm_recon_series

LP = tac.physical_decay_per_h()
ADMINISTRATION = datetime(2026, 5, 4, 9, 0, 0)
ADMINISTERED_MBQ = 7400.0
# VOI: (initial concentration Bq/mL, effective decay constant 1/h)
KINETICS = {"liver": (60e3, LP + 0.010), "spleen": (120e3, LP + 0.006), "lesion": (600e3, LP + 0.002)}
BACKGROUND = (4e3, LP + 0.03)
LESION_CENTRE, LESION_RADIUS = np.array([5.0, -25.0, 20.0]), 12.0


@dataclass
class Study:
    folder: Path
    spects: list[Path]
    cts: list[Path]
    times: list[datetime]
    masks: dict[str, Path]
    lesions: dict[str, Path]
    masks_tp2: dict[str, Path] = field(default_factory=dict)  # the same regions drawn on the second CT
    truth_tia_MBq_h: dict[str, float] = field(default_factory=dict)


def _regions(points: np.ndarray, extent: np.ndarray) -> dict[str, np.ndarray]:
    regions = synthetic.psma_regions(points, extent)
    out = {"liver": regions["liver"], "spleen": regions["spleen"]}
    out["lesion"] = np.linalg.norm(points - LESION_CENTRE, axis=-1) <= LESION_RADIUS
    return out


def _concentration(points: np.ndarray, extent: np.ndarray, hours: float) -> np.ndarray:
    x, y = points[..., 0], points[..., 1]
    body = (x / (0.9 * extent[0])) ** 2 + (y / (0.75 * extent[1])) ** 2 <= 1.0
    values = np.where(body, BACKGROUND[0] * math.exp(-BACKGROUND[1] * hours), 0.0)
    for name, region in _regions(points, extent).items():
        c0, lam = KINETICS[name]
        values = np.where(region, c0 * math.exp(-lam * hours), values)
    return values


def make_study(folder: Path, hours: tuple[float, ...] = (4.0, 24.0, 96.0), *, spacing: float = 4.8, patient_id: str = "SYN-DOSE-1",
               shifts: tuple[tuple[float, ...], ...] = ((0, 0, 0, 0), (6.0, -4.0, 5.0, 3.0), (-5.0, 7.0, -4.0, -2.0)),
               spect_size: tuple[int, int, int] = (40, 40, 30), ct_size: tuple[int, int, int] = (60, 60, 45), ct_spacing: float = 3.2,
               ct_subsamples: int = 2) -> Study:
    """Write the study under ``folder``; ``shifts`` per time point: (tx, ty, tz mm, rotation about z in degrees)."""
    spect_grid = synthetic.grid(spect_size, (spacing,) * 3)
    ct_grid = synthetic.grid(ct_size, (ct_spacing,) * 3)
    extent = synthetic.half_extent_mm(spect_grid)
    study_uid = generate_uid()
    study = Study(folder, [], [], [], {}, {})
    for k, hours_k in enumerate(hours):
        tx, ty, tz, angle = shifts[k % len(shifts)]
        transform = sitk.Euler3DTransform()
        transform.SetRotation(0.0, 0.0, math.radians(angle))
        transform.SetTranslation((tx, ty, tz))
        when = ADMINISTRATION + timedelta(hours=hours_k)
        frame = generate_uid()
        header = synthetic.PetHeader(scan=when, injection=ADMINISTRATION, frame_of_reference_uid=frame,
                                     study_instance_uid=study_uid, patient_id=patient_id, patient_name="SYNTHETIC^DOSE")
        ct_dir = synthetic.write_ct_series(synthetic.scene_ct(ct_grid, extent, transform, ct_subsamples), folder / f"tp{k + 1}" / "ct", header)
        body_points = synthetic.map_points(transform, synthetic.points_mm(spect_grid), inverse=True)
        image = synthetic.image_like(_concentration(body_points, extent, hours_k).astype(np.float32), spect_grid)
        source = Dataset()
        source.PatientName, source.PatientID, source.PatientBirthDate, source.PatientSex = "SYNTHETIC^DOSE", patient_id, "", "M"
        source.StudyInstanceUID, source.FrameOfReferenceUID = study_uid, frame
        source.StudyDate, source.StudyTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
        source.AcquisitionDate, source.AcquisitionTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
        item = Dataset()
        item.Radiopharmaceutical = "Lu-177 PSMA"
        item.RadionuclideTotalDose = f"{ADMINISTERED_MBQ * 1e6:.0f}"
        item.RadiopharmaceuticalStartDateTime = ADMINISTRATION.strftime("%Y%m%d%H%M%S")
        source.RadiopharmaceuticalInformationSequence = [item]
        spect_dir = folder / f"tp{k + 1}" / "recon"
        (spect_dir / "dicom").mkdir(parents=True)
        write_nm_recon_series(image, spect_dir / "dicom", source, series_description="synthetic Lu-177 SPECT Bq/mL")
        study.spects.append(spect_dir)
        study.cts.append(ct_dir)
        study.times.append(when)
        if k <= 1:
            masks = {name: synthetic.image_like(region.astype(np.uint8), ct_grid, sitk.sitkUInt8)
                     for name, region in _regions(synthetic.map_points(transform, synthetic.points_mm(ct_grid), inverse=True), extent).items()}
            for name, mask in masks.items():
                path = folder / f"{name}{'_tp2' if k else ''}.nii.gz"
                sitk.WriteImage(mask, str(path))
                if k:
                    study.masks_tp2[name] = path
                else:
                    (study.lesions if name == "lesion" else study.masks)[name] = path
        if k == 0:
            # truth: the analytic curves over each region as the SPECT grid samples it (voxel centres inside)
            voxel_mL = spacing**3 / 1000.0
            sampled = _regions(body_points, extent)
            study.truth_tia_MBq_h = {name: c0 * float(sampled[name].sum()) * voxel_mL * 1e-6 / lam for name, (c0, lam) in KINETICS.items()}
    return study


# A small organ S-value table for tests. Its numbers are MADE UP for testing (of the right order
# for Lu-177, kidneys ≈ E_e/m plus a little photon self-dose), taken from no publication; rows
# are targets, columns sources, mGy/(MBq·s); the last row gives the phantom masses in g.
TEST_S_TABLE = """\
,Kidneys,Liver,Spleen,Red Mar.,Tot Body
Kidneys,8.0e-5,1.2e-7,2.0e-7,1.5e-7,6.0e-7
Liver,1.1e-7,1.4e-5,5.0e-8,6.0e-8,6.0e-7
Spleen,2.0e-7,5.0e-8,1.6e-4,1.0e-7,6.0e-7
Red Marrow,1.4e-7,6.0e-8,1.0e-7,1.5e-5,6.0e-7
Total Body,4.0e-7,4.0e-7,4.0e-7,4.0e-7,4.0e-7
phantom_mass_g,300,1800,150,1170,70000
"""
TEST_S_TABLE_CITATION = "theraflow test table (made-up numbers)"


def write_test_s_table(path: Path, with_masses: bool = True) -> Path:
    """Write :data:`TEST_S_TABLE` (without its phantom_mass_g row when ``with_masses`` is False)."""
    lines = TEST_S_TABLE.splitlines()
    path.write_text("\n".join(lines if with_masses else lines[:-1]) + "\n")
    return path
