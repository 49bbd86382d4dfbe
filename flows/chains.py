"""What happens to one study after a scan, by route, as plain functions (no Prefect):

- ``pet``: a pre-therapy PET (PSMA or SSTR ligand, from the header's code or name) → reference
  regions from the study's SEG/RTSTRUCT (``quant.regions``; or a configured segmenter command)
  → lesions → VISION / TheraP / PROMISE (``quant.pipeline.run_select``) → DICOM SEG, SR and the
  report as Encapsulated PDF, for the PACS. No reference region yet: *waiting*; another tracer:
  *skipped*, with the reason.
- ``spect``: a post-therapy SPECT/CT → calibrated reconstruction (``recon.spect``) → organ and
  lesion activities (MBq, Bq/mL at acquisition start, % of the administered activity) in the
  regions of the study's SEG/RTSTRUCT or, without one, in the regions of an earlier time point
  of the same treatment cycle (same patient, administration time and nuclide), carried by rigid
  CT–CT registration (``quant.registration``); the NM RECON object for the PACS. When the
  cycle then has at least ``DoseOptions.min_timepoints`` SPECT/CT time points (default 3), its
  dosimetry (``quant.dosimetry.pipeline.run_dose``) into ``dose/``, the RT Dose for the PACS.

Each chain writes into a staging folder that the caller renames into place, and appends its
steps to a list as it goes (so that a failure still shows which steps ran).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom

from flows.store import DONE, SKIPPED, WAITING, ResultRecord, Step
from recon.errors import InputError

ROUTE_SPECT, ROUTE_PET = "spect", "pet"
REGIONS_DIR = "regions"                  # canonical regions on the SPECT grid, one mask file each
CT_FILE = "ct.nii.gz"                    # the SPECT/CT's CT, the registration target of later time points
ACTIVITIES_FILE = "activities.json"
LESIONS_FILE = "lesions.nii.gz"          # a PET selection's lesion labels (PET grid), carried to later SPECT/CTs
REPORT_DICOM = "report_pdf.dcm"
DOSE_DIR = "dose"                        # the cycle's dosimetry, written with its last time point
LESION_PREFIX = "lesion_"                # regions that are lesions (sphere model), e.g. a PET selection's


@dataclass(frozen=True)
class DoseOptions:
    """When and how the SPECT chain runs a cycle's dosimetry: once the cycle has
    ``min_timepoints`` SPECT/CT time points (0: never), with the ``settings`` file of
    ``theraflow dose --settings`` (None: its defaults)."""

    min_timepoints: int = 3
    settings: Path | None = None


@dataclass
class ChainResult:
    """What a chain produced: its status (done, waiting, skipped) and reason, the folder it wrote
    (None when nothing), DICOM files (relative to that folder) for the PACS, the summary for the
    store, the provenance, and the pseudonymous patient and treatment-cycle keys."""

    status: str
    reason: str | None = None
    staging: Path | None = None
    push: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    total_activity_MBq: float | None = None
    patient_key: str | None = None
    cycle_key: str | None = None


def _digest(*parts: str) -> str:
    salt = os.environ.get("THERAFLOW_PATIENT_KEY_SALT", "theraflow")
    return hashlib.sha256("\x1f".join((salt, *parts)).encode()).hexdigest()[:32]


def patient_key(patient_id: str, issuer: str = "") -> str:
    """A pseudonymous key of a patient (salted SHA-256 of PatientID and its issuer), so that the
    store links a patient's studies without holding the ID (``THERAFLOW_PATIENT_KEY_SALT``)."""
    return _digest("patient", patient_id.strip(), issuer.strip())


def patient_key_of(ds: pydicom.Dataset) -> str | None:
    patient_id = str(ds.get("PatientID", "") or "")
    return patient_key(patient_id, str(ds.get("IssuerOfPatientID", "") or "")) if patient_id.strip() else None


def cycle_key(nuclide: str, administration: str) -> str:
    """The key of one treatment cycle: one administration (nuclide and start date-time)."""
    return _digest("cycle", nuclide, administration)


