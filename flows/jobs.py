"""The work the Prefect flows orchestrate, as plain functions usable without Prefect.

- parameters: ``--set key=value`` overrides to ``SpectParameters`` and back to the canonical
  dict that enters the idempotency key;
- planning: which series of a study to reconstruct (NM TOMO projections and the CT that shares
  their frame of reference);
- arrival: waiting until a study's instances stop changing;
- processing one study: claim a row, retrieve, reconstruct, write, push, record;
- cohorts: a manifest CSV and a parameter grid to one table (CSV, Parquet when pyarrow is
  installed) and a plot (when matplotlib is installed).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import itertools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from flows import deid
from flows.chains import ROUTE_PET, ROUTE_SPECT, ChainResult, listmode_chain, pet_chain, spect_chain
from flows.dicom_net import (
    DEFAULT_AET, ListModeInbox, NetworkError, RetryPolicy, SeriesKind, Sink, Source, Study, default_sink, is_uid, parse_sink,
    parse_source,
)
from flows.store import DONE, FAILED, INPUT, INTERNAL, NETWORK, SKIPPED, WAITING, ResultsStore, input_key
from recon.errors import InputError
from recon.io import safepath

logger = logging.getLogger("theraflow.flows")

ARRIVING = "arriving"
LATE = "late:"           # prefix of the fingerprint remembered for a late arrival already reported    # still arriving after the longest wait: left for a later scan
NO_SINK = "none"


# -- defaults ---------------------------------------------------------------------------------


def _home() -> Path:
    return Path(os.environ.get("THERAFLOW_HOME", "~/.theraflow")).expanduser()


def default_store() -> str:
    """``$THERAFLOW_STORE``, else a SQLite file in ``$THERAFLOW_HOME`` (``~/.theraflow``)."""
    return os.environ.get("THERAFLOW_STORE") or str(_home() / "results.sqlite")


def default_out() -> str:
    """``$THERAFLOW_OUT``, else ``$THERAFLOW_HOME/results``."""
    return os.environ.get("THERAFLOW_OUT") or str(_home() / "results")


def default_source() -> str:
    """``$THERAFLOW_SOURCE``, else the watched folder ``$THERAFLOW_HOME/inbox``."""
    return os.environ.get("THERAFLOW_SOURCE") or str(_home() / "inbox")


# -- parameters -------------------------------------------------------------------------------


def _as_bool(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def _optional(convert):
    def parse(text: Any):
        return None if text is None or str(text).strip().lower() in ("", "none") else convert(text)

    return parse


# Keys of ``--set key=value`` and of the stored parameter sets, with their value parsers.
PARAMETER_KEYS = {
    "algorithm": str,
    "iterations": int,
    "subsets": int,
    "beta": float,
    "gamma": float,
    "scatter": str,
    "projector": str,
    "psf": _as_bool,
    "sensitivity": _optional(float),
    "nuclide": _optional(str),
    "registry": _optional(str),
    "strict": _as_bool,
    "max_calibration_age_days": float,
}
# Keys of ``--set`` for a treatment cycle's dosimetry (``flows.chains.DoseOptions``): the number
# of SPECT/CT time points that starts it (0: never) and a ``theraflow dose --settings`` file.
DOSE_KEYS = {"dose_timepoints": int, "dose_settings": _optional(str)}
# Unattended processing refuses a calibration that cannot be trusted (simulated for a real
# camera, expired, too old): a person is not there to read the warning.
FLOW_STRICT = True


def spect_parameters(overrides: Mapping[str, Any] | None = None) -> Any:
    """``SpectParameters`` with these overrides (values may be text, as from ``--set``), strict
    about calibration unless ``strict=false``. InputError names an unknown key or a bad value."""
    from recon.spect.pipeline import SpectParameters
    from recon.spect.reconstruct import Algorithm

    values: dict[str, Any] = {}
    for key, raw in (overrides or {}).items():
        if key in DOSE_KEYS:
            continue
        if key not in PARAMETER_KEYS:
            raise InputError(None, f"unknown parameter {key!r} (known: {', '.join([*PARAMETER_KEYS, *DOSE_KEYS])})")
        try:
            values[key] = PARAMETER_KEYS[key](raw)
        except ValueError as exc:
            raise InputError(None, f"parameter {key}={raw!r}: {exc}") from None
    default = SpectParameters()
    try:
        algorithm = Algorithm(
            values.get("algorithm", default.algorithm.name), values.get("iterations", default.algorithm.iterations),
            values.get("subsets", default.algorithm.subsets), values.get("beta", default.algorithm.beta),
            values.get("gamma", default.algorithm.gamma),
        )
        return SpectParameters(
            algorithm=algorithm, scatter=values.get("scatter", default.scatter), psf=values.get("psf", default.psf),
            projector=values.get("projector", default.projector),
            sensitivity_cps_per_MBq=values.get("sensitivity", default.sensitivity_cps_per_MBq),
            nuclide=values.get("nuclide", default.nuclide),
            registry=Path(values["registry"]) if values.get("registry") else default.registry,
            strict=values.get("strict", FLOW_STRICT),
            max_calibration_age_days=values.get("max_calibration_age_days", default.max_calibration_age_days),
        )
    except ValueError as exc:
        raise InputError(None, f"parameters: {exc}") from None


def dose_options(overrides: Mapping[str, Any] | None = None) -> Any:
    """``flows.chains.DoseOptions`` from the ``dose_*`` keys of ``overrides`` (text or values);
    InputError for a bad count or an unreadable settings file."""
    from flows.chains import DoseOptions
    from quant.dosimetry.pipeline import PipelineSettings

    values = {key: DOSE_KEYS[key](raw) for key, raw in (overrides or {}).items() if key in DOSE_KEYS and raw is not None}
    count = values.get("dose_timepoints", DoseOptions.min_timepoints)
    if count < 0:
        raise InputError(None, f"parameter dose_timepoints={count}: 0 (never) or more")
    settings = Path(values["dose_settings"]).absolute() if values.get("dose_settings") else None
    PipelineSettings.from_file(settings)   # refused now rather than after the reconstructions
    return DoseOptions(count, settings)


def dose_parameters(options: Any) -> dict[str, Any]:
    """The ``dose_*`` parameters that differ from the defaults (so that the keys of results made
    with the defaults do not change)."""
    from flows.chains import DoseOptions

    default = DoseOptions()
    return {**({"dose_timepoints": options.min_timepoints} if options.min_timepoints != default.min_timepoints else {}),
            **({"dose_settings": str(options.settings)} if options.settings is not None else {})}


def parameters_dict(params: Any) -> dict[str, Any]:
    """The canonical parameter set (the ``--set`` keys; BSREM's prior only for BSREM), as
    stored and hashed into the key."""
    out: dict[str, Any] = {
        "algorithm": params.algorithm.name,
        "iterations": params.algorithm.iterations,
        "subsets": params.algorithm.subsets,
        "scatter": params.scatter,
        "projector": params.projector,
        "psf": params.psf,
        "sensitivity": params.sensitivity_cps_per_MBq,
        "nuclide": params.nuclide,
        "registry": None if params.registry is None else str(Path(params.registry).absolute()),
        "strict": params.strict,
        "max_calibration_age_days": params.max_calibration_age_days,
    }
    if params.algorithm.name == "bsrem":
        out.update(beta=params.algorithm.beta, gamma=params.algorithm.gamma)
    return out


def _split(items: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(None, f"{item!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def parse_assignments(items: Iterable[str]) -> dict[str, str]:
    """``["key=value", …]`` to a dict of checked overrides (values stay text)."""
    out = _split(items)
    spect_parameters(out)
    return out


def parse_grid(items: Iterable[str]) -> dict[str, list[str]]:
    """``["key=v1,v2", …]`` to a parameter grid, every value checked."""
    grid = {key: [v.strip() for v in values.split(",") if v.strip()] for key, values in _split(items).items()}
    for key, values in grid.items():
        if not values:
            raise InputError(None, f"grid {key}: no values")
        for value in values:
            spect_parameters({key: value})
    return grid


def expand_grid(base: Mapping[str, Any], grid: Mapping[str, Sequence[Any]] | None) -> list[dict[str, Any]]:
    """Every combination of the grid's values over ``base`` (just ``base`` without a grid)."""
    if not grid:
        return [dict(base)]
    keys = sorted(grid)
    return [{**base, **dict(zip(keys, combo))} for combo in itertools.product(*(grid[k] for k in keys))]


# -- planning ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What to do with a study: its route (``spect`` or ``pet``), the series it reads (NM TOMO
    projections or the PET series; the CT; the SEG/RTSTRUCT segmentations), restricted to the
    instances used (``study``), or why it cannot be done (``problem``)."""

    study: Study
    route: str
    main_series: tuple[str, ...]
    ct_series: str | None
    segmentation_series: tuple[str, ...] = ()
    problem: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def study_uid(self) -> str:
        return self.study.uid

    @property
    def nm_series(self) -> tuple[str, ...]:
        return self.main_series if self.route == ROUTE_SPECT else ()

    @property
    def series_uids(self) -> list[str]:
        """Every series read, main series first."""
        return [*self.main_series, *([self.ct_series] if self.ct_series else []), *self.segmentation_series]

    @property
    def inputs(self) -> list[str]:
        """SOP Instance UIDs of every input instance, sorted."""
        return sorted(sop for uid in self.series_uids for sop in self.study.series[uid].instances)


def _restricted(study: Study, series_uids: Iterable[str], only: set[str] | None) -> Study:
    out = Study(study.uid, study.date, study.time)
    for uid in series_uids:
        series = study.series[uid]
        keep = {sop: cls for sop, cls in series.instances.items() if only is None or sop in only}
        out.series[uid] = replace(series, instances=keep, files={sop: p for sop, p in series.files.items() if sop in keep})
    return out


def plan_study(study: Study, *, require_ct: bool = True, only: Iterable[str] | None = None) -> Plan | None:
    """The plan for ``study``, or None when it holds nothing theraflow processes. NM TOMO
    projections make a ``spect`` study (a CT in their frame of reference required unless not
    ``require_ct``), else a PET series a ``pet`` study (its CT optional); the study's
    segmentations (SEG, RTSTRUCT; none of ours) go with either. ``only`` restricts the inputs to
    these SOP Instance UIDs (reprocessing an earlier version)."""
    only_set = None if only is None else set(only)

    def used(series_list):
        return [s for s in series_list if only_set is None or only_set & set(s.instances)]

    nm = used(study.of_kind(SeriesKind.NM_TOMO_RAW))
    listmode = used(study.of_kind(SeriesKind.LISTMODE))
    pet = used(study.of_kind(SeriesKind.PT))
    if nm:
        route, main = ROUTE_SPECT, nm
    elif listmode:                       # PET raw data: reconstructed by theraflow (the scanner's PT series, if any, not used)
        route, main = ROUTE_PET, [max(listmode, key=lambda s: (len(s.instances), s.uid))]
    elif pet:
        route, main = ROUTE_PET, [max(pet, key=lambda s: (len(s.instances), s.uid))]
    else:
        return None
    frames = {s.frame_of_reference_uid for s in main}
    cts = used(study.of_kind(SeriesKind.CT))
    same_frame = [s for s in cts if s.frame_of_reference_uid in frames]
    ct = max(same_frame, key=lambda s: (len(s.instances), s.uid)) if same_frame else None
    segmentations = [s for s in used(study.of_kind(SeriesKind.SEGMENTATION))]
    problem = None
    if ct is None and route == ROUTE_SPECT and cts:   # another frame: not aligned unless registered, which a flow cannot know
        problem = (f"study {study.uid}: no CT series shares the NM frame of reference ({len(cts)} in other frames); "
                   "register it and reconstruct with 'theraflow recon spect --ct-registered'")
    elif ct is None and route == ROUTE_SPECT and require_ct:
        problem = f"study {study.uid}: no CT series for attenuation correction"
    chosen = _restricted(study, [s.uid for s in main] + ([ct.uid] if ct else []) + [s.uid for s in segmentations], only_set)
    missing = (only_set or set()) - {sop for s in chosen.series.values() for sop in s.instances}
    if missing:
        problem = f"study {study.uid}: {len(missing)} input instance(s) of the earlier version are no longer at the source"
    return Plan(chosen, route, tuple(sorted(s.uid for s in main)), None if ct is None else ct.uid,
                tuple(sorted(s.uid for s in segmentations)), problem)


# -- arrivals -------------------------------------------------------------------------------------


def wait_until_settled(
    source: Source, study_uids: Iterable[str], *, settle_s: float, max_wait_s: float, poll_s: float | None = None,
) -> tuple[list[str], list[str]]:
    """Wait until each study has not changed for ``settle_s`` seconds, at most ``max_wait_s``.
    Returns (settled, still arriving). Sources that know when files changed (folders) settle at
    once when that was long enough ago; others (PACS) are watched for ``settle_s``."""
    poll = poll_s if poll_s is not None else max(0.2, min(settle_s / 2, 5.0))
    pending: dict[str, tuple[Any, float]] = {uid: (None, 0.0) for uid in study_uids}
    settled: list[str] = []
    deadline = time.monotonic() + max_wait_s
    while pending:
        for uid in list(pending):
            observation = source.observe(uid)
            fingerprint, since = pending[uid]
            now = time.monotonic()
            if fingerprint is None or fingerprint != observation.fingerprint:
                pending[uid] = (observation.fingerprint, now)
                since = now
            quiet = now - since if observation.changed_at is None else time.time() - observation.changed_at
            if quiet >= settle_s:
                settled.append(uid)
                del pending[uid]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
    for uid in pending:
        logger.info("study %s is still arriving after %.0f s: left for a later run", uid, max_wait_s)
    return settled, list(pending)


# -- processing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """Everything the processing of a study needs besides the study, as plain values (so that
    it travels to any worker): source and sink addresses, store URL, output root, overrides."""

    source: str
    store: str
    out: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    sink: str | None = None            # None: back to the source (PACS/DICOMweb); "none": nowhere
    calling_aet: str = DEFAULT_AET
    require_ct: bool = True
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    lookback_days: float | None = None    # PACS/DICOMweb listing window before the last scan (default dicom_net.DEFAULT_LOOKBACK)
    listmode_inbox: str | None = None     # folder of the PET scanner's PETSIRD exports, joined to the source's studies
    segmenter: str | None = None          # "CMD {ct} {out}": makes SEG/RTSTRUCT when a PET study has none
    region_names: str | None = None       # JSON table of segment names over quant/data/region_names.json

    def open_source(self) -> Source:
        window = {} if self.lookback_days is None else {"lookback": timedelta(days=self.lookback_days)}
        source = parse_source(self.source, calling_aet=self.calling_aet, retry=self.retry, **window)
        return source if self.listmode_inbox is None else ListModeInbox(source, Path(self.listmode_inbox).expanduser())

    def open_sink(self, source: Source) -> Sink | None:
        if self.sink is None:
            return default_sink(source)
        if self.sink == NO_SINK:
            return None
        return parse_sink(self.sink, calling_aet=self.calling_aet, retry=self.retry)


@dataclass(frozen=True)
class Outcome:
    """What became of one study with one parameter set."""

    study_uid: str
    status: str                          # done, waiting, failed, skipped or arriving
    key: str | None = None
    version: int | None = None
    reason: str | None = None
    error_kind: str | None = None        # failed: input, network or internal
    total_activity_MBq: float | None = None
    output_dir: str | None = None
    duration_s: float | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    route: str | None = None
    summary: Mapping[str, Any] | None = None

    def line(self) -> str:
        """One line for people (UIDs only)."""
        text = f"{self.study_uid}"
        if self.version is not None:
            text += f" v{self.version}"
        text += f" {self.status}"
        if self.route:
            text += f" [{self.route}]"
        text += _verdict_text(self.summary)
        if self.total_activity_MBq is not None:
            text += f" {self.total_activity_MBq:.2f} MBq"
        if self.output_dir:
            text += f" -> {self.output_dir}"
        if self.reason and self.status != DONE:
            text += f": {self.reason}"
        return text


def chain_parameters(route: str, job: Job) -> dict[str, Any]:
    """The parameter set of a route, as stored and hashed into the key: the SPECT
    reconstruction's for ``spect``; the segmenter and region-name table for ``pet``."""
    if route == ROUTE_SPECT:
        return parameters_dict(spect_parameters(job.overrides)) | dose_parameters(dose_options(job.overrides))
    return {"route": ROUTE_PET, "segmenter": job.segmenter,
            "region_names": None if job.region_names is None else str(Path(job.region_names).absolute())}


