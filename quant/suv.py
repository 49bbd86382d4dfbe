"""Standardized uptake values (SUV) from PET DICOM series of any vendor, after the QIBA pseudo-code.

Units used throughout: activity concentration in Bq/mL, activity in Bq, body weight in kg (g inside
SUV factors), height in cm (DICOM PatientSize is in m), times as naive local datetimes, half-lives
in seconds. SUVbw, SUVlbm and SUVibw are in g/mL; SUVbsa in cm²/mL.

"Modality values" are stored pixel values × RescaleSlope + RescaleIntercept, slice by slice.
Every factor below multiplies modality values, one number per slice (array order of the image).

Body measures: LBM by Janmahasatian (default) or James-128, BSA by Du Bois, IBW by Devine. Values a
scanner stored as SUV of another type (Units GML with SUVType LBMJAMES128/LBMJANMA/IBW, or CM2ML)
are turned back into SUVbw with the formula IBSI-SUV defines for that type (IBW: Sugawara 1999).
PatientSex other than M or F: the mean of the male and female formulas (IBSI-SUV), said in the rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, DT, TM

from recon.errors import InputError
from recon.nuclides import find_nuclide

KINDS = ("bw", "lbm", "bsa", "ibw")
LBM_FORMULAS = ("janmahasatian", "james128")
SUV_UNIT = {"bw": "g/mL", "lbm": "g/mL", "ibw": "g/mL", "bsa": "cm2/mL"}
MBQ_DOSE_LIMIT = 1e5  # a PET RadionuclideTotalDose below this many "Bq" was written in MBq
MAX_WEIGHT_KG = 500.0
MAX_HEIGHT_M = 3.0
GE_PET_CREATOR = "GEMS_PETD_01"
PHILIPS_PET_CREATOR = "Philips PET Private Group"


# --------------------------------------------------------------------------- series reading


@dataclass(frozen=True)
class PetSeries:
    """One PET series: per-slice headers (no pixel data) sorted along the slice normal, and the
    modality values as a float32 SimpleITK image with LPS geometry (slice k = array index k).

    Masks are placed on ``image`` in the frame of reference of ``first``; ``label`` names the
    image in refusals ('PET'; 'masks CT' when a CT series stands in to receive masks)."""

    folder: Path
    files: tuple[Path, ...]
    headers: tuple[Dataset, ...]
    image: sitk.Image
    label: str = "PET"

    @property
    def first(self) -> Dataset:
        return self.headers[0]


def read_pet_series(folder: str | Path) -> PetSeries:
    """Read the single-frame PET images of one series in ``folder`` (other modalities are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "not a folder")
    slices = _pet_slices(folder)
    files = tuple(path for path, _ in slices)
    datasets = [ds for _, ds in slices]
    origin, spacing, direction = _geometry(folder, datasets)
    volume = np.stack([_modality_values(path, ds) for path, ds in slices]).astype(np.float32)
    for ds in datasets:
        del ds.PixelData
    image = sitk.GetImageFromArray(volume)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return PetSeries(folder, files, tuple(datasets), image)


def _pet_slices(folder: Path) -> list[tuple[Path, Dataset]]:
    """(path, dataset) of every PET image in ``folder``, one series, sorted along the normal."""
    found: list[tuple[Path, Dataset]] = []
    modalities: set[str] = set()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError):
            continue
        modalities.add(str(ds.get("Modality", "?")))
        if ds.get("Modality") == "PT" and "PixelData" in ds:
            found.append((path, ds))
    if not found:
        seen = ", ".join(sorted(modalities)) if modalities else "no DICOM files"
        raise InputError(folder, f"not a PET series (Modality PT): found {seen}")
    series = {str(ds.SeriesInstanceUID) for _, ds in found}
    if len(series) > 1:
        shown = ", ".join(sorted(series)[:3]) + (", ..." if len(series) > 3 else "")
        raise InputError(folder, f"{len(series)} PET series in one folder ({shown}): give one series folder")
    for path, ds in found:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InputError(path, "multi-frame PET image: only single-frame PET Image Storage is supported")
    normal = _normal(found[0][1])
    return sorted(found, key=lambda item: float(np.dot(normal, _position(item[1]))))


def _normal(ds: Dataset) -> np.ndarray:
    row, col = np.asarray(ds.ImageOrientationPatient, float).reshape(2, 3)
    return np.cross(row, col)


def _position(ds: Dataset) -> np.ndarray:
    return np.asarray(ds.ImagePositionPatient, float)


def _geometry(folder: Path, datasets: Sequence[Dataset]) -> tuple[tuple, tuple, tuple]:
    """Origin [mm], spacing [mm] (columns, rows, slices) and direction (LPS) of the sorted slices."""
    first = datasets[0]
    orientation = np.asarray(first.ImageOrientationPatient, float)
    for ds in datasets:
        same_grid = (ds.Rows, ds.Columns) == (first.Rows, first.Columns) and np.allclose(ds.PixelSpacing, first.PixelSpacing)
        if not same_grid or not np.allclose(ds.ImageOrientationPatient, orientation, atol=1e-4):
            raise InputError(folder, "slices differ in size, pixel spacing or orientation")
    normal = _normal(first)
    offsets = np.array([np.dot(normal, _position(ds)) for ds in datasets])
    steps = np.diff(offsets)
    if len(datasets) == 1:
        dz = float(first.get("SliceThickness") or 1.0)
    elif np.any(steps < 1e-3):
        raise InputError(folder, "several images at one slice position (dynamic or gated series are not supported)")
    elif np.ptp(steps) > 0.01 * steps.mean():
        raise InputError(folder, f"uneven slice spacing ({steps.min():.3f} to {steps.max():.3f} mm)")
    else:
        dz = float(steps.mean())
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    direction = np.column_stack([orientation[:3], orientation[3:], normal])
    return tuple(_position(first)), (col_spacing, row_spacing, dz), tuple(direction.ravel())


