"""Synthetic images with known answers, for tests and demonstrations: uniform or Gaussian-blurred
spheres with analytic profiles, a small PSMA-PET-like scene (SUV) with reference organs and
lesions, and writers of PET and CT DICOM series (pydicom) from such images.

Units: SUVbw in g/mL, concentrations in Bq/mL, lengths in mm (LPS), activities in Bq, weights
in kg. No real patient data: names and IDs are fixed placeholders.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy.special import erf

PET_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
GA68_HALF_LIFE_S = 4062.6
F18_HALF_LIFE_S = 6586.2


# --------------------------------------------------------------------------- grids and profiles


def grid(size: Sequence[int], spacing: Sequence[float], origin: Sequence[float] | None = None) -> sitk.Image:
    """An empty float32 image (identity direction); centred on 0 when ``origin`` is None."""
    image = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    image.SetSpacing([float(s) for s in spacing])
    if origin is None:
        origin = [-(n - 1) * s / 2.0 for n, s in zip(size, spacing)]
    image.SetOrigin([float(o) for o in origin])
    return image


def points_mm(image: sitk.Image) -> np.ndarray:
    """Voxel-centre coordinates [z, y, x, 3] (mm, LPS) in SimpleITK array order."""
    from quant.phantom import physical_coordinates

    return physical_coordinates(image)


def image_like(values: np.ndarray, reference: sitk.Image, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
    image = sitk.Cast(sitk.GetImageFromArray(values), pixel_type)
    image.CopyInformation(reference)
    return image


def blurred_sphere_profile(r: np.ndarray, radius: float, sigma: float) -> np.ndarray:
    """A uniform sphere of value 1 and ``radius`` (mm) convolved with an isotropic Gaussian of SD
    ``sigma`` (mm), at distance ``r`` (mm) from its centre; the sphere itself when sigma = 0."""
    r = np.asarray(r, dtype=np.float64)
    if sigma <= 0:
        return (r <= radius).astype(np.float64)
    s2 = math.sqrt(2.0) * sigma
    out = 0.5 * (erf((radius - r) / s2) + erf((radius + r) / s2))
    small = r < 1e-6
    rr = np.where(small, 1.0, r)
    tail = sigma / (rr * math.sqrt(2.0 * math.pi)) * (np.exp(-((radius - rr) ** 2) / (2 * sigma**2)) - np.exp(-((radius + rr) ** 2) / (2 * sigma**2)))
    centre = erf(radius / s2) - math.sqrt(2.0 / math.pi) * (radius / sigma) * math.exp(-(radius**2) / (2 * sigma**2))
    return np.where(small, centre, out - tail)


def sphere_mean(radius: float, sigma: float, over_radius: float, centre_offset: float = 0.0, samples: int = 400) -> float:
    """Mean of :func:`blurred_sphere_profile` over a concentric sphere of ``over_radius`` (mm),
    by radial quadrature (``centre_offset`` must be 0: concentric only)."""
    if centre_offset != 0.0:
        raise ValueError("only concentric means are analytic here")
    r = (np.arange(samples) + 0.5) / samples * over_radius
    g = blurred_sphere_profile(r, radius, sigma)
    return float(3.0 * np.sum(g * r**2) * (over_radius / samples) / over_radius**3)


def radius_at_fraction(radius: float, sigma: float, fraction: float, background: float = 0.0, contrast: float = 1.0) -> float:
    """Distance (mm) where bg + contrast·profile falls to ``fraction`` of its centre value (bisection)."""
    centre = background + contrast * float(blurred_sphere_profile(np.array([0.0]), radius, sigma)[0])
    target = fraction * centre
    lo, hi = 0.0, radius + 10.0 * max(sigma, 1.0)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        value = background + contrast * float(blurred_sphere_profile(np.array([mid]), radius, sigma)[0])
        lo, hi = (mid, hi) if value > target else (lo, mid)
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------- a PSMA-like scene


@dataclass(frozen=True)
class SphereLesion:
    """A spherical lesion: centre (mm, LPS), diameter (mm), SUV above zero, Gaussian blur SD (mm),
    an optional single hot voxel (SUV) at its centre, and its site for the selection criteria."""

    centre_mm: tuple[float, float, float]
    diameter_mm: float
    suv: float
    sigma_mm: float = 0.0
    hot_voxel_suv: float | None = None
    site: str = "unknown"
    short_axis_mm: float | None = None


@dataclass
class Scene:
    """An SUV image, reference masks (uint8, same grid) by name, and the lesions put in it."""

    suv: sitk.Image
    masks: dict[str, sitk.Image]
    lesions: list[SphereLesion]
    reference_suv: dict[str, float] = field(default_factory=dict)


def psma_regions(points: np.ndarray, extent_mm: Sequence[float]) -> dict[str, np.ndarray]:
    """Boolean organ regions of :func:`psma_scene` at physical points [..., 3] (mm, LPS) of a
    scene whose box has half-extents ``extent_mm`` (mm): 'liver', 'parotid', 'blood_pool',
    'spleen'. Evaluating at moved points gives the same organs in another frame of reference."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    extent = np.asarray(extent_mm, dtype=np.float64)
    regions: dict[str, np.ndarray] = {}
    regions["liver"] = ((x + 0.45 * extent[0]) ** 2 / 30.0**2 + (y - 0.0) ** 2 / 25.0**2 + (z + 0.3 * extent[2]) ** 2 / 25.0**2) <= 1.0
    regions["parotid"] = np.zeros(x.shape, bool)
    for side in (-1.0, 1.0):
        regions["parotid"] |= ((x - side * 0.6 * extent[0]) ** 2 + y**2 + (z - 0.8 * extent[2]) ** 2) <= 12.0**2
    regions["blood_pool"] = ((x - 0.0) ** 2 + (y - 0.4 * extent[1]) ** 2 <= 8.0**2) & (np.abs(z) < 0.3 * extent[2])
    regions["spleen"] = ((x - 0.6 * extent[0]) ** 2 + (y - 0.3 * extent[1]) ** 2 + (z + 0.3 * extent[2]) ** 2) <= 14.0**2
    return regions


