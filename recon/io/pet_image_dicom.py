"""Write a reconstructed PET volume as a PET Image Storage series (one single-frame file per slice).

SOP class 1.2.840.10008.5.1.4.1.1.128, Image Type ``ORIGINAL\\PRIMARY`` (reconstructed from the
scanner's raw data), Series Type ``STATIC\\IMAGE``, Counts Source ``EMISSION``.

Pixel values: 16-bit stored values with a RescaleSlope per slice and RescaleIntercept 0; unsigned
(0..65535) when the volume has no negative value, signed (-32767..32767) otherwise. Modality
values (stored x slope) are the activity concentration in Bq/mL (Units ``BQML``) at the start of
the acquisition: DecayCorrection ``START`` (series reference time = SeriesDate/SeriesTime =
AcquisitionDate/AcquisitionTime = ``info.acquisition_start``), DecayFactor 1. FrameReferenceTime
is the time of the mean count rate within the frame (ms after the start), so the QIBA
back-computation (start - FrameReferenceTime + mean-count-rate time) also lands on the start.

Geometry: slice k of the SimpleITK image (array index k) is file k+1 (InstanceNumber and
ImageIndex k+1); ImagePositionPatient is the LPS position (mm) of its first voxel,
ImageOrientationPatient the first two direction columns. Any direction SimpleITK allows works:
with a left-handed one (slices along -(row x column)) readers that sort slices along the normal
get the same voxels in the opposite slice order.

The radionuclide code comes from DICOM CID 4020 and the radiopharmaceutical code, when the agent
is recognised, from CID 4021, both as pydicom's code dictionary gives them (``pydicom.sr.codedict``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, PositronEmissionTomographyImageStorage, generate_uid

from recon.io.dicom_common import (
    HEADFIRST,
    code_item,
    ds_text,
    patient_orientation_item,
    set_monochrome16,
    software_version,
)

FILE_PATTERN = "PET_{:04d}.dcm"

# CID 4020 (PET Radionuclide), SNOMED CT codes as pydicom's code dictionary gives them.
RADIONUCLIDE_CODES = {
    "Ga-68": codes.cid4020._68Gallium,  # SCT 35337001 ^68^Gallium
    "F-18": codes.cid4020._18Fluorine,  # SCT 77004003 ^18^Fluorine
}
# CID 4021 (PET Radiopharmaceutical): (nuclide, pattern on the agent name, code); first match wins.
_RADIOPHARMACEUTICAL_CODES = (
    ("Ga-68", r"PSMA-?11\b|GOZETOTIDE|HBED-CC", codes.cid4021.PSMA11Ga68),  # NCIt C118961
    ("F-18", r"PSMA-?1007\b", codes.cid4021.PSMA1007F18),  # DCM 126758
    ("F-18", r"\bFDG\b|FLUORODEOXYGLUCOSE", codes.cid4021.FluorodeoxyglucoseF18),  # SCT 35321007
)
# CorrectedImage (0028,0051) defined terms of the PET Series module.
CORRECTED_IMAGE_TERMS = frozenset({"DECY", "ATTN", "SCAT", "DTIM", "MOTN", "PMOT", "CLN", "RAN", "RADL", "DCAL", "NORM"})
_SOURCE_IMAGE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")
_MAX_UNSIGNED = np.iinfo(np.uint16).max
_MAX_SIGNED = np.iinfo(np.int16).max
_LO_MAX = 64
_CS = re.compile(r"[A-Z0-9_ ]{1,16}")
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


@dataclass(frozen=True)
class PetSeriesInfo:
    """What the writer needs besides the image. Times are naive local datetimes as in DICOM.

    ``source_uids`` are SOP Instance UIDs of the inputs (e.g. list-mode, CT) and
    ``source_sop_class_uids`` their SOP Class UIDs, one per UID (a reference needs both; Raw Data
    Storage 1.2.840.10008.5.1.4.1.1.66 for list-mode, CT Image Storage 1.2.840.10008.5.1.4.1.1.2
    for CT). They are listed in the Source Image Sequence."""

    study_instance_uid: str
    frame_of_reference_uid: str
    patient_id: str
    patient_name: str
    patient_sex: str  # 'M', 'F', 'O' or ''
    patient_weight_kg: float | None
    patient_size_m: float | None
    study_datetime: datetime | None
    acquisition_start: datetime  # DecayCorrection START reference; AcquisitionDate/Time, SeriesDate/Time
    duration_s: float  # ActualFrameDuration (ms in DICOM)
    radiopharmaceutical: str  # e.g. 'Ga-68 PSMA-11'
    nuclide: str  # 'Ga-68' or 'F-18' (code from DICOM CID 4020, half-life and positron fraction)
    half_life_s: float
    positron_fraction: float
    injected_activity_bq: float | None
    injection_datetime: datetime | None
    corrections: tuple[str, ...]  # CorrectedImage defined terms, e.g. ('NORM','ATTN','SCAT','RAN','DECY')
    randoms_method: str  # RandomsCorrectionMethod: 'DLYD', 'SING' or 'NONE'
    reconstruction_method: str  # e.g. 'OSEM 3i7s TOF'
    attenuation_method: str  # AttenuationCorrectionMethod text, e.g. 'CT bilinear 511 keV' or 'NONE'
    scatter_method: str  # ScatterCorrectionMethod text
    manufacturer: str
    model_name: str
    series_description: str
    source_uids: tuple[str, ...] = ()  # SOP Instance UIDs of the inputs, referenced (e.g. list-mode, CT)
    series_number: int = 1002
    source_sop_class_uids: tuple[str, ...] = ()  # SOP Class UID of each source_uids entry


def write_pet_series(image: sitk.Image, out_dir: Path, info: PetSeriesInfo) -> list[Path]:
    """Write image (3-D, Bq/mL at acquisition start, LPS, mm, any direction SimpleITK allows) as a
    PET Image Storage series (one file per slice, 1.2.840.10008.5.1.4.1.1.128) into out_dir; return the paths.

    ``out_dir`` is created when missing; the files are ``PET_0001.dcm``... in slice order (array
    index 0 first). Raises ValueError, writing nothing, for an image that is not 3-D scalar or has
    non-finite values, and for ``info`` values DICOM cannot carry or that contradict each other.
    """
    values = _checked_values(image)
    _check_info(info)
    signed = bool((values < 0.0).any())
    max_stored = _MAX_SIGNED if signed else _MAX_UNSIGNED
    slopes = [_rescale_slope(float(np.abs(plane).max()), max_stored) for plane in values]

    template = _series_template(image, info, signed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for k, (plane, slope) in enumerate(zip(values, slopes)):
            ds = _slice_dataset(template, image, k, plane, slope, signed, max_stored)
            path = out_dir / FILE_PATTERN.format(k + 1)
            ds.save_as(path, enforce_file_format=True)
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


# --------------------------------------------------------------------------- checks


def _checked_values(image: sitk.Image) -> np.ndarray:
    """The voxel values as float64 (slices, rows, columns); ValueError unless 3-D scalar and finite."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"expected a 3-D scalar image, got {image.GetDimension()}-D with {image.GetNumberOfComponentsPerPixel()} component(s)")
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("image has non-finite values (NaN or infinity)")
    return values


