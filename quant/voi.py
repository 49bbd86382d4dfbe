"""Lesion volumes of interest on SUV images, reference regions, and per-lesion uptake figures.

Units: SUV images in g/mL (SUVbw; any SUV kind works, ratios are unit-free); volumes in mL;
lengths and positions in mm (LPS); total lesion uptake (TLU = SUVmean × volume) in SUV·mL
(g for SUVbw). All images are SimpleITK images on one grid (the PET's); label images are
uint16, 0 = background, lesions 1..N numbered by decreasing SUVmax.

Lesion VOIs (:func:`segment_lesions`):

- ``fixed``: voxels with SUV ≥ a fixed threshold, split into connected components.
- ``percent_max``: candidates are the connected components above a seed threshold, split into
  local regions, one per uptake maximum (watershed with a minimum depth); each local region's
  VOI is the connected region, grown from its hottest voxel, of voxels ≥ 41 % (the configured
  fraction) of that hottest value, within the local region and the voxels outside every
  candidate up to a margin (so neighbouring lesions are not merged; hotter lesions claim
  voxels first).
- ``percist``: voxels with SUV ≥ 1.5 × liver SUVmean + 2 × liver SD (PERCIST 1.0 threshold,
  factors configurable), split into connected components.

SUVpeak: the largest mean of SUV in a sphere of 1 mL (radius 6.20 mm) whose centre lies in a
voxel of the lesion VOI; voxels enter the sphere mean weighted by the fraction of their volume
inside the sphere (5³ sub-samples per voxel), so the sphere holds 1 mL whatever the grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from scipy import ndimage

from recon.errors import InputError

METHODS = ("fixed", "percent_max", "percist")
REFERENCE_NAMES = ("liver", "parotid", "blood_pool", "spleen")
ALIASES = {
    "liver": "liver",
    "parotid": "parotid",
    "parotids": "parotid",
    "parotid_glands": "parotid",
    "parotid_gland": "parotid",
    "blood_pool": "blood_pool",
    "bloodpool": "blood_pool",
    "blood": "blood_pool",
    "aorta": "blood_pool",
    "mediastinal_blood_pool": "blood_pool",
    "spleen": "spleen",
}
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass(frozen=True)
class VoiSettings:
    """Segmentation and measurement settings (configuration, not code).

    ``method``: one of :data:`METHODS`. ``fixed_threshold``: SUV for 'fixed' (and the seed
    threshold of 'percent_max' when no liver is given). ``percent_of_max``: fraction of the
    lesion's SUVmax (0.41). ``seed_threshold``: SUV above which 'percent_max' looks for
    candidates (None: the PERCIST liver threshold when a liver is given, else
    ``fixed_threshold``). ``margin_mm``: how far a 41 % VOI may reach beyond its candidate.
    ``percist_liver_factor`` × liver SUVmean + ``percist_sd_factor`` × liver SD is the PERCIST
    threshold. ``min_volume_mL``: smaller components are dropped. ``fully_connected``: 26-
    (True) or 6-connectivity (False). ``peak_volume_mL``: SUVpeak sphere volume.
    ``ratio_statistic``: lesion statistic ('suv_max', 'suv_peak' or 'suv_mean') divided by the
    reference SUVmean in the lesion-to-reference ratios.
    """

    method: str = "percist"
    fixed_threshold: float = 3.0
    percent_of_max: float = 0.41
    seed_threshold: float | None = None
    margin_mm: float = 10.0
    split_level: float | None = 2.0
    percist_liver_factor: float = 1.5
    percist_sd_factor: float = 2.0
    min_volume_mL: float = 0.0
    fully_connected: bool = True
    peak_volume_mL: float = 1.0
    ratio_statistic: str = "suv_max"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"VOI method {self.method!r}: one of {METHODS}")
        if not 0.0 < self.percent_of_max < 1.0:
            raise ValueError("percent_of_max is a fraction in (0, 1)")
        if self.ratio_statistic not in ("suv_max", "suv_peak", "suv_mean"):
            raise ValueError(f"ratio_statistic {self.ratio_statistic!r}: suv_max, suv_peak or suv_mean")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> VoiSettings:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown VOI settings: {sorted(unknown)}")
        return cls(**values)


# --------------------------------------------------------------------------- reference regions


@dataclass(frozen=True)
class RegionStats:
    """SUV statistics of a reference region: mean, sample SD, max, median (image units), volume [mL]."""

    name: str
    suv_mean: float
    suv_sd: float
    suv_max: float
    suv_median: float
    volume_mL: float
    voxels: int


def canonical_name(name: str) -> str:
    """Reference-region name in canonical form ('Parotids' → 'parotid'); others lower-cased."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    return ALIASES.get(key, key)