def half_extent_mm(image: sitk.Image) -> np.ndarray:
    """Half the box size (mm) of ``image`` along x, y, z: size × spacing / 2."""
    return np.asarray(image.GetSize()) * np.asarray(image.GetSpacing()) / 2.0


def psma_scene(lesions: Sequence[SphereLesion], size: Sequence[int] = (64, 64, 80), spacing: Sequence[float] = (4.0, 4.0, 4.0),
               background: float = 0.5, liver: tuple[float, float] = (5.0, 1.0), parotid: float = 12.0,
               blood_pool: float = 1.8, spleen: float = 4.0) -> Scene:
    """A box of ``background`` SUV with a liver (checkerboard of mean ± SD, so its SUVmean and
    sample SD are known), parotids, a blood pool (aorta-like cylinder), a spleen, and the
    ``lesions`` added on top (lesion SUV replaces the background inside uniform spheres; blurred
    spheres add ``suv`` × profile). Masks: 'liver', 'parotid', 'blood_pool', 'spleen'
    (:func:`psma_regions`)."""
    ref = grid(size, spacing)
    pts = points_mm(ref)
    values = np.full(pts.shape[:-1], background, dtype=np.float64)
    masks = psma_regions(pts, half_extent_mm(ref))
    checker = (np.indices(values.shape).sum(axis=0) % 2) * 2 - 1  # ±1
    values[masks["liver"]] = liver[0] + liver[1] * checker[masks["liver"]]
    values[masks["parotid"]] = parotid
    values[masks["blood_pool"]] = blood_pool
    values[masks["spleen"]] = spleen
    for lesion in lesions:
        r = np.linalg.norm(pts - np.asarray(lesion.centre_mm), axis=-1)
        if lesion.sigma_mm > 0:
            values += lesion.suv * blurred_sphere_profile(r, lesion.diameter_mm / 2.0, lesion.sigma_mm)
        else:
            values[r <= lesion.diameter_mm / 2.0] = lesion.suv
        if lesion.hot_voxel_suv is not None:
            values[np.unravel_index(int(np.argmin(r)), r.shape)] = lesion.hot_voxel_suv
    checker_sd = float(np.std(values[masks["liver"]], ddof=1))
    return Scene(
        suv=image_like(values.astype(np.float32), ref),
        masks={name: image_like(mask.astype(np.uint8), ref, sitk.sitkUInt8) for name, mask in masks.items()},
        lesions=list(lesions),
        reference_suv={"liver": liver[0], "liver_sd": checker_sd, "parotid": parotid, "blood_pool": blood_pool, "spleen": spleen},
    )


