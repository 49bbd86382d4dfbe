"""The two quantification jobs behind ``theraflow quant select`` and ``theraflow quant phantom``,
as plain functions: read and check the inputs, compute, and write one result folder atomically.

``select``: PET DICOM series → SUVbw (quant.suv) → reference regions and lesion VOIs
(quant.voi) → VISION / TheraP / PROMISE (quant.selection) → selection.json, lesions.json,
lesions.csv, seg.dcm (DICOM SEG, when there is a lesion), sr.dcm (TID 1500) and report.html.
Masks drawn on another CT (``masks_ct_dir``: a SPECT/CT's or diagnostic CT, another frame of
reference) are carried onto the PET grid: that CT is registered rigidly onto the PET/CT's CT
(quant.registration) and the masks are resampled through the same transform (nearest
neighbour); the transform (registration.tfm), its quality figure (registration.png) and
numbers go with the results.
``phantom``: image (NIfTI, PET series, NM RECON) + phantom description → phantom_qc.json and
phantom_qc.csv. Bad input raises ``recon.errors.InputError`` before anything is written.
"""

from __future__ import annotations

import csv
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from scipy import ndimage

from quant import outputs, phantom_qc, report, selection, suv, voi
from quant import registration as reg
from quant.jsonfile import read_json_object
from quant.tracer import identify_tracer
from recon.errors import InputError
from recon.io.ct import read_ct_series
from recon.io.outputs import atomic_folder, check_output_folder

SELECT_MARKER = "selection.json"
PHANTOM_MARKER = "phantom_qc.json"
TRANSFORM_FILE = "registration.tfm"
FIGURE_FILE = "registration.png"


# --------------------------------------------------------------------------- inputs


def read_sites(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """Lesion sites from JSON: {"<label or lesion mask name>": {"site": ..., "short_axis_mm": ...}}."""
    if path is None:
        return {}
    path = Path(path)
    data = read_json_object(path, "sites file")
    if not all(isinstance(v, dict) for v in data.values()):
        raise InputError(path, 'sites file must map lesion labels or names to {"site": ..., "short_axis_mm": ...}')
    for key, value in data.items():
        if value.get("site", "unknown") not in selection.SITES:
            raise InputError(path, f"lesion {key}: site {value.get('site')!r} is not one of {selection.SITES}")
        if value.get("short_axis_mm") is not None and not (isinstance(value["short_axis_mm"], (int, float)) and value["short_axis_mm"] > 0):
            raise InputError(path, f"lesion {key}: short_axis_mm must be a positive number (mm)")
    return {str(k): v for k, v in data.items()}


def _margin_mm(search: Mapping[str, Any], key: str, criteria_file: str | Path | None) -> float:
    """A lesion-search exclusion margin (mm) from the criteria, refused unless a number ≥ 0."""
    value = search.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise InputError(criteria_file, f"lesion_search.{key} must be a number of mm ≥ 0, not {value!r}")
    return float(value)


def _widened(mask: sitk.Image | None, margin_mm: float) -> sitk.Image | None:
    """``mask`` dilated by a ball of ``margin_mm`` (mm, voxel spacing respected); unchanged for 0 or None."""
    if mask is None or margin_mm <= 0:
        return mask
    structure = voi._ellipsoid_structure(margin_mm, mask.GetSpacing())
    grown = ndimage.binary_dilation(sitk.GetArrayViewFromImage(mask) != 0, structure=structure)
    out = sitk.GetImageFromArray(grown.astype(np.uint8))
    out.CopyInformation(mask)
    return out


def _excluded(masks: Mapping[str, sitk.Image], setting: Any) -> list[str]:
    if setting == "all":
        return list(masks)
    if setting in (None, "none"):
        return []
    wanted = {voi.canonical_name(n) for n in setting}
    return [name for name in masks if voi.canonical_name(name) in wanted]


# --------------------------------------------------------------------------- masks on another CT


def read_registration_settings(path: str | Path | None) -> reg.RegistrationSettings:
    """Registration settings from JSON (fields of ``quant.registration.RegistrationSettings``), else the defaults."""
    if path is None:
        return reg.RegistrationSettings()
    path = Path(path)
    data = read_json_object(path, "registration settings file")
    try:
        return reg.RegistrationSettings.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"registration settings: {exc}") from None