def plan_key(plan: Plan, job: Job) -> str:
    return input_key(plan.inputs, chain_parameters(plan.route, job))


def find_new_studies(source: Source, store: ResultsStore, job: Job, since: datetime | None) -> dict[str, str | None]:
    """Studies of ``source`` listed since ``since`` that theraflow processes (SPECT or PET) and
    whose current inputs with the job's parameters are neither finished nor failed on bad input,
    with their listing fingerprints. A study whose fingerprint is unchanged since it was last
    settled is not inventoried again; studies found settled are remembered as such."""
    found: dict[str, str | None] = {}
    for uid, fingerprint in source.listing(since).items():
        if fingerprint is not None and store.seen(source.name, uid) == fingerprint:
            continue
        plan = plan_study(source.inventory(uid), require_ct=job.require_ct)
        why = "nothing theraflow processes" if plan is None else store.should_skip(plan_key(plan, job))
        if why:
            logger.info("study %s: skipped, %s", uid, why)
            store.remember(source.name, uid, fingerprint)
        else:
            found[uid] = fingerprint
    for uid, fingerprint in source.listing(since, before_window=True).items():
        if fingerprint is not None and store.seen(source.name, uid) not in (fingerprint, LATE + fingerprint):
            logger.warning("study %s is dated before the look-back window and arrived or changed after the scans stopped "
                           "listing it: not processed (widen --lookback, or push it to --listen)", uid)
            store.remember(source.name, uid, LATE + fingerprint)   # said once; a wider window still inventories it
    return found