def _modality_values(path: Path, ds: Dataset) -> np.ndarray:
    """Stored values × RescaleSlope + RescaleIntercept of one slice (float64)."""
    try:
        stored = ds.pixel_array.astype(np.float64)
    except Exception as exc:  # pydicom raises many types for broken or unsupported pixel data
        raise InputError(path, f"pixel data cannot be read ({exc})") from exc
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return stored * slope + intercept


# --------------------------------------------------------------------------- header values


def _private(ds: Dataset, group: int, creator: str, offset: int) -> str | None:
    """Text of private element ``offset`` of ``creator``'s block, or of block 0x10 when the file
    has no private creator at all in ``group`` (seen in exported files)."""
    for block in range(0x10, 0x100):
        owner = ds.get((group, block))
        if owner is not None and _text(owner.value).upper() == creator.upper():
            element = ds.get((group, (block << 8) | offset))
            return _text(element.value) if element is not None else None
    if any(ds.get((group, block)) is not None for block in range(0x10, 0x100)):
        return None
    element = ds.get((group, 0x1000 | offset))
    return _text(element.value) if element is not None else None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value).strip(" \x00")


def _number(ds: Dataset, keyword: str) -> float | None:
    """The attribute as a finite number, None when absent or empty; InputError for text such as 'abc' or NaN."""
    value = ds.get(keyword)
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise InputError(getattr(ds, "filename", None), f"{keyword} {str(value)[:20]!r} is not a number")
    return number


def _parse_dt(text: str, path: Path, what: str) -> datetime:
    """A DICOM DT as a naive local datetime (a UTC offset, if any, is dropped)."""
    try:
        value = DT(text)
    except ValueError as exc:
        raise InputError(path, f"{what} is not a DICOM date-time: {text!r}") from exc
    return datetime(value.year, value.month, value.day, value.hour, value.minute, value.second, value.microsecond)


def _date_time(ds: Dataset, date_keyword: str, time_keyword: str, path: Path) -> datetime | None:
    """Date and time attributes combined, or None when either is absent."""
    day, clock = ds.get(date_keyword), ds.get(time_keyword)
    if not day or not clock:
        return None
    try:
        return datetime.combine(_as_date(day), _as_time(clock))
    except ValueError as exc:
        raise InputError(path, f"{date_keyword}/{time_keyword} unreadable: {day!r} {clock!r}") from exc


def _as_date(value: Any) -> date:
    value = DA(str(value))
    return date(value.year, value.month, value.day)


def _as_time(value: Any) -> time:
    value = TM(str(value))
    return time(value.hour, value.minute, value.second, value.microsecond)


def _radiopharmaceutical(series: PetSeries) -> Dataset:
    items = series.first.get("RadiopharmaceuticalInformationSequence")
    if not items:
        raise InputError(series.files[0], "no RadiopharmaceuticalInformationSequence (dose, injection time, half-life)")
    return items[0]


# --------------------------------------------------------------------------- patient and body size


@dataclass(frozen=True)
class Patient:
    """Body measures from the header: weight [kg], height [cm] (None when absent), sex ('M', 'F' or other)."""

    weight_kg: float
    height_cm: float | None
    sex: str


def _patient(series: PetSeries) -> Patient:
    ds, path = series.first, series.files[0]
    weight = _number(ds, "PatientWeight")
    if weight is None:
        raise InputError(path, "PatientWeight missing: SUV needs the body weight")
    if not 0.0 < weight <= MAX_WEIGHT_KG:
        raise InputError(path, f"PatientWeight {weight:g} kg is implausible (expected 0-{MAX_WEIGHT_KG:g} kg)")
    height_m = _number(ds, "PatientSize")
    if height_m is not None and not 0.0 < height_m <= MAX_HEIGHT_M:
        raise InputError(path, f"PatientSize {height_m:g} is implausible (DICOM gives height in m, 0-{MAX_HEIGHT_M:g})")
    height_cm = None if height_m is None else 100.0 * height_m
    return Patient(weight, height_cm, str(ds.get("PatientSex", "") or "").upper())


def _by_sex(sex: str, male: float, female: float) -> tuple[float, str]:
    """The male or female value, or their mean (IBSI-SUV convention) for any other PatientSex."""
    if sex == "M":
        return male, "male"
    if sex == "F":
        return female, "female"
    return (male + female) / 2.0, f"PatientSex {sex or 'empty'}: mean of the male and female formulas"


def lbm_janmahasatian_kg(weight_kg: float, height_cm: float, sex: str) -> tuple[float, str]:
    """Lean body mass [kg], Janmahasatian 2005: 9270·W/(6680 + 216·BMI) male, 9270·W/(8780 + 244·BMI) female."""
    bmi = weight_kg / (height_cm / 100.0) ** 2
    value, which = _by_sex(sex, 9270.0 * weight_kg / (6680.0 + 216.0 * bmi), 9270.0 * weight_kg / (8780.0 + 244.0 * bmi))
    return value, f"LBM Janmahasatian ({which})"