def voxel_volume_mL(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing())) / 1000.0


def region_stats(suv: sitk.Image, mask: sitk.Image, name: str) -> RegionStats:
    """Statistics of ``suv`` inside the non-zero voxels of ``mask`` (same grid)."""
    _check_same_grid(suv, mask, name)
    inside = sitk.GetArrayViewFromImage(mask) != 0
    if not inside.any():
        raise InputError(None, f"reference region {name!r} is empty")
    values = sitk.GetArrayViewFromImage(suv)[inside].astype(np.float64)
    sd = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return RegionStats(name, float(values.mean()), sd, float(values.max()), float(np.median(values)),
                       values.size * voxel_volume_mL(suv), int(values.size))


def reference_stats(suv: sitk.Image, masks: Mapping[str, sitk.Image]) -> dict[str, RegionStats]:
    """Statistics of every reference region among ``masks`` (names canonicalised; masks with
    other names, e.g. kidneys or bladder, are not reference regions and are skipped)."""
    out = {}
    for name, mask in masks.items():
        canonical = canonical_name(name)
        if canonical in REFERENCE_NAMES:
            out[canonical] = region_stats(suv, mask, canonical)
    return out


def percist_threshold(liver: RegionStats, settings: VoiSettings | None = None) -> float:
    """PERCIST threshold [SUV]: 1.5 × liver SUVmean + 2 × liver SD (factors from ``settings``)."""
    settings = settings or VoiSettings()
    return settings.percist_liver_factor * liver.suv_mean + settings.percist_sd_factor * liver.suv_sd


def _check_same_grid(image: sitk.Image, other: sitk.Image, what: str) -> None:
    same = (
        image.GetSize() == other.GetSize()
        and np.allclose(image.GetSpacing(), other.GetSpacing(), rtol=1e-3)
        and np.allclose(image.GetOrigin(), other.GetOrigin(), atol=0.01 * min(image.GetSpacing()))
        and np.allclose(image.GetDirection(), other.GetDirection(), atol=1e-4)
    )
    if not same:
        raise InputError(None, f"{what}: mask is not on the image grid")


# --------------------------------------------------------------------------- masks from files


def load_masks(named_paths: Mapping[str, str | Path | sitk.Image], series: Any) -> dict[str, sitk.Image]:
    """Masks on the PET grid of ``series`` (a ``quant.suv.PetSeries``) from NIfTI (same grid
    required), RTSTRUCT or DICOM SEG files (same frame of reference required), or given as images
    already on that grid. ``NAME=FILE``
    pairs: a SEG or RTSTRUCT holding several segments/ROIs gives the one labelled NAME."""
    from quant import suv

    masks = {}
    for name, path in named_paths.items():
        if isinstance(path, sitk.Image):          # already on the PET grid (e.g. quant.regions)
            _check_same_grid(series.image, path, f"mask {name!r}")
            masks[name] = sitk.Cast(path != 0, sitk.sitkUInt8)
            continue
        path = Path(path)
        if not path.is_file():
            raise InputError(path, f"mask {name!r}: no such file")
        modality = _dicom_modality(path)
        if modality == "SEG":
            masks[name] = read_seg_mask(path, series, name)
        elif modality == "RTSTRUCT":
            try:
                masks[name] = suv.load_mask(path, series)
            except InputError as exc:
                if "ROIs match" not in exc.problem:
                    raise
                masks[name] = suv.load_mask(path, series, _roi_named(path, name))
        else:
            masks[name] = suv.load_mask(path, series)
        if not sitk.GetArrayViewFromImage(masks[name]).any():
            raise InputError(path, f"mask {name!r} is empty")
    return masks


def _dicom_modality(path: Path) -> str | None:
    if path.name.endswith((".nii", ".nii.gz")):
        return None
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality", ""))
    except (InvalidDicomError, OSError):
        return None


def _roi_named(path: Path, name: str) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    names = [str(item.ROIName) for item in ds.get("StructureSetROISequence", [])]
    for candidate in names:
        if canonical_name(candidate) == canonical_name(name):
            return candidate
    raise InputError(path, f"no ROI named {name!r} (ROIs: {', '.join(names) or 'none'})")


