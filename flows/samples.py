"""Sample studies for the after-scan walk-through and the tests, written as a department's
scanners and segmentation server would leave them:

- a pre-therapy PSMA PET/CT (synthetic, ``quant.synthetic``: exact SUVs, organs, two lesions)
  with a DICOM SEG of reference regions drawn on its CT (a finer grid than the PET),
  TotalSegmentator-style names (``liver``, ``parotid_gland_left``/``_right``, ``aorta``, ``spleen``);
- a post-therapy Lu-177 SPECT/CT at two time points of one cycle: the simulated IEC sample
  (``data-samples/lu177-iec``) as two studies of one patient, one day apart, the frame of
  reference of the second moved by 30 mm along z (the patient lies elsewhere), with a SEG of
  "organs" on the first CT (balls of 35 mm around the 37 and 28 mm spheres named
  ``kidney_left`` and ``spleen``, and the phantom's ``body``);
- the Ga-68 PET list mode sample (``data-samples/ga68-iec-pet``) with its CT and a SEG whose
  "liver" is a region of the phantom's uniform background (``write_phantom_regions``).

``python -m flows.samples INBOX`` writes all of them into INBOX. No real patient data: names
and IDs are placeholders.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from quant import synthetic as syn
from recon.io.ct import read_ct_series

SAMPLES = Path(__file__).resolve().parents[1] / "data-samples"
LU177 = SAMPLES / "lu177-iec"
GA68_LISTMODE = SAMPLES / "ga68-iec-pet"
NODE_MM = (12.0, -40.0, 10.0)
BONE_MM = (-42.0, -52.0, 50.0)
SHIFT_MM = 30.0


@dataclass(frozen=True)
class StudyFiles:
    """A written study: its UID and files by series kind (nm, ct, pet, seg)."""

    study_uid: str
    files_by_kind: dict[str, list[Path]]

    @property
    def files(self) -> list[Path]:
        return [path for paths in self.files_by_kind.values() for path in paths]


def write_psma_study(folder: Path, *, tracer: str = "PSMA-11", days_ago: float = 0, with_seg: bool = True,
                     patient_id: str = "SYN-CHAIN") -> tuple[StudyFiles, syn.Scene]:
    """The synthetic PSMA PET/CT (scanned ``days_ago`` days ago, radiopharmaceutical named
    ``tracer``), and its reference-region SEG unless not ``with_seg``; returns the files and the scene (truth)."""
    scene = syn.psma_scene([syn.SphereLesion(NODE_MM, 20.0, 25.0, site="lymph_node"), syn.SphereLesion(BONE_MM, 16.0, 12.0)])
    scan = datetime.now().replace(microsecond=0) - timedelta(days=days_ago)
    header = syn.PetHeader(patient_id=patient_id, patient_name="SYNTHETIC^CHAIN", scan=scan, injection=scan - timedelta(hours=1))

    def name_tracer(ds: Dataset, k: int) -> None:
        ds.RadiopharmaceuticalInformationSequence[0].Radiopharmaceutical = tracer

    syn.write_pet_series(scene.suv, folder / "pet", header, edit=name_tracer)
    extent = syn.half_extent_mm(scene.suv)
    ct_grid = syn.grid((128, 128, 80), (2.0, 2.0, 4.0))
    syn.write_ct_series(syn.scene_ct(ct_grid, extent, sub=1), folder / "ct", header)
    files = {"pet": sorted((folder / "pet").glob("*.dcm")), "ct": sorted((folder / "ct").glob("*.dcm"))}
    if with_seg:
        organs = syn.scene_masks(ct_grid, extent)
        x = syn.points_mm(ct_grid)[..., 0]
        parotid = sitk.GetArrayFromImage(organs["parotid"]).astype(bool)
        masks = {"liver": organs["liver"], "spleen": organs["spleen"], "aorta": organs["blood_pool"],
                 "parotid_gland_left": syn.image_like((parotid & (x > 0)).astype(np.uint8), ct_grid, sitk.sitkUInt8),
                 "parotid_gland_right": syn.image_like((parotid & (x <= 0)).astype(np.uint8), ct_grid, sitk.sitkUInt8)}
        files["seg"] = [syn.write_segmentation(masks, folder / "ct", folder / "seg" / "seg.dcm")]
    return StudyFiles(header.study_instance_uid, files), scene


def clone_sample(dest: Path, *, study_time: str = "120000", edit: Callable[[Dataset, str], None] | None = None) -> StudyFiles:
    """The Lu-177 sample study with new Study/Series/SOP/Frame of Reference UIDs and today's
    date; ``edit(ds, kind)`` may change each file ('nm' or 'ct') before it is written."""
    study_uid, frame = generate_uid(), generate_uid()
    series_uids: dict[str, str] = {}
    out: dict[str, list[Path]] = {"nm": [], "ct": []}
    for kind, files in (("nm", [LU177 / "nm" / "projections.dcm"]), ("ct", sorted((LU177 / "ct").glob("*.dcm")))):
        for path in files:
            ds = dcmread(path)
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uids.setdefault(str(ds.SeriesInstanceUID), generate_uid())
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.FrameOfReferenceUID = frame
            ds.StudyDate, ds.StudyTime = date.today().strftime("%Y%m%d"), study_time
            if edit is not None:
                edit(ds, kind)
            target = dest / kind / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(target, enforce_file_format=True)
            out[kind].append(target)
    return StudyFiles(str(study_uid), out)


def _moved(values, shift_z: float) -> list[str]:
    x, y, z = (float(v) for v in values)
    return [f"{x:.4f}", f"{y:.4f}", f"{z + shift_z:.4f}"]


def write_spect_time_point(dest: Path, *, patient_id: str, day: int, shift_z: float, study_time: str = "120000") -> StudyFiles:
    """The Lu-177 sample as a time point of patient ``patient_id``'s cycle (the sample's own
    administration), acquired ``day`` days after the sample's date, in a frame of reference
    moved by ``shift_z`` mm along z."""

    def edit(ds: Dataset, kind: str) -> None:
        ds.PatientID, ds.PatientName = patient_id, "TIMEPOINT^SAMPLE"
        for detector in ds.get("DetectorInformationSequence", []):
            detector.ImagePositionPatient = _moved(detector.ImagePositionPatient, shift_z)
        if "ImagePositionPatient" in ds:
            ds.ImagePositionPatient = _moved(ds.ImagePositionPatient, shift_z)
            if "SliceLocation" in ds:
                ds.SliceLocation = f"{float(ds.ImagePositionPatient[2]):.4f}"
        for keyword in ("AcquisitionDate", "SeriesDate", "ContentDate"):
            if day and keyword in ds:
                ds.data_element(keyword).value = (datetime.strptime(ds.data_element(keyword).value, "%Y%m%d")
                                                  + timedelta(days=day)).strftime("%Y%m%d")

    return clone_sample(dest, study_time=study_time, edit=edit)


def organ_masks(ct: sitk.Image, shift_z: float = 0.0) -> dict[str, sitk.Image]:
    """The sample's "organs" on ``ct``'s grid, in a frame moved by ``shift_z`` mm: ``kidney_left``
    and ``spleen`` (balls of 35 mm radius around the 37 and 28 mm spheres), ``body`` (the
    phantom's water and walls: CT above −300 HU, holes filled)."""
    spheres = {s["label"]: s for s in json.loads((LU177 / "truth" / "phantom.json").read_text())["spheres"]}

    def ball(label: int) -> sitk.Image:
        centre = np.add(spheres[label]["centre_mm"], (0.0, 0.0, shift_z))
        inside = np.linalg.norm(syn.points_mm(ct) - centre, axis=-1) <= 35.0
        return syn.image_like(inside.astype(np.uint8), ct, sitk.sitkUInt8)

    return {"kidney_left": ball(6), "spleen": ball(5), "body": sitk.Cast(sitk.BinaryFillhole(ct > -300), sitk.sitkUInt8)}


def write_spect_cycle(folder: Path, patient_id: str = "LU-CYCLE-1") -> tuple[StudyFiles, StudyFiles]:
    """Two time points of one cycle: day 0 with a SEG of organs on its CT, day 1 moved by
    ``SHIFT_MM`` without a SEG (its regions come from day 0 by registration)."""
    first = write_spect_time_point(folder / "day0", patient_id=patient_id, day=0, shift_z=0.0, study_time="080000")
    ct_folder = first.files_by_kind["ct"][0].parent
    ct, _, _ = read_ct_series(ct_folder)
    first.files_by_kind["seg"] = [syn.write_segmentation(organ_masks(ct), ct_folder, folder / "day0" / "seg" / "seg.dcm")]
    second = write_spect_time_point(folder / "day1", patient_id=patient_id, day=1, shift_z=SHIFT_MM, study_time="090000")
    return first, second


def write_phantom_regions(ct_folder: Path, path: Path) -> Path:
    """A SEG on the Ga-68 PET phantom's CT standing in for the segmentation of a patient: its
    ``liver`` is a ball of 25 mm radius of uniform background, (8, 135, −70) mm, clear of the
    spheres and the walls (the phantom has no liver; only the selection's mechanics are shown)."""
    ct, _, _ = read_ct_series(ct_folder)
    inside = np.linalg.norm(syn.points_mm(ct) - np.asarray((8.0, 135.0, -70.0)), axis=-1) <= 25.0
    return syn.write_segmentation({"liver": syn.image_like(inside.astype(np.uint8), ct, sitk.sitkUInt8)}, ct_folder, path)


def write_inbox(inbox: Path) -> dict[str, str]:
    """Every sample study into ``inbox`` (see the module text); returns study UIDs by name."""
    psma, _ = write_psma_study(inbox / "psma-pet")
    first, second = write_spect_cycle(inbox / "lu177-cycle")
    listmode = inbox / "ga68-listmode"
    shutil.copytree(GA68_LISTMODE / "ct", listmode / "ct")
    shutil.copy(GA68_LISTMODE / "listmode.petsird", listmode / "listmode.petsird")
    write_phantom_regions(listmode / "ct", listmode / "seg" / "seg.dcm")
    return {"psma_pet": psma.study_uid, "spect_day0": first.study_uid, "spect_day1": second.study_uid,
            "ga68_listmode": json.loads((GA68_LISTMODE / "truth" / "phantom.json").read_text())["uids"]["study"]}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m flows.samples INBOX")
    for name, uid in write_inbox(Path(sys.argv[1])).items():
        print(f"{name}: {uid}")