class _Steps:
    """Times and records the steps of a chain into a shared list."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps

    def run(self, name: str, work: Callable[[], Any], numbers: Callable[[Any], dict] | None = None) -> Any:
        started = time.perf_counter()
        try:
            value = work()
        except Exception as exc:
            self.steps.append(Step(name, "failed", str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                                   seconds=round(time.perf_counter() - started, 3)))
            raise
        self.steps.append(Step(name, DONE, numbers=None if numbers is None else numbers(value),
                               seconds=round(time.perf_counter() - started, 3)))
        return value

    def note(self, name: str, status: str, reason: str, numbers: dict | None = None) -> None:
        self.steps.append(Step(name, status, reason, numbers))


# -- reference regions ---------------------------------------------------------------------------


def run_segmenter(command: str, ct_dir: Path, out_dir: Path, timeout_s: float = 3600.0) -> list[Path]:
    """A configured segmentation command (``"CMD {ct} {out}"``, run without a shell) on the CT
    folder; the SEG/RTSTRUCT files it leaves in ``out_dir``. Nothing is downloaded by theraflow."""
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = [part.replace("{ct}", str(ct_dir)).replace("{out}", str(out_dir)) for part in shlex.split(command)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise InputError(None, f"segmenter {argv[0]} failed (exit {proc.returncode}): {last}")
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


# -- PET ------------------------------------------------------------------------------------------


def pet_chain(pet_dir: Path, ct_dir: Path | None, segmentation_files: Sequence[Path], staging: Path, steps: list[Step], *,
              segmenter: str | None = None, work: Path | None = None, region_table: Mapping[str, str] | None = None) -> ChainResult:
    """Selection of a pre-therapy PET (see the module text)."""
    import SimpleITK as sitk

    from quant import pipeline, regions, suv
    from quant.pdf import encapsulated_pdf, html_to_pdf
    from quant.tracer import identify_tracer
    from recon.io.ct import read_ct_series

    record = _Steps(steps)
    series = suv.read_pet_series(pet_dir)
    first = series.first
    keys = {"patient_key": patient_key_of(first)}
    tracer = identify_tracer(first)
    if tracer is None or not tracer.selects_for_therapy:
        named = "no radiopharmaceutical named" if tracer is None else f"{tracer.agent} ({tracer.family})"
        reason = f"not a pre-therapy PET: {named}; theraflow selects on PSMA and SSTR ligands"
        record.note("tracer", SKIPPED, reason)
        return ChainResult(SKIPPED, reason, **keys)
    record.note("tracer", DONE, f"{tracer.agent} ({tracer.family}, from the {tracer.how})")
    files = list(segmentation_files)
    if not files and segmenter and ct_dir is not None:
        files = record.run("segmenter", lambda: run_segmenter(segmenter, ct_dir, (work or staging.parent) / "segmenter"),
                           lambda found: {"files": len(found)})
    frame = str(first.get("FrameOfReferenceUID", ""))
    found = record.run("reference-regions", lambda: regions.regions_from_files(files, series.image, frame, region_table),
                       lambda r: {"regions": sorted(r.masks), "unknown": r.unknown, "other_frames": r.other_frames})
    if "liver" not in found.masks:      # the PERCIST lesion threshold and VISION both need the liver
        reason = ("waiting for reference regions: no SEG or RTSTRUCT in the study" if not files else
                  f"waiting for reference regions: the study's segmentations give no liver (found: {', '.join(sorted(found.masks)) or 'none'})")
        steps[-1] = Step("reference-regions", WAITING, reason, steps[-1].numbers, steps[-1].seconds)
        return ChainResult(WAITING, reason, **keys)
    selection_dir = staging / "selection"
    result = record.run("selection", lambda: pipeline.run_select(pet_dir, found.masks, selection_dir, ct_dir=ct_dir, masks_resampled=True),
                        lambda r: r.selection.as_dict()["vision"] | {"lesions": len(r.lesions)})
    if ct_dir is not None:      # what a later SPECT/CT of the patient registers onto, and the lesions it carries
        sitk.WriteImage(read_ct_series(ct_dir)[0], str(staging / CT_FILE), useCompression=True)
        sitk.WriteImage(result.labels, str(staging / LESIONS_FILE), useCompression=True)
    pdf = record.run("report-pdf", lambda: html_to_pdf(selection_dir / "report.html", selection_dir / "report.pdf"),
                     lambda p: {"bytes": p.stat().st_size})
    title = f"theraflow selection report ({tracer.agent})"
    encapsulated_pdf(pdf.read_bytes(), first, title).save_as(selection_dir / REPORT_DICOM, enforce_file_format=True)
    push = [f"selection/{name}" for name in ("seg.dcm", "sr.dcm", REPORT_DICOM) if (selection_dir / name).exists()]
    chosen = result.selection.as_dict()
    summary = {
        "route": ROUTE_PET,
        "tracer": {"agent": tracer.agent, "family": tracer.family, "from": tracer.how},
        "verdicts": {"vision": chosen["vision"]["eligible"], "therap": chosen["therap"]["eligible"],
                     "promise_highest_score": result.selection.promise_summary["highest_score"]},
        "vision": chosen["vision"]["summary"], "therap": chosen["therap"]["summary"],
        "lesions": len(result.lesions),
        "suv_max": max((lesion.suv_max for lesion in result.lesions), default=None),
        "references_suv_mean": {name: stats["suv_mean"] for name, stats in
                                json.loads((selection_dir / pipeline.SELECT_MARKER).read_text())["references"].items()},
        "regions_from": found.sources,
        "report": f"selection/{REPORT_DICOM}",
        "lesion_labels": LESIONS_FILE if ct_dir is not None else None,
    }
    return ChainResult(DONE, None, staging, push, summary, {"selection": str(selection_dir / pipeline.SELECT_MARKER)}, **keys)


def listmode_chain(listmode: Path, ct_dir: Path | None, segmentation_files: Sequence[Path], staging: Path, steps: list[Step],
                   **options: Any) -> ChainResult:
    """PET raw data (PETSIRD list mode) of a study: reconstructed with its CT (``recon.pet``)
    into a PET series of ours, for the PACS, then the PET chain on that series. Without the CT
    of its study yet: *waiting* (nothing reconstructed)."""
    from recon.pet.outputs import write_pet_result
    from recon.pet.pipeline import PetParameters, reconstruct_pet

    record = _Steps(steps)
    if ct_dir is None:
        reason = "waiting for the CT of the list-mode study (attenuation and scatter need it)"
        record.note("reconstruction", WAITING, reason)
        return ChainResult(WAITING, reason)
    result = record.run("reconstruction", lambda: reconstruct_pet(listmode, ct_dir, PetParameters()),
                        lambda r: {"total_activity_MBq": round(r.provenance["total_activity_MBq"], 3)})
    write_pet_result(result, staging / "pet")
    series = sorted((staging / "pet" / "dicom").glob("*.dcm"))
    chain = pet_chain(staging / "pet" / "dicom", ct_dir, segmentation_files, staging, steps, **options)
    push = [f"pet/dicom/{p.name}" for p in series] + chain.push
    summary = {**chain.summary, "route": ROUTE_PET, "reconstruction": "pet/recon.json"}
    return ChainResult(chain.status, chain.reason, staging, push, summary, result.provenance,
                       result.provenance["total_activity_MBq"], chain.patient_key, chain.cycle_key)


# -- SPECT ----------------------------------------------------------------------------------------


def _write_regions(masks: Mapping[str, Any], folder: Path) -> list[str]:
    """Canonical regions (uint8 masks; they may overlap, e.g. body and kidneys) as
    ``folder/<name>.nii.gz`` (names are checked canonical names: letters, digits, '_')."""
    import SimpleITK as sitk

    folder.mkdir()
    for name, mask in masks.items():
        sitk.WriteImage(mask, str(folder / f"{name}.nii.gz"), useCompression=True)
    return sorted(masks)


def _read_regions(folder: Path, names: Sequence[str]) -> dict[str, Any]:
    import SimpleITK as sitk

    return {name: sitk.ReadImage(str(folder / f"{name}.nii.gz")) for name in names}


def _carry(reference: ResultRecord, ct_dir: Path, image: Any, masks: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``masks`` defined in the frame of an earlier result (a time point, a PET/CT) on this
    image's grid: this CT (fixed) registered rigidly onto that result's CT (moving), the masks
    resampled through the transform (nearest neighbour). Refused when the registration fails its
    quality check."""
    import SimpleITK as sitk

    from quant import registration as reg
    from recon.io.ct import read_ct_series

    ct, _, _ = read_ct_series(ct_dir)
    result = reg.register_ct(ct, sitk.ReadImage(str(Path(reference.output_dir) / CT_FILE)), reg.RegistrationSettings())
    if not result.quality.acceptable:
        raise InputError(ct_dir, f"registration onto v{reference.version} of study {reference.study_uid} failed its "
                         f"quality check ({result.quality.reason})")
    carried = {name: sitk.Cast(reg.resample_mask(mask, image, result.transform) != 0, sitk.sitkUInt8) for name, mask in masks.items()}
    return carried, {"reference": {"study_uid": reference.study_uid, "version": reference.version, "route": reference.route},
                     **{k: v for k, v in result.as_dict().items() if k in ("quality", "translation_mm", "rotation_deg", "centre_mm")}}