# --------------------------------------------------------------------------- DICOM writers


@dataclass(frozen=True)
class PetHeader:
    """What a synthetic PET series states: body weight (kg), injected activity (Bq) at
    ``injection``, scan (series) start, half-life (s), nuclide name, frame of reference."""

    weight_kg: float = 80.0
    height_m: float = 1.80
    sex: str = "M"
    dose_Bq: float = 200e6
    injection: datetime = datetime(2026, 3, 2, 9, 0, 0)
    scan: datetime = datetime(2026, 3, 2, 10, 0, 0)
    half_life_s: float = GA68_HALF_LIFE_S
    nuclide: str = "^68^Gallium"
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    study_instance_uid: str = field(default_factory=generate_uid)
    patient_name: str = "SYNTHETIC^PSMA"
    patient_id: str = "SYN-0001"


def suv_to_bqml(header: PetHeader) -> float:
    """Bq/mL per SUVbw unit: decayed dose at the scan start / body weight in g."""
    elapsed = (header.scan - header.injection).total_seconds()
    return header.dose_Bq * 0.5 ** (elapsed / header.half_life_s) / (1000.0 * header.weight_kg)


def _base(ds: Dataset, sop_class: str, modality: str, header: PetHeader, series_uid: str, k: int, image: sitk.Image) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName, ds.PatientID = header.patient_name, header.patient_id
    ds.PatientBirthDate, ds.PatientSex = "", header.sex
    ds.PatientWeight, ds.PatientSize = f"{header.weight_kg:g}", f"{header.height_m:g}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = header.study_instance_uid, series_uid
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = header.frame_of_reference_uid, ""
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = header.scan.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = header.scan.strftime("%H%M%S")
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.Manufacturer = "theraflow synthetic"
    ds.SeriesNumber, ds.InstanceNumber = 1 if modality == "PT" else 2, k + 1
    ds.BodyPartExamined = "WHOLEBODY"
    ds.PatientPosition = "FFS"
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in np.r_[direction[:, 0], direction[:, 1]]]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
    ds.SliceLocation = f"{image.TransformIndexToPhysicalPoint((0, 0, k))[2]:.4f}"
    ds.PixelSpacing = [f"{image.GetSpacing()[1]:g}", f"{image.GetSpacing()[0]:g}"]
    ds.SliceThickness = f"{image.GetSpacing()[2]:g}"
    ds.Rows, ds.Columns = image.GetSize()[1], image.GetSize()[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]


