"""``theraflow dose``: post-therapy dosimetry of one administration. ``flows.cli`` calls
:func:`add_parsers`; bad input raises ``recon.errors.InputError`` (one ``error:`` line, exit 2).

Time points are given in order, each as ``--timepoint SPECT`` followed by its optional ``--ct
CT_DIR`` and ``--at ISO_TIME``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


class _TimePointAction(argparse.Action):
    """``--timepoint`` opens a time point; ``--ct`` and ``--at`` complete the last one opened."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        points = getattr(namespace, "timepoints", None) or []
        if option_string == "--timepoint":
            points.append({"spect": values})
        else:
            if not points:
                parser.error(f"{option_string} must follow the --timepoint it belongs to")
            key = option_string.lstrip("-")
            if key in points[-1]:
                parser.error(f"{option_string} given twice for time point {len(points)}")
            points[-1][key] = values
        namespace.timepoints = points


def add_parsers(groups: Any) -> None:
    """Add the ``dose`` command to the sub-parsers object ``groups``."""
    dose = groups.add_parser("dose", help="post-therapy dosimetry (Lu-177): TIA, organ, lesion and voxel absorbed doses ± uncertainty")
    dose.add_argument("--timepoint", action=_TimePointAction, required=True, metavar="SPECT", dest="timepoints",
                      help="a SPECT time point (theraflow recon folder or NM RECON DICOM file), in chronological order; repeat for each")
    dose.add_argument("--ct", action=_TimePointAction, metavar="CT_DIR", dest="timepoints", help="CT series folder of the preceding --timepoint")
    dose.add_argument("--at", action=_TimePointAction, metavar="ISO_TIME", dest="timepoints",
                      help="time the preceding --timepoint's Bq/mL refer to (default: its acquisition start)")
    dose.add_argument("--masks", nargs="+", default=[], metavar="NAME=FILE",
                      help="organ masks on a time point's CT (--masks-on; NIfTI on its grid, RTSTRUCT or SEG in its frame): "
                           "kidneys, liver, spleen, salivary_glands, red_marrow, total_body, …")
    dose.add_argument("--lesions", nargs="+", default=[], metavar="NAME=FILE", help="lesion masks (sphere model, recovery correction)")
    dose.add_argument("--administered", type=float, metavar="MBQ", help="administered activity (default: from the NM header)")
    dose.add_argument("--administration", metavar="ISO_TIME", help="administration time (default: from the NM header)")
    dose.add_argument("--reference", type=int, default=1, metavar="K", help="reference time point (1-based, default 1)")
    dose.add_argument("--masks-on", type=int, metavar="K", help="time point whose CT the masks are drawn on (1-based, default: the reference)")
    dose.add_argument("--svalues", metavar="FILE",
                      help="organ S-value table (CSV: rows targets, columns sources, mGy/(MBq·s), optional phantom_mass_g row); "
                           "without it organ doses are the electron self-dose only")
    dose.add_argument("--svalues-source", metavar="TEXT", help="citation of the --svalues table (recorded in dose.json; required with it)")
    dose.add_argument("--settings", type=Path, metavar="FILE", help="dosimetry settings JSON (see quant/dosimetry/pipeline.py)")
    dose.add_argument("--out", required=True, type=Path, metavar="OUT_DIR")
    dose.set_defaults(func=_dose)


def _time(text: str | None, what: str) -> Any:
    from datetime import datetime

    from recon.errors import InputError

    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise InputError(None, f"{what} {text!r} is not an ISO date-time") from None


def _dose(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from quant.dosimetry import pipeline
    from quant.pipeline import parse_named_paths
    from recon.errors import InputError

    points = [pipeline.TimePoint(Path(p["spect"]), Path(p["ct"]) if p.get("ct") else None, _time(p.get("at"), "--at"))
              for p in args.timepoints]
    settings = pipeline.PipelineSettings.from_file(args.settings)
    try:
        dose = replace(settings.dose, s_values=args.svalues or settings.dose.s_values,
                       s_values_source=args.svalues_source or settings.dose.s_values_source)
    except ValueError as exc:
        raise InputError(Path(args.svalues or args.settings), str(exc)) from None
    settings = replace(settings, dose=dose, reference=args.reference - 1, masks_on=(args.masks_on or args.reference) - 1)
    result = pipeline.run_dose(points, parse_named_paths(args.masks, "--masks"), args.out, settings,
                               lesions=parse_named_paths(args.lesions, "--lesions"), administered_MBq=args.administered,
                               administration_time=_time(args.administration, "--administration"))
    print(f"time points: {', '.join(f'{t:.1f}' for t in result.times_h)} h after the administration")
    for voi in result.vois:
        dose = "–" if voi.dose is None else f"{voi.dose.value:.3g} ± {voi.dose.sd:.2g} Gy"
        print(f"{voi.name}: TIA {voi.tia.value:.4g} ± {voi.tia.sd:.2g} MBq·h, dose {dose}")
    for note in result.notes:
        print(f"note: {note}")
    print(f"written: {args.out} ({', '.join(result.files)})")
    return 0
