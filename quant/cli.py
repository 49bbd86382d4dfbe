"""``theraflow quant ...`` sub-commands. ``flows.cli`` calls :func:`add_parsers`; bad input raises
``recon.errors.InputError``, which the main program turns into one ``error:`` line and exit 2."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

KINDS = ("bw", "lbm", "bsa", "ibw")  # as quant.suv.KINDS, repeated to keep start-up free of heavy imports
LBM_FORMULAS = ("janmahasatian", "james128")


def add_parsers(groups: Any) -> None:
    """Add the ``quant`` group (sub-command ``suv``) to the sub-parsers object ``groups``."""
    quant = groups.add_parser("quant", help="quantify images (SUV)")
    commands = quant.add_subparsers(dest="command", required=True, parser_class=type(quant))
    suv = commands.add_parser("suv", help="SUV scale factor of a PET DICOM series, and SUV statistics in a mask")
    suv.add_argument("pet", type=Path, metavar="PET_DIR", help="folder with the PET series")
    suv.add_argument("--json", action="store_true", help="print one JSON object")
    suv.add_argument("--mask", type=Path, metavar="MASK", help="NIfTI mask on the PET grid, or an RTSTRUCT DICOM file")
    suv.add_argument("--roi", metavar="NAME", help="ROI of the RTSTRUCT to use when it holds several")
    suv.add_argument("--suv", choices=KINDS, default="bw", help="SUV normalisation (default bw)")
    suv.add_argument("--lbm", choices=LBM_FORMULAS, default="janmahasatian", help="lean body mass formula for --suv lbm")
    suv.set_defaults(func=_suv)


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