def _pet_lesions(pet: ResultRecord) -> dict[str, Any]:
    """The lesions of a PET selection as masks (``lesion_<label>``), on the PET grid."""
    import numpy as np
    import SimpleITK as sitk

    labels = sitk.ReadImage(str(Path(pet.output_dir) / LESIONS_FILE))
    values = sitk.GetArrayViewFromImage(labels)
    return {f"{LESION_PREFIX}{int(label)}": sitk.Cast(labels == int(label), sitk.sitkUInt8) for label in np.unique(values) if label}


def _cycle_timepoints(rows: Sequence[ResultRecord], cycle: str | None, study_uid: str) -> list[ResultRecord]:
    """The latest done version of each other SPECT/CT study of this treatment cycle whose result
    holds what dosimetry needs (NM RECON, CT, acquisition start)."""
    latest: dict[str, ResultRecord] = {}
    for row in rows:   # oldest first: later versions replace earlier ones
        if (row.route == ROUTE_SPECT and row.status == DONE and cycle and row.cycle_key == cycle and row.study_uid != study_uid
                and row.output_dir and row.summary and row.summary.get("reference_time")
                and (Path(row.output_dir) / CT_FILE).is_file() and (Path(row.output_dir) / "dicom").is_dir()):
            latest[row.study_uid] = row
    return list(latest.values())


