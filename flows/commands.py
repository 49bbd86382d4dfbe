"""``theraflow run …``: the Prefect flows on the command line.

``add_parsers(groups)`` adds the ``run`` group to the sub-parsers of ``flows.cli``. Nothing here
imports Prefect (or the reconstruction) until a ``run`` sub-command runs. Exit status: 0 when
every study was done or skipped, 1 when a study failed (recorded with its reason in the store),
a study was still arriving or the scan itself failed (source unreachable), 2 for bad input
(``recon.errors.InputError``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

from flows.cli import non_negative_number as _seconds
from flows.cli import positive_int
from recon.errors import InputError
from recon.io.safepath import check_writable

EXIT_FAILED = 1
DASK_ADDRESS_ENV = "THERAFLOW_DASK_ADDRESS"
_DASK_SCHEMES = ("tcp", "tls", "ws", "wss")


def _prepare_prefect() -> None:
    """Defaults for Prefect in this process, before it is first imported: a patient-data
    server does not phone home; a temporary API server (no ``PREFECT_API_URL``) gets time to
    start on a slow machine; our own log lines reach the Prefect UI."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "theraflow")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


def _report(outcomes: Iterable) -> int:
    status = 0
    for outcome in outcomes:
        print(outcome.line())
        if outcome.status in ("failed", "arriving"):
            status = EXIT_FAILED
    return status


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    from flows.jobs import parse_assignments

    return parse_assignments(args.set or [])


def _open_store(location: str | None) -> None:
    """Open the results store once before any flow run: a store that cannot be used fails here
    (``InputError``), and its tables exist before workers race to create them."""
    from flows import jobs
    from flows.store import ResultsStore

    ResultsStore(location or jobs.default_store()).close()


def _prepare_scan(args: argparse.Namespace):
    """Check everything ``after-scan`` and ``serve`` were given before any flow run; returns the
    flow with its task runner, its parameters and the storage SCP to run beside it (or None)."""
    overrides = _overrides(args)
    if args.region_names is not None:
        from quant.regions import load_name_table

        load_name_table(args.region_names)   # a bad table fails here, before any flow run
    _prepare_prefect()
    from flows import jobs
    from flows.pipeline import after_scan, task_runner

    source = args.source or jobs.default_source()
    check_writable(args.out or jobs.default_out(), "--out")
    listener = _listener(args, source)
    job = jobs.Job(source, "", "", overrides, args.sink, args.aet, listmode_inbox=args.listmode_inbox)
    job.open_sink(job.open_source())   # bad addresses and folders fail here, before any flow run
    _open_store(args.store)
    parameters = dict(source=source, store=args.store, out=None if args.out is None else str(args.out), overrides=overrides,
                      sink=args.sink, settle_s=args.settle, max_wait_s=args.max_wait, calling_aet=args.aet,
                      require_ct=not args.allow_no_ct, segmenter=args.segmenter, lookback_days=args.lookback,
                      listmode_inbox=None if args.listmode_inbox is None else str(args.listmode_inbox),
                      region_names=None if args.region_names is None else str(args.region_names))
    return after_scan.with_options(task_runner=task_runner(args.workers)), parameters, listener


def _listening(listener, args: argparse.Namespace, source: str):
    if listener is not None:
        print(f"listening: {args.listen} (C-STORE into {source}; allowed: {', '.join(args.allow)})", file=sys.stderr, flush=True)
    return listener or contextlib.nullcontext()


def _after_scan(args: argparse.Namespace) -> int:
    run, parameters, listener = _prepare_scan(args)
    with _listening(listener, args, parameters["source"]):
        if args.once:
            return _scan(run, parameters)
        return _scan_until_stopped(run, parameters, args.interval)


def _serve(args: argparse.Namespace) -> int:
    """Register the after-scan flow as a Prefect deployment on a schedule and serve it until
    stopped (Ctrl-C, SIGTERM): runs start on the interval or cron schedule, or from the UI;
    at most ``--limit`` at once in this process (default 1: one reconstruction per node)."""
    flow, parameters, listener = _prepare_scan(args)
    schedule = {"cron": args.cron} if args.cron else {"interval": args.interval}
    with _listening(listener, args, parameters["source"]):
        flow.serve(name=args.name, parameters=parameters, limit=args.limit, pause_on_shutdown=False,
                   description="theraflow after every scan: SPECT and PET studies to verdicts and activities", **schedule)
    return 0


