"""Write a reconstructed SPECT volume as one multi-frame DICOM NM Image Storage object (RECON TOMO).

The object is a standard NM image (SOP class 1.2.840.10008.5.1.4.1.1.20) with Image Type
``DERIVED\\PRIMARY\\RECON TOMO\\EMISSION``: one frame per slice, indexed by Slice Vector.

Pixel values: unsigned 16-bit stored values; activity concentration in Bq/mL is
``stored * RescaleSlope`` (RescaleIntercept 0), declared again in a Real World Value Mapping
item with UCUM units ``Bq/ml``.

Geometry (what GDCM, hence SimpleITK, reads back for NM multi-frame): the first item of
Detector Information Sequence carries Image Position (Patient) of the first voxel of the first
frame and Image Orientation (Patient); frames follow along the cross product row x column
direction, Spacing Between Slices (mm) apart. That only expresses right-handed directions
(determinant +1: identity, or e.g. slices along -z with rows along -y); a left-handed direction
raises ValueError (flip the slice axis with ``SimpleITK.Flip`` first).
"""

from __future__ import annotations

import copy
from datetime import datetime
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, NuclearMedicineImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

from recon.io.dicom_common import (
    HEADFIRST as _HEADFIRST,
    code_item as _code,
    copy_attributes,
    ds_text as _ds,
    patient_orientation_item as _patient_orientation,
    set_monochrome16,
    software_version as _software_version,
)

OUTPUT_NAME = "NM_RECON.dcm"
IMAGE_TYPE = ["DERIVED", "PRIMARY", "RECON TOMO", "EMISSION"]

_MAX_STORED = np.iinfo(np.uint16).max
_SLICE_VECTOR = Tag(0x0054, 0x0080)
_HANDEDNESS_TOLERANCE = 1e-6

# Copied from the source when present (empty when missing: type 2 in the NM IOD).
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "Manufacturer",
)
# Copied from the source only when present (type 3).
_OPTIONAL_COPIED = (
    "SpecificCharacterSet",
    "PatientWeight",
    "PatientSize",
    "StudyDescription",
    "InstitutionName",
    "ManufacturerModelName",
    "DeviceSerialNumber",
    "AcquisitionDate",
    "AcquisitionTime",
    "BodyPartExamined",
    "TypeOfDetectorMotion",
)
_BQ_PER_ML = ("Bq/ml", "UCUM", "Becquerels/milliliter")
_SOURCE_IMAGE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")


def write_nm_recon_series(
    image: sitk.Image,
    out_dir: Path,
    source: Dataset,
    *,
    series_description: str,
    series_number: int = 1001,
    image_comments: str = "",
    derivation_description: str = "",
    photopeak_window: tuple[float, float] | None = None,
) -> list[Path]:
    """Write ``image`` as ``out_dir / "NM_RECON.dcm"`` and return ``[that path]``.

    ``image``: 3-D activity concentration in Bq/mL (any real pixel type; negative values are
    clipped to 0), LPS geometry with origin and spacing in mm and a right-handed direction.
    ``source``: header of the NM projection file reconstructed; patient, study, frame of
    reference, equipment, acquisition timing, radiopharmaceutical, patient orientation and
    rotation information are copied from it, and its SOP instance is referenced as source image.
    ``photopeak_window``: (lower, upper) energy window limits in keV, recorded as the one
    energy window of the reconstruction; None leaves the window unspecified.
    Raises ValueError for an image that is not 3-D scalar, has non-finite values or has a
    left-handed direction; nothing is written then.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("expected a 3-D scalar image")
    values = np.clip(sitk.GetArrayFromImage(image).astype(np.float64), 0.0, None)
    if not np.isfinite(values).all():
        raise ValueError("image has non-finite values")
    slope = _rescale_slope(float(values.max()))
    stored = np.rint(values / slope).clip(0, _MAX_STORED).astype("<u2")

    ds = Dataset()
    _set_identity(ds, source)
    _set_series(ds, series_description, series_number)
    _set_image(ds, source, image_comments, derivation_description)
    _set_geometry(ds, image)
    _set_nm_modules(ds, source, photopeak_window)
    _set_pixels(ds, stored, slope)

    path = Path(out_dir) / OUTPUT_NAME
    ds.save_as(path, enforce_file_format=True)
    return [path]


def _rescale_slope(maximum: float) -> float:
    """Bq/mL per stored unit, as written in the DS (so stored values are quantised with it)."""
    if not maximum > 0.0:
        return 1.0
    return float(format_number_as_ds(maximum / _MAX_STORED))


def _copied_sequence(source: Dataset, keyword: str) -> Sequence:
    """A deep copy of a source sequence, empty when the source has none."""
    return Sequence(copy.deepcopy(list(source.get(keyword) or [])))


def _set_identity(ds: Dataset, source: Dataset) -> None:
    """File meta, SOP common, patient, study, frame of reference and equipment attributes."""
    sop_instance_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = NuclearMedicineImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta

    now = datetime.now()
    ds.SOPClassUID = NuclearMedicineImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = ds.ContentDate = ds.SeriesDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = ds.SeriesTime = now.strftime("%H%M%S.%f")

    copy_attributes(ds, source, _TYPE2_COPIED, _OPTIONAL_COPIED)
    ds.StudyInstanceUID = source.get("StudyInstanceUID") or generate_uid()
    ds.FrameOfReferenceUID = source.get("FrameOfReferenceUID") or generate_uid()
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator") or ""
    ds.SoftwareVersions = f"theraflow {_software_version()}"


def _set_series(ds: Dataset, series_description: str, series_number: int) -> None:
    """General series attributes (after ``_set_identity``, which copies BodyPartExamined)."""
    ds.Modality = "NM"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    if "BodyPartExamined" not in ds:
        ds.Laterality = ""  # body part unknown: Laterality (type 2C) present, empty


def _set_image(ds: Dataset, source: Dataset, image_comments: str, derivation_description: str) -> None:
    """General image attributes, with the source projections referenced when identifiable."""
    ds.ImageType = IMAGE_TYPE
    ds.InstanceNumber = 1
    ds.LossyImageCompression = "00"
    if image_comments:
        ds.ImageComments = image_comments
    if derivation_description:
        ds.DerivationDescription = derivation_description
    if source.get("SOPClassUID") and source.get("SOPInstanceUID"):
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        reference.PurposeOfReferenceCodeSequence = [_code(*_SOURCE_IMAGE_PURPOSE)]
        ds.SourceImageSequence = [reference]


def _set_geometry(ds: Dataset, image: sitk.Image) -> None:
    """Pixel spacing, slice spacing/thickness and the detector item holding position and orientation (mm)."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    row, column, normal = direction[:, 0], direction[:, 1], direction[:, 2]
    if not np.allclose(np.cross(row, column), normal, atol=_HANDEDNESS_TOLERANCE):
        raise ValueError(
            "image direction is not right-handed (slice axis != row x column); "
            "NM objects cannot store it: flip the slice axis first"
        )
    spacing_x, spacing_y, spacing_z = image.GetSpacing()
    ds.PixelSpacing = [_ds(spacing_y), _ds(spacing_x)]
    ds.SpacingBetweenSlices = _ds(spacing_z)
    ds.SliceThickness = _ds(spacing_z)

    detector = Dataset()
    detector.ImagePositionPatient = [_ds(v) for v in image.GetOrigin()]
    detector.ImageOrientationPatient = [_ds(v) for v in (*row, *column)]
    ds.DetectorInformationSequence = [detector]