@dataclass
class CarriedMasks:
    """Masks (uint8, PET grid) carried from the masks CT, the transform used (PET/CT point →
    masks CT point, mm LPS; None when both share the PET's frame of reference), its provenance
    for selection.json and its quality figure (RGB, None without registration)."""

    masks: dict[str, sitk.Image]
    lesion_masks: dict[str, sitk.Image]
    transform: sitk.Transform | None
    provenance: dict[str, Any]
    figure: np.ndarray | None
    notes: list[str] = field(default_factory=list)


def _ct_identity(folder: str | Path, header: pydicom.Dataset) -> dict[str, str]:
    return {"folder": str(folder), "series_instance_uid": str(header.get("SeriesInstanceUID", "")),
            "frame_of_reference_uid": str(header.get("FrameOfReferenceUID", ""))}


def carry_masks_from_ct(masks: Mapping[str, str | Path], lesion_masks: Mapping[str, str | Path], series: suv.PetSeries,
                        pet_ct: sitk.Image, pet_ct_header: pydicom.Dataset, pet_ct_dir: str | Path, masks_ct_dir: str | Path,
                        settings: reg.RegistrationSettings | None = None) -> CarriedMasks:
    """Masks defined on the CT in ``masks_ct_dir`` (NIfTI on its grid, RTSTRUCT or SEG in its
    frame of reference) on the PET grid of ``series``. When that CT is in another frame of
    reference than the PET, it is registered rigidly (``settings``) onto ``pet_ct`` (the
    PET/CT's CT, the PET's frame of reference) and each mask is resampled through the resulting
    transform with nearest-neighbour interpolation; a registration that fails its quality check
    is refused. Mask volumes (mL) before and after carrying are kept in the provenance."""
    settings = settings or reg.RegistrationSettings()
    masks_ct, masks_ct_header, masks_ct_uids = read_ct_series(masks_ct_dir)
    space = suv.PetSeries(Path(masks_ct_dir), (), (masks_ct_header,), masks_ct, label="masks CT")
    on_ct = voi.load_masks(masks, space)
    lesions_on_ct = voi.load_masks(lesion_masks, space)
    pet_frame = str(series.first.get("FrameOfReferenceUID", ""))
    provenance: dict[str, Any] = {"masks_ct": _ct_identity(masks_ct_dir, masks_ct_header), "fixed_ct": _ct_identity(pet_ct_dir, pet_ct_header),
                                  "mask_interpolation": "nearest neighbour"}
    notes: list[str] = []
    if str(masks_ct_header.get("FrameOfReferenceUID", "")) == pet_frame:
        transform, figure = None, None
        provenance.update(registered=False, summary=f"masks CT {masks_ct_dir} shares the PET's frame of reference {pet_frame}: "
                          "no registration, masks resampled onto the PET grid (nearest neighbour)")
        notes.append("masks CT in the PET's frame of reference: masks resampled without registration")
    else:
        result = reg.register_ct(pet_ct, masks_ct, settings)
        if not result.quality.acceptable:
            raise InputError(masks_ct_dir, f"registration onto the PET/CT's CT {pet_ct_dir} failed its quality check "
                             f"({result.quality.reason}): masks not carried")
        transform = result.transform
        identity = sitk.Transform(3, sitk.sitkIdentity)
        figure = report.registration_figure(pet_ct, masks_ct, identity, transform)
        provenance.update(
            registered=True,
            summary=(f"masks CT {masks_ct_dir} (frame of reference {masks_ct_header.get('FrameOfReferenceUID', '')}) registered "
                     f"{'rigidly and by B-spline' if result.bspline else 'rigidly'} (Mattes MI, multi-resolution) onto the PET/CT's CT "
                     f"{pet_ct_dir} (frame {pet_frame}); masks resampled onto the PET grid through the same transform (nearest neighbour)"),
            convention="transform maps a point of the PET/CT frame (mm, LPS) to the masks CT frame (ITK convention)",
            transform_file=TRANSFORM_FILE, figure_file=FIGURE_FILE,
            matrix=[float(v) for v in result.rigid.GetMatrix()],
            masks_ct_instances=len(masks_ct_uids),
            **result.as_dict(),
        )
        notes.append(f"masks carried from {masks_ct_dir} by registration (NCC {result.quality.ncc_before:.3f} → {result.quality.ncc_after:.3f})")
    carried: list[dict[str, sitk.Image]] = []
    volumes: dict[str, dict[str, float]] = {}
    for given, paths in ((on_ct, masks), (lesions_on_ct, lesion_masks)):
        out = {}
        for name, mask in given.items():
            moved = sitk.Cast(reg.resample_mask(mask, series.image, transform) != 0, sitk.sitkUInt8)
            if not sitk.GetArrayViewFromImage(moved).any():
                raise InputError(paths[name], f"mask {name!r} lies outside the PET field of view once carried from the masks CT")
            out[name] = moved
            volumes[name] = {"masks_ct_mL": float(sitk.GetArrayViewFromImage(mask).astype(bool).sum()) * voi.voxel_volume_mL(mask),
                             "pet_mL": float(sitk.GetArrayViewFromImage(moved).sum()) * voi.voxel_volume_mL(moved)}
        carried.append(out)
    provenance["mask_volumes_mL"] = volumes
    return CarriedMasks(carried[0], carried[1], transform, provenance, figure, notes)


