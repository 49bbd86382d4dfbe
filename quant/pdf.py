"""The report where clinicians look: HTML rendered to PDF by headless Chromium, and the PDF as a
DICOM Encapsulated PDF object in the patient's study (PS3.3 A.45.1: Patient, General Study,
Encapsulated Document Series, General Equipment, SC Equipment, Encapsulated Document, SOP
Common). The patient and study attributes are copied from an image of the study; nothing else
about the patient is added.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from datetime import datetime
from pathlib import Path

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from recon.io.dicom_common import code_item, software_version

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
_CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--no-pdf-header-footer")
# Patient and General Study attributes copied from the study's image.
_PATIENT_STUDY = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                  "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
REPORT_TITLE = ("18748-4", "LN", "Diagnostic imaging study")


def chromium() -> str:
    """The Chromium executable (``chromium`` or ``chromium-browser`` on PATH)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("headless Chromium is needed to render the PDF report (Debian package 'chromium')")


def html_to_pdf(html: Path, pdf: Path, timeout_s: float = 120.0) -> Path:
    """Render ``html`` (a self-contained page) to ``pdf`` with headless Chromium (A4, no network)."""
    with tempfile.TemporaryDirectory(prefix="theraflow-chromium-") as profile:
        proc = subprocess.run([chromium(), *_CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--print-to-pdf={pdf}",
                               html.absolute().as_uri()], capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0 or not pdf.exists() or not pdf.read_bytes().startswith(b"%PDF"):
        raise RuntimeError(f"Chromium could not render {html.name} to PDF (exit {proc.returncode})")
    return pdf


def encapsulated_pdf(pdf: bytes, study_image: Dataset, title: str, *, series_number: int = 990,
                     when: datetime | None = None) -> Dataset:
    """An Encapsulated PDF object holding ``pdf`` in the study of ``study_image`` (a new series of
    Modality DOC), titled ``title`` (at most 64 characters)."""
    when = when or datetime.now()
    ds = Dataset()
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = generate_uid()
    for keyword in _PATIENT_STUDY:                           # Patient and General Study modules (type 2: may be empty)
        if keyword in study_image:
            ds[keyword] = study_image[keyword]
        elif keyword != "IssuerOfPatientID":
            setattr(ds, keyword, "")
    ds.Modality = "DOC"                                      # Encapsulated Document Series
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "theraflow report"
    ds.Manufacturer = "theraflow"                            # General Equipment
    ds.SoftwareVersions = f"theraflow {software_version()}"
    ds.ConversionType = "WSD"                                # SC Equipment: workstation
    ds.InstanceNumber = 1                                    # Encapsulated Document
    ds.ContentDate, ds.ContentTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = title[:64]
    ds.ConceptNameCodeSequence = [code_item(*REPORT_TITLE)]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.SpecificCharacterSet = study_image.get("SpecificCharacterSet", "ISO_IR 100")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds
