"""Outputs of the lesion analysis: the lesion table (JSON, CSV), the lesion VOIs as a DICOM
Segmentation, the measurements as a DICOM Comprehensive 3D SR following TID 1500
(Measurement Report).

Values keep the units of :mod:`quant.voi`: SUV in g/mL (SUVbw), volumes in mL, lengths in mm,
total lesion uptake in g (SUVbw × mL). Codes: SUVbw measurements are DCM 126401 with UCUM
g/ml{SUVbw}; derivations SCT Maximum / Mean, DCM 126031 Peak Value Within ROI; volumes SCT
118565006; axes SCT Long axis / Short axis. Figures without a standard code (total lesion
uptake, lesion-to-reference ratios, miPSMA score) use the private scheme ``99THERAFLOW``.
"""

from __future__ import annotations

import copy
import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from quant.voi import Lesion, RegionStats

SOFTWARE = "theraflow"
PRIVATE_SCHEME = "99THERAFLOW"
SITE_CODES = {
    "lymph_node": codes.SCT.LymphNode,
    "bone": codes.SCT.Bone,
    "bone_soft_tissue": codes.SCT.Bone,
}
REFERENCE_CODES = {
    "liver": codes.SCT.Liver,
    "parotid": codes.SCT.ParotidGland,
    "spleen": codes.SCT.Spleen,
    "blood_pool": codes.SCT.Aorta,
}
TABLE_COLUMNS = ("label", "name", "site", "voxels", "volume_mL", "suv_max", "suv_mean", "suv_sd", "suv_peak", "tlu",
                 "long_axis_mm", "short_axis_mm", "site_short_axis_mm", "lesion_to_liver", "lesion_to_parotid", "promise_score",
                 "max_position_mm", "peak_centre_mm", "centroid_mm")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("theraflow")
    except Exception:  # not installed: a source checkout
        return "0"


# --------------------------------------------------------------------------- tables


def lesion_rows(lesions: Sequence[Lesion], scores: Mapping[int, int | None] | None = None) -> list[dict[str, Any]]:
    """One dict per lesion with :data:`TABLE_COLUMNS` (positions as 'x y z' text in mm)."""
    scores = scores or {}
    rows = []
    for lesion in lesions:
        data = lesion.as_dict()
        data["promise_score"] = scores.get(lesion.label)
        for key in ("max_position_mm", "peak_centre_mm", "centroid_mm"):
            data[key] = " ".join(f"{v:.1f}" for v in data[key])
        rows.append({key: data.get(key) for key in TABLE_COLUMNS})
    return rows


def write_lesion_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(TABLE_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default, ensure_ascii=False) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


# --------------------------------------------------------------------------- DICOM SEG


def read_source_images(files: Sequence[Path]) -> list[Dataset]:
    """The PET slices' headers in series order (no pixel data needed by highdicom here)."""
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in files]


def lesion_segmentation(labels: sitk.Image, lesions: Sequence[Lesion], source_images: Sequence[Dataset],
                        series_number: int = 900) -> hd.seg.Segmentation:
    """A BINARY DICOM Segmentation with one segment per lesion (segment number = lesion label),
    on the frames of ``source_images`` (the PET slices in array order)."""
    label_array = sitk.GetArrayFromImage(labels).astype(np.uint16)
    if label_array.shape[0] != len(source_images):
        raise ValueError(f"{label_array.shape[0]} label slices for {len(source_images)} source images")
    if not lesions:
        raise ValueError("no lesion to segment")
    present = sorted(lesion.label for lesion in lesions)
    if present != list(range(1, len(present) + 1)):
        raise ValueError(f"lesion labels must be 1..N, got {present}")
    algorithm = hd.AlgorithmIdentificationSequence(name=SOFTWARE, version=_version(), family=codes.cid7162.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=lesion.label,
            segment_label=f"Lesion {lesion.label}" + ("" if lesion.name == "auto" else f" ({lesion.name})"),
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC if lesion.name == "auto" else hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            algorithm_identification=algorithm if lesion.name == "auto" else None,
            tracking_uid=hd.UID(),
            tracking_id=f"Lesion {lesion.label}",
        )
        for lesion in sorted(lesions, key=lambda item: item.label)
    ]
    return hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=label_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=SOFTWARE,
        manufacturer_model_name=f"{SOFTWARE} quant",
        software_versions=_version(),
        device_serial_number="0",
        content_description="Lesion VOIs",
        content_label="LESIONS",
        series_description="theraflow lesion VOIs",
    )


# --------------------------------------------------------------------------- DICOM SR (TID 1500)