def _check_info(info: PetSeriesInfo) -> None:
    """ValueError for what DICOM cannot carry or what contradicts the series' declarations."""
    if info.nuclide not in RADIONUCLIDE_CODES:
        raise ValueError(f"nuclide {info.nuclide!r}: expected one of {sorted(RADIONUCLIDE_CODES)}")
    for name in ("duration_s", "half_life_s"):
        if not getattr(info, name) > 0.0:
            raise ValueError(f"{name} must be positive, got {getattr(info, name)!r}")
    if not 0.0 < info.positron_fraction <= 1.0:
        raise ValueError(f"positron_fraction must be in (0, 1], got {info.positron_fraction!r}")
    for name in ("patient_weight_kg", "patient_size_m", "injected_activity_bq"):
        value = getattr(info, name)
        if value is not None and not (math.isfinite(value) and value > 0.0):
            raise ValueError(f"{name} must be positive or None, got {value!r}")
    if info.patient_sex not in ("M", "F", "O", ""):
        raise ValueError(f"patient_sex must be 'M', 'F', 'O' or '', got {info.patient_sex!r}")
    unknown = sorted(set(info.corrections) - CORRECTED_IMAGE_TERMS)
    if unknown:
        raise ValueError(f"corrections {unknown} are not CorrectedImage defined terms {sorted(CORRECTED_IMAGE_TERMS)}")
    if "DECY" not in info.corrections:
        raise ValueError("corrections lack 'DECY': the series declares DecayCorrection START (values at acquisition start)")
    if not _CS.fullmatch(info.randoms_method):
        raise ValueError(f"randoms_method {info.randoms_method!r} is not a DICOM code string (e.g. 'DLYD', 'SING', 'NONE')")
    for name in ("radiopharmaceutical", "reconstruction_method", "attenuation_method", "scatter_method",
                 "manufacturer", "model_name", "series_description", "patient_id"):
        value = getattr(info, name)
        if len(value) > _LO_MAX or "\\" in value:
            raise ValueError(f"{name} {value!r}: at most {_LO_MAX} characters, no backslash")
    uids = {"study_instance_uid": (info.study_instance_uid,), "frame_of_reference_uid": (info.frame_of_reference_uid,),
            "source_uids": info.source_uids, "source_sop_class_uids": info.source_sop_class_uids}
    for name, values in uids.items():
        for uid in values:
            if len(uid) > 64 or not _UID.fullmatch(uid):
                raise ValueError(f"{name}: {uid!r} is not a DICOM UID")
    if len(info.source_sop_class_uids) != len(info.source_uids):
        raise ValueError(
            f"{len(info.source_uids)} source_uids but {len(info.source_sop_class_uids)} source_sop_class_uids: "
            "a reference needs the SOP class of each source (e.g. Raw Data Storage 1.2.840.10008.5.1.4.1.1.66 "
            "for list-mode, CT Image Storage 1.2.840.10008.5.1.4.1.1.2)"
        )
    if info.injection_datetime is not None and info.injection_datetime > info.acquisition_start:
        raise ValueError(f"injection {info.injection_datetime.isoformat()} is after the acquisition start {info.acquisition_start.isoformat()}")
    if not 1 <= info.series_number <= 2**31 - 1:
        raise ValueError(f"series_number must be a positive IS, got {info.series_number!r}")


