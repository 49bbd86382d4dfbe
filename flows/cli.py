"""The ``theraflow`` command line. Heavy packages are imported only by the sub-command that
needs them; bad input ends with one ``error:`` line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, as for every other bad input
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(EXIT_BAD_INPUT)


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{path}: no such file")
    return path


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: not a finite number")
    return value


def positive_number(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be positive")
    return value


def non_negative_number(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must not be negative")
    return value


def _iso_datetime(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not an ISO date-time such as 2025-03-01T09:30") from None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def _replicates(text: str) -> int:
    value = int(text)
    if value != 0 and value < 2:
        raise argparse.ArgumentTypeError(f"{text}: 0 (none) or at least 2 replicates")
    return value


def _named_file(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text}: expected NAME=FILE")
    return name, _existing_file(path)


def _progress_printer():
    """A progress callback: a rich bar on a terminal, a few plain lines otherwise."""
    if sys.stderr.isatty():
        from rich.progress import BarColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

        bar = Progress("reconstructing", BarColumn(), "{task.completed}/{task.total}", TimeElapsedColumn(), TimeRemainingColumn(), transient=True)
        task = None

        def update(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                bar.start()
                task = bar.add_task("osem", total=total)
            bar.update(task, completed=done)
            if done >= total:
                bar.stop()

        return update

    def plain(done: int, total: int) -> None:
        if done == total or done % max(1, total // 4) == 0:
            print(f"reconstructing: {done}/{total} sub-iterations", file=sys.stderr, flush=True)

    return plain


def _recon_spect(args: argparse.Namespace) -> int:
    from recon.io.outputs import check_output_folder
    from recon.spect.outputs import write_spect_result
    from recon.spect.pipeline import SpectParameters, reconstruct_spect
    from recon.spect.reconstruct import Algorithm

    params = SpectParameters(
        algorithm=Algorithm(args.algorithm, args.iterations, args.subsets, args.beta, prior=args.prior),
        scatter=args.scatter,
        scatter_smoothing_mm=SpectParameters.scatter_smoothing_mm if args.scatter_smoothing_mm is None else args.scatter_smoothing_mm,
        projector=args.projector,
        psf=not args.no_psf,
        penetration=not args.no_penetration,
        sensitivity_cps_per_MBq=args.sensitivity,
        nuclide=args.nuclide,
        since_separation_h=args.since_separation_h,
        registry=args.registry,
        strict=args.strict,
        max_calibration_age_days=args.max_calibration_age_days,
        ct_registered=args.ct_registered,
        photopeaks=args.photopeaks,
        bootstrap=args.bootstrap,
        vois=tuple(args.voi),
    )
    check_output_folder(args.out)
    result = reconstruct_spect(args.nm, args.ct, params, progress=_progress_printer())
    out = write_spect_result(result, args.out)
    for note in result.provenance["notes"]:
        print(f"note: {note}", file=sys.stderr)
    for warning in result.provenance["calibration"]["warnings"]:
        print(f"warning: {warning} (recorded in recon.json and the DICOM Image Comments; --strict refuses)", file=sys.stderr)
    print(f"total activity: {result.total_activity_MBq:.2f} MBq (Bq/mL at acquisition start) -> {out}")
    return 0


def _recon_pet(args: argparse.Namespace) -> int:
    from recon.io.outputs import check_output_folder
    from recon.pet.outputs import write_pet_result
    from recon.pet.pipeline import PetParameters, reconstruct_pet
    from recon.spect.reconstruct import Algorithm

    params = PetParameters(algorithm=Algorithm(args.algorithm, args.iterations, args.subsets, args.beta),
                           tof=not args.no_tof, scatter=not args.no_scatter, scatter_method=args.scatter,
                           nuclide=args.nuclide, ct_registered=args.ct_registered)
    check_output_folder(args.out)
    result = reconstruct_pet(args.listmode, args.ct, params, progress=_progress_printer())
    out = write_pet_result(result, args.out)
    for note in result.provenance["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"total activity in the field of view: {result.provenance['total_activity_MBq']:.2f} MBq "
          f"(Bq/mL at acquisition start) -> {out}")
    return 0


def _calibrate_spect(args: argparse.Namespace) -> int:
    import getpass

    from recon.spect import calibration

    reports = []
    for measured in calibration.measure_sensitivities(args.nm, args.activity, args.at, args.photopeaks):
        report = {**measured.__dict__, "cps_per_MBq": measured.cps_per_MBq}
        if args.write:
            entry = measured.entry(args.by or getpass.getuser(), args.valid_days, note=Path(args.nm).name)
            report["entry"] = entry.__dict__
            report["registry"] = str(calibration.add_to_registry(entry, args.registry))
        reports.append(report)
    print(json.dumps(reports[0] if args.photopeaks == "main" else reports, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="theraflow", description="Quantitative SPECT/PET for radioligand therapy.")
    groups = parser.add_subparsers(dest="group", required=True, parser_class=_Parser)

    recon = groups.add_parser("recon", help="reconstruct raw data").add_subparsers(dest="modality", required=True, parser_class=_Parser)
    spect = recon.add_parser("spect", help="SPECT projections (DICOM NM TOMO) to Bq/mL")
    spect.add_argument("--nm", nargs="+", required=True, type=_existing_file, metavar="FILE", help="NM projection file(s), one per bed")
    spect.add_argument("--ct", type=Path, metavar="CT_DIR", help="CT series folder for attenuation correction")
    spect.add_argument("--out", required=True, type=Path, metavar="OUT_DIR")
    spect.add_argument("--sensitivity", type=positive_number, metavar="CPS_PER_MBQ", help="camera sensitivity per head (overrides the registry)")
    spect.add_argument("--iterations", type=positive_int, default=4)
    spect.add_argument("--subsets", type=positive_int, default=10)
    spect.add_argument("--algorithm", choices=("osem", "bsrem"), default="osem")
    spect.add_argument("--prior", choices=("rdp",), default="rdp", help="BSREM's prior: relative difference (Nuyts et al. 2002)")
    spect.add_argument("--beta", type=non_negative_number,
                       help="relative-difference prior weight (bsrem; default: from the counts, 0.3 x (1000 / photopeak "
                            "counts per body projection pixel)^(2/3), recon.spect.priors)")
    spect.add_argument("--scatter", choices=("tew", "dew", "none"), default="tew")
    spect.add_argument("--scatter-smoothing-mm", type=non_negative_number, metavar="SIGMA_MM",
                       help="σ of the Gaussian smoothing of each view's scatter estimate (default 8.5 mm, FWHM 20 mm; 0: raw)")
    spect.add_argument("--projector", choices=("native", "pytomography"), default="native",
                       help="SPECT system matrix: theraflow's own (default) or PyTomography's (same physics, slower)")
    spect.add_argument("--no-psf", action="store_true", help="no collimator-detector response modelling")
    spect.add_argument("--no-penetration", action="store_true",
                       help="no septal-penetration tail (by default modelled where the collimator and energy call for it)")
    spect.add_argument("--nuclide", help="radionuclide, when the file does not say (e.g. Lu-177); must agree when it does")
    spect.add_argument("--since-separation-h", type=non_negative_number, metavar="HOURS",
                       help="time since the parent (Ra-223, Pb-212) was separated from its progeny (default: equilibrium)")
    spect.add_argument("--photopeaks", choices=("main", "all"), default="main",
                       help="main: the nuclide's most abundant windowed photopeak; all: every windowed photopeak (e.g. Ac-225 "
                            "218 and 440 keV) in one joint reconstruction, each window calibrated in the registry")
    spect.add_argument("--bootstrap", type=_replicates, default=0, metavar="N",
                       help="standard uncertainty of each VOI's activity from count noise: N Poisson bootstrap replicates of "
                            "the counts (N more reconstructions; N >= 2; default 0: none), in recon.json 'vois'")
    spect.add_argument("--voi", type=_named_file, action="append", default=[], metavar="NAME=MASK",
                       help="a VOI mask image (non-zero inside, any grid): its activity (and uncertainty) in recon.json 'vois'; repeatable")
    spect.add_argument("--registry", type=Path, help="sensitivity registry file")
    spect.add_argument("--strict", action="store_true",
                       help="refuse a calibration of unknown origin, simulated for a real camera, expired or too old (default: warn)")
    spect.add_argument("--max-calibration-age-days", type=non_negative_number, default=365.0, metavar="DAYS",
                       help="calibration dated further than this from the acquisition: warned, refused with --strict (default 365)")
    spect.add_argument("--ct-registered", action="store_true",
                       help="the CT is registered to the SPECT although its frame of reference differs (recorded in recon.json)")
    spect.set_defaults(func=_recon_spect)

    pet = recon.add_parser("pet", help="PET list mode (PETSIRD) to Bq/mL, TOF OSEM")
    pet.add_argument("--listmode", required=True, type=_existing_file, metavar="FILE.petsird", help="PETSIRD binary list-mode file")
    pet.add_argument("--ct", type=Path, metavar="CT_DIR", help="CT series folder for attenuation and scatter correction")
    pet.add_argument("--out", required=True, type=Path, metavar="OUT_DIR")
    pet.add_argument("--iterations", type=positive_int, default=2)
    pet.add_argument("--subsets", type=positive_int, default=4)
    pet.add_argument("--algorithm", choices=("osem", "bsrem"), default="osem")
    pet.add_argument("--beta", type=non_negative_number, default=0.3, help="relative-difference prior weight (bsrem)")
    pet.add_argument("--no-tof", action="store_true", help="ignore the time-of-flight information")
    pet.add_argument("--no-scatter", action="store_true", help="no scatter correction")
    pet.add_argument("--scatter", choices=("tail", "sss"), default="tail",
                     help="scatter shape: blurred activity (tail) or single-scatter simulation (sss), both scaled to the tails")
    pet.add_argument("--nuclide", help="radionuclide, when the file does not say (e.g. Ga-68)")
    pet.add_argument("--ct-registered", action="store_true",
                     help="the CT is registered to the PET although its frame of reference differs (recorded in recon.json)")
    pet.set_defaults(func=_recon_pet)

    calibrate = groups.add_parser("calibrate", help="derive calibrations").add_subparsers(dest="modality", required=True, parser_class=_Parser)
    cal = calibrate.add_parser("spect", help="camera sensitivity from a planar acquisition of a known source in air")
    cal.add_argument("--nm", required=True, type=_existing_file, metavar="FILE")
    cal.add_argument("--activity", type=positive_number, metavar="MBQ", help="source activity (default: RadionuclideTotalDose)")
    cal.add_argument("--at", type=_iso_datetime, metavar="ISO_DATETIME", help="time of that activity (default: RadiopharmaceuticalStartDateTime)")
    cal.add_argument("--photopeaks", choices=("main", "all"), default="main",
                     help="main: the nuclide's most abundant windowed photopeak; all: one sensitivity per photopeak window "
                          "(a list; for 'recon spect --photopeaks all')")
    cal.add_argument("--write", action="store_true", help="add the result(s) to the sensitivity registry")
    cal.add_argument("--registry", type=Path, help="registry file (default: the one in use)")
    cal.add_argument("--by", help="who measured (recorded in the entry; default: the user name)")
    cal.add_argument("--valid-days", type=positive_int, default=365, metavar="DAYS",
                     help="the entry is valid this many days after the measurement (default 365)")
    cal.set_defaults(func=_calibrate_spect)

    from quant.cli import add_parsers as add_quant_parsers

    add_quant_parsers(groups)
    from quant.dosimetry.cli import add_parsers as add_dose_parsers

    add_dose_parsers(groups)

    from flows.commands import add_parsers as add_flow_parsers

    add_flow_parsers(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from recon.errors import InputError

    try:
        return args.func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
