"""recon.io.nm_recon_dicom: the reconstructed volume as one NM RECON TOMO object, valid and geometry-preserving."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom import Dataset
from pydicom.uid import NuclearMedicineImageStorage, generate_uid

from recon.io.nm_recon_dicom import write_nm_recon_series

SPACING = (4.42, 4.42, 4.42)
ORIGIN = (-100.0, -80.0, -300.0)
SIZE = (40, 36, 24)  # x, y, z
HOT_BQ_ML = 50_000.0
BACKGROUND_BQ_ML = 1_234.5
HOT_SLICES = (slice(4, 9), slice(6, 12), slice(25, 31))  # z, y, x: off-centre on every axis
LU177_PHOTOPEAK_KEV = (187.2, 228.8)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _source_header(*, with_patient: bool = True) -> Dataset:
    """A Lu-177 NM TOMO projection header, as a dual-head camera writes it (no pixel data)."""
    ds = Dataset()
    ds.SOPClassUID = NuclearMedicineImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = "NM"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "TOMO", "EMISSION"]
    ds.PatientName = "Test^Patient" if with_patient else ""
    ds.PatientID = "TF-0001" if with_patient else ""
    ds.PatientBirthDate = "19580214" if with_patient else ""
    ds.PatientSex = "M" if with_patient else ""
    if with_patient:
        ds.PatientWeight = "82.5"
        ds.StudyDate = "20240611"
        ds.StudyTime = "091500"
        ds.AccessionNumber = "ACC42"
        ds.ReferringPhysicianName = "Referrer^Rita"
        ds.StudyID = "1"
        ds.AcquisitionDate = "20240611"
        ds.AcquisitionTime = "093000"
        ds.BodyPartExamined = "ABDOMEN"
        ds.ManufacturerModelName = "Symbia Intevo"
    ds.Manufacturer = "SIEMENS NM"

    drug = Dataset()
    drug.Radiopharmaceutical = "Lu-177 PSMA-617"
    drug.RadiopharmaceuticalStartTime = "080000"
    drug.RadionuclideTotalDose = "7400000000"
    drug.RadionuclideCodeSequence = [_code("C-162A7", "SRT", "^177^Lutetium")]
    ds.RadiopharmaceuticalInformationSequence = [drug]

    windows = []
    for name, (lower, upper) in (("EM", LU177_PHOTOPEAK_KEV), ("SC", (166.4, 187.2))):
        limits = Dataset()
        limits.EnergyWindowLowerLimit = str(lower)
        limits.EnergyWindowUpperLimit = str(upper)
        window = Dataset()
        window.EnergyWindowRangeSequence = [limits]
        window.EnergyWindowName = name
        windows.append(window)
    ds.EnergyWindowInformationSequence = windows
    ds.NumberOfEnergyWindows = 2

    detectors = []
    for _ in range(2):
        detector = Dataset()
        detector.CollimatorType = "PARA"
        detector.ImagePositionPatient = ["-294.6", "-294.6", "-250.0"]
        detector.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
        detectors.append(detector)
    ds.DetectorInformationSequence = detectors
    ds.NumberOfDetectors = 2

    rotation = Dataset()
    rotation.StartAngle = "0"
    rotation.AngularStep = "6"
    rotation.RotationDirection = "CW"
    rotation.ScanArc = "180"
    rotation.ActualFrameDuration = 15000
    rotation.NumberOfFramesInRotation = 30
    ds.RotationInformationSequence = [rotation]
    ds.NumberOfRotations = 1
    ds.TypeOfDetectorMotion = "STEP AND SHOOT"

    orientation = _code("F-10450", "99SDM", "recumbent")
    orientation.PatientOrientationModifierCodeSequence = [_code("F-10340", "99SDM", "supine")]
    ds.PatientOrientationCodeSequence = [orientation]
    ds.PatientGantryRelationshipCodeSequence = [_code("F-10470", "99SDM", "headfirst")]
    return ds


def _volume(direction: tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    """Float32 Bq/mL volume: uniform background and one hot off-centre cuboid."""
    array = np.full(SIZE[::-1], BACKGROUND_BQ_ML, dtype=np.float32)
    array[HOT_SLICES] = HOT_BQ_ML
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection([float(v) for v in direction])
    return image


def _hot_centre_mm(image: sitk.Image) -> np.ndarray:
    """Physical position (mm) of the centroid of the voxels above half the hot value."""
    zyx = np.argwhere(sitk.GetArrayViewFromImage(image) > HOT_BQ_ML / 2).mean(axis=0)
    return np.array(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]]))


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in result.stderr.splitlines() if line.startswith("Error")]


needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")


@pytest.fixture
def source() -> Dataset:
    return _source_header()


@pytest.fixture
def written(tmp_path: Path, source: Dataset) -> Path:
    paths = write_nm_recon_series(
        _volume(),
        tmp_path,
        source,
        series_description="SPECT OSEM Lu-177",
        image_comments="OSEM 4 it x 8 subsets; AC SC RR",
        derivation_description="OSEM reconstruction of NM TOMO projections",
        photopeak_window=LU177_PHOTOPEAK_KEV,
    )
    assert paths == [tmp_path / "NM_RECON.dcm"]
    return paths[0]


@needs_dciodvfy
def test_dciodvfy_reports_no_errors(written: Path) -> None:
    assert _dciodvfy_errors(written) == []


def test_simpleitk_reads_back_geometry_and_values(written: Path) -> None:
    original = _volume()
    read = sitk.ReadImage(str(written))
    slope = float(pydicom.dcmread(written, stop_before_pixels=True).RescaleSlope)

    assert read.GetSize() == original.GetSize()
    np.testing.assert_allclose(read.GetOrigin(), original.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(read.GetSpacing(), original.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(read.GetDirection(), original.GetDirection(), atol=1e-6)
    values = sitk.GetArrayFromImage(read).astype(np.float64)
    expected = sitk.GetArrayFromImage(original).astype(np.float64)
    assert np.abs(values - expected).max() <= slope / 2 * (1 + 1e-9)
    np.testing.assert_allclose(_hot_centre_mm(read), _hot_centre_mm(original), atol=1e-3)


def test_pydicom_reads_back_identity_and_scaling(written: Path, source: Dataset) -> None:
    ds = pydicom.dcmread(written)

    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == NuclearMedicineImageStorage
    assert ds.Modality == "NM"
    assert list(ds.ImageType) == ["DERIVED", "PRIMARY", "RECON TOMO", "EMISSION"]
    assert ds.PatientID == source.PatientID
    assert ds.PatientName == source.PatientName
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SOPInstanceUID != source.SOPInstanceUID
    assert ds.SoftwareVersions.startswith("theraflow ")
    assert ds.NumberOfFrames == SIZE[2] == ds.NumberOfSlices
    assert (ds.Rows, ds.Columns) == (SIZE[1], SIZE[0])
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ds.RadiopharmaceuticalInformationSequence[0].Radiopharmaceutical == "Lu-177 PSMA-617"
    window = ds.EnergyWindowInformationSequence[0].EnergyWindowRangeSequence[0]
    assert (float(window.EnergyWindowLowerLimit), float(window.EnergyWindowUpperLimit)) == LU177_PHOTOPEAK_KEV

    slope = float(ds.RescaleSlope)
    assert float(ds.RescaleIntercept) == 0.0
    assert ds.pixel_array.max() > 0.99 * np.iinfo(np.uint16).max
    mapping = ds.RealWorldValueMappingSequence[0]
    assert mapping.RealWorldValueSlope == pytest.approx(slope)
    assert mapping.RealWorldValueIntercept == 0.0
    units = mapping.MeasurementUnitsCodeSequence[0]
    assert (units.CodeValue, units.CodingSchemeDesignator) == ("Bq/ml", "UCUM")


@needs_dciodvfy
def test_empty_patient_fields_still_valid(tmp_path: Path) -> None:
    source = _source_header(with_patient=False)
    (path,) = write_nm_recon_series(_volume(), tmp_path, source, series_description="SPECT")

    assert _dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyID"):
        assert keyword in ds and not ds[keyword].value


@needs_dciodvfy
def test_bare_source_without_orientation_codes_still_valid(tmp_path: Path) -> None:
    (path,) = write_nm_recon_series(_volume(), tmp_path, Dataset(), series_description="SPECT")

    assert _dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.PatientOrientationCodeSequence[0].CodeMeaning == "recumbent"
    assert ds.PatientGantryRelationshipCodeSequence[0].CodeMeaning == "headfirst"


def test_right_handed_direction_with_slices_along_minus_z_round_trips(tmp_path: Path, source: Dataset) -> None:
    original = _volume(direction=(1, 0, 0, 0, -1, 0, 0, 0, -1))
    (path,) = write_nm_recon_series(original, tmp_path, source, series_description="SPECT")

    read = sitk.ReadImage(str(path))
    np.testing.assert_allclose(read.GetOrigin(), original.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(read.GetDirection(), original.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(_hot_centre_mm(read), _hot_centre_mm(original), atol=1e-3)


def test_left_handed_direction_is_refused(tmp_path: Path, source: Dataset) -> None:
    with pytest.raises(ValueError, match="right-handed"):
        write_nm_recon_series(_volume(direction=(1, 0, 0, 0, 1, 0, 0, 0, -1)), tmp_path, source, series_description="x")
    assert list(tmp_path.iterdir()) == []