def lbm_james128_kg(weight_kg: float, height_cm: float, sex: str) -> tuple[float, str]:
    """Lean body mass [kg], James 1976 ("James-128"): 1.10·W − 128·(W/H)² male, 1.07·W − 148·(W/H)² female (H in cm)."""
    ratio = (weight_kg / height_cm) ** 2
    value, which = _by_sex(sex, 1.10 * weight_kg - 128.0 * ratio, 1.07 * weight_kg - 148.0 * ratio)
    return value, f"LBM James-128 ({which})"


def bsa_dubois_m2(weight_kg: float, height_cm: float) -> tuple[float, str]:
    """Body surface area [m²], Du Bois 1916: 0.007184 · W^0.425 · H^0.725 (W kg, H cm)."""
    return 0.007184 * weight_kg**0.425 * height_cm**0.725, "BSA Du Bois"


def ibw_devine_kg(height_cm: float, sex: str) -> tuple[float, str]:
    """Ideal body weight [kg], Devine 1974: 50 (male) or 45.5 (female) + 2.3 kg per inch above 60 in."""
    inches_over_5ft = height_cm / 2.54 - 60.0
    value, which = _by_sex(sex, 50.0 + 2.3 * inches_over_5ft, 45.5 + 2.3 * inches_over_5ft)
    return value, f"IBW Devine ({which})"


def ibw_sugawara_kg(height_cm: float, sex: str) -> tuple[float, str]:
    """Ideal body weight [kg] as IBSI-SUV defines SUVibw (Sugawara 1999):
    48.0 + 1.06·(H − 152) male, 45.5 + 0.91·(H − 152) female (H in cm)."""
    value, which = _by_sex(sex, 48.0 + 1.06 * (height_cm - 152.0), 45.5 + 0.91 * (height_cm - 152.0))
    return value, f"IBW Sugawara/IBSI-SUV ({which})"


_LBM: dict[str, Callable[[float, float, str], tuple[float, str]]] = {
    "janmahasatian": lbm_janmahasatian_kg,
    "james128": lbm_james128_kg,
}


def body_normaliser(patient: Patient, kind: str, lbm_formula: str = "janmahasatian",
                    ibw: Callable[[float, str], tuple[float, str]] = ibw_devine_kg,
                    path: Path | None = None) -> tuple[float, str]:
    """The SUV denominator's body measure: g for bw/lbm/ibw, cm² for bsa, with the rule used
    (``path`` names the file in refusals)."""
    if kind == "bw":
        return 1000.0 * patient.weight_kg, "body weight"
    if patient.height_cm is None:
        raise InputError(path, f"PatientSize (height) missing: SUV{kind} needs it")
    w, h = patient.weight_kg, patient.height_cm
    if kind == "lbm":
        value, rule = _LBM[lbm_formula](w, h, patient.sex)
    elif kind == "ibw":
        value, rule = ibw(h, patient.sex)
    elif kind == "bsa":
        value, rule = bsa_dubois_m2(w, h)
        return 1.0e4 * value, f"{rule}, {value:.4f} m2"
    else:
        raise ValueError(f"unknown SUV kind {kind!r}; one of {KINDS}")
    if value <= 0.0:
        raise InputError(path, f"{rule} gives {value:.1f} kg for this weight and height: not usable")
    return 1000.0 * value, f"{rule}, {value:.2f} kg"


# --------------------------------------------------------------------------- SUV scale


