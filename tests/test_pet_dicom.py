"""recon.io.pet_image_dicom: a reconstructed PET volume as a PET Image Storage series that is
valid (dciodvfy), geometry-preserving (SimpleITK) and readable by the project's SUV code."""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from conftest import dciodvfy_errors
from quant import suv
from recon.io.pet_image_dicom import PetSeriesInfo, mean_count_rate_time_s, write_pet_series

GA68_HALF_LIFE_S = 67.71 * 60
ACQUISITION_START = datetime(2024, 5, 14, 10, 7, 30)
INJECTION = datetime(2024, 5, 14, 9, 2, 10)
DOSE_BQ = 152.4e6
WEIGHT_KG = 71.5
SIZE = (40, 36, 12)  # columns, rows, slices
ORIGIN = (-93.25, 41.5, -612.75)
SPACING = (2.036, 2.5, 3.27)
FLIPPED_Z = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
OBLIQUE = tuple(sitk.VersorTransform((0.2, 0.1, 0.97), 0.3).GetMatrix())
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RAW_DATA_STORAGE = "1.2.840.10008.5.1.4.1.1.66"


def _volume(direction: tuple[float, ...] | None = None, negative: bool = False) -> sitk.Image:
    """Bq/mL: a warm background, a hot sphere off-centre, a cold slice (all zero), noise."""
    rng = np.random.default_rng(7)
    z, y, x = np.mgrid[: SIZE[2], : SIZE[1], : SIZE[0]]
    values = 4000.0 + 300.0 * rng.standard_normal(z.shape)
    values[(x - 12) ** 2 + (y - 20) ** 2 + ((z - 4) * 1.6) ** 2 < 30] = 41000.0
    if not negative:
        values = np.clip(values, 0.0, None)
    else:
        values[9] -= 6000.0
    values[10] = 0.0
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.SetOrigin(ORIGIN)
    image.SetSpacing(SPACING)
    if direction is not None:
        image.SetDirection(direction)
    return image


def _info(**changes) -> PetSeriesInfo:
    info = PetSeriesInfo(
        study_instance_uid="1.2.826.0.1.3680043.8.498.1001",
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.1002",
        patient_id="IEC-01",
        patient_name="Phantom^IEC",
        patient_sex="O",
        patient_weight_kg=WEIGHT_KG,
        patient_size_m=1.74,
        study_datetime=datetime(2024, 5, 14, 8, 55, 0),
        acquisition_start=ACQUISITION_START,
        duration_s=600.0,
        radiopharmaceutical="Ga-68 PSMA-11",
        nuclide="Ga-68",
        half_life_s=GA68_HALF_LIFE_S,
        positron_fraction=0.8891,
        injected_activity_bq=DOSE_BQ,
        injection_datetime=INJECTION,
        corrections=("NORM", "ATTN", "SCAT", "RAN", "DECY"),
        randoms_method="DLYD",
        reconstruction_method="OSEM 3i7s TOF",
        attenuation_method="CT bilinear 511 keV",
        scatter_method="tail-fitted single scatter",
        manufacturer="theraflow",
        model_name="digital PET simulation",
        series_description="theraflow PET Ga-68 Bq/mL",
        source_uids=("1.2.826.0.1.3680043.8.498.2001", "1.2.826.0.1.3680043.8.498.2002"),
        source_sop_class_uids=(RAW_DATA_STORAGE, CT_IMAGE_STORAGE),
    )
    return dataclasses.replace(info, **changes)