def _private(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


_ML = hd.sr.CodedConcept(value="ml", scheme_designator="UCUM", meaning="milliliter")
_MM = hd.sr.CodedConcept(value="mm", scheme_designator="UCUM", meaning="millimeter")
_GRAM = hd.sr.CodedConcept(value="g", scheme_designator="UCUM", meaning="gram")
_ONE = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
_SCORE = hd.sr.CodedConcept(value="{score}", scheme_designator="UCUM", meaning="score")


def _suv_unit(kind: str) -> hd.sr.CodedConcept:
    if kind != "bw":
        raise ValueError("the SR writer records SUVbw only")
    return hd.sr.CodedConcept(value="g/ml{SUVbw}", scheme_designator="UCUM", meaning="Standardized Uptake Value body weight")


def _lesion_measurements(lesion: Lesion, score: int | None, suv_kind: str) -> list[hd.sr.Measurement]:
    unit = _suv_unit(suv_kind)
    suv = codes.DCM.Suvbw
    items = [
        hd.sr.Measurement(name=suv, value=lesion.suv_max, unit=unit, derivation=codes.SCT.Maximum),
        hd.sr.Measurement(name=suv, value=lesion.suv_mean, unit=unit, derivation=codes.SCT.Mean),
        hd.sr.Measurement(name=suv, value=lesion.suv_peak, unit=unit, derivation=codes.DCM.PeakValueWithinROI),
        hd.sr.Measurement(name=codes.SCT.Volume, value=lesion.volume_mL, unit=_ML),
        hd.sr.Measurement(name=_private("TLU", "Total lesion uptake (SUVmean x volume)"), value=lesion.tlu, unit=_GRAM),
        hd.sr.Measurement(name=codes.SCT.LongAxis, value=lesion.long_axis_mm, unit=_MM),
        hd.sr.Measurement(name=codes.SCT.ShortAxis, value=lesion.short_axis_mm, unit=_MM),
    ]
    for reference, value in sorted(lesion.ratios.items()):
        items.append(hd.sr.Measurement(name=_private(f"RATIO_{reference.upper()}", f"Lesion to {reference.replace('_', ' ')} SUV ratio"),
                                       value=value, unit=_ONE))
    if score is not None:
        items.append(hd.sr.Measurement(name=_private("MIPSMA", "PROMISE miPSMA expression score"), value=float(score), unit=_SCORE))
    return items


# Type 2 patient and study attributes the SR copies from its evidence; real files often lack
# some of them (AccessionNumber above all), which DICOM allows only as present but empty.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _with_type2(ds: Dataset) -> Dataset:
    """``ds``, or a shallow copy of it with the missing ``_TYPE2`` attributes present and empty."""
    missing = [name for name in _TYPE2 if name not in ds]
    if not missing:
        return ds
    out = copy.copy(ds)
    for name in missing:
        setattr(out, name, "")
    return out


def measurement_report_sr(lesions: Sequence[Lesion], references: Mapping[str, RegionStats], source_images: Sequence[Dataset],
                          segmentation: Dataset | None, scores: Mapping[int, int | None] | None = None,
                          suv_kind: str = "bw", series_number: int = 901) -> hd.sr.Comprehensive3DSR:
    """A Comprehensive 3D SR with a TID 1500 Measurement Report: one volumetric measurement
    group per lesion (referencing its segment in ``segmentation``) and one measurement group
    per reference region (SUV mean and SD)."""
    scores = scores or {}
    first = source_images[0]
    series_uid = str(first.SeriesInstanceUID)
    groups: list[Any] = []
    for lesion in lesions:
        if segmentation is None:
            raise ValueError("lesion measurements need the segmentation they refer to")
        site = SITE_CODES.get(lesion.site)
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"Lesion {lesion.label}"),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=str(segmentation.SOPClassUID), sop_instance_uid=str(segmentation.SOPInstanceUID),
                segment_number=lesion.label, source_series=hd.sr.SourceSeriesForSegmentation(series_uid)),
            finding_type=codes.SCT.Lesion,
            finding_sites=[hd.sr.FindingSite(site)] if site is not None else None,
            measurements=_lesion_measurements(lesion, scores.get(lesion.label), suv_kind),
        ))
    unit = _suv_unit(suv_kind)
    for name, region in sorted(references.items()):
        site = REFERENCE_CODES.get(name)
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"Reference {name}"),
            finding_type=codes.SCT.AnatomicalStructure,
            finding_sites=[hd.sr.FindingSite(site)] if site is not None else None,
            measurements=[
                hd.sr.Measurement(name=codes.DCM.Suvbw, value=region.suv_mean, unit=unit, derivation=codes.SCT.Mean),
                hd.sr.Measurement(name=codes.DCM.Suvbw, value=region.suv_sd, unit=unit, derivation=codes.SCT.StandardDeviation),
                hd.sr.Measurement(name=codes.SCT.Volume, value=region.volume_mL, unit=_ML),
            ],
        ))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name=SOFTWARE, manufacturer_name=SOFTWARE,
                                                                                 model_name=f"{SOFTWARE} quant"),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.PETWholeBody,
        imaging_measurements=groups,
    )
    evidence = [_with_type2(ds) for ds in source_images] + ([segmentation] if segmentation is not None else [])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=SOFTWARE,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description="theraflow lesion measurements",
    )
    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "theraflow private codes"
    scheme.CodingSchemeResponsibleOrganization = "theraflow"
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def sr_measurements(sr: Dataset) -> list[dict[str, Any]]:
    """Lesion measurement groups of a TID 1500 SR read back: tracking id, referenced segment and
    {name (derivation): value} (for tests and downstream checks)."""
    out = []
    report = hd.sr.srread(sr) if isinstance(sr, (str, Path)) else sr
    content = report.ContentSequence
    for item in content:
        if item.ConceptNameCodeSequence[0].CodeValue != "126010":  # Imaging Measurements
            continue
        for group in item.ContentSequence:
            entry: dict[str, Any] = {"measurements": {}}
            for child in group.ContentSequence:
                name = child.ConceptNameCodeSequence[0].CodeMeaning
                if child.ValueType == "TEXT" and name == "Tracking Identifier":
                    entry["tracking_id"] = str(child.TextValue)
                elif child.ValueType == "IMAGE" and "ReferencedSOPSequence" in child:
                    ref = child.ReferencedSOPSequence[0]
                    if "ReferencedSegmentNumber" in ref:
                        entry["segment"] = int(ref.ReferencedSegmentNumber)
                elif child.ValueType == "NUM":
                    derivation = next((m.ConceptCodeSequence[0].CodeMeaning for m in child.get("ContentSequence", [])
                                       if m.ConceptNameCodeSequence[0].CodeMeaning == "Derivation"), None)
                    key = name if derivation is None else f"{name} ({derivation})"
                    entry["measurements"][key] = float(child.MeasuredValueSequence[0].NumericValue)
            out.append(entry)
    return out