@dataclass(frozen=True)
class SuvScale:
    """What turns modality values into SUV, with the reasons.

    ``scale`` multiplies modality values to give SUV of ``kind`` (``unit``: g/mL, cm²/mL for bsa);
    ``suv_bw_scale`` gives SUVbw [g/mL]. Both are floats, or one value per slice (array order)
    when slices differ (per-slice decay, vendor factors). ``decay_factor`` = activity at the
    scan reference time / activity at injection (1.0 for ADMIN; None where the file's values
    are already SUV). ``dose_Bq`` is the administered activity at injection.
    """

    kind: str
    unit: str
    scale: float | np.ndarray
    suv_bw_scale: float | np.ndarray
    decay_factor: float | np.ndarray | None
    scan_datetime: datetime | None
    injection_datetime: datetime | None
    dose_Bq: float | None
    half_life_s: float | None
    weight_kg: float
    units: str
    rules: dict[str, str]

    def scale_per_slice(self, slices: int) -> np.ndarray:
        """``scale`` as an array of one value per slice."""
        return np.broadcast_to(np.asarray(self.scale, float), (slices,))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO text, per-slice arrays as lists."""
        return {
            "suv_kind": self.kind,
            "suv_unit": self.unit,
            "units": self.units,
            "scale": _jsonable(self.scale),
            "suv_bw_scale": _jsonable(self.suv_bw_scale),
            "decay_factor": _jsonable(self.decay_factor),
            "scan_datetime": self.scan_datetime.isoformat() if self.scan_datetime else None,
            "injection_datetime": self.injection_datetime.isoformat() if self.injection_datetime else None,
            "dose_Bq": self.dose_Bq,
            "half_life_s": self.half_life_s,
            "weight_kg": self.weight_kg,
            "rules": dict(self.rules),
        }


def _jsonable(value: float | np.ndarray | None) -> float | list[float] | None:
    if value is None:
        return None
    return [float(v) for v in value] if isinstance(value, np.ndarray) else float(value)


def _collapse(values: np.ndarray) -> float | np.ndarray:
    """A single float when every slice has the same value, else the per-slice array."""
    return float(values[0]) if np.all(values == values[0]) else values


@dataclass
class _ToBw:
    """Modality value → SUVbw factors per slice, and how they were found."""

    factors: np.ndarray
    rules: dict[str, str]
    decay: np.ndarray | None = None
    scan: datetime | None = None
    injection: datetime | None = None
    dose_Bq: float | None = None
    half_life_s: float | None = None


def suv_scale(series: PetSeries, kind: str = "bw", lbm_formula: str = "janmahasatian") -> SuvScale:
    """The SUV scale factors of ``series`` for ``kind`` ('bw', 'lbm', 'bsa' or 'ibw'; LBM by
    ``lbm_formula``: 'janmahasatian' or 'james128', IBW by Devine), with the rules that chose them."""
    if kind not in KINDS:
        raise ValueError(f"unknown SUV kind {kind!r}; one of {KINDS}")
    if lbm_formula not in LBM_FORMULAS:
        raise ValueError(f"unknown LBM formula {lbm_formula!r}; one of {LBM_FORMULAS}")
    _check_series_consistent(series)
    units = _series_value(series, "Units")
    rules = {"image": _check_corrections(series)}
    patient = _patient(series)
    to_bw = _units_to_bw(series, units, patient)
    normaliser, body_rule = body_normaliser(patient, kind, lbm_formula, path=series.files[0])
    rules.update(to_bw.rules)
    rules["body"] = f"SUV{kind}: {body_rule}"
    suv_bw = to_bw.factors
    return SuvScale(
        kind=kind,
        unit=SUV_UNIT[kind],
        scale=_collapse(suv_bw * normaliser / (1000.0 * patient.weight_kg)),
        suv_bw_scale=_collapse(suv_bw),
        decay_factor=None if to_bw.decay is None else _collapse(to_bw.decay),
        scan_datetime=to_bw.scan,
        injection_datetime=to_bw.injection,
        dose_Bq=to_bw.dose_Bq,
        half_life_s=to_bw.half_life_s,
        weight_kg=patient.weight_kg,
        units=units,
        rules=rules,
    )


# Series-level values the SUV is computed from, read on the first slice: every slice must agree.
_SERIES_LEVEL = ("Units", "DecayCorrection", "CorrectedImage", "SUVType", "PatientWeight", "PatientSize", "SeriesDate", "SeriesTime")
_ISOTOPE_LEVEL = ("Radiopharmaceutical", "RadionuclideTotalDose", "RadionuclideHalfLife", "RadiopharmaceuticalStartDateTime",
                  "RadiopharmaceuticalStartTime")


def _on_every_slice(series: PetSeries, keyword: str, isotope: bool = False) -> str:
    """The value (text, '' when absent) of ``keyword`` on every slice, or of the first
    Radiopharmaceutical Information item's when ``isotope``; InputError when slices disagree."""
    def value(ds: Dataset) -> str:
        if isotope:
            ds = (ds.get("RadiopharmaceuticalInformationSequence") or [Dataset()])[0]
        element = ds.get(keyword, "")
        return "\\".join(_text(v) for v in element) if isinstance(element, MultiValue) else _text(element)

    values = {value(ds) for ds in series.headers}
    if len(values) > 1:
        where = "Radiopharmaceutical Information " if isotope else ""
        raise InputError(series.folder, f"{where}{keyword} differs between slices: {sorted(values)}")
    return values.pop()


def _check_series_consistent(series: PetSeries) -> None:
    for keyword in _SERIES_LEVEL:
        _on_every_slice(series, keyword)
    for keyword in _ISOTOPE_LEVEL:
        _on_every_slice(series, keyword, isotope=True)


def _series_value(series: PetSeries, keyword: str) -> str:
    """A series-level attribute that every slice must carry with the same value."""
    value = _on_every_slice(series, keyword)
    if not value:
        raise InputError(series.files[0], f"{keyword} missing")
    return value


def _check_corrections(series: PetSeries) -> str:
    """Refuse images without attenuation and decay correction (NONE: we correct decay ourselves)."""
    corrected = set(series.first.get("CorrectedImage") or [])
    decay_mode = _text(series.first.get("DecayCorrection", ""))
    path = series.files[0]
    if "ATTN" not in corrected:
        raise InputError(path, f"CorrectedImage {sorted(corrected)} lacks ATTN: not attenuation corrected, no SUV")
    if decay_mode == "NONE":
        if "DECY" in corrected:
            raise InputError(path, "CorrectedImage says DECY but DecayCorrection is NONE: contradictory")
        return "CorrectedImage has ATTN; DecayCorrection NONE: decay corrected here, slice by slice"
    if "DECY" not in corrected:
        raise InputError(path, f"CorrectedImage {sorted(corrected)} lacks DECY: not decay corrected, no SUV")
    return "CorrectedImage has ATTN and DECY"