def _with_hint(exc: InputError) -> InputError:
    """A mask refusal for another grid or frame of reference, with the way out (--masks-ct)."""
    if any(phrase in exc.problem for phrase in ("frame of reference", "another grid", "differs from the PET")):
        return InputError(exc.path, f"{exc.problem} (masks drawn on another CT: give that CT with --masks-ct and the PET/CT's CT with --ct)")
    return exc


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
    labels: sitk.Image | None = None      # lesion labels (uint16, PET grid; label = lesion number)


def run_select(pet_dir: str | Path, masks: Mapping[str, str | Path], out_dir: str | Path, *, ct_dir: str | Path | None = None,
               lesion_masks: Mapping[str, str | Path] | None = None, sites_file: str | Path | None = None,
               criteria_file: str | Path | None = None, method: str | None = None, masks_ct_dir: str | Path | None = None,
               registration_file: str | Path | None = None, masks_resampled: bool = False) -> SelectResult:
    """Lesion analysis and theranostic selection of one PET series; writes ``out_dir``.

    ``masks`` and ``lesion_masks`` lie on the PET grid or in its frame of reference, or, with
    ``masks_ct_dir``, on that CT (registered onto the PET/CT's CT ``ct_dir``, which is then
    required; settings from ``registration_file``, see :func:`carry_masks_from_ct`). ``masks_resampled``:
    the masks were resampled onto the PET grid from another grid (e.g. a segmentation of the
    CT, ``quant.regions``), so their borders are up to a PET voxel off, as after registration."""
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
    if masks_ct_dir is not None and ct_dir is None:
        raise InputError(masks_ct_dir, "--masks-ct needs --ct: the CT of the PET/CT, to register the masks CT onto")
    if registration_file is not None and masks_ct_dir is None:
        raise InputError(registration_file, "--registration applies to --masks-ct only: no CT to register")
    registration_settings = read_registration_settings(registration_file)

    series = suv.read_pet_series(pet_dir)
    scale = suv.suv_scale(series, "bw")
    suv_image = suv.scaled_image(series.image, scale)
    ct = None
    if ct_dir is not None:
        ct, ct_header, _ = read_ct_series(ct_dir)
        pet_frame = str(series.first.get("FrameOfReferenceUID", ""))
        if str(ct_header.get("FrameOfReferenceUID", "")) != pet_frame:
            raise InputError(ct_dir, f"CT frame of reference {ct_header.get('FrameOfReferenceUID', 'missing')} is not the PET's {pet_frame}: "
                             "give the CT of the same PET/CT (a CT of another study goes to --masks-ct)")
    carried = None
    if masks_ct_dir is not None:
        carried = carry_masks_from_ct(masks, lesion_masks or {}, series, ct, ct_header, ct_dir, masks_ct_dir, registration_settings)
        loaded, given = carried.masks, carried.lesion_masks
        notes.extend(carried.notes)
    else:
        try:
            loaded = voi.load_masks(masks, series)
            given = voi.load_masks(lesion_masks or {}, series)
        except InputError as exc:
            raise _with_hint(exc) from None
    references = voi.reference_stats(suv_image, loaded)
    if settings.method == "percist" and "liver" not in references:
        raise InputError(None, "the PERCIST threshold needs a liver mask: --masks liver=FILE (or choose --method fixed)")
    missing = [name for name in voi.REFERENCE_NAMES if name not in references]
    if missing:
        notes.append(f"no mask for reference region(s) {', '.join(missing)}: criteria that need them are undetermined")

    excluded = _excluded(loaded, criteria["lesion_search"]["exclude_masks"])
    moved = masks_resampled or (carried is not None and carried.transform is not None)
    margin_key = "exclude_margin_mm_registered" if moved else "exclude_margin_mm"
    margin_mm = _margin_mm(criteria["lesion_search"], margin_key, criteria_file)
    exclude = _widened(voi.union_mask([loaded[name] for name in excluded], suv_image), margin_mm)
    segmentation = voi.segment_lesions(suv_image, settings, references.get("liver"), exclude=exclude)
    labels, names = voi.add_given_lesions(suv_image, segmentation.labels, given)
    unknown_keys = set(sites) - {str(k) for k in names} - set(names.values())
    if unknown_keys:
        notes.append(f"sites given for unknown lesion(s) {sorted(unknown_keys)}: ignored")
    lesions = voi.measure_lesions(suv_image, labels, references, settings, sites=sites, names=names,
                                  levels=voi.voi_levels(segmentation, labels, names))
    tracer = identify_tracer(series.first)
    chosen = selection.select(lesions, references, criteria, tracer=tracer)
    burden = voi.tumour_burden(lesions)
    scores = {score.label: score.score for score in chosen.promise}
    rows = outputs.lesion_rows(lesions, scores)
    if excluded:
        widened = f", widened by {margin_mm:g} mm ({margin_key})" if margin_mm > 0 else ""
        notes.append(f"lesion search leaves out the masks {', '.join(sorted(excluded))}{widened}")
    if given:
        notes.append(f"lesion masks given: {', '.join(sorted(given))} (replace automatic VOIs they overlap)")

    summary = {
        "pet": {"folder": str(pet_dir), "series_instance_uid": str(series.first.SeriesInstanceUID),
                "frame_of_reference_uid": str(series.first.get("FrameOfReferenceUID", "")), "slices": len(series.files),
                "tracer": None if tracer is None else asdict(tracer)},
        "ct": None if ct_dir is None else _ct_identity(ct_dir, ct_header),
        "registration": None if carried is None else carried.provenance,
        "suv": scale.as_dict(),
        "masks": {name: "image on the PET grid" if isinstance(path, sitk.Image) else str(path) for name, path in masks.items()},
        "lesion_masks": {name: str(path) for name, path in (lesion_masks or {}).items()},
        "segmentation": {"exclude_margin_mm": margin_mm, "method": segmentation.method, "threshold": segmentation.threshold, "description": segmentation.description,
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
        registration=None if carried is None else carried.provenance, registration_rgb=None if carried is None else carried.figure,
        study={"PET series": str(series.first.SeriesInstanceUID), "tracer": "unknown" if tracer is None else f"{tracer.agent} (from the {tracer.how} '{tracer.text}')",
               "scan": scale.scan_datetime.isoformat() if scale.scan_datetime else "unknown"},
    )
    files = []
    with atomic_folder(out_dir, SELECT_MARKER) as tmp:
        outputs.write_lesion_csv(tmp / "lesions.csv", rows)
        outputs.write_json(tmp / "lesions.json", {"lesions": rows, "units": summary["units"]})
        if seg_ds is not None:
            seg_ds.save_as(tmp / "seg.dcm")
        sr.save_as(tmp / "sr.dcm")
        if carried is not None and carried.transform is not None:
            sitk.WriteTransform(carried.transform, str(tmp / TRANSFORM_FILE))
        if carried is not None and carried.figure is not None:
            (tmp / FIGURE_FILE).write_bytes(report.png_bytes(carried.figure))
        (tmp / "report.html").write_text(html_text, encoding="utf-8")
        summary["files"] = sorted(p.name for p in tmp.iterdir()) + [SELECT_MARKER]
        summary["seconds"] = round(time.perf_counter() - started, 2)
        outputs.write_json(tmp / SELECT_MARKER, summary)
        files = summary["files"]
    return SelectResult(Path(out_dir), lesions, chosen, burden, files, notes, labels)


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