def write_pet_series(suv: sitk.Image, folder: str | Path, header: PetHeader | None = None, edit=None) -> Path:
    """Write ``suv`` (SUVbw) as a BQML, DecayCorrection START PET series (one file per slice,
    uint16 with a per-slice RescaleSlope). ``edit(ds, k)`` may change slice k before saving."""
    header = header or PetHeader()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bqml = sitk.GetArrayFromImage(suv).astype(np.float64) * suv_to_bqml(header)
    series_uid = generate_uid()
    for k in range(bqml.shape[0]):
        ds = Dataset()
        _base(ds, PET_STORAGE, "PT", header, series_uid, k, suv)
        ds.SeriesDescription = "synthetic PSMA PET"
        ds.Units, ds.DecayCorrection, ds.CountsSource, ds.SeriesType = "BQML", "START", "EMISSION", ["WHOLE BODY", "IMAGE"]
        ds.CorrectedImage = ["NORM", "ATTN", "SCAT", "DECY"]
        ds.RandomsCorrectionMethod, ds.AttenuationCorrectionMethod, ds.ReconstructionMethod = "DLYD", "CTAC", "OSEM"
        ds.DecayFactor, ds.ScatterFractionFactor, ds.DeadTimeFactor = "1", "0", "1"
        ds.ActualFrameDuration, ds.FrameReferenceTime = 120000, 0
        ds.ImageIndex, ds.NumberOfSlices = k + 1, bqml.shape[0]
        ds.AcquisitionDateTime = header.scan.strftime("%Y%m%d%H%M%S")
        item = Dataset()
        item.Radiopharmaceutical = "PSMA-11"
        item.RadionuclideTotalDose = f"{header.dose_Bq:.0f}"
        item.RadionuclideHalfLife = f"{header.half_life_s:g}"
        item.RadionuclidePositronFraction = "0.889"
        item.RadiopharmaceuticalStartDateTime = header.injection.strftime("%Y%m%d%H%M%S")
        item.RadiopharmaceuticalStartTime = header.injection.strftime("%H%M%S")
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "C-131A3", "SRT", header.nuclide
        item.RadionuclideCodeSequence = DicomSequence([code])
        ds.RadiopharmaceuticalInformationSequence = DicomSequence([item])
        ds.PatientGantryRelationshipCodeSequence = DicomSequence([_code("102540008", "SCT", "headfirst")])
        orientation = _code("102538003", "SCT", "recumbent")
        orientation.PatientOrientationModifierCodeSequence = DicomSequence([_code("40199007", "SCT", "supine")])
        ds.PatientOrientationCodeSequence = DicomSequence([orientation])
        ds.CollimatorType = "NONE"
        del ds.PatientPosition  # not with PatientOrientationCodeSequence (NM/PET Patient Orientation module)
        plane = bqml[k]
        slope = max(float(plane.max()), 1e-6) / 32767.0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", "0"
        stored = np.clip(np.round(plane / float(ds.RescaleSlope)), -32768, 32767).astype(np.int16)
        ds.SmallestImagePixelValue, ds.LargestImagePixelValue = int(stored.min()), int(stored.max())
        ds["SmallestImagePixelValue"].VR = ds["LargestImagePixelValue"].VR = "SS"
        ds.PixelData = stored.tobytes()
        if edit is not None:
            edit(ds, k)
        ds.save_as(folder / f"PT{k + 1:04d}.dcm", enforce_file_format=True)
    return folder


def write_ct_series(hu: sitk.Image, folder: str | Path, header: PetHeader | None = None, edit=None) -> Path:
    """Write ``hu`` (HU) as a CT series (int16, RescaleIntercept −1024) in ``header``'s frame of reference."""
    header = header or PetHeader()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    values = sitk.GetArrayFromImage(hu).astype(np.float64)
    series_uid = generate_uid()
    for k in range(values.shape[0]):
        ds = Dataset()
        _base(ds, CT_STORAGE, "CT", header, series_uid, k, hu)
        ds.SeriesDescription = "synthetic CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP, ds.ConvolutionKernel = "120", "STANDARD"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "1", "-1024", "HU"
        ds.AcquisitionNumber = 1
        ds.PixelData = np.clip(np.round(values[k] + 1024.0), -32768, 32767).astype(np.int16).tobytes()
        if edit is not None:
            edit(ds, k)
        ds.save_as(folder / f"CT{k + 1:04d}.dcm", enforce_file_format=True)
    return folder


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    ds = Dataset()
    ds.CodeValue, ds.CodingSchemeDesignator, ds.CodeMeaning = value, scheme, meaning
    return ds


def body_ct(reference: sitk.Image, masks: Mapping[str, sitk.Image] | None = None) -> sitk.Image:
    """A crude CT (HU) on ``reference``'s grid: a soft-tissue ellipsoid body, bone spine, lungs,
    and +60 HU in the masked organs, for display and registration tests."""
    organs = np.zeros(sitk.GetArrayViewFromImage(reference).shape, bool)
    for mask in (masks or {}).values():
        organs |= sitk.GetArrayViewFromImage(mask) != 0
    hu = body_ct_values(points_mm(reference), half_extent_mm(reference), organs)
    return image_like(hu.astype(np.float32), reference)


