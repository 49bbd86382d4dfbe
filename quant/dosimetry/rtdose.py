"""An absorbed-dose map as a DICOM RT Dose object (built with pydicom; highdicom has no RT Dose).

The dose grid is the reference SPECT grid, in the reference CT's frame of reference (SPECT/CT
of one hybrid scan): Frame of Reference UID, patient and study come from the CT, whose slices
are listed in the Referenced Image Sequence. Pixels: unsigned 16-bit (steps of 1/65534 of the maximum dose), dose = stored ×
Dose Grid Scaling (Gy); frames along the slice normal, Grid Frame Offset Vector relative to the
first (mm). Dose Type PHYSICAL. Dose Summation Type: every standard defined term references an
RT Plan or a treatment record (RECORD needs a Referenced Treatment Record Sequence), neither of
which exists for a radiopharmaceutical therapy, so the defined terms are extended with
``MRT_DELIVERED`` (dose delivered by one administration; dciodvfy: a warning, no error).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RTDoseStorage, generate_uid

from recon.io.dicom_common import copy_attributes, ds_text, set_monochrome16, software_version

_TYPE2_FROM_CT = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                  "AccessionNumber", "ReferringPhysicianName", "StudyID")
_OPTIONAL_FROM_CT = ("SpecificCharacterSet", "PatientWeight", "PatientSize", "StudyDescription", "IssuerOfPatientID")
_MAX_STORED = np.iinfo(np.uint16).max
DOSE_SUMMATION_TYPE = "MRT_DELIVERED"


def write_rt_dose(path: Path, dose_Gy: sitk.Image, ct_header: Dataset, ct_uids: Sequence[str], comment: str = "") -> Path:
    """Write ``dose_Gy`` (3-D, Gy, LPS) as an RT Dose file at ``path``; patient, study and frame
    of reference from ``ct_header``; ``ct_uids``: the CT's SOP Instance UIDs (referenced)."""
    direction = np.asarray(dose_Gy.GetDirection(), dtype=np.float64).reshape(3, 3)
    row, column, normal = direction[:, 0], direction[:, 1], direction[:, 2]
    if not np.allclose(np.cross(row, column), normal, atol=1e-6):
        raise ValueError("dose grid direction is not right-handed: flip the slice axis first")
    values = np.clip(sitk.GetArrayFromImage(dose_Gy).astype(np.float64), 0.0, None)
    if not np.isfinite(values).all():
        raise ValueError("dose map has non-finite values")
    scaling = max(float(values.max()), 1e-12) / (_MAX_STORED - 1)
    stored = np.rint(values / scaling).astype("<u2")

    uid = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTDoseStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    now = datetime.now()
    ds.SOPClassUID = RTDoseStorage
    ds.SOPInstanceUID = uid
    ds.InstanceCreationDate = ds.ContentDate = ds.SeriesDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = ds.SeriesTime = now.strftime("%H%M%S")
    copy_attributes(ds, ct_header, _TYPE2_FROM_CT, _OPTIONAL_FROM_CT)
    ds.StudyInstanceUID = ct_header.StudyInstanceUID
    ds.FrameOfReferenceUID = ct_header.FrameOfReferenceUID
    ds.PositionReferenceIndicator = ct_header.get("PositionReferenceIndicator") or ""
    ds.Modality = "RTDOSE"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 2001
    ds.SeriesDescription = "theraflow absorbed dose (Gy)"
    ds.OperatorsName = ""
    ds.Manufacturer = "theraflow"
    ds.SoftwareVersions = f"theraflow {software_version()}"
    ds.InstanceNumber = 1
    if comment:
        ds.ImageComments = comment[:10240]
    ds.ReferencedImageSequence = [_reference(CTImageStorage, u) for u in ct_uids]

    sx, sy, sz = dose_Gy.GetSpacing()
    ds.ImagePositionPatient = [ds_text(v) for v in dose_Gy.GetOrigin()]
    ds.ImageOrientationPatient = [ds_text(v) for v in (*row, *column)]
    ds.PixelSpacing = [ds_text(sy), ds_text(sx)]
    ds.SliceThickness = ds_text(sz)
    frames, rows, columns = stored.shape
    set_monochrome16(ds, rows, columns)
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = Tag(0x3004, 0x000C)
    ds.GridFrameOffsetVector = [ds_text(k * sz) for k in range(frames)]
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = DOSE_SUMMATION_TYPE
    ds.DoseGridScaling = ds_text(scaling)
    ds.TissueHeterogeneityCorrection = ["IMAGE"]
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _reference(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def read_rt_dose(path: str | Path) -> sitk.Image:
    """An RT Dose file as a float image in Gy (SimpleITK reads the geometry; values × Dose Grid Scaling)."""
    import pydicom

    image = sitk.ReadImage(str(path))
    scaling = float(pydicom.dcmread(path, stop_before_pixels=True).DoseGridScaling)
    out = sitk.Cast(image, sitk.sitkFloat64) * scaling
    out.CopyInformation(image)
    return out
