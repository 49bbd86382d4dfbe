"""``theraflow quant ...`` sub-commands. ``flows.cli`` calls :func:`add_parsers`; bad input raises
``recon.errors.InputError``, which the main program turns into one ``error:`` line and exit 2."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

KINDS = ("bw", "lbm", "bsa", "ibw")  # as quant.suv.KINDS, repeated to keep start-up free of heavy imports
LBM_FORMULAS = ("janmahasatian", "james128")
METHODS = ("fixed", "percent_max", "percist")  # as quant.voi.METHODS


def add_parsers(groups: Any) -> None:
    """Add the ``quant`` group (sub-commands ``suv``, ``select``, ``phantom``) to the sub-parsers object ``groups``."""
    quant = groups.add_parser("quant", help="quantify images (SUV, lesions and theranostic selection, phantom QC)")
    commands = quant.add_subparsers(dest="command", required=True, parser_class=type(quant))
    suv = commands.add_parser("suv", help="SUV scale factor of a PET DICOM series, and SUV statistics in a mask")
    suv.add_argument("pet", type=Path, metavar="PET_DIR", help="folder with the PET series")
    suv.add_argument("--json", action="store_true", help="print one JSON object")
    suv.add_argument("--mask", type=Path, metavar="MASK", help="NIfTI mask on the PET grid, or an RTSTRUCT DICOM file")
    suv.add_argument("--roi", metavar="NAME", help="ROI of the RTSTRUCT to use when it holds several")
    suv.add_argument("--suv", choices=KINDS, default="bw", help="SUV normalisation (default bw)")
    suv.add_argument("--lbm", choices=LBM_FORMULAS, default="janmahasatian", help="lean body mass formula for --suv lbm")
    suv.set_defaults(func=_suv)

    select = commands.add_parser("select", help="lesion VOIs, uptake figures and VISION/TheraP/PROMISE selection of a PSMA PET")
    select.add_argument("--pet", required=True, type=Path, metavar="PET_DIR", help="folder with the PET series")
    select.add_argument("--ct", type=Path, metavar="CT_DIR", help="folder with the CT of the same PET/CT (for the fused images; "
                        "the registration target with --masks-ct)")
    select.add_argument("--masks-ct", type=Path, metavar="CT_DIR",
                        help="CT the --masks and --lesion-masks are drawn on (e.g. the SPECT/CT's or a diagnostic CT, another frame "
                             "of reference): registered rigidly onto --ct, masks carried onto the PET grid by the same transform")
    select.add_argument("--registration", type=Path, metavar="FILE",
                        help="registration settings JSON for --masks-ct (fields of quant.registration.RegistrationSettings)")
    select.add_argument("--masks", nargs="+", default=[], metavar="NAME=FILE",
                        help="reference and physiological masks (NIfTI on the PET grid, RTSTRUCT or SEG in its frame of reference): "
                             "liver, parotid, blood_pool, spleen are reference regions; all masks are left out of the lesion search")
    select.add_argument("--lesion-masks", nargs="+", default=[], metavar="NAME=FILE",
                        help="lesions read elsewhere (e.g. on CT, PSMA-negative ones), measured like the automatic VOIs")
    select.add_argument("--sites", type=Path, metavar="FILE", help='JSON {"<label or lesion mask name>": {"site": ..., "short_axis_mm": ...}}')
    select.add_argument("--criteria", type=Path, metavar="FILE", help="criteria JSON merged over quant/data/criteria.json")
    select.add_argument("--method", choices=METHODS, help="lesion VOI method (default from the criteria: percist)")
    select.add_argument("--out", required=True, type=Path, metavar="OUT_DIR")
    select.set_defaults(func=_select)

    phantom = commands.add_parser("phantom", help="NEMA IEC phantom QC: recovery coefficients, background variability, EARL bands")
    phantom.add_argument("image", type=Path, metavar="IMAGE", help="NIfTI file, PET series folder or NM RECON DICOM file (Bq/mL)")
    phantom.add_argument("--phantom", required=True, type=Path, metavar="PHANTOM_JSON", help="phantom description (spheres, concentrations)")
    phantom.add_argument("--modality", choices=("pet", "spect"), help="needed for NIfTI images")
    phantom.add_argument("--settings", type=Path, metavar="FILE", help="QC settings and bands (default quant/data/phantom_qc.json)")
    phantom.add_argument("--image-time", metavar="ISO_DATETIME", help="time the image values refer to (default: from DICOM)")
    phantom.add_argument("--out", required=True, type=Path, metavar="OUT_DIR")
    phantom.set_defaults(func=_phantom)


def _suv(args: argparse.Namespace) -> int:
    from quant import suv

    series = suv.read_pet_series(args.pet)
    scale = suv.suv_scale(series, args.suv, args.lbm)
    report = {"pet": str(args.pet), "series_uid": str(series.first.SeriesInstanceUID), **scale.as_dict()}
    if args.mask is not None:
        mask = suv.load_mask(args.mask, series, args.roi)
        stats = suv.mask_stats(suv.scaled_image(series.image, scale), mask)
        report.update(mask=str(args.mask), mask_voxels=stats.voxels, suv_min=stats.min, suv_median=stats.median, suv_max=stats.max)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_text(report)
    return 0


def _print_text(report: dict[str, Any]) -> None:
    """One ``key: value`` line per item, the rules last."""
    rules = report.pop("rules")
    for key, value in report.items():
        print(f"{key}: {value}")
    for key, value in rules.items():
        print(f"rule {key}: {value}")


def _select(args: argparse.Namespace) -> int:
    from quant import pipeline

    result = pipeline.run_select(
        args.pet, pipeline.parse_named_paths(args.masks, "--masks"), args.out, ct_dir=args.ct,
        lesion_masks=pipeline.parse_named_paths(args.lesion_masks, "--lesion-masks"), sites_file=args.sites,
        criteria_file=args.criteria, method=args.method, masks_ct_dir=args.masks_ct, registration_file=args.registration,
    )
    burden = result.burden
    print(f"lesions: {burden.lesions} (total volume {burden.volume_mL:.1f} mL, total lesion uptake {burden.total_lesion_uptake:.1f} g)")
    for verdict in (result.selection.vision, result.selection.therap):
        print(f"{verdict.criterion}: {verdict.summary}")
    print(f"PROMISE miPSMA highest score: {result.selection.promise_summary['highest_score']}")
    for note in result.notes:
        print(f"note: {note}")
    print(f"written: {args.out} ({', '.join(result.files)})")
    return 0


def _phantom(args: argparse.Namespace) -> int:
    from datetime import datetime

    from quant import pipeline
    from recon.errors import InputError

    try:
        when = datetime.fromisoformat(args.image_time) if args.image_time else None
    except ValueError:
        raise InputError(None, f"--image-time {args.image_time!r} is not an ISO date-time") from None
    qc = pipeline.run_phantom(args.image, args.phantom, args.out, modality=args.modality, settings_file=args.settings, image_time=when)
    for sphere in qc.spheres:
        verdicts = " ".join(f"{name}:{'/'.join(v.values())}" for name, v in sphere.acceptance.items())
        print(f"sphere {sphere.diameter_mm:g} mm: RCmean {sphere.rc_mean_sphere:.3f} (A50 {sphere.rc_mean_a50:.3f}) "
              f"RCmax {sphere.rc_max:.3f} RCpeak {sphere.rc_peak:.3f} {verdicts}".rstrip())
    print("background variability (%): " + ", ".join(f"{d} mm {v:.2f}" for d, v in qc.background_variability.items()))
    for name, outcome in qc.acceptance.items():
        print(f"{name}: {outcome}")
    for note in qc.notes:
        print(f"note: {note}")
    print(f"written: {args.out}")
    return 0