def cycle_dosimetry(earlier: Sequence[ResultRecord], current: Path, ct_dir: Path, acquired: str, masks: Mapping[str, Any],
                    options: DoseOptions, out_dir: Path) -> Any:
    """The dosimetry of a treatment cycle (``quant.dosimetry.pipeline.run_dose``) from the
    results of its ``earlier`` time points and the ``current`` one (result folder, CT series
    folder, acquisition start ISO), in chronological order; the current time point is the
    reference (its CT is the RT Dose's frame) and ``masks`` (on its SPECT grid; names starting
    with ``lesion_`` are lesions) are its regions."""
    from quant.dosimetry.pipeline import PipelineSettings, TimePoint, run_dose

    points = sorted([(row.summary["reference_time"], TimePoint(Path(row.output_dir), Path(row.output_dir) / CT_FILE)) for row in earlier]
                    + [(acquired, TimePoint(current, ct_dir))], key=lambda item: datetime.fromisoformat(item[0]))
    index = next(i for i, (_, point) in enumerate(points) if point.spect == current)
    settings = replace(PipelineSettings.from_file(options.settings), reference=index, masks_on=index)
    organs = {name: mask for name, mask in masks.items() if not name.startswith(LESION_PREFIX)}
    lesions = {name: mask for name, mask in masks.items() if name.startswith(LESION_PREFIX)}
    return run_dose([point for _, point in points], organs, out_dir, settings, lesions=lesions)


def _dose_summary(result: Any) -> dict[str, Any]:
    return {"time_points": len(result.times_h), "times_h": [round(t, 2) for t in result.times_h], "folder": DOSE_DIR,
            "vois": {v.name: {"tia_MBq_h": round(v.tia.value, 3), "dose_Gy": None if v.dose is None else round(v.dose.value, 4),
                              "dose_sd_Gy": None if v.dose is None else round(v.dose.sd, 4)} for v in result.vois}}