def _read_in_written_order(paths: list[Path]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    return reader.Execute()


def _assert_same_grid_and_values(read: sitk.Image, original: sitk.Image, paths: list[Path]) -> None:
    assert read.GetSize() == original.GetSize()
    np.testing.assert_allclose(read.GetOrigin(), original.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(read.GetSpacing(), original.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(read.GetDirection(), original.GetDirection(), atol=1e-4)
    slopes = np.array([float(pydicom.dcmread(p, stop_before_pixels=True).RescaleSlope) for p in paths])
    error = np.abs(sitk.GetArrayFromImage(read).astype(np.float64) - sitk.GetArrayFromImage(original).astype(np.float64))
    assert np.all(error.max(axis=(1, 2)) <= slopes / 2 * (1 + 1e-6) + 1e-3)


@pytest.fixture
def written(tmp_path: Path) -> list[Path]:
    return write_pet_series(_volume(), tmp_path / "pet", _info())


@pytest.mark.parametrize("direction", [None, FLIPPED_Z, OBLIQUE], ids=["identity", "flipped-z", "oblique"])
def test_dciodvfy_reports_no_errors_on_every_file(tmp_path: Path, dciodvfy: str, direction) -> None:
    paths = write_pet_series(_volume(direction), tmp_path, _info())
    assert len(paths) == SIZE[2]
    for path in paths:
        assert dciodvfy_errors(dciodvfy, path) == [], path.name


def test_dciodvfy_accepts_minimal_info_and_signed_values(tmp_path: Path, dciodvfy: str) -> None:
    info = _info(patient_name="", patient_sex="", patient_weight_kg=None, patient_size_m=None, study_datetime=None,
                 injected_activity_bq=None, injection_datetime=None, radiopharmaceutical="", nuclide="F-18",
                 half_life_s=109.77 * 60, positron_fraction=0.9686, source_uids=(), source_sop_class_uids=(),
                 corrections=("NORM", "DECY"), randoms_method="NONE", attenuation_method="NONE", scatter_method="NONE",
                 manufacturer="", model_name="")
    paths = write_pet_series(_volume(negative=True), tmp_path, info)
    for path in paths:
        assert dciodvfy_errors(dciodvfy, path) == [], path.name
    assert pydicom.dcmread(paths[0], stop_before_pixels=True).PixelRepresentation == 1


def test_series_attributes(written: list[Path]) -> None:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in written]
    first = headers[0]
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.128"
    assert first.Modality == "PT"
    assert (first.Units, first.DecayCorrection, first.CountsSource) == ("BQML", "START", "EMISSION")
    assert list(first.SeriesType) == ["STATIC", "IMAGE"]
    assert list(first.CorrectedImage) == ["NORM", "ATTN", "SCAT", "RAN", "DECY"]
    assert first.RandomsCorrectionMethod == "DLYD"
    assert first.ReconstructionMethod == "OSEM 3i7s TOF"
    assert first.AttenuationCorrectionMethod == "CT bilinear 511 keV"
    assert float(first.DecayFactor) == 1.0
    assert int(first.ActualFrameDuration) == 600000
    assert float(first.FrameReferenceTime) == pytest.approx(1000 * mean_count_rate_time_s(GA68_HALF_LIFE_S, 600.0))
    assert 290e3 < float(first.FrameReferenceTime) < 300e3  # a little before mid-frame for Ga-68
    assert first.NumberOfSlices == SIZE[2]
    assert (first.SeriesDate, first.SeriesTime[:6]) == ("20240514", "100730")
    assert (first.AcquisitionDate, first.AcquisitionTime[:6]) == ("20240514", "100730")
    assert float(first.PatientWeight) == WEIGHT_KG and float(first.PatientSize) == 1.74
    assert first.StudyInstanceUID == _info().study_instance_uid
    assert first.FrameOfReferenceUID == _info().frame_of_reference_uid
    assert [item.ReferencedSOPClassUID for item in first.SourceImageSequence] == [RAW_DATA_STORAGE, CT_IMAGE_STORAGE]
    assert "OSEM 3i7s TOF" in first.ImageComments
    assert [h.ImageIndex for h in headers] == list(range(1, SIZE[2] + 1))
    assert [h.InstanceNumber for h in headers] == list(range(1, SIZE[2] + 1))
    assert len({h.SeriesInstanceUID for h in headers}) == 1
    assert len({h.SOPInstanceUID for h in headers}) == SIZE[2]
    assert all(float(h.RescaleIntercept) == 0 for h in headers)
    assert len({h.RescaleSlope for h in headers}) > 2  # per slice

    item = first.RadiopharmaceuticalInformationSequence[0]
    assert item.Radiopharmaceutical == "Ga-68 PSMA-11"
    assert float(item.RadionuclideTotalDose) == DOSE_BQ
    assert float(item.RadionuclideHalfLife) == pytest.approx(GA68_HALF_LIFE_S)
    assert float(item.RadionuclidePositronFraction) == 0.8891
    assert item.RadiopharmaceuticalStartDateTime.startswith("20240514090210")
    assert item.RadiopharmaceuticalStartTime.startswith("090210")
    nuclide = item.RadionuclideCodeSequence[0]
    assert (nuclide.CodeValue, nuclide.CodingSchemeDesignator, nuclide.CodeMeaning) == ("35337001", "SCT", "^68^Gallium")
    agent = item.RadiopharmaceuticalCodeSequence[0]
    assert (agent.CodeValue, agent.CodingSchemeDesignator) == ("C118961", "NCIt")


def test_f18_codes(tmp_path: Path) -> None:
    info = _info(nuclide="F-18", radiopharmaceutical="F-18 FDG", half_life_s=109.77 * 60, positron_fraction=0.9686)
    (first, *_) = write_pet_series(_volume(), tmp_path, info)
    item = pydicom.dcmread(first, stop_before_pixels=True).RadiopharmaceuticalInformationSequence[0]
    assert item.RadionuclideCodeSequence[0].CodeValue == "77004003"
    assert item.RadiopharmaceuticalCodeSequence[0].CodeValue == "35321007"


@pytest.mark.parametrize("direction", [None, FLIPPED_Z, OBLIQUE], ids=["identity", "flipped-z", "oblique"])
@pytest.mark.parametrize("negative", [False, True], ids=["unsigned", "signed"])
def test_simpleitk_reads_back_geometry_and_values(tmp_path: Path, direction, negative: bool) -> None:
    original = _volume(direction, negative)
    paths = write_pet_series(original, tmp_path, _info())
    _assert_same_grid_and_values(_read_in_written_order(paths), original, paths)


@pytest.mark.parametrize("direction", [None, FLIPPED_Z], ids=["identity", "flipped-z"])
def test_gdcm_sorted_series_has_the_same_voxels_in_space(tmp_path: Path, direction) -> None:
    """Sorted by GDCM (along the slice normal), a flipped series comes back right-handed with the
    slices reversed: every voxel keeps its physical position and value."""
    original = _volume(direction)
    write_pet_series(original, tmp_path, _info())
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    read = reader.Execute()
    resampled = sitk.Resample(read, original, sitk.Transform(), sitk.sitkNearestNeighbor, -1.0)
    expected = sitk.GetArrayFromImage(original)
    got = sitk.GetArrayFromImage(resampled)
    assert (got >= 0).all()  # every voxel of the original grid found in the read image
    np.testing.assert_allclose(got, expected, atol=41000.0 / 65535)


@pytest.mark.parametrize("direction", [None, FLIPPED_Z], ids=["identity", "flipped-z"])
def test_project_suv_code_reads_the_series(tmp_path: Path, direction) -> None:
    original = _volume(direction)
    write_pet_series(original, tmp_path, _info())
    series = suv.read_pet_series(tmp_path)
    scale = suv.suv_scale(series, "bw")

    elapsed_s = (ACQUISITION_START - INJECTION).total_seconds()  # 3920 s
    expected = WEIGHT_KG * 1000.0 / (DOSE_BQ * math.exp(-math.log(2.0) * elapsed_s / GA68_HALF_LIFE_S))
    assert float(scale.suv_bw_scale) == pytest.approx(expected, rel=1e-4)
    assert scale.scan_datetime == ACQUISITION_START
    assert scale.injection_datetime == INJECTION
    assert scale.dose_Bq == DOSE_BQ

    # values in the SUV reader's image are the written Bq/mL, at the same physical places
    resampled = sitk.Resample(series.image, original, sitk.Transform(), sitk.sitkNearestNeighbor, -1.0)
    np.testing.assert_allclose(sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(original), atol=41000.0 / 65535)


def test_non_ascii_patient_name_is_declared(tmp_path: Path, dciodvfy: str) -> None:
    (first, *_) = write_pet_series(_volume(), tmp_path, _info(patient_name="Müller^Jörg"))
    ds = pydicom.dcmread(first, stop_before_pixels=True)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Müller^Jörg"
    assert dciodvfy_errors(dciodvfy, first) == []


def _non_finite() -> sitk.Image:
    image = _volume()
    values = sitk.GetArrayFromImage(image)
    values[3, 4, 5] = np.nan
    bad = sitk.GetImageFromArray(values)
    bad.CopyInformation(image)
    return bad


def _infinite() -> sitk.Image:
    image = _volume()
    values = sitk.GetArrayFromImage(image)
    values[0, 0, 0] = np.inf
    bad = sitk.GetImageFromArray(values)
    bad.CopyInformation(image)
    return bad


@pytest.mark.parametrize(
    "make",
    [_non_finite, _infinite, lambda: sitk.Image(40, 36, sitk.sitkFloat32),
     lambda: sitk.Image([40, 36, 12], sitk.sitkVectorFloat32, 2)],
    ids=["nan", "inf", "2-D", "vector"],
)
def test_bad_image_raises_and_writes_nothing(tmp_path: Path, make) -> None:
    out = tmp_path / "pet"
    with pytest.raises(ValueError):
        write_pet_series(make(), out, _info())
    assert not out.exists()


@pytest.mark.parametrize(
    "changes",
    [
        {"nuclide": "Lu-177"},
        {"corrections": ("ATTN", "SCAT")},  # no DECY, yet DecayCorrection START
        {"corrections": ("ATTN", "DECY", "PVC")},
        {"duration_s": 0.0},
        {"patient_sex": "X"},
        {"source_sop_class_uids": ()},
        {"injection_datetime": datetime(2024, 5, 14, 11, 0, 0)},
        {"study_instance_uid": "not.a.uid"},
        {"series_description": "x" * 65},
    ],
    ids=["nuclide", "no-DECY", "unknown-term", "duration", "sex", "classes", "injection-after", "uid", "too-long"],
)
def test_bad_info_raises_and_writes_nothing(tmp_path: Path, changes) -> None:
    out = tmp_path / "pet"
    with pytest.raises(ValueError):
        write_pet_series(_volume(), out, _info(**changes))
    assert not out.exists()