def _units_to_bw(series: PetSeries, units: str, patient: Patient) -> _ToBw:
    """Factors from modality values to SUVbw for each Units (BQML, CNTS-Philips, GML, CM2ML)."""
    if units == "BQML":
        return _activity_to_bw(series, patient, np.ones(len(series.headers)), "Units BQML: modality values are Bq/mL")
    if units == "CNTS":
        return _philips_to_bw(series, patient)
    if units == "GML":
        return _gml_to_bw(series, patient)
    if units == "CM2ML":
        suv_type = _text(series.first.get("SUVType", "")) or "BSA"
        if suv_type != "BSA":
            raise InputError(series.files[0], f"Units CM2ML with SUVType {suv_type}: inconsistent")
        return _stored_suv_to_bw(series, patient, "bsa")
    raise InputError(series.files[0], f"Units {units}: no SUV possible (BQML, CNTS with Philips factors, GML or CM2ML)")


def _philips_to_bw(series: PetSeries, patient: Patient) -> _ToBw:
    """Philips CNTS: (7053,1009) activity-concentration factor to Bq/mL (preferred: our decay
    rules apply), else (7053,1000) SUVbw factor."""
    acsf = [_private(ds, 0x7053, PHILIPS_PET_CREATOR, 0x09) for ds in series.headers]
    suvf = [_private(ds, 0x7053, PHILIPS_PET_CREATOR, 0x00) for ds in series.headers]
    if all(acsf):
        factors = _positive_factors(series, acsf, "Philips activity concentration scale factor (7053,1009)")
        return _activity_to_bw(series, patient, factors, "Units CNTS: Philips (7053,1009) × modality value = Bq/mL")
    if all(suvf):
        factors = _positive_factors(series, suvf, "Philips SUV scale factor (7053,1000)")
        return _ToBw(factors, {"units": "Units CNTS: Philips (7053,1000) × modality value = SUVbw (decay applied by the scanner)"})
    raise InputError(series.files[0], "Units CNTS without Philips scale factors (7053,1009) or (7053,1000) on every slice")


def _positive_factors(series: PetSeries, texts: list[str | None], what: str) -> np.ndarray:
    """Per-slice vendor factors as numbers, refused unless all are positive numbers."""
    try:
        factors = np.array([float(text) for text in texts])
    except (TypeError, ValueError) as exc:
        raise InputError(series.folder, f"{what} is not a number") from exc
    if np.any(~(factors > 0.0)):
        raise InputError(series.folder, f"{what} not positive")
    return factors


def _gml_to_bw(series: PetSeries, patient: Patient) -> _ToBw:
    """GML: values are SUV of SUVType (BW when absent); other types are converted back to SUVbw."""
    suv_type = _text(series.first.get("SUVType", "")) or "BW"
    stored_kind = {"BW": "bw", "LBMJAMES128": "lbm-james128", "LBMJANMA": "lbm-janmahasatian", "IBW": "ibw"}.get(suv_type)
    if stored_kind is None:
        raise InputError(series.files[0], f"Units GML with SUVType {suv_type}: not supported (BW, LBMJAMES128, LBMJANMA, IBW)")
    return _stored_suv_to_bw(series, patient, stored_kind)


def _stored_suv_to_bw(series: PetSeries, patient: Patient, stored_kind: str) -> _ToBw:
    """Factor from an SUV the scanner stored (bw, lbm-<formula>, ibw by IBSI-SUV, bsa) to SUVbw:
    weight / the stored SUV's body measure."""
    units = "CM2ML" if stored_kind == "bsa" else "GML"
    n = len(series.headers)
    if stored_kind == "bw":
        return _ToBw(np.ones(n), {"units": "Units GML, SUVType BW: values are SUVbw"})
    kind, _, formula = stored_kind.partition("-")
    normaliser, rule = body_normaliser(patient, kind, formula or "janmahasatian", ibw=ibw_sugawara_kg, path=series.files[0])
    factor = 1000.0 * patient.weight_kg / normaliser
    return _ToBw(np.full(n, factor), {"units": f"Units {units}: values are SUV{kind} ({rule}); SUVbw = value × weight / that"})


def _activity_to_bw(series: PetSeries, patient: Patient, to_bqml: np.ndarray, units_rule: str) -> _ToBw:
    """Bq/mL → SUVbw: weight [g] / (dose [Bq] × decay from injection to the scan reference)."""
    dose, dose_rule = _dose_Bq(series)
    mode = _text(series.first.get("DecayCorrection", ""))
    rules = {"units": units_rule, "dose": dose_rule}
    if mode == "ADMIN":
        rules["decay"] = "DecayCorrection ADMIN: values already decayed to injection, decay factor 1"
        factors = to_bqml * 1000.0 * patient.weight_kg / dose
        return _ToBw(factors, rules, decay=np.ones_like(to_bqml), dose_Bq=dose)
    half_life, rules["half_life"] = _half_life_s(series)
    if mode == "START":
        scan, rules["scan_time"] = _start_reference(series, half_life)
        injection, rules["injection_time"] = _injection(series, scan)
        decay = np.full(len(to_bqml), 0.5 ** ((scan - injection).total_seconds() / half_life))
        rules["decay"] = "DecayCorrection START: values refer to the scan reference time; dose decayed from injection to it"
    elif mode == "NONE":
        starts = _acquisition_starts(series)
        scan, rules["scan_time"] = min(starts), "NONE: each slice's AcquisitionDate/AcquisitionTime (earliest shown)"
        injection, rules["injection_time"] = _injection(series, scan)
        decay = _frame_decay(series, starts, injection, half_life)
        rules["decay"] = "DecayCorrection NONE: per slice, decay from injection to acquisition start × mean decay over ActualFrameDuration"
    else:
        raise InputError(series.files[0], f"DecayCorrection {mode or 'missing'}: expected START, ADMIN or NONE")
    factors = to_bqml * 1000.0 * patient.weight_kg / (dose * decay)
    return _ToBw(factors, rules, decay=decay, scan=scan, injection=injection, dose_Bq=dose, half_life_s=half_life)