def _listener(args: argparse.Namespace, source: str):
    """Our storage SCP for ``--listen AET@[HOST:]PORT``: what the PACS or camera pushes (only the
    ``--allow AET@HOST`` callers) is written into the watched folder the scans read."""
    if not args.listen:
        if args.allow:
            raise InputError(None, "--allow applies to --listen only")
        return None
    from flows.dicom_net import StorageSCP, is_folder_address

    if not is_folder_address(source):
        raise InputError(None, f"--listen writes what it receives into a watched folder, not {source}: give --watch FOLDER")
    aet, sep, where = args.listen.partition("@")
    host, _, port = where.rpartition(":")
    if not sep or not aet or not 0 < len(aet) <= 16 or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(None, f"--listen {args.listen}: expected AET@PORT or AET@HOST:PORT")
    if not args.allow:
        raise InputError(None, "--listen needs at least one --allow AET@HOST (the PACS or camera that may send)")
    allowed: dict[str, list[str]] = {}
    for item in args.allow:
        calling, sep, peer = item.partition("@")
        if not sep or not calling or not peer:
            raise InputError(None, f"--allow {item}: expected AET@HOST")
        allowed.setdefault(calling, []).append(peer)
    inbox = Path(source.removeprefix("file://")).expanduser()
    inbox.mkdir(parents=True, exist_ok=True)
    return StorageSCP(aet, (host or "0.0.0.0", int(port)), inbox, allowed)