def body_ct_values(points: np.ndarray, extent_mm: Sequence[float], organs: np.ndarray | None = None) -> np.ndarray:
    """HU of :func:`body_ct` at physical points [..., 3] (mm, LPS) of a body whose box has
    half-extents ``extent_mm`` (mm); ``organs`` (boolean, same shape) get +60 HU."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    extent = np.asarray(extent_mm, dtype=np.float64)
    hu = np.full(x.shape, -1000.0)
    body = (x / (0.9 * extent[0])) ** 2 + (y / (0.75 * extent[1])) ** 2 <= 1.0
    hu[body] = 20.0
    lungs = body & (np.abs(np.abs(x) - 0.4 * extent[0]) < 0.25 * extent[0]) & (np.abs(y) < 0.4 * extent[1]) & (z > 0.0) & (z < 0.6 * extent[2])
    hu[lungs] = -800.0
    hu[(x**2 + (y - 0.55 * extent[1]) ** 2) < 12.0**2] = 700.0
    if organs is not None:
        hu[organs] = 60.0
    return hu


def map_points(transform: sitk.Transform, points: np.ndarray, inverse: bool = False) -> np.ndarray:
    """A rigid or affine SimpleITK ``transform`` (x → A·x + o) applied to points [..., 3] (mm),
    or its inverse (A⁻¹·(y − o)) when ``inverse``, vectorised."""
    matrix = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    offset = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)), dtype=np.float64)
    if inverse:
        return (points - offset) @ np.linalg.inv(matrix).T
    return points @ matrix.T + offset


def scene_masks(reference: sitk.Image, extent_mm: Sequence[float], body_to_frame: sitk.Transform | None = None) -> dict[str, sitk.Image]:
    """The organ masks of :func:`psma_regions` (uint8) of a scene with half-extents ``extent_mm``
    on ``reference``'s grid, in a frame of reference where the body point x (mm, the scene's own
    frame) lies at ``body_to_frame``(x): a second scan of the same patient, positioned otherwise."""
    pts = points_mm(reference)
    body = pts if body_to_frame is None else map_points(body_to_frame, pts, inverse=True)
    return {name: image_like(mask.astype(np.uint8), reference, sitk.sitkUInt8) for name, mask in psma_regions(body, extent_mm).items()}


def scene_ct(reference: sitk.Image, extent_mm: Sequence[float], body_to_frame: sitk.Transform | None = None, sub: int = 2) -> sitk.Image:
    """The CT (HU) of :func:`body_ct_values` with the :func:`psma_regions` organs on
    ``reference``'s grid (frame as in :func:`scene_masks`), each voxel the mean of ``sub``³
    sub-samples (partial volume, as a scanner integrates over a voxel)."""
    pts = points_mm(reference)
    spacing = np.asarray(reference.GetSpacing())
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    total = np.zeros(pts.shape[:-1])
    for dz in offsets:
        for dy in offsets:
            for dx in offsets:
                p = pts + np.array([dx, dy, dz]) * spacing
                body = p if body_to_frame is None else map_points(body_to_frame, p, inverse=True)
                organs = np.zeros(body.shape[:-1], bool)
                for region in psma_regions(body, extent_mm).values():
                    organs |= region
                total += body_ct_values(body, extent_mm, organs)
    return image_like((total / sub**3).astype(np.float32), reference)


def scan_after(injection: datetime, minutes: float) -> datetime:
    return injection + timedelta(minutes=minutes)


def write_segmentation(masks: Mapping[str, sitk.Image], ct_folder: str | Path, path: str | Path,
                       manufacturer: str = "synthetic segmenter") -> Path:
    """``masks`` (uint8, on the grid of the CT series in ``ct_folder``) as a BINARY DICOM SEG with one
    segment per name, referencing those CT slices, as a segmentation server leaves it in a study."""
    import highdicom as hd
    from pydicom import dcmread

    slices = sorted((dcmread(p) for p in Path(ct_folder).glob("*.dcm")), key=lambda d: float(d.ImagePositionPatient[2]))
    names = list(masks)
    stack = np.stack([sitk.GetArrayFromImage(masks[name]).astype(bool) for name in names], axis=-1)
    if stack.shape[0] != len(slices):
        raise ValueError(f"{stack.shape[0]} mask slices for {len(slices)} CT slices")
    anatomy = hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure")
    descriptions = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=name, segmented_property_category=anatomy, segmented_property_type=anatomy,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL) for number, name in enumerate(names, start=1)]
    seg = hd.seg.Segmentation(
        source_images=slices, pixel_array=stack.astype(np.uint8), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=50, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer=manufacturer, manufacturer_model_name="synthetic", software_versions="1",
        device_serial_number="0", series_description="organ segmentation")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path