def spect_chain(nm_files: Sequence[Path], ct_dir: Path | None, segmentation_files: Sequence[Path], params: Any, staging: Path,
                steps: list[Step], *, history: Callable[[str], list[ResultRecord]] | None = None,
                region_table: Mapping[str, str] | None = None, dose: DoseOptions = DoseOptions()) -> ChainResult:
    """Reconstruction and activities of a post-therapy SPECT/CT (see the module text), with the
    lesions of the patient's latest PET selection carried by registration, and the cycle's
    dosimetry when its time points are complete. ``history(patient_key)`` gives the patient's
    rows, oldest first."""
    import SimpleITK as sitk

    from quant import regions
    from quant.activity import voi_activities
    from recon.io.ct import read_ct_series
    from recon.io.outputs import write_json
    from recon.spect.outputs import write_spect_result
    from recon.spect.pipeline import reconstruct_spect

    record = _Steps(steps)
    result = record.run("reconstruction", lambda: reconstruct_spect(list(nm_files), ct_dir, params),
                        lambda r: {"total_activity_MBq": round(r.total_activity_MBq, 3)})
    write_spect_result(result, staging)
    acq = result.acquisition
    keys = {"patient_key": patient_key_of(acq.header)}
    if keys["patient_key"] and acq.injection_time is not None:
        keys["cycle_key"] = cycle_key(result.provenance["nuclide"], acq.injection_time.isoformat())
    summary: dict[str, Any] = {"route": ROUTE_SPECT, "total_activity_MBq": result.total_activity_MBq,
                               "administered_MBq": acq.administered_MBq,
                               "reference_time": result.provenance["calibration"]["reference_time"],
                               "administration_time": None if acq.injection_time is None else acq.injection_time.isoformat()}
    if ct_dir is not None:
        sitk.WriteImage(read_ct_series(ct_dir)[0], str(staging / CT_FILE), useCompression=True)
    rows = history(keys["patient_key"]) if history and keys["patient_key"] else []
    frame = str(acq.header.get("FrameOfReferenceUID", ""))
    masks: dict[str, Any] = {}
    if segmentation_files:
        found = record.run("regions", lambda: regions.regions_from_files(segmentation_files, result.image, frame, region_table),
                           lambda r: {"regions": sorted(r.masks), "unknown": r.unknown, "other_frames": r.other_frames})
        masks, summary["regions_from"] = dict(found.masks), found.sources
    else:
        cycle = [r for r in rows if r.route == ROUTE_SPECT and r.status == DONE and r.cycle_key == keys.get("cycle_key")
                 and r.summary and r.summary.get("regions")]
        if cycle and ct_dir is not None:
            first = cycle[0]
            try:
                masks, summary["registration"] = record.run(
                    "registration", lambda: _carry(first, ct_dir, result.image, _read_regions(Path(first.output_dir) / REGIONS_DIR,
                                                                                            first.summary["regions"])),
                    lambda carried: carried[1]["quality"])
                summary["regions_from"] = f"time point v{first.version} of study {first.study_uid} (registered)"
            except InputError:   # recorded as a failed step; the reconstruction stands, the activities wait
                masks = {}
    pets = [r for r in rows if r.route == ROUTE_PET and r.status == DONE and r.summary and r.summary.get("lesion_labels")]
    if pets and ct_dir is not None:
        try:
            lesions, summary["pet_registration"] = record.run(
                "pet-lesions", lambda: _carry(pets[-1], ct_dir, result.image, _pet_lesions(pets[-1])),
                lambda carried: {"lesions": sorted(carried[0]), **carried[1]["quality"]})
            masks.update({name: mask for name, mask in lesions.items() if sitk.GetArrayViewFromImage(mask).any()})
        except InputError:
            pass
    if not masks:
        record.note("activities", WAITING, "waiting for organ masks: no SEG or RTSTRUCT in the study and no earlier time point "
                    "of this cycle with regions")
    else:
        summary["regions"] = _write_regions(masks, staging / REGIONS_DIR)
        activities = record.run("activities", lambda: voi_activities(result.image, masks, acq.administered_MBq),
                                lambda values: {v.name: round(v.activity_MBq, 4) for v in values})
        summary["activities"] = [a.as_dict() for a in activities]
        write_json(staging / ACTIVITIES_FILE, {"reference_time": summary["reference_time"], "units": {
            "activity": "MBq at the reference time", "concentration": "Bq/mL", "volume": "mL",
            "percent_injected": "% of the administered activity as administered (not decay-corrected)"},
            "regions_from": summary.get("regions_from"), "registration": summary.get("registration"),
            "pet_registration": summary.get("pet_registration"), "activities": summary["activities"]})
    push = [f"dicom/{p.name}" for p in sorted((staging / "dicom").glob("*.dcm"))]
    if dose.min_timepoints > 0 and masks and ct_dir is not None and summary["reference_time"]:
        earlier = _cycle_timepoints(rows, keys.get("cycle_key"), str(acq.header.get("StudyInstanceUID", "")))
        if len(earlier) + 1 < dose.min_timepoints:
            record.note("dosimetry", WAITING, f"waiting for time points: {len(earlier) + 1} of {dose.min_timepoints} of this cycle")
        else:
            try:
                dosimetry = record.run("dosimetry", lambda: cycle_dosimetry(earlier, staging, ct_dir, summary["reference_time"], masks, dose,
                                                                           staging / DOSE_DIR),
                                       lambda r: {"time_points": len(r.times_h), "total_s": round(r.timings_s["total_s"], 1)})
                summary["dose"] = _dose_summary(dosimetry)
                push += [f"{DOSE_DIR}/rtdose.dcm"] if "rtdose.dcm" in dosimetry.files else []
            except InputError:   # recorded as a failed step; the reconstruction and activities stand
                pass
    return ChainResult(DONE, None, staging, push, summary, result.provenance, result.total_activity_MBq, **keys)