def _dose_Bq(series: PetSeries) -> tuple[float, str]:
    """RadionuclideTotalDose [Bq] (PET Isotope module); values below 1e5 are taken as MBq."""
    dose = _number(_radiopharmaceutical(series), "RadionuclideTotalDose")
    path = series.files[0]
    if dose is None:
        raise InputError(path, "RadionuclideTotalDose missing: SUV needs the injected activity")
    if dose <= 0.0:
        raise InputError(path, f"RadionuclideTotalDose {dose:g} is not positive")
    if dose < MBQ_DOSE_LIMIT:
        return dose * 1e6, f"RadionuclideTotalDose {dose:g} < {MBQ_DOSE_LIMIT:g}: written in MBq by mistake, taken as {dose:g} MBq"
    return dose, f"RadionuclideTotalDose {dose:g} Bq"


def _half_life_s(series: PetSeries) -> tuple[float, str]:
    """RadionuclideHalfLife [s], else the half-life of the nuclide the sequence names."""
    item = _radiopharmaceutical(series)
    half_life = _number(item, "RadionuclideHalfLife")
    if half_life is not None:
        if half_life <= 0.0:
            raise InputError(series.files[0], f"RadionuclideHalfLife {half_life:g} s is not positive")
        return half_life, f"RadionuclideHalfLife {half_life:g} s"
    codes = item.get("RadionuclideCodeSequence") or []
    names = [_text(code.get("CodeMeaning", "")) for code in codes] + [_text(item.get("Radiopharmaceutical", ""))]
    for name in filter(None, names):
        nuclide = find_nuclide(name)
        if nuclide is not None:
            return nuclide.half_life_s, f"RadionuclideHalfLife missing: {nuclide.name} half-life {nuclide.half_life_s:g} s from the nuclide named"
    raise InputError(series.files[0], "RadionuclideHalfLife missing and no known radionuclide named")


def _acquisition_starts(series: PetSeries) -> list[datetime]:
    """AcquisitionDate/AcquisitionTime of every slice (SeriesDate when AcquisitionDate is absent)."""
    starts = []
    for path, ds in zip(series.files, series.headers):
        when = _date_time(ds, "AcquisitionDate", "AcquisitionTime", path) or _date_time(ds, "SeriesDate", "AcquisitionTime", path)
        if when is None:
            raise InputError(path, "AcquisitionDate/AcquisitionTime missing")
        starts.append(when)
    return starts


def _start_reference(series: PetSeries, half_life_s: float) -> tuple[datetime, str]:
    """Scan reference time for DecayCorrection START (QIBA): GE private (0009,100D) when present;
    SeriesDate/SeriesTime unless after the earliest acquisition; then back-computed from
    FrameReferenceTime; else the earliest AcquisitionDate/AcquisitionTime."""
    ds, path = series.first, series.files[0]
    ge = _private(ds, 0x0009, GE_PET_CREATOR, 0x0D)
    if ge:
        return _parse_dt(ge, path, "GE private scan date-time (0009,100D)"), "GE private scan date-time (0009,100D)"
    starts = _acquisition_starts(series)
    earliest = min(starts)
    series_time = _date_time(ds, "SeriesDate", "SeriesTime", path)
    if series_time is not None and series_time <= earliest:
        return series_time, "SeriesDate/SeriesTime (not after the earliest acquisition)"
    why = "SeriesDate/SeriesTime missing" if series_time is None else "SeriesTime after the earliest AcquisitionTime (series re-created)"
    k = starts.index(earliest)
    back = _back_computed_reference(series.headers[k], earliest, half_life_s)
    if back is not None:
        return back, f"{why}: AcquisitionTime − FrameReferenceTime + mean-count-rate time within the frame (QIBA)"
    return earliest, f"{why}: earliest AcquisitionDate/AcquisitionTime"


def _back_computed_reference(ds: Dataset, start: datetime, half_life_s: float) -> datetime | None:
    """Decay reference time from a frame: its start − FrameReferenceTime + the time within the
    frame at which the count rate equals its mean; None without positive frame times."""
    reference_ms, duration_ms = _number(ds, "FrameReferenceTime"), _number(ds, "ActualFrameDuration")
    if not reference_ms or not duration_ms or reference_ms <= 0 or duration_ms <= 0:
        return None
    lam = math.log(2.0) / half_life_s
    decay_in_frame = lam * duration_ms / 1000.0
    mean_rate_time_s = math.log(decay_in_frame / (1.0 - math.exp(-decay_in_frame))) / lam
    return start - timedelta(milliseconds=reference_ms) + timedelta(seconds=mean_rate_time_s)