def read_seg_mask(path: Path, series: Any, name: str | None = None) -> sitk.Image:
    """One segment of a DICOM SEG (BINARY or FRACTIONAL > 50 %) on the PET grid: frames are
    placed by ImagePositionPatient; the frame of reference, orientation, rows, columns and
    pixel spacing must match the PET."""
    ds = pydicom.dcmread(path)
    image = series.image
    if ds.get("SOPClassUID") != SEG_STORAGE:
        raise InputError(path, "not a DICOM Segmentation Storage object")
    frame_uid = str(series.first.FrameOfReferenceUID)
    if str(ds.get("FrameOfReferenceUID", "")) != frame_uid:
        raise InputError(path, f"SEG frame of reference {ds.get('FrameOfReferenceUID', 'missing')} is not the {getattr(series, 'label', 'PET')}'s {frame_uid}")
    segments = {int(item.SegmentNumber): str(item.SegmentLabel) for item in ds.SegmentSequence}
    if len(segments) == 1:
        number = next(iter(segments))
    else:
        matches = [n for n, label in segments.items() if name is not None and canonical_name(label) == canonical_name(name)]
        if len(matches) != 1:
            raise InputError(path, f"{len(segments)} segments ({', '.join(segments.values())}); none is labelled {name!r}")
        number = matches[0]
    if (int(ds.Rows), int(ds.Columns)) != (image.GetSize()[1], image.GetSize()[0]):
        raise InputError(path, f"SEG frames {ds.Rows}×{ds.Columns} differ from the {getattr(series, 'label', 'PET')} slices")
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient if "PlaneOrientationSequence" in shared else None
    spacing = shared.PixelMeasuresSequence[0].PixelSpacing if "PixelMeasuresSequence" in shared else None
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if orientation is None or not np.allclose(np.asarray(orientation, float), np.r_[direction[:, 0], direction[:, 1]], atol=1e-4):
        raise InputError(path, f"SEG orientation differs from the {getattr(series, 'label', 'PET')}'s")
    if spacing is None or not np.allclose([float(v) for v in spacing], image.GetSpacing()[1::-1], rtol=1e-3):
        raise InputError(path, f"SEG pixel spacing differs from the {getattr(series, 'label', 'PET')}'s")
    frames = ds.pixel_array.reshape(int(ds.get("NumberOfFrames", 1)), int(ds.Rows), int(ds.Columns))
    fractional = str(ds.get("SegmentationType", "BINARY")) == "FRACTIONAL"
    limit = 0.5 * float(ds.get("MaximumFractionalValue", 255)) if fractional else 0.0
    mask = np.zeros(image.GetSize()[::-1], dtype=np.uint8)
    for frame, item in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        if int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) != number:
            continue
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        index = image.TransformPhysicalPointToContinuousIndex(tuple(position))
        k = int(round(index[2]))
        if max(abs(index[0]), abs(index[1]), abs(index[2] - k)) > 0.05 or not 0 <= k < mask.shape[0]:
            raise InputError(path, f"a SEG frame does not lie on a {getattr(series, 'label', 'PET')} slice")
        mask[k] |= (frame > limit).astype(np.uint8)
    out = sitk.GetImageFromArray(mask)
    out.CopyInformation(image)
    return out


# --------------------------------------------------------------------------- segmentation


@dataclass(frozen=True)
class LesionSegmentation:
    """Lesion labels (uint16 on the SUV grid, 1..N by decreasing SUVmax), the method and the
    thresholds used (SUV; per lesion for 'percent_max')."""

    labels: sitk.Image
    method: str
    threshold: float | None
    lesion_thresholds: dict[int, float]
    description: str


def _structure(fully_connected: bool) -> np.ndarray:
    return ndimage.generate_binary_structure(3, 3 if fully_connected else 1)


def _components(binary: np.ndarray, settings: VoiSettings, voxel_mL: float) -> tuple[np.ndarray, int]:
    labels, n = ndimage.label(binary, structure=_structure(settings.fully_connected))
    if settings.min_volume_mL > 0 and n:
        sizes = np.bincount(labels.ravel())
        small = np.flatnonzero(sizes * voxel_mL < settings.min_volume_mL)
        small = small[small > 0]
        labels[np.isin(labels, small)] = 0
    return labels, n