def _scan_until_stopped(run, parameters: dict, interval: float) -> int:
    """A scan every ``interval`` seconds. The first SIGINT or SIGTERM stops after the current
    scan (a SIGTERM during a scan ends that scan at once: Prefect marks the run crashed); a
    second SIGINT aborts. A scan that fails (source unreachable) is reported; the next one
    comes anyway."""
    from prefect.exceptions import TerminationSignal

    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("stopping after the current scan (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        while not stop.is_set():
            _scan(run, parameters)
            stop.wait(interval)
    except (KeyboardInterrupt, TerminationSignal):
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _outcomes(state) -> list:
    """The outcomes a flow run returned, also when it ended Failed (a study failed)."""
    from flows.pipeline import StudiesFailed

    value = state.result(raise_on_failure=False)
    if isinstance(value, StudiesFailed):
        return value.outcomes
    if isinstance(value, BaseException):
        raise value
    return value


def _scan(run, parameters: dict) -> int:
    from flows.dicom_net import NetworkError

    try:
        return _report(_outcomes(run(**parameters, return_state=True)))
    except NetworkError as exc:
        print(f"error: scan of {parameters['source']} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _reprocess(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    from flows import jobs
    from flows.dicom_net import is_uid
    from flows.store import ResultsStore
    from recon.errors import InputError

    if not is_uid(args.study_uid):   # before a store is opened (or made)
        raise InputError(None, f"{args.study_uid[:80]!r} is not a Study Instance UID")
    if args.out is not None:
        check_writable(args.out, "--out")
    store = ResultsStore(args.store or jobs.default_store())
    try:   # an unknown study fails here, before any flow run
        jobs.reprocess_job(store, args.study_uid, overrides, source=args.source, out=None if args.out is None else str(args.out))
    finally:
        store.close()
    _prepare_prefect()
    from flows.pipeline import reprocess

    state = reprocess(args.study_uid, overrides, store=args.store, source=args.source,
                      out=None if args.out is None else str(args.out), sink=args.sink, return_state=True)
    return _report(_outcomes(state))


def _study(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    from flows.jobs import parse_grid, read_manifest

    grid = parse_grid(args.grid or [])
    check_writable(args.out, "--out")
    read_manifest(args.manifest)
    _open_store(args.store)
    _prepare_prefect()
    from flows.pipeline import study, task_runner

    run = study.with_options(task_runner=task_runner(args.workers, dask=args.dask))
    report = run(str(args.manifest), str(args.out), grid=grid or None, overrides=overrides, source=args.source,
                 store=args.store, deidentify=args.deidentify)
    for note in report.notes:
        print(f"note: {note}")
    print(f"table: {report.csv}")
    for label, path in (("parquet", report.parquet), ("plot", report.plot), ("export", report.export)):
        if path is not None:
            print(f"{label}: {path}")
    print(f"{report.processed} processing(s), {report.failed} failed")
    return EXIT_FAILED if report.failed else 0


def _results(args: argparse.Namespace) -> int:
    from flows import jobs
    from flows.chains import patient_key
    from flows.store import ResultsStore

    store = ResultsStore(args.store or jobs.default_store())
    try:
        if args.patient is not None:
            rows = store.patient_rows(patient_key(args.patient, args.issuer or ""))
        else:
            rows = store.rows(args.study)
        report = [jobs.result_view(row, store.steps(row.id)) for row in rows]
    finally:
        store.close()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for view in report:
            print(jobs.result_line(view))
    return 0


def _days(text: str) -> float:
    value = _seconds(text)   # a finite number ≥ 0
    if value > 3650:
        raise argparse.ArgumentTypeError(f"{text}: at most 3650 days")
    return value


def _dask_address(text: str) -> str | None:
    """``local``, a Dask scheduler address ``tcp://HOST:PORT`` (or tls/ws/wss), or '' (none)."""
    if not text or text == "local":
        return text or None
    try:
        parts = urlsplit(text)
        valid = parts.scheme in _DASK_SCHEMES and bool(parts.hostname) and parts.port is not None
    except ValueError:
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(f"{text}: expected 'local' or a scheduler address such as tcp://HOST:8786")
    return text


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="URL", help="results store: SQLAlchemy URL or SQLite file (default $THERAFLOW_STORE or ~/.theraflow/results.sqlite)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="reconstruction parameter: algorithm, iterations, subsets, beta, gamma, scatter, psf, sensitivity, nuclide, registry, "
                             "strict (default true: an untrusted calibration is refused), max_calibration_age_days; "
                             "dosimetry of a treatment cycle: dose_timepoints (SPECT/CT time points that start it, default 3, 0: never), "
                             "dose_settings (a 'theraflow dose --settings' JSON file)")


def _scan_options(scan: argparse.ArgumentParser, aet: str) -> None:
    """The options ``run after-scan`` and ``serve`` share."""
    where = scan.add_mutually_exclusive_group()
    where.add_argument("--source", metavar="SOURCE", help="dicom://AET@HOST:PORT[?retrieve=move&port=N], dicomweb://HOST:PORT/PATH "
                       "or a watched FOLDER (default $THERAFLOW_SOURCE or ~/.theraflow/inbox)")
    where.add_argument("--watch", dest="source", metavar="FOLDER", help="a watched folder (the same as --source FOLDER)")
    scan.add_argument("--out", type=Path, metavar="DIR", help="result folders DIR/<study>/v<version> (default $THERAFLOW_OUT or ~/.theraflow/results)")
    scan.add_argument("--sink", metavar="DEST", help="where result DICOM goes: dicom://…, dicomweb://…, a FOLDER or 'none' (default: back to a PACS/DICOMweb source)")
    scan.add_argument("--settle", type=_seconds, default=10.0, metavar="SECONDS", help="a study is processed once unchanged this long")
    scan.add_argument("--max-wait", type=_seconds, default=600.0, metavar="SECONDS", help="longest wait for a study still arriving")
    scan.add_argument("--workers", type=positive_int, default=1, help="studies processed at once")
    scan.add_argument("--aet", default=aet, help="our AE title (default $THERAFLOW_AET or THERAFLOW)")
    scan.add_argument("--allow-no-ct", action="store_true", help="reconstruct studies without CT (no attenuation correction)")
    scan.add_argument("--listen", metavar="AET@[HOST:]PORT",
                      help="also run a storage SCP: studies the PACS or camera pushes are written into the watched folder")
    scan.add_argument("--allow", action="append", default=[], metavar="AET@HOST",
                      help="with --listen: a calling AE title and the host it may send from (repeatable)")
    scan.add_argument("--listmode-inbox", type=Path, metavar="FOLDER",
                      help="folder where the PET scanner exports PETSIRD list mode: each file joins the source's study its "
                           "exam information names (the CT stays at the source), is reconstructed and sent there")
    scan.add_argument("--lookback", type=_days, metavar="DAYS",
                      help="a PACS or DICOMweb source lists studies dated from DAYS before the last successful scan on "
                           "(default 14; a study's inputs and parameters are its key, so listing again is harmless)")
    scan.add_argument("--segmenter", metavar="'CMD {ct} {out}'",
                      help="command that writes SEG/RTSTRUCT reference regions for a PET study that has none ({ct}: the CT "
                           "folder, {out}: the folder to write to); nothing is downloaded")
    scan.add_argument("--region-names", type=Path, metavar="FILE",
                      help="JSON table of segment/ROI names to theraflow's region names, over quant/data/region_names.json")
    _common(scan)


def add_parsers(groups: argparse._SubParsersAction) -> None:
    """Add ``run after-scan | reprocess | study`` to the command line's sub-parsers."""
    run = groups.add_parser("run", help="orchestrated processing (Prefect flows)")
    flows = run.add_subparsers(dest="flow", required=True, parser_class=type(run))
    aet = os.environ.get("THERAFLOW_AET", "THERAFLOW")

    scan = flows.add_parser("after-scan", help="process new studies of a folder, PACS or DICOMweb server")
    _scan_options(scan, aet)
    scan.add_argument("--once", action="store_true", help="one scan, then exit (default: scan every --interval seconds)")
    scan.add_argument("--interval", type=_seconds, default=60.0, metavar="SECONDS")
    scan.set_defaults(func=_after_scan)

    served = groups.add_parser("serve", help="serve the after-scan flow as a Prefect deployment on a schedule, unattended")
    _scan_options(served, aet)
    when = served.add_mutually_exclusive_group()
    when.add_argument("--interval", type=_seconds, default=60.0, metavar="SECONDS", help="a run every SECONDS (default 60)")
    when.add_argument("--cron", metavar="'MIN HOUR DOM MON DOW'", help="a run on this cron schedule instead")
    served.add_argument("--name", default="after-scan", help="deployment name (default after-scan)")
    served.add_argument("--limit", type=positive_int, default=1, help="runs at once in this process (default 1: one reconstruction per node)")
    served.set_defaults(func=_serve)

    again = flows.add_parser("reprocess", help="a study again with other parameters: a new version")
    again.add_argument("study_uid", metavar="STUDY_UID")
    again.add_argument("--source", metavar="SOURCE", help="where its inputs are (default: where they came from)")
    again.add_argument("--out", type=Path, metavar="DIR", help="result root (default: beside the earlier version)")
    again.add_argument("--sink", metavar="DEST", help="where result DICOM goes (default: back to a PACS/DICOMweb source; 'none')")
    _common(again)
    again.set_defaults(func=_reprocess)

    listed = groups.add_parser("results", help="what was done, is waiting or failed, with verdicts and numbers")
    which = listed.add_mutually_exclusive_group()
    which.add_argument("--study", metavar="STUDY_UID", help="one study")
    which.add_argument("--patient", metavar="PATIENT_ID", help="one patient's studies (the store keeps only a pseudonymous key)")
    listed.add_argument("--issuer", metavar="ISSUER", help="IssuerOfPatientID, with --patient")
    listed.add_argument("--json", action="store_true", help="one JSON list")
    listed.add_argument("--store", metavar="URL", help="results store (default $THERAFLOW_STORE or ~/.theraflow/results.sqlite)")
    listed.set_defaults(func=_results)

    cohort = flows.add_parser("study", help="a cohort from a manifest CSV, results in one table")
    cohort.add_argument("manifest", type=Path, metavar="MANIFEST", help="CSV with a 'study' column (folder or Study Instance UID), optional 'label', 'source'")
    cohort.add_argument("--out", type=Path, required=True, metavar="OUT_DIR")
    cohort.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="parameter grid: every combination is reconstructed")
    cohort.add_argument("--source", metavar="SOURCE", help="source of manifest lines given as Study Instance UIDs")
    cohort.add_argument("--workers", type=positive_int, default=1, help="processings at once (threads; with --dask local: Dask worker processes)")
    cohort.add_argument("--dask", type=_dask_address, default=os.environ.get(DASK_ADDRESS_ENV, ""), metavar="ADDRESS|local",
                        help="run the processings on a Dask cluster: its scheduler (tcp://HOST:8786) or 'local', a temporary "
                             "one on this machine (default $THERAFLOW_DASK_ADDRESS; none: a thread pool)")
    cohort.add_argument("--deidentify", action="store_true", help="pseudonyms in the table; de-identified result DICOM in OUT_DIR/export")
    _common(cohort)
    cohort.set_defaults(func=_study)