def _injection(series: PetSeries, scan: datetime) -> tuple[datetime, str]:
    """Injection time: RadiopharmaceuticalStartDateTime, else RadiopharmaceuticalStartTime on the
    scan date (the day before when that would follow the scan: injection across midnight)."""
    item, path = _radiopharmaceutical(series), series.files[0]
    full = _text(item.get("RadiopharmaceuticalStartDateTime", ""))
    if full:
        injection = _parse_dt(full, path, "RadiopharmaceuticalStartDateTime")
        rule = "RadiopharmaceuticalStartDateTime"
    else:
        clock = item.get("RadiopharmaceuticalStartTime")
        if not clock:
            raise InputError(path, "RadiopharmaceuticalStartDateTime and RadiopharmaceuticalStartTime missing: no injection time")
        try:
            injection = datetime.combine(scan.date(), _as_time(clock))
        except ValueError as exc:
            raise InputError(path, f"RadiopharmaceuticalStartTime unreadable: {clock!r}") from exc
        rule = "RadiopharmaceuticalStartTime on the scan date"
        if injection > scan:
            injection -= timedelta(days=1)
            rule = "RadiopharmaceuticalStartTime on the day before the scan (injection across midnight)"
    if injection > scan:
        raise InputError(path, f"scan reference time {scan.isoformat()} is before the injection {injection.isoformat()}")
    return injection, rule


def _frame_decay(series: PetSeries, starts: list[datetime], injection: datetime, half_life_s: float) -> np.ndarray:
    """Per slice: activity fraction at acquisition start × mean fraction over the frame duration."""
    lam = math.log(2.0) / half_life_s
    factors = []
    for path, ds, start in zip(series.files, series.headers, starts):
        duration_ms = _number(ds, "ActualFrameDuration")
        if not duration_ms or duration_ms <= 0:
            raise InputError(path, "ActualFrameDuration missing: needed to decay-correct a DecayCorrection NONE image")
        x = lam * duration_ms / 1000.0
        factors.append(math.exp(-lam * (start - injection).total_seconds()) * (1.0 - math.exp(-x)) / x)
    return np.array(factors)


# --------------------------------------------------------------------------- images and masks


def suv_image(series: PetSeries, kind: str = "bw", lbm_formula: str = "janmahasatian") -> sitk.Image:
    """SUV image (float32, same grid) of ``kind``: modality values × the per-slice scale."""
    scale = suv_scale(series, kind, lbm_formula)
    return scaled_image(series.image, scale)


def scaled_image(image: sitk.Image, scale: SuvScale) -> sitk.Image:
    """``image`` (modality values) × ``scale.scale``, slice by slice (array axis 0)."""
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    factors = scale.scale_per_slice(values.shape[0])
    out = sitk.GetImageFromArray((values * factors[:, None, None]).astype(np.float32))
    out.CopyInformation(image)
    return out


@dataclass(frozen=True)
class MaskStats:
    """Minimum, median and maximum of an image inside a mask (image units), and the voxel count."""

    min: float
    median: float
    max: float
    voxels: int


def mask_stats(image: sitk.Image, mask: sitk.Image) -> MaskStats:
    """Statistics of ``image`` over the non-zero voxels of ``mask`` (same grid required)."""
    if mask.GetSize() != image.GetSize():
        raise ValueError(f"mask size {mask.GetSize()} differs from image size {image.GetSize()}")
    inside = sitk.GetArrayViewFromImage(mask) != 0
    if not inside.any():
        raise InputError(None, "mask is empty")
    values = sitk.GetArrayViewFromImage(image)[inside].astype(np.float64)
    return MaskStats(float(values.min()), float(np.median(values)), float(values.max()), int(values.size))


def load_mask(path: str | Path, series: PetSeries, roi: str | None = None) -> sitk.Image:
    """A mask on the PET grid from a NIfTI file (same grid required) or an RTSTRUCT (same frame
    of reference required; ``roi`` names the ROI when it holds several)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such mask file")
    if path.name.endswith((".nii", ".nii.gz")):
        if roi is not None:
            raise InputError(path, "--roi applies to RTSTRUCT masks only")
        return _nifti_mask(path, series.image, getattr(series, 'label', 'PET'))
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        raise InputError(path, "mask is neither NIfTI (.nii, .nii.gz) nor a readable DICOM file") from exc
    if ds.get("Modality") != "RTSTRUCT":
        raise InputError(path, f"mask DICOM has Modality {ds.get('Modality', '?')}, expected RTSTRUCT")
    return _rtstruct_mask(path, ds, series, roi)


def _nifti_mask(path: Path, reference: sitk.Image, label: str = "PET") -> sitk.Image:
    try:
        mask = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, "NIfTI mask unreadable") from exc
    if mask.GetDimension() != 3 or mask.GetSize() != reference.GetSize():
        raise InputError(path, f"mask grid {mask.GetSize()} differs from the {label} grid {reference.GetSize()}")
    same = (
        np.allclose(mask.GetSpacing(), reference.GetSpacing(), rtol=1e-3)
        and np.allclose(mask.GetOrigin(), reference.GetOrigin(), atol=0.01 * min(reference.GetSpacing()))
        and np.allclose(mask.GetDirection(), reference.GetDirection(), atol=1e-4)
    )
    if not same:
        raise InputError(path, f"mask is on another grid (origin, spacing or orientation) than the {label}")
    mask = sitk.Cast(mask != 0, sitk.sitkUInt8)
    mask.CopyInformation(reference)
    return mask


def _rtstruct_mask(path: Path, ds: Dataset, series: PetSeries, roi: str | None) -> sitk.Image:
    """Rasterise one ROI's CLOSED_PLANAR contours: voxel centres inside (even-odd rule, so inner
    contours are holes) on the PET slice each contour lies in."""
    number = _roi_number(path, ds, roi, str(series.first.FrameOfReferenceUID), getattr(series, 'label', 'PET'))
    contours = next((item.get("ContourSequence") or [] for item in ds.get("ROIContourSequence", []) if item.ReferencedROINumber == number), [])
    image = series.image
    inverse = np.linalg.inv(np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing()))
    size = image.GetSize()
    mask = np.zeros(size[::-1], dtype=bool)
    for contour in contours:
        if contour.get("ContourGeometricType") != "CLOSED_PLANAR":
            continue
        points = np.asarray(contour.ContourData, float).reshape(-1, 3)
        index = (points - np.asarray(image.GetOrigin())) @ inverse.T
        k = int(round(float(index[:, 2].mean())))
        if np.ptp(index[:, 2]) > 0.1 or abs(index[:, 2].mean() - k) > 0.1:
            raise InputError(path, f"a contour does not lie in a {getattr(series, 'label', 'PET')} slice plane")
        if not 0 <= k < size[2]:
            raise InputError(path, f"a contour lies outside the {getattr(series, 'label', 'PET')} volume")
        mask[k] ^= _inside_polygon(index[:, 0], index[:, 1], size[0], size[1])
    if not mask.any():
        raise InputError(path, f"the ROI's contours enclose no {getattr(series, 'label', 'PET')} voxel centre")
    out = sitk.GetImageFromArray(mask.astype(np.uint8))
    out.CopyInformation(image)
    return out


def _roi_number(path: Path, ds: Dataset, roi: str | None, frame_of_reference: str, label: str = "PET") -> int:
    """The ROI to use (the only one, or the one named ``roi``), checked against the PET's frame of reference."""
    rois = list(ds.get("StructureSetROISequence", []))
    if roi is not None:
        rois = [item for item in rois if str(item.ROIName) == roi]
    if len(rois) != 1:
        names = ", ".join(str(item.ROIName) for item in ds.get("StructureSetROISequence", []))
        raise InputError(path, f"{len(rois)} ROIs match; name one with --roi (ROIs: {names or 'none'})")
    item = rois[0]
    if str(item.get("ReferencedFrameOfReferenceUID", "")) != frame_of_reference:
        raise InputError(path, f"ROI frame of reference {item.get('ReferencedFrameOfReferenceUID', 'missing')} is not the {label}'s {frame_of_reference}")
    return int(item.ROINumber)