def _rescale_slope(maximum: float, max_stored: int) -> float:
    """Bq/mL per stored unit for a slice whose largest |value| is ``maximum``, as written in the
    DS (so stored values are quantised with exactly that number); 1 for an all-zero slice."""
    if not maximum > 0.0:
        return 1.0
    slope = float(ds_text(maximum / max_stored))
    if np.rint(maximum / slope) > max_stored:  # DS rounding went down
        slope = float(ds_text(maximum / (max_stored - 1)))
    return slope


# --------------------------------------------------------------------------- series-level attributes


def _series_template(image: sitk.Image, info: PetSeriesInfo, signed: bool) -> Dataset:
    """Every attribute shared by the slices of the series (one instance per slice is derived from it)."""
    ds = Dataset()
    if any(not text.isascii() for text in (info.patient_name, info.patient_id, info.radiopharmaceutical,
                                           info.manufacturer, info.model_name, info.series_description)):
        ds.SpecificCharacterSet = "ISO_IR 192"
    _set_patient_study(ds, info)
    _set_series(ds, info, image.GetSize()[2])
    _set_isotope(ds, info)
    _set_equipment_and_frame(ds, info)
    _set_image_common(ds, info, image, signed)
    return ds


def _dicom_date(when: datetime | None) -> str:
    return when.strftime("%Y%m%d") if when else ""


