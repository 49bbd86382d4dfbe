"""De-identification of research exports: a short explicit list, not the full DICOM PS3.15
Basic Profile.

What it does to every element, at every nesting level:

- private elements are removed;
- the attributes in ``REMOVED`` are removed, those in ``EMPTIED`` are kept empty (type 2);
- every person name (VR PN) is emptied; PatientName and PatientID become the pseudonym;
- every UID that is not a standard DICOM UID (``1.2.840.10008.…``) is replaced by a UID derived
  from it and a secret salt, so that references between exported objects still match;
- PatientIdentityRemoved = YES and DeidentificationMethod say so.

Dates and times are kept: decay correction and dosimetry need them. Burned-in text in pixels is
not looked for (reconstructed SPECT has none).
"""

from __future__ import annotations

from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement
from pydicom.uid import generate_uid

REMOVED = (
    "PatientBirthTime", "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName", "OtherPatientIDs",
    "OtherPatientNames", "OtherPatientIDsSequence", "MedicalRecordLocator", "PatientComments", "AdditionalPatientHistory",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber",
    "RequestAttributesSequence", "ReferencedPatientSequence", "ImageComments", "DerivationDescription",
    "MilitaryRank", "BranchOfService", "EthnicGroup", "Occupation", "RegionOfResidence", "CountryOfResidence",
)
EMPTIED = ("PatientBirthDate", "AccessionNumber", "StudyID")
_STANDARD_UID_ROOT = "1.2.840.10008."
METHOD = "theraflow explicit list; UIDs remapped; dates kept"   # LO: 64 characters at most


def _remap(uid: str, salt: str) -> str:
    return uid if uid.startswith(_STANDARD_UID_ROOT) else str(generate_uid(entropy_srcs=[salt, uid]))


def deidentify(ds: Dataset, pseudonym: str, salt: str) -> Dataset:
    """De-identify ``ds`` in place (see the module text) and return it."""
    ds.remove_private_tags()

    def visit(dataset: Dataset, element: DataElement) -> None:
        if element.keyword in REMOVED:
            del dataset[element.tag]
        elif element.keyword in EMPTIED or element.VR == "PN":
            element.value = ""
        elif element.VR == "UI" and element.value:
            element.value = [_remap(str(v), salt) for v in element.value] if element.VM > 1 else _remap(str(element.value), salt)

    ds.walk(visit)
    ds.PatientName = pseudonym
    ds.PatientID = pseudonym
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    if getattr(ds, "file_meta", None) is not None and "SOPInstanceUID" in ds:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def deidentify_file(source: Path, target: Path, pseudonym: str, salt: str) -> Path:
    """Write a de-identified copy of ``source`` to ``target``."""
    ds = deidentify(dcmread(source), pseudonym, salt)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target