def settled(outcome: Outcome) -> bool:
    """Whether a study needs nothing more until its inputs change (done, waiting, skipped, or
    failed on bad input), so that its listing fingerprint may be remembered."""
    return outcome.status in (DONE, WAITING, SKIPPED) or (outcome.status == FAILED and outcome.error_kind == INPUT)


def _arrange(plan: Plan, files: Mapping[str, Path], work: Path) -> tuple[list[Path], Path | None, list[Path]]:
    """The main series' files, a CT folder holding exactly the planned instances, the segmentation files."""
    def of(uid: str) -> list[Path]:
        return sorted(files[sop] for sop in plan.study.series[uid].instances)

    main = [path for uid in plan.main_series for path in of(uid)]
    segmentations = [path for uid in plan.segmentation_series for path in of(uid)]
    if plan.ct_series is None:
        return main, None, segmentations
    ct_dir = work / "ct"
    ct_dir.mkdir()
    for sop in plan.study.series[plan.ct_series].instances:
        os.link(files[sop], ct_dir / f"{sop}.dcm")
    return main, ct_dir, segmentations


def _run_chain(plan: Plan, job: Job, files: Mapping[str, Path], work: Path, steps: list, store: ResultsStore) -> ChainResult:
    from quant.regions import load_name_table

    main, ct_dir, segmentations = _arrange(plan, files, work)
    table = load_name_table(job.region_names)
    if plan.route == ROUTE_SPECT:
        return spect_chain(main, ct_dir, segmentations, spect_parameters(job.overrides), work / "result", steps,
                           history=store.patient_rows, region_table=table, dose=dose_options(job.overrides))
    options = dict(segmenter=job.segmenter, work=work, region_table=table)
    if plan.study.series[plan.main_series[0]].kind == SeriesKind.LISTMODE:
        return listmode_chain(main[0], ct_dir, segmentations, work / "result", steps, **options)
    pet_dir = work / "pet"
    pet_dir.mkdir()
    for path in main:
        os.link(path, pet_dir / path.name)
    return pet_chain(pet_dir, ct_dir, segmentations, work / "result", steps, **options)