def _dicom_time(when: datetime | None) -> str:
    return when.strftime("%H%M%S.%f") if when else ""


def _set_patient_study(ds: Dataset, info: PetSeriesInfo) -> None:
    """Patient, General Study and Patient Study modules."""
    ds.PatientName = info.patient_name
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = info.patient_sex
    if info.patient_size_m is not None:
        ds.PatientSize = ds_text(info.patient_size_m)
    if info.patient_weight_kg is not None:
        ds.PatientWeight = ds_text(info.patient_weight_kg)
    ds.StudyInstanceUID = info.study_instance_uid
    ds.StudyDate = _dicom_date(info.study_datetime)
    ds.StudyTime = _dicom_time(info.study_datetime)
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""


def _set_series(ds: Dataset, info: PetSeriesInfo, slices: int) -> None:
    """General Series and PET Series modules (SeriesDate/Time = the DecayCorrection START reference)."""
    ds.Modality = "PT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = info.series_number
    ds.SeriesDescription = info.series_description
    ds.SeriesDate = _dicom_date(info.acquisition_start)
    ds.SeriesTime = _dicom_time(info.acquisition_start)
    ds.Laterality = ""  # type 2C: body part unknown, present and empty
    ds.Units = "BQML"
    ds.CountsSource = "EMISSION"
    ds.SeriesType = ["STATIC", "IMAGE"]
    ds.NumberOfSlices = slices
    ds.CorrectedImage = list(info.corrections)
    ds.DecayCorrection = "START"
    ds.CollimatorType = "NONE"  # 3-D acquisition, no septa
    ds.RandomsCorrectionMethod = info.randoms_method
    if info.attenuation_method:
        ds.AttenuationCorrectionMethod = info.attenuation_method
    if info.scatter_method:
        ds.ScatterCorrectionMethod = info.scatter_method
    if info.reconstruction_method:
        ds.ReconstructionMethod = info.reconstruction_method


def _set_isotope(ds: Dataset, info: PetSeriesInfo) -> None:
    """PET Isotope module: one Radiopharmaceutical Information item (dose in Bq, half-life in s)."""
    item = Dataset()
    if info.radiopharmaceutical:
        item.Radiopharmaceutical = info.radiopharmaceutical
    if info.injection_datetime is not None:
        item.RadiopharmaceuticalStartTime = _dicom_time(info.injection_datetime)
        item.RadiopharmaceuticalStartDateTime = info.injection_datetime.strftime("%Y%m%d%H%M%S.%f")
    if info.injected_activity_bq is not None:
        item.RadionuclideTotalDose = ds_text(info.injected_activity_bq)
    item.RadionuclideHalfLife = ds_text(info.half_life_s)
    item.RadionuclidePositronFraction = ds_text(info.positron_fraction)
    nuclide = RADIONUCLIDE_CODES[info.nuclide]
    item.RadionuclideCodeSequence = [code_item(nuclide.value, nuclide.scheme_designator, nuclide.meaning)]
    agent = radiopharmaceutical_code(info.nuclide, info.radiopharmaceutical)
    if agent is not None:
        item.RadiopharmaceuticalCodeSequence = [code_item(*agent)]
    ds.RadiopharmaceuticalInformationSequence = [item]
    ds.PatientOrientationCodeSequence = [patient_orientation_item()]
    ds.PatientGantryRelationshipCodeSequence = [code_item(*HEADFIRST)]


def radiopharmaceutical_code(nuclide: str, radiopharmaceutical: str) -> tuple[str, str, str] | None:
    """(value, scheme, meaning) of the CID 4021 code for a recognised agent of ``nuclide``, else None."""
    text = radiopharmaceutical.upper()
    for code_nuclide, pattern, code in _RADIOPHARMACEUTICAL_CODES:
        if code_nuclide == nuclide and re.search(pattern, text):
            return code.value, code.scheme_designator, code.meaning
    return None


