"""The two quantification jobs behind ``theraflow quant select`` and ``theraflow quant phantom``,
as plain functions: read and check the inputs, compute, and write one result folder atomically.

``select``: PET DICOM series → SUVbw (quant.suv) → reference regions and lesion VOIs
(quant.voi) → VISION / TheraP / PROMISE (quant.selection) → selection.json, lesions.json,
lesions.csv, seg.dcm (DICOM SEG, when there is a lesion), sr.dcm (TID 1500) and report.html.
``phantom``: image (NIfTI, PET series, NM RECON) + phantom description → phantom_qc.json and
phantom_qc.csv. Bad input raises ``recon.errors.InputError`` before anything is written.
"""

from __future__ import annotations

import csv
import json
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
import SimpleITK as sitk

from quant import outputs, phantom_qc, report, selection, suv, voi
from recon.errors import InputError
from recon.io.ct import read_ct_series
from recon.io.outputs import atomic_folder, check_output_folder

SELECT_MARKER = "selection.json"
PHANTOM_MARKER = "phantom_qc.json"


# --------------------------------------------------------------------------- inputs


def read_sites(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """Lesion sites from JSON: {"<label or lesion mask name>": {"site": ..., "short_axis_mm": ...}}."""
    if path is None:
        return {}
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "no such sites file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"sites file is not JSON ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise InputError(path, 'sites file must map lesion labels or names to {"site": ..., "short_axis_mm": ...}')
    for key, value in data.items():
        if value.get("site", "unknown") not in selection.SITES:
            raise InputError(path, f"lesion {key}: site {value.get('site')!r} is not one of {selection.SITES}")
        if value.get("short_axis_mm") is not None and not (isinstance(value["short_axis_mm"], (int, float)) and value["short_axis_mm"] > 0):
            raise InputError(path, f"lesion {key}: short_axis_mm must be a positive number (mm)")
    return {str(k): v for k, v in data.items()}


def _tracer(series: suv.PetSeries) -> str | None:
    items = series.first.get("RadiopharmaceuticalInformationSequence") or []
    if not items:
        return None
    name = str(items[0].get("Radiopharmaceutical", "") or "")
    return name or None


def _excluded(masks: Mapping[str, sitk.Image], setting: Any) -> list[str]:
    if setting == "all":
        return list(masks)
    if setting in (None, "none"):
        return []
    wanted = {voi.canonical_name(n) for n in setting}
    return [name for name in masks if voi.canonical_name(name) in wanted]


# --------------------------------------------------------------------------- select


@dataclass
class SelectResult:
    """What ``select`` computed (kept for callers and tests)."""

    out_dir: Path
    lesions: list[voi.Lesion]
    selection: selection.Selection
    burden: voi.TumourBurden
    files: list[str]
    notes: list[str] = field(default_factory=list)


def run_select(pet_dir: str | Path, masks: Mapping[str, str | Path], out_dir: str | Path, *, ct_dir: str | Path | None = None,
               lesion_masks: Mapping[str, str | Path] | None = None, sites_file: str | Path | None = None,
               criteria_file: str | Path | None = None, method: str | None = None) -> SelectResult:
    """Lesion analysis and theranostic selection of one PET series; writes ``out_dir``."""
    started = time.perf_counter()
    check_output_folder(out_dir, SELECT_MARKER)
    criteria = selection.load_criteria(criteria_file)
    voi_config = dict(criteria["voi"])
    if method is not None:
        voi_config["method"] = method
    try:
        settings = voi.VoiSettings.from_dict(voi_config)
    except ValueError as exc:
        raise InputError(criteria_file, f"VOI settings: {exc}") from None
    sites = read_sites(sites_file)
    notes: list[str] = []

    series = suv.read_pet_series(pet_dir)
    scale = suv.suv_scale(series, "bw")
    suv_image = suv.scaled_image(series.image, scale)
    loaded = voi.load_masks(masks, series)
    given = voi.load_masks(lesion_masks or {}, series)
    references = voi.reference_stats(suv_image, loaded)
    if settings.method == "percist" and "liver" not in references:
        raise InputError(None, "the PERCIST threshold needs a liver mask: --masks liver=FILE (or choose --method fixed)")
    missing = [name for name in voi.REFERENCE_NAMES if name not in references]
    if missing:
        notes.append(f"no mask for reference region(s) {', '.join(missing)}: criteria that need them are undetermined")
    ct = None
    if ct_dir is not None:
        ct, ct_header, _ = read_ct_series(ct_dir)
        pet_frame = str(series.first.get("FrameOfReferenceUID", ""))
        if str(ct_header.get("FrameOfReferenceUID", "")) != pet_frame:
            raise InputError(ct_dir, f"CT frame of reference {ct_header.get('FrameOfReferenceUID', 'missing')} is not the PET's {pet_frame}: "
                             "give the CT of the same PET/CT (or register it first)")

    excluded = _excluded(loaded, criteria["lesion_search"]["exclude_masks"])
    exclude = voi.union_mask([loaded[name] for name in excluded], suv_image)
    segmentation = voi.segment_lesions(suv_image, settings, references.get("liver"), exclude=exclude)
    labels, names = voi.add_given_lesions(suv_image, segmentation.labels, given)
    unknown_keys = set(sites) - {str(k) for k in names} - set(names.values())
    if unknown_keys:
        notes.append(f"sites given for unknown lesion(s) {sorted(unknown_keys)}: ignored")
    lesions = voi.measure_lesions(suv_image, labels, references, settings, sites=sites, names=names)
    chosen = selection.select(lesions, references, criteria, tracer=_tracer(series))
    burden = voi.tumour_burden(lesions)
    scores = {score.label: score.score for score in chosen.promise}
    rows = outputs.lesion_rows(lesions, scores)
    if excluded:
        notes.append(f"lesion search leaves out the masks {', '.join(sorted(excluded))}")
    if given:
        notes.append(f"lesion masks given: {', '.join(sorted(given))} (replace automatic VOIs they overlap)")

    summary = {
        "pet": {"folder": str(pet_dir), "series_instance_uid": str(series.first.SeriesInstanceUID),
                "frame_of_reference_uid": str(series.first.get("FrameOfReferenceUID", "")), "slices": len(series.files),
                "tracer": _tracer(series)},
        "ct": None if ct_dir is None else {"folder": str(ct_dir)},
        "suv": scale.as_dict(),
        "masks": {name: str(path) for name, path in masks.items()},
        "lesion_masks": {name: str(path) for name, path in (lesion_masks or {}).items()},
        "segmentation": {"method": segmentation.method, "threshold": segmentation.threshold, "description": segmentation.description,
                         "lesion_thresholds": segmentation.lesion_thresholds, "settings": asdict(settings)},
        "references": {name: asdict(region) for name, region in references.items()},
        "lesions": [lesion.as_dict() for lesion in lesions],
        "tumour_burden": asdict(burden),
        **chosen.as_dict(),
        "units": {"suv": "g/mL (SUVbw)", "volume": "mL", "length": "mm (LPS)", "tlu": "g (SUVbw × mL)"},
        "notes": notes,
        "software": {"theraflow": outputs._version(), "python": platform.python_version(), "SimpleITK": sitk.Version.VersionString(),
                     "pydicom": pydicom.__version__},
        "created": datetime.now().isoformat(timespec="seconds"),
    }
    source_images = outputs.read_source_images(series.files)
    seg_ds = outputs.lesion_segmentation(labels, lesions, source_images) if lesions else None
    if seg_ds is None:
        notes.append("no lesion: no DICOM SEG written; the SR holds the reference regions only")
    sr = outputs.measurement_report_sr(lesions, references, source_images, seg_ds, scores)
    html_text = report.render_html(
        suv=suv_image, labels=labels if lesions else None, ct=ct, lesion_rows=rows,
        references=summary["references"], selection=chosen.as_dict(), burden=asdict(burden),
        method=segmentation.description, notes=notes,
        study={"PET series": str(series.first.SeriesInstanceUID), "tracer": _tracer(series) or "unknown",
               "scan": scale.scan_datetime.isoformat() if scale.scan_datetime else "unknown"},
    )
    files = []
    with atomic_folder(out_dir, SELECT_MARKER) as tmp:
        outputs.write_lesion_csv(tmp / "lesions.csv", rows)
        outputs.write_json(tmp / "lesions.json", {"lesions": rows, "units": summary["units"]})
        if seg_ds is not None:
            seg_ds.save_as(tmp / "seg.dcm")
        sr.save_as(tmp / "sr.dcm")
        (tmp / "report.html").write_text(html_text, encoding="utf-8")
        summary["files"] = sorted(p.name for p in tmp.iterdir()) + [SELECT_MARKER]
        summary["seconds"] = round(time.perf_counter() - started, 2)
        outputs.write_json(tmp / SELECT_MARKER, summary)
        files = summary["files"]
    return SelectResult(Path(out_dir), lesions, chosen, burden, files, notes)


# --------------------------------------------------------------------------- phantom


def run_phantom(image_path: str | Path, phantom_path: str | Path, out_dir: str | Path, *, modality: str | None = None,
                settings_file: str | Path | None = None, image_time: datetime | None = None) -> phantom_qc.PhantomQC:
    """NEMA IEC phantom QC of one image; writes phantom_qc.json and phantom_qc.csv to ``out_dir``."""
    check_output_folder(out_dir, PHANTOM_MARKER)
    phantom = phantom_qc.load_phantom(phantom_path)
    settings = phantom_qc.load_settings(settings_file)
    loaded = phantom_qc.read_image(image_path)
    chosen = modality or loaded.modality
    if chosen is None:
        raise InputError(image_path, "the image file does not say whether it is PET or SPECT: give --modality pet|spect")
    if loaded.modality is not None and modality is not None and modality != loaded.modality:
        raise InputError(image_path, f"--modality {modality} but the image is {loaded.modality.upper()}")
    when = image_time or loaded.reference_datetime
    qc = phantom_qc.analyse_phantom(loaded.image, phantom, chosen, settings, when)
    data = {"image": str(image_path), "phantom": str(phantom_path), "image_time_rule": loaded.rule if image_time is None else "--image-time",
            **qc.as_dict(), "units": {"concentration": "image units (Bq/mL)", "bv": "%", "volume": "mL", "length": "mm"},
            "created": datetime.now().isoformat(timespec="seconds")}
    rows = qc.rows()
    with atomic_folder(out_dir, PHANTOM_MARKER) as tmp:
        with (tmp / "phantom_qc.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else "" if v is None else v) for k, v in row.items()})
        outputs.write_json(tmp / PHANTOM_MARKER, data)
    return qc


def parse_named_paths(items: Sequence[str] | None, what: str) -> dict[str, Path]:
    """``NAME=FILE`` strings as {NAME: Path}; duplicate names refused."""
    out: dict[str, Path] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise InputError(None, f"{what} {item!r}: expected NAME=FILE")
        if name.strip() in out:
            raise InputError(None, f"{what}: {name.strip()!r} given twice")
        out[name.strip()] = Path(path.strip())
    return out