def process_plan(plan: Plan, job: Job, *, source: Source, store: ResultsStore, flow_run_id: str | None = None) -> Outcome:
    """Claim, retrieve, run the study's chain (``flows.chains``), write ``out/<study>/v<version>``,
    push, record. Failures are recorded with their reason and returned, never raised; a key that
    is finished or running elsewhere is skipped."""
    pdict = chain_parameters(plan.route, job)
    key = input_key(plan.inputs, pdict)
    record = store.claim(key, plan.study_uid, source.name, pdict, plan.inputs, flow_run_id=flow_run_id)
    if record is None:
        existing = store.get(key)
        return Outcome(
            plan.study_uid, SKIPPED, key, existing.version if existing else None, store.should_skip(key) or "claimed elsewhere",
            total_activity_MBq=existing.total_activity_MBq if existing else None,
            output_dir=existing.output_dir if existing else None, parameters=pdict, route=plan.route,
        )
    logger.info("study %s: version %d started (%s, key %s)", plan.study_uid, record.version, plan.route, key[:12])
    timings: dict[str, float] = {}
    steps: list = []
    out_dir = Path(job.out).absolute() / plan.study_uid / f"v{record.version}"
    started = time.perf_counter()
    written = False
    try:
        if plan.problem:
            raise InputError(None, plan.problem)
        Path(job.out).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".work-", dir=job.out) as tmp:
            work = Path(tmp)
            files = source.retrieve(plan.study, plan.series_uids, work / "retrieved")
            timings["retrieve_s"] = time.perf_counter() - started
            t = time.perf_counter()
            chain = _run_chain(plan, job, files, work, steps, store)
            timings["chain_s"] = time.perf_counter() - t
            if chain.staging is not None:
                if plan.notes and chain.provenance.get("notes") is not None:
                    chain.provenance["notes"].extend(plan.notes)
                chain.provenance.setdefault("inputs", {})["source"] = source.name
                out_dir.parent.mkdir(parents=True, exist_ok=True)
                chain.staging.rename(out_dir)
                written = True
        sink = job.open_sink(source)
        if sink is not None and chain.push:
            t = time.perf_counter()
            sink.store([out_dir / name for name in chain.push])
            timings["push_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - started
        record = store.finish(record, status=chain.status, reason=chain.reason, total_activity_MBq=chain.total_activity_MBq,
                              output_dir=out_dir if written else None, provenance=chain.provenance, timings=timings,
                              summary=chain.summary, steps=steps, route=plan.route, patient_key=chain.patient_key,
                              cycle_key=chain.cycle_key)
        logger.info("study %s: version %d %s%s", plan.study_uid, record.version, chain.status, _verdict_text(chain.summary) or
                    (f": {chain.reason}" if chain.reason else ""))
        return Outcome(plan.study_uid, chain.status, key, record.version, chain.reason, None, record.total_activity_MBq,
                       record.output_dir, record.duration_s, pdict, plan.route, chain.summary)
    except InputError as exc:
        kind, reason = INPUT, str(exc)
    except NetworkError as exc:
        kind, reason = NETWORK, str(exc)
    except Exception as exc:  # noqa: BLE001 - recorded per study; the other studies go on
        logger.error("study %s: unexpected error: %s: %s", plan.study_uid, type(exc).__name__, exc)
        logger.debug("traceback", exc_info=True)
        kind, reason = INTERNAL, f"{type(exc).__name__}: {exc}"
    except BaseException as exc:   # interrupted (Ctrl-C, SIGTERM): no row left running, then stop
        store.fail(record, f"interrupted ({type(exc).__name__})", INTERNAL, steps=steps, route=plan.route)
        if written:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    if written:   # a result that was not pushed and recorded is no result
        shutil.rmtree(out_dir, ignore_errors=True)
    timings["total_s"] = time.perf_counter() - started
    record = store.fail(record, reason, kind, timings, steps=steps, route=plan.route)
    logger.warning("study %s: version %d failed (%s): %s", plan.study_uid, record.version, kind, reason)
    return Outcome(plan.study_uid, FAILED, key, record.version, reason, kind, duration_s=record.duration_s, parameters=pdict,
                   route=plan.route)


def _verdict_text(summary: Mapping[str, Any] | None) -> str:
    """' VISION eligible, TheraP not eligible, miPSMA 3' for a PET selection; '' otherwise."""
    verdicts = (summary or {}).get("verdicts")
    if not verdicts:
        return ""
    word = {True: "eligible", False: "not eligible", None: "undetermined"}
    return (f" VISION {word[verdicts['vision']]}, TheraP {word[verdicts['therap']]}, "
            f"miPSMA {verdicts['promise_highest_score']}")


def process_study(job: Job, study_uid: str, *, only: Iterable[str] | None = None, flow_run_id: str | None = None) -> Outcome:
    """Plan and process one study of ``job.source`` (see ``process_plan``)."""
    source = job.open_source()
    store = ResultsStore(job.store)
    try:
        plan = plan_study(source.inventory(study_uid), require_ct=job.require_ct, only=only)
        if plan is None:
            return Outcome(study_uid, SKIPPED, reason="nothing theraflow processes (no NM TOMO projections, no PET series)")
        return process_plan(plan, job, source=source, store=store, flow_run_id=flow_run_id)
    except (InputError, NetworkError) as exc:   # the study cannot even be listed: nothing to record against
        return Outcome(study_uid, FAILED, reason=str(exc), error_kind=INPUT if isinstance(exc, InputError) else NETWORK)
    finally:
        store.close()


def markdown_summary(outcomes: Sequence[Outcome], headline: str) -> str:
    """A markdown table of what became of each study (UIDs, routes, verdicts, numbers; never a
    patient name or ID), for the Prefect UI."""
    lines = [f"# theraflow: {headline}", "", "| study | version | route | status | verdict / numbers | where or why |",
             "|---|---|---|---|---|---|"]
    for o in outcomes:
        numbers = _verdict_text(o.summary).strip()
        if o.total_activity_MBq is not None:
            numbers = (numbers + "; " if numbers else "") + f"{o.total_activity_MBq:.1f} MBq"
        for activity in (o.summary or {}).get("activities", []):
            numbers += f"; {activity['name']} {activity['activity_MBq']:.2f} MBq"
        where = o.reason if o.status != DONE else (o.output_dir or "")
        lines.append(f"| `{o.study_uid}` | {o.version or ''} | {o.route or ''} | {o.status} | {numbers} | {where} |")
    if not outcomes:
        lines.append("| – | | | nothing new | | |")
    return "\n".join(lines) + "\n"


def result_view(row: Any, steps: Sequence[Any]) -> dict[str, Any]:
    """One store row for ``theraflow results``: identity, status, verdicts and numbers, steps."""
    summary = row.summary or {}
    return {
        "study_uid": row.study_uid, "version": row.version, "route": row.route, "status": row.status, "reason": row.reason,
        "error_kind": row.error_kind, "started_at": row.started_at, "finished_at": row.finished_at,
        "total_activity_MBq": row.total_activity_MBq, "verdicts": summary.get("verdicts"), "tracer": summary.get("tracer"),
        "activities": summary.get("activities"), "registration": summary.get("registration"), "output_dir": row.output_dir,
        "steps": [{"name": s.name, "status": s.status, "reason": s.reason, "numbers": s.numbers, "seconds": s.seconds} for s in steps],
    }


def result_line(view: Mapping[str, Any]) -> str:
    """``result_view`` as one line for people."""
    text = f"{view['study_uid']} v{view['version']} {view['status']} [{view['route'] or 'spect'}]"
    text += _verdict_text(view)
    if view["total_activity_MBq"] is not None:
        text += f" {view['total_activity_MBq']:.2f} MBq"
    for activity in view.get("activities") or []:
        text += f"; {activity['name']} {activity['activity_MBq']:.2f} MBq"
    waiting = [f"{s['name']}: {s['reason']}" for s in view["steps"] if s["status"] == WAITING]
    if view["reason"]:
        text += f": {view['reason']}"
    elif waiting:
        text += " (" + "; ".join(waiting) + ")"
    return text


def scan_succeeded(outcomes: Iterable[Outcome]) -> bool:
    """Whether a scan may move its source's cursor: nothing left arriving and no failure a later
    run could fix (network, internal)."""
    return all(o.status not in (FAILED, ARRIVING) or o.error_kind == INPUT for o in outcomes)


def reprocess_job(store: ResultsStore, study_uid: str, overrides: Mapping[str, Any], *, source: str | None = None,
                  out: str | None = None, sink: str | None = None) -> tuple[Job, list[str]]:
    """The job and inputs for reprocessing ``study_uid`` with ``overrides`` over the
    parameters of its latest version (done, else any): same input instances, same source and
    output root unless given."""
    if not is_uid(study_uid):
        raise InputError(None, f"{study_uid!r} is not a Study Instance UID")
    base = store.latest(study_uid) or store.latest(study_uid, status=None)
    if base is None:
        raise InputError(None, f"study {study_uid} has no results in {store.engine.url.render_as_string(hide_password=True)}")
    root = out or (str(Path(base.output_dir).parents[1]) if base.output_dir else default_out())
    if base.parameters.get("route") == ROUTE_PET:   # a PET selection: its own settings, no reconstruction parameters
        if overrides:
            raise InputError(None, f"study {study_uid} is a PET selection: --set applies to SPECT reconstructions only")
        return (Job(source or base.source, store.url, root, {}, sink, segmenter=base.parameters.get("segmenter"),
                    region_names=base.parameters.get("region_names")), list(base.inputs))
    merged = {k: v for k, v in {**base.parameters, **overrides}.items() if v is not None}
    spect_parameters(merged)
    dose_options(merged)
    return Job(source or base.source, store.url, root, merged, sink), list(base.inputs)


# -- cohorts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CohortEntry:
    """One line of a cohort manifest: a study folder or a Study Instance UID (at ``source``)."""

    study: str
    label: str = ""
    source: str | None = None


def read_manifest(path: str | Path) -> list[CohortEntry]:
    """A CSV with a ``study`` column (a folder, relative to the CSV, or a Study Instance UID)
    and optional ``label`` and ``source`` columns."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such manifest")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 text (byte {exc.start})") from None
    if "\x00" in text:
        raise InputError(path, "not a CSV text file (NUL characters)")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if "study" not in (reader.fieldnames or []):
            raise InputError(path, "manifest needs a 'study' column (folder or Study Instance UID)")
        entries = []
        for number, row in enumerate(reader, start=2):
            study = (row.get("study") or "").strip()
            if not study:
                continue
            if not is_uid(study):
                folder = Path(study) if Path(study).is_absolute() else path.parent / study
                if not folder.is_dir():
                    raise InputError(path, f"line {number}: {study!r:.80} is neither a folder nor a Study Instance UID")
                study = str(folder.absolute())
            label = (row.get("label") or "").strip()
            if label:   # a folder name of the de-identified export
                try:
                    safepath.safe_name(label, "label")
                except InputError as exc:
                    raise InputError(path, f"line {number}: {exc}") from None
            entries.append(CohortEntry(study, label, (row.get("source") or "").strip() or None))
    except csv.Error as exc:
        raise InputError(path, f"not a readable CSV file ({exc})") from None
    if not entries:
        raise InputError(path, "manifest lists no study")
    return entries


def cohort_studies(entry: CohortEntry, default: str | None) -> tuple[str, list[str]]:
    """The source address and study UIDs of a manifest entry."""
    if not is_uid(entry.study):
        return entry.study, parse_source(entry.study).list_studies(None)
    source = entry.source or default
    if source is None:
        raise InputError(None, f"study {entry.study}: no source given (manifest 'source' column or --source)")
    return source, [entry.study]


TABLE_COLUMNS = (
    "label", "study_uid", "status", "version", "algorithm", "iterations", "subsets", "scatter", "psf",
    "total_activity_MBq", "duration_s", "reason", "output_dir",
)


def cohort_rows(results: Iterable[tuple[CohortEntry, Outcome]], *, pseudonyms: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Table rows; with ``pseudonyms`` (study UID → pseudonym) the UID and folder are left out."""
    rows = []
    for entry, outcome in results:
        row = {name: None for name in TABLE_COLUMNS}
        row.update({k: v for k, v in outcome.parameters.items() if k in row})
        row.update(label=entry.label, study_uid=outcome.study_uid, status=outcome.status, version=outcome.version,
                   total_activity_MBq=outcome.total_activity_MBq, duration_s=outcome.duration_s,
                   reason=outcome.reason if outcome.status != DONE else None, output_dir=outcome.output_dir)
        if pseudonyms is not None:
            row["study_uid"] = pseudonyms[outcome.study_uid]
            row["output_dir"] = None
        rows.append(row)
    return rows


@dataclass(frozen=True)
class CohortReport:
    """Files written for a cohort, what could not be written, and counts."""

    processed: int
    failed: int
    csv: Path
    parquet: Path | None
    plot: Path | None
    export: Path | None
    notes: tuple[str, ...]


def write_cohort(rows: list[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path | None, Path | None, list[str]]:
    """``results.csv``; ``results.parquet`` when pyarrow is installed; ``results.png`` (total
    activity per study and parameter set) when matplotlib is installed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    csv_path = out_dir / "results.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    parquet = None
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        parquet = out_dir / "results.parquet"
        pq.write_table(pa.Table.from_pylist(rows), parquet)
    else:
        notes.append("pyarrow not installed: no results.parquet")
    plot = None
    if importlib.util.find_spec("matplotlib") is not None:
        plot = _plot(rows, out_dir / "results.png")
    else:
        notes.append("matplotlib not installed: no results.png")
    return csv_path, parquet, plot, notes


def _plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["total_activity_MBq"] is not None]
    studies = sorted({r["label"] or r["study_uid"][-12:] for r in done})
    settings = sorted({f"{r['algorithm']} {r['iterations']}i{r['subsets']}s psf={r['psf']} {r['scatter']}" for r in done})
    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 * len(studies) * max(1, len(settings)) / 2), 3.5))
    width = 0.8 / max(1, len(settings))
    for i, setting in enumerate(settings):
        values = []
        for study in studies:
            match = [r["total_activity_MBq"] for r in done
                     if (r["label"] or r["study_uid"][-12:]) == study
                     and f"{r['algorithm']} {r['iterations']}i{r['subsets']}s psf={r['psf']} {r['scatter']}" == setting]
            values.append(match[0] if match else 0.0)
        ax.bar([j + i * width for j in range(len(studies))], values, width=width, label=setting)
    ax.set_xticks([j + width * (len(settings) - 1) / 2 for j in range(len(studies))], studies)
    ax.set_ylabel("total activity [MBq]")
    ax.set_title("theraflow cohort")
    if settings:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def export_deidentified(results: Iterable[tuple[CohortEntry, Outcome]], out_dir: str | Path, salt: str) -> tuple[Path, dict[str, str]]:
    """De-identified copies of the result DICOM files in ``out_dir/export/<pseudonym>/``;
    returns the folder and the pseudonyms (study UID → ``SUBJ-0001`` or the label)."""
    export = Path(out_dir) / "export"
    pseudonyms: dict[str, str] = {}
    for entry, outcome in results:
        if outcome.study_uid not in pseudonyms:
            name = base = entry.label or f"SUBJ-{len(pseudonyms) + 1:04d}"
            while name in pseudonyms.values():   # several studies under one label
                name = f"{base}-{sum(v == base or v.startswith(base + '-') for v in pseudonyms.values()) + 1}"
            pseudonyms[outcome.study_uid] = name
        name = pseudonyms[outcome.study_uid]
        if outcome.output_dir is None:
            continue
        folder = safepath.inside(export, safepath.safe_name(name, "pseudonym"), f"v{outcome.version}")
        for source in sorted((Path(outcome.output_dir) / "dicom").glob("*.dcm")):
            deid.deidentify_file(source, folder / source.name, name, salt)
    return export, pseudonyms


def now_utc() -> datetime:
    return datetime.now(timezone.utc)
