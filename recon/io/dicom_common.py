"""Small pieces shared by the DICOM writers (NM reconstruction, PET image series)."""

from __future__ import annotations

import importlib.metadata

from pydicom import Dataset
from pydicom.valuerep import format_number_as_ds

# Default patient orientation: recumbent, supine, head first (SNOMED CT, CID 19/20/21).
RECUMBENT = ("102538003", "SCT", "recumbent")
SUPINE = ("40199007", "SCT", "supine")
HEADFIRST = ("102540008", "SCT", "headfirst")


def software_version() -> str:
    """The installed theraflow version, '0+unknown' when not installed as a package."""
    try:
        return importlib.metadata.version("theraflow")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """A code sequence item (Code Value, Coding Scheme Designator, Code Meaning)."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def ds_text(value: float) -> str:
    """``value`` as a valid DS string (at most 16 characters)."""
    return format_number_as_ds(float(value))


def patient_orientation_item() -> Dataset:
    """Patient Orientation Code Sequence item: recumbent, with modifier supine."""
    item = code_item(*RECUMBENT)
    item.PatientOrientationModifierCodeSequence = [code_item(*SUPINE)]
    return item


def set_monochrome16(ds: Dataset, rows: int, columns: int, signed: bool = False) -> None:
    """Image Pixel attributes of 16-bit greyscale pixels (one sample, MONOCHROME2)."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0


def copy_attributes(ds: Dataset, source: Dataset, type2: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Copy ``type2`` attributes from ``source`` (empty when it lacks them) and the ``optional``
    ones it has (patient and study modules of a derived object)."""
    for keyword in type2:
        setattr(ds, keyword, source.get(keyword) or "")
    for keyword in optional:
        if source.get(keyword):
            setattr(ds, keyword, source.get(keyword))