def _inside_polygon(xs: np.ndarray, ys: np.ndarray, columns: int, rows: int) -> np.ndarray:
    """Boolean [rows, columns]: pixel centres (i, j integer) inside the polygon (even-odd rule)."""
    inside = np.zeros((rows, columns), dtype=bool)
    i0, i1 = max(int(np.floor(xs.min())), 0), min(int(np.ceil(xs.max())), columns - 1)
    j0, j1 = max(int(np.floor(ys.min())), 0), min(int(np.ceil(ys.max())), rows - 1)
    if i0 > i1 or j0 > j1:
        return inside
    px, py = np.meshgrid(np.arange(i0, i1 + 1, dtype=float), np.arange(j0, j1 + 1, dtype=float))
    crossings = np.zeros(px.shape, dtype=bool)
    for x1, y1, x2, y2 in zip(xs, ys, np.roll(xs, -1), np.roll(ys, -1)):
        if y1 == y2:
            continue
        straddles = (y1 > py) != (y2 > py)
        crossings ^= straddles & (px < x1 + (py - y1) * (x2 - x1) / (y2 - y1))
    inside[j0 : j1 + 1, i0 : i1 + 1] = crossings
    return inside


# --------------------------------------------------------------------------- SPECT


@dataclass(frozen=True)
class SpectUptakeScale:
    """Factors for a SPECT image in Bq/mL referring to ``reference_time``.

    ``suv_bw_scale`` [g/mL per Bq/mL]: × voxel value = SUVbw. ``percent_ia_per_mL_scale``
    [%IA/mL per Bq/mL]: × voxel value = % of the injected activity (decayed to the image's
    reference time) per mL; × a VOI's summed Bq/mL × voxel volume [mL] = %IA in that VOI.
    ``decay_factor`` = activity at the reference time / activity at administration.
    """

    suv_bw_scale: float
    percent_ia_per_mL_scale: float
    decay_factor: float


def spect_uptake_scale(weight_kg: float, administered_MBq: float, administration_time: datetime,
                       reference_time: datetime, half_life_s: float) -> SpectUptakeScale:
    """SUVbw and %IA factors for a SPECT image in Bq/mL whose values refer to ``reference_time``
    (e.g. acquisition start), for ``administered_MBq`` given at ``administration_time``."""
    if not 0.0 < weight_kg <= MAX_WEIGHT_KG:
        raise InputError(None, f"weight {weight_kg:g} kg is implausible (expected 0-{MAX_WEIGHT_KG:g} kg)")
    if administered_MBq <= 0.0:
        raise InputError(None, f"administered activity {administered_MBq:g} MBq is not positive")
    if half_life_s <= 0.0:
        raise InputError(None, f"half-life {half_life_s:g} s is not positive")
    elapsed_s = (reference_time - administration_time).total_seconds()
    if elapsed_s < 0:
        raise InputError(None, f"image reference time {reference_time.isoformat()} is before the administration {administration_time.isoformat()}")
    decay = 0.5 ** (elapsed_s / half_life_s)
    activity_Bq = administered_MBq * 1e6 * decay
    return SpectUptakeScale(1000.0 * weight_kg / activity_Bq, 100.0 / activity_Bq, decay)