def _by_max(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Relabel 1..N by decreasing maximum value (ties by lower old label)."""
    present = np.unique(labels)
    present = present[present > 0]
    if present.size == 0:
        return np.zeros(labels.shape, dtype=np.uint16)
    maxima = ndimage.maximum(values, labels, present)
    order = present[np.lexsort((present, -np.asarray(maxima)))]
    lut = np.zeros(int(labels.max()) + 1, dtype=np.uint16)
    lut[order] = np.arange(1, order.size + 1, dtype=np.uint16)
    return lut[labels]


def _search_region(shape: tuple[int, ...], search: sitk.Image | None, exclude: sitk.Image | None) -> np.ndarray:
    region = np.ones(shape, dtype=bool) if search is None else sitk.GetArrayViewFromImage(search) != 0
    if exclude is not None:
        region = region & (sitk.GetArrayViewFromImage(exclude) == 0)
    return region


def segment_lesions(suv: sitk.Image, settings: VoiSettings | None = None, liver: RegionStats | None = None,
                    search: sitk.Image | None = None, exclude: sitk.Image | None = None) -> LesionSegmentation:
    """Lesion VOIs by ``settings.method`` inside ``search`` (everywhere when None) and outside
    ``exclude`` (e.g. the union of reference and physiological-uptake masks). 'percist' needs
    ``liver``; 'percent_max' uses it for its seed threshold when no seed threshold is set."""
    settings = settings or VoiSettings()
    values = sitk.GetArrayFromImage(suv).astype(np.float64)
    region = _search_region(values.shape, search, exclude)
    voxel_mL = voxel_volume_mL(suv)
    per_lesion: dict[int, float] = {}
    if settings.method == "fixed":
        threshold = settings.fixed_threshold
        labels, _ = _components((values >= threshold) & region, settings, voxel_mL)
        description = f"SUV ≥ {threshold:g} (fixed threshold), connected components"
    elif settings.method == "percist":
        if liver is None:
            raise InputError(None, "PERCIST threshold needs a liver reference region (mask named 'liver')")
        threshold = percist_threshold(liver, settings)
        labels, _ = _components((values >= threshold) & region, settings, voxel_mL)
        description = (f"SUV ≥ {settings.percist_liver_factor:g} × liver SUVmean {liver.suv_mean:.3f} + "
                       f"{settings.percist_sd_factor:g} × liver SD {liver.suv_sd:.3f} = {threshold:.3f} (PERCIST), connected components")
    else:
        threshold, labels, per_lesion, description = _percent_max(values, region, suv.GetSpacing(), settings, liver, voxel_mL)
    relabelled = _by_max(values, labels)
    if per_lesion:
        mapping = {int(relabelled[labels == old].flat[0]): t for old, t in per_lesion.items() if (labels == old).any()}
        per_lesion = dict(sorted(mapping.items()))
    out = sitk.GetImageFromArray(relabelled)
    out.CopyInformation(suv)
    return LesionSegmentation(out, settings.method, threshold, per_lesion, description)


def _percent_max(values: np.ndarray, region: np.ndarray, spacing: Sequence[float], settings: VoiSettings,
                 liver: RegionStats | None, voxel_mL: float) -> tuple[float, np.ndarray, dict[int, float], str]:
    if settings.seed_threshold is not None:
        seed, seed_rule = settings.seed_threshold, f"SUV ≥ {settings.seed_threshold:g}"
    elif liver is not None:
        seed, seed_rule = percist_threshold(liver, settings), "the PERCIST liver threshold"
    else:
        seed, seed_rule = settings.fixed_threshold, f"SUV ≥ {settings.fixed_threshold:g}"
    structure = _structure(settings.fully_connected)
    basins = _local_regions(values, (values >= seed) & region, settings)
    labels = np.zeros(values.shape, dtype=np.int32)
    thresholds: dict[int, float] = {}
    n = int(basins.max())
    if n == 0:
        return seed, labels, thresholds, _percent_description(settings, seed, seed_rule)
    slices = ndimage.find_objects(basins)
    maxima = ndimage.maximum(values, basins, np.arange(1, n + 1))
    margin = [int(math.ceil(settings.margin_mm / s)) for s in spacing[::-1]]
    ball = _ellipsoid_structure(settings.margin_mm, spacing)
    for number in np.argsort(-np.asarray(maxima), kind="stable") + 1:
        if slices[number - 1] is None:
            continue
        box = tuple(slice(max(sl.start - m, 0), min(sl.stop + m, size)) for sl, m, size in zip(slices[number - 1], margin, values.shape))
        own = basins[box] == number
        free = (basins[box] == 0) | own
        local = ndimage.binary_dilation(own, structure=ball) & region[box] & free & (labels[box] == 0)
        sub = values[box]
        limit = settings.percent_of_max * float(sub[own].max())
        grown, _ = ndimage.label(local & (sub >= limit), structure=structure)
        hottest = np.unravel_index(np.argmax(np.where(own, sub, -np.inf)), sub.shape)
        keep = (grown == grown[hottest]) & (grown > 0)
        if not keep.any() or keep.sum() * voxel_mL < settings.min_volume_mL:
            continue
        labels[box][keep] = number
        thresholds[int(number)] = limit
    return seed, labels, thresholds, _percent_description(settings, seed, seed_rule)


def _local_regions(values: np.ndarray, candidates: np.ndarray, settings: VoiSettings) -> np.ndarray:
    """Split the connected components of ``candidates`` into local regions, one per uptake
    maximum that rises more than ``settings.split_level`` (SUV) above the saddle to its
    neighbours (morphological watershed of −SUV); labels 1..N, 0 outside the candidates."""
    components, n = ndimage.label(candidates, structure=_structure(settings.fully_connected))
    out = np.zeros(values.shape, dtype=np.int32)
    next_label = 1
    for number, box in enumerate(ndimage.find_objects(components), start=1):
        inside = components[box] == number
        sub = np.where(inside, values[box], float(values[box][inside].min()))
        if inside.sum() < 2 or settings.split_level is None:
            out[box][inside] = next_label
            next_label += 1
            continue
        basins = sitk.GetArrayFromImage(sitk.MorphologicalWatershed(
            sitk.GetImageFromArray((-sub).astype(np.float32)), level=float(settings.split_level),
            markWatershedLine=False, fullyConnected=settings.fully_connected))
        ids = np.unique(basins[inside])
        ids = ids[ids > 0]
        lut = np.zeros(int(basins.max()) + 1, dtype=np.int32)
        lut[ids] = np.arange(next_label, next_label + ids.size, dtype=np.int32)
        out[box][inside] = lut[basins[inside]]
        next_label += ids.size
    return out


def _percent_description(settings: VoiSettings, seed: float, seed_rule: str) -> str:
    return (f"{100 * settings.percent_of_max:g} % of each lesion's SUVmax, grown from its hottest voxel within "
            f"{settings.margin_mm:g} mm of its local region; local regions: connected components above {seed_rule} "
            f"({seed:.3f}) split at uptake maxima deeper than {settings.split_level} SUV")


def _ellipsoid_structure(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    half = [int(math.ceil(radius_mm / s)) for s in spacing[::-1]]
    grids = np.meshgrid(*(np.arange(-h, h + 1) * s for h, s in zip(half, spacing[::-1])), indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2 + 1e-9


# --------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class Lesion:
    """Uptake figures of one lesion VOI.

    SUVs in the SUV image's unit; ``volume_mL`` = voxels × voxel volume; ``tlu`` = SUVmean ×
    volume (SUV·mL); ``long_axis_mm`` and ``short_axis_mm`` (axial, RECIST-style): axes of the
    VOI's equivalent ellipsoid, sub-voxel (``size_method`` says how, see ``_axes_mm``);
    ``peak_centre_mm``, ``max_position_mm``,
    ``centroid_mm``: LPS. ``ratios``: lesion ``ratio_statistic`` / reference SUVmean per
    reference region; ``site`` and ``site_short_axis_mm`` come from outside (CT reading) when
    known: a site's size given there takes precedence in the selection criteria. ``name``:
    'auto' for a VOI found on the PET, else the name of the lesion mask it came from."""

    label: int
    voxels: int
    volume_mL: float
    suv_max: float
    suv_mean: float
    suv_sd: float
    suv_peak: float
    tlu: float
    long_axis_mm: float
    short_axis_mm: float
    max_position_mm: tuple[float, float, float]
    peak_centre_mm: tuple[float, float, float]
    centroid_mm: tuple[float, float, float]
    ratios: dict[str, float] = field(default_factory=dict)
    site: str = "unknown"
    site_short_axis_mm: float | None = None
    name: str = "auto"
    size_method: str = ""

    @property
    def lesion_to_liver(self) -> float | None:
        return self.ratios.get("liver")

    @property
    def lesion_to_parotid(self) -> float | None:
        return self.ratios.get("parotid")

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("max_position_mm", "peak_centre_mm", "centroid_mm"):
            out[key] = list(out[key])
        out["lesion_to_liver"] = self.lesion_to_liver
        out["lesion_to_parotid"] = self.lesion_to_parotid
        return out


@dataclass(frozen=True)
class TumourBurden:
    """Whole-body figures over all lesions: count, total volume [mL], total lesion uptake
    (Σ SUVmean × volume, SUV·mL), volume-weighted SUVmean and the highest SUVmax."""

    lesions: int
    volume_mL: float
    total_lesion_uptake: float
    suv_mean: float | None
    suv_max: float | None


def peak_kernel(spacing: Sequence[float], volume_mL: float = 1.0, sub: int = 5) -> np.ndarray:
    """Weights (array order z, y, x) of a sphere of ``volume_mL`` on voxels of ``spacing`` (mm,
    x, y, z): the fraction of each voxel inside the sphere centred on the middle voxel, by
    ``sub``³ sub-samples, normalised to sum 1."""
    radius = (3.0 * volume_mL * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    sp = np.asarray(spacing, float)[::-1]
    half = [int(math.ceil(radius / s + 0.5)) for s in sp]
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    axes = [np.add.outer(np.arange(-h, h + 1), offsets).ravel() * s for h, s in zip(half, sp)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    inside = (x**2 + y**2 + z**2 <= radius**2).astype(np.float64)
    shape = [2 * h + 1 for h in half]
    weights = inside.reshape(shape[0], sub, shape[1], sub, shape[2], sub).mean(axis=(1, 3, 5))
    return weights / weights.sum()


def suv_peak(values: np.ndarray, inside: np.ndarray, kernel: np.ndarray) -> tuple[float, tuple[int, int, int]]:
    """Largest kernel-weighted mean of ``values`` centred on a voxel of ``inside`` (array order),
    and that centre's index. Values outside the array count as 0."""
    half = [k // 2 for k in kernel.shape]
    where = np.argwhere(inside)
    lo = np.maximum(where.min(axis=0) - half, 0)
    hi = np.minimum(where.max(axis=0) + np.asarray(half) + 1, values.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    local = ndimage.correlate(values[box], kernel, mode="constant", cval=0.0)
    candidates = np.where(inside[box], local, -np.inf)
    best = np.unravel_index(int(np.argmax(candidates)), candidates.shape)
    return float(candidates[best]), tuple(int(b + a) for b, a in zip(best, lo))


def _index_to_mm(image: sitk.Image, index_zyx: Sequence[float]) -> tuple[float, float, float]:
    return tuple(float(v) for v in image.TransformContinuousIndexToPhysicalPoint(tuple(float(i) for i in index_zyx[::-1])))


def _membership(values: np.ndarray, inside: np.ndarray, others: np.ndarray, level: float | None) -> np.ndarray:
    """How much of each voxel belongs to the VOI (0-1): with the VOI's threshold ``level``
    (SUV), the image ramp clip(SUV / (2 · level)), at least ½ inside the VOI and at most ½ on
    its rim (the 26-neighbours not in ``others``, other lesions); without a level, the mask."""
    if level is None or not level > 0:
        return inside.astype(np.float64)
    rim = ndimage.binary_dilation(inside, structure=_structure(True)) & ~inside & ~others
    ramp = np.clip(values / (2.0 * level), 0.0, 1.0)
    return np.where(inside, np.maximum(ramp, 0.5), np.where(rim, np.minimum(ramp, 0.5), 0.0))


def _axes_mm(membership: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """(long axis, axial short axis) in mm of the ellipsoid with the second moments of
    ``membership`` (weights on voxel centres) and its volume (Σ weights × voxel volume): the
    largest ellipsoid axis, and the minor axis of the ellipsoid's central axial section
    (RECIST-style short axis). Sub-voxel: a 12 mm sphere sampled at 4 mm measures 12 ± 0.3 mm
    (tests/test_quant_voi.py). A VOI thinner than a voxel along some direction gets the voxel's
    own extent (variance spacing²/12) added."""
    sp = np.asarray(spacing, float)[::-1]                       # (z, y, x) mm
    where = np.argwhere(membership > 0)
    weights = membership[membership > 0]
    points = where * sp
    centred = points - np.average(points, axis=0, weights=weights)
    covariance = (centred.T * weights) @ centred / weights.sum()
    if np.linalg.eigvalsh(covariance)[0] < float(np.min(sp)) ** 2 / 12.0:
        covariance = covariance + np.diag(sp**2 / 12.0)
    semi_axes = np.sqrt(5.0 * np.linalg.eigvalsh(covariance))   # a uniform ellipsoid's variance is a²/5
    volume = weights.sum() * float(np.prod(sp))
    covariance = covariance * (volume / (4.0 / 3.0 * math.pi * float(np.prod(semi_axes)))) ** (2.0 / 3.0)
    long_axis = 2.0 * math.sqrt(5.0 * float(np.linalg.eigvalsh(covariance)[-1]))
    axial = np.linalg.inv(covariance)[1:, 1:] / 5.0            # the section z = centre: [y x] axial [y x]ᵀ ≤ 1
    short_axis = 2.0 / math.sqrt(float(np.linalg.eigvalsh(axial)[-1]))
    return long_axis, short_axis


def measure_lesions(suv: sitk.Image, labels: sitk.Image, references: Mapping[str, RegionStats] | None = None,
                    settings: VoiSettings | None = None, sites: Mapping[int | str, Mapping[str, Any]] | None = None,
                    names: Mapping[int, str] | None = None, levels: Mapping[int, float] | None = None) -> list[Lesion]:
    """Uptake figures of every labelled lesion (label order). ``sites`` maps a label (or a
    lesion name from ``names``) to {'site': 'lymph_node' | 'solid_organ' | 'bone' |
    'bone_soft_tissue' | 'unknown', 'short_axis_mm': CT short axis (mm, optional)}.
    ``levels``: the threshold (SUV) that drew each label's VOI (:func:`voi_levels`); sizes of
    a VOI without one come from its mask alone."""
    settings = settings or VoiSettings()
    references = references or {}
    sites = sites or {}
    names = names or {}
    levels = levels or {}
    _check_same_grid(suv, labels, "lesion labels")
    values = sitk.GetArrayFromImage(suv).astype(np.float64)
    label_array = sitk.GetArrayViewFromImage(labels)
    kernel = peak_kernel(suv.GetSpacing(), settings.peak_volume_mL)
    voxel_mL = voxel_volume_mL(suv)
    lesions = []
    pad = [k // 2 + 1 for k in kernel.shape]
    boxes = ndimage.find_objects(np.asarray(label_array, dtype=np.int64)) if label_array.any() else []
    for number, box in enumerate(boxes, start=1):
        if box is None:
            continue
        # work in the lesion's bounding box, padded by the SUVpeak sphere
        box = tuple(slice(max(b.start - p, 0), min(b.stop + p, n)) for b, p, n in zip(box, pad, values.shape))
        start = np.array([b.start for b in box])
        local = values[box]
        inside = label_array[box] == number
        lesion_values = local[inside]
        peak, peak_local = suv_peak(local, inside, kernel)
        peak_index = tuple(int(i) for i in np.add(peak_local, start))
        max_index = np.add(np.unravel_index(int(np.argmax(np.where(inside, local, -np.inf))), local.shape), start)
        centroid_index = np.argwhere(inside).mean(axis=0) + start
        level = levels.get(int(number))
        membership = _membership(local, inside, (label_array[box] != 0) & ~inside, level)
        long_axis, short_axis = _axes_mm(membership, suv.GetSpacing())
        size_method = ("sub-voxel ellipsoid of the VOI mask (no threshold)" if level is None
                       else f"sub-voxel ellipsoid of the VOI at its threshold SUV {level:.2f}")
        volume = inside.sum() * voxel_mL
        mean = float(lesion_values.mean())
        stats = {"suv_max": float(lesion_values.max()), "suv_mean": mean, "suv_peak": peak}
        ratios = {name: stats[settings.ratio_statistic] / ref.suv_mean for name, ref in references.items() if ref.suv_mean > 0}
        name = names.get(int(number), "auto")
        site = dict(sites.get(int(number)) or sites.get(str(int(number))) or (sites.get(name) if name != "auto" else None) or {})
        lesions.append(Lesion(
            label=int(number), voxels=int(inside.sum()), volume_mL=float(volume),
            suv_max=stats["suv_max"], suv_mean=mean, suv_sd=float(lesion_values.std(ddof=1)) if lesion_values.size > 1 else 0.0,
            suv_peak=peak, tlu=mean * float(volume), long_axis_mm=long_axis, short_axis_mm=short_axis,
            max_position_mm=_index_to_mm(suv, max_index), peak_centre_mm=_index_to_mm(suv, peak_index),
            centroid_mm=_index_to_mm(suv, centroid_index), ratios=ratios,
            site=str(site.get("site", "unknown")), site_short_axis_mm=None if site.get("short_axis_mm") is None else float(site["short_axis_mm"]),
            name=name, size_method=size_method,
        ))
    return lesions


def voi_levels(segmentation: LesionSegmentation, labels: sitk.Image, names: Mapping[int, str]) -> dict[int, float]:
    """The threshold (SUV) of each automatic VOI of ``labels`` (as renumbered by
    :func:`add_given_lesions`): its own for 'percent_max', the segmentation's otherwise."""
    found = sitk.GetArrayViewFromImage(segmentation.labels)
    final = sitk.GetArrayViewFromImage(labels)
    levels = {}
    for label, name in names.items():
        where = final == label
        if name != "auto" or not where.any():
            continue
        level = segmentation.lesion_thresholds.get(int(found[where].flat[0]), segmentation.threshold)
        if level is not None:
            levels[int(label)] = float(level)
    return levels


def add_given_lesions(suv: sitk.Image, labels: sitk.Image, given: Mapping[str, sitk.Image]) -> tuple[sitk.Image, dict[int, str]]:
    """Merge lesion masks read elsewhere (e.g. CT-detected lesions, PSMA-negative ones among
    them) with automatic VOIs: an automatic VOI that overlaps a given mask is replaced by it;
    given masks take their voxels from automatic VOIs. Returns labels renumbered 1..N by
    decreasing SUVmax and the name of each label ('auto', or the given mask's name)."""
    _check_same_grid(suv, labels, "lesion labels")
    auto = sitk.GetArrayFromImage(labels).astype(np.int32)
    combined = np.zeros(auto.shape, dtype=np.int32)
    given_masks = {}
    for name, mask in given.items():
        _check_same_grid(suv, mask, f"lesion mask {name!r}")
        inside = sitk.GetArrayViewFromImage(mask) != 0
        if not inside.any():
            raise InputError(None, f"lesion mask {name!r} is empty")
        given_masks[name] = inside
        overlapped = np.unique(auto[inside])
        auto[np.isin(auto, overlapped[overlapped > 0])] = 0
    next_label = 1
    origin: dict[int, str] = {}
    for number in np.unique(auto[auto > 0]):
        combined[auto == number] = next_label
        origin[next_label] = "auto"
        next_label += 1
    for name, inside in given_masks.items():
        combined[inside] = next_label
        origin[next_label] = name
        next_label += 1
    values = sitk.GetArrayViewFromImage(suv)
    relabelled = _by_max(values, combined)
    names = {}
    for old, name in origin.items():
        where = combined == old
        if where.any():
            names[int(relabelled[where].flat[0])] = name
    out = sitk.GetImageFromArray(relabelled)
    out.CopyInformation(suv)
    return out, dict(sorted(names.items()))


def tumour_burden(lesions: Sequence[Lesion]) -> TumourBurden:
    """Whole-body tumour volume and uptake from the lesion list."""
    volume = float(sum(lesion.volume_mL for lesion in lesions))
    uptake = float(sum(lesion.tlu for lesion in lesions))
    return TumourBurden(len(lesions), volume, uptake, uptake / volume if volume > 0 else None,
                        max((lesion.suv_max for lesion in lesions), default=None))


def union_mask(masks: Sequence[sitk.Image], reference: sitk.Image) -> sitk.Image | None:
    """The union of ``masks`` (on ``reference``'s grid) as uint8, or None when there are none."""
    if not masks:
        return None
    union = np.zeros(reference.GetSize()[::-1], dtype=bool)
    for mask in masks:
        _check_same_grid(reference, mask, "exclusion mask")
        union |= sitk.GetArrayViewFromImage(mask) != 0
    out = sitk.GetImageFromArray(union.astype(np.uint8))
    out.CopyInformation(reference)
    return out