def _set_nm_modules(ds: Dataset, source: Dataset, photopeak_window: tuple[float, float] | None) -> None:
    """NM/PET patient orientation, isotope, detector and TOMO acquisition attributes."""
    ds.PatientOrientationCodeSequence = _copied_sequence(source, "PatientOrientationCodeSequence") or [
        _patient_orientation()
    ]
    ds.PatientGantryRelationshipCodeSequence = _copied_sequence(source, "PatientGantryRelationshipCodeSequence") or [
        _code(*_HEADFIRST)
    ]
    ds.RadiopharmaceuticalInformationSequence = _copied_sequence(source, "RadiopharmaceuticalInformationSequence")
    ds.EnergyWindowInformationSequence = [_energy_window(photopeak_window)]
    ds.NumberOfEnergyWindows = 1
    ds.NumberOfDetectors = 1
    ds.RotationInformationSequence = _copied_sequence(source, "RotationInformationSequence")
    ds.NumberOfRotations = len(ds.RotationInformationSequence) or 1
    ds.CountsAccumulated = ""

    detector = ds.DetectorInformationSequence[0]
    source_detectors = source.get("DetectorInformationSequence") or [Dataset()]
    detector.CollimatorType = source_detectors[0].get("CollimatorType") or ""
    for keyword in ("FocalDistance", "XFocusCenter", "YFocusCenter", "ZoomFactor"):
        setattr(detector, keyword, "")


def _energy_window(photopeak_window: tuple[float, float] | None) -> Dataset:
    """One energy window item: the photopeak range in keV when known."""
    item = Dataset()
    if photopeak_window is not None:
        lower, upper = photopeak_window
        limits = Dataset()
        limits.EnergyWindowLowerLimit = _ds(lower)
        limits.EnergyWindowUpperLimit = _ds(upper)
        item.EnergyWindowRangeSequence = [limits]
        item.EnergyWindowName = "PHOTOPEAK"
    return item


def _set_pixels(ds: Dataset, stored: np.ndarray, slope: float) -> None:
    """Image pixel, multi-frame and rescale attributes for ``stored`` (frames, rows, columns)."""
    frames, rows, columns = stored.shape
    set_monochrome16(ds, rows, columns)
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = _SLICE_VECTOR
    ds.SliceVector = list(range(1, frames + 1))
    ds.NumberOfSlices = frames
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = _ds(slope)
    ds.RealWorldValueMappingSequence = [_real_world_value_mapping(slope)]
    ds.PixelData = stored.tobytes()


def _real_world_value_mapping(slope: float) -> Dataset:
    """Stored values 0..65535 to Bq/mL with ``slope`` (Bq/mL per stored unit) and intercept 0."""
    item = Dataset()
    item.add_new(0x00409216, "US", 0)  # RealWorldValueFirstValueMapped
    item.add_new(0x00409211, "US", _MAX_STORED)  # RealWorldValueLastValueMapped
    item.RealWorldValueIntercept = 0.0
    item.RealWorldValueSlope = slope
    item.LUTExplanation = "Bq/mL"
    item.LUTLabel = "BQML"
    item.MeasurementUnitsCodeSequence = [_code(*_BQ_PER_ML)]
    return item