def _set_equipment_and_frame(ds: Dataset, info: PetSeriesInfo) -> None:
    """General Equipment and Frame of Reference modules."""
    ds.Manufacturer = info.manufacturer
    if info.model_name:
        ds.ManufacturerModelName = info.model_name
    ds.SoftwareVersions = f"theraflow {software_version()}"
    ds.FrameOfReferenceUID = info.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""


def mean_count_rate_time_s(half_life_s: float, duration_s: float) -> float:
    """Time after the frame start at which the decaying count rate equals its mean over the frame."""
    x = math.log(2.0) / half_life_s * duration_s
    if x < 1e-9:
        return duration_s / 2.0
    return math.log(x / -math.expm1(-x)) / (math.log(2.0) / half_life_s)


def image_comments(info: PetSeriesInfo) -> str:
    """One line summarising the reconstruction (Image Comments)."""
    return (
        f"theraflow {software_version()} {info.reconstruction_method or 'reconstruction'} from list-mode; "
        f"corrections {'/'.join(info.corrections)}; attenuation {info.attenuation_method or 'unspecified'}; "
        f"scatter {info.scatter_method or 'unspecified'}; randoms {info.randoms_method}; "
        f"Bq/mL decay-corrected to acquisition start, frame {info.duration_s:g} s"
    )


def _set_image_common(ds: Dataset, info: PetSeriesInfo, image: sitk.Image, signed: bool) -> None:
    """General Image, PET Image, Image Plane (in-plane part) and Image Pixel attributes shared by the slices."""
    now = datetime.now()
    ds.InstanceCreationDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = now.strftime("%H%M%S.%f")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.AcquisitionDate = _dicom_date(info.acquisition_start)
    ds.AcquisitionTime = _dicom_time(info.acquisition_start)
    ds.ActualFrameDuration = int(round(info.duration_s * 1000.0))
    ds.FrameReferenceTime = ds_text(1000.0 * mean_count_rate_time_s(info.half_life_s, info.duration_s))
    ds.DecayFactor = "1"
    ds.LossyImageCompression = "00"
    ds.ImageComments = image_comments(info)
    if info.source_uids:
        ds.SourceImageSequence = [_reference(cls, uid) for cls, uid in zip(info.source_sop_class_uids, info.source_uids)]

    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing_x, spacing_y, spacing_z = image.GetSpacing()
    ds.ImageOrientationPatient = [ds_text(v) for v in (*direction[:, 0], *direction[:, 1])]
    ds.PixelSpacing = [ds_text(spacing_y), ds_text(spacing_x)]
    ds.SliceThickness = ds_text(spacing_z)

    columns, rows, _ = image.GetSize()
    set_monochrome16(ds, rows, columns, signed)
    ds.RescaleIntercept = "0"


def _reference(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    item.PurposeOfReferenceCodeSequence = [code_item(*_SOURCE_IMAGE_PURPOSE)]
    return item


# --------------------------------------------------------------------------- one slice


def _slice_dataset(template: Dataset, image: sitk.Image, k: int, plane: np.ndarray, slope: float,
                   signed: bool, max_stored: int) -> Dataset:
    """The instance for slice ``k``: the template plus identity, position and pixels."""
    ds = Dataset()
    ds.update(template)  # shallow: shared sequences are not modified per slice
    sop_instance_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = PositronEmissionTomographyImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID = PositronEmissionTomographyImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceNumber = k + 1
    ds.ImageIndex = k + 1

    position = np.asarray(image.TransformIndexToPhysicalPoint((0, 0, k)), dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    normal = np.cross(direction[:, 0], direction[:, 1])
    ds.ImagePositionPatient = [ds_text(v) for v in position]
    ds.SliceLocation = ds_text(float(np.dot(normal, position)))

    low = -max_stored if signed else 0
    stored = np.rint(plane / slope).clip(low, max_stored).astype("<i2" if signed else "<u2")
    ds.RescaleSlope = ds_text(slope)
    ds.PixelData = stored.tobytes()
    return ds
