"""Prefect 3 flows: thin orchestration over the plain functions of ``flows.jobs``.

- ``after_scan``: new studies of a source since its last successful scan → wait until their
  files stop arriving → reconstruct each (tasks, a bounded number at a time) → push the result
  DICOM back → one store row each. Idempotent: inputs and parameters already done are skipped.
  A study that fails is recorded with its reason and the others go on.
- ``reprocess``: a study again with other parameters → a new version beside the old ones.
- ``study``: a cohort (manifest CSV × optional parameter grid) → one table and a plot.

Tasks run on a thread pool of ``workers`` threads (default 1: one reconstruction at a time uses
every core of a small server). The cohort flow may run them on a Dask cluster instead, through
``prefect_dask.DaskTaskRunner`` (``pip install theraflow[dask]``): ``task_runner(dask=…)`` with a
scheduler address (``tcp://scheduler:8786``) or ``"local"`` (a temporary cluster on this machine);
``theraflow run study --dask`` and ``$THERAFLOW_DASK_ADDRESS`` choose it on the command line.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State
from prefect.states import Failed
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows import jobs
from flows.dicom_net import DEFAULT_AET
from flows.jobs import NO_SINK, CohortReport, Job, Outcome
from flows.store import FAILED, ResultsStore
from recon.errors import InputError

LOCAL_DASK = "local"


class StudiesFailed(Exception):
    """A run in which a study failed (each recorded in the store): what a direct call of the
    flow raises; ``outcomes`` holds every study's outcome, the failed and the others."""

    def __init__(self, outcomes: list[Outcome]) -> None:
        failed = [o for o in outcomes if o.status == FAILED]
        super().__init__(f"{len(failed)} of {len(outcomes)} stud{'y' if len(outcomes) == 1 else 'ies'} failed: "
                         + "; ".join(o.line() for o in failed))
        self.outcomes = outcomes

    def __reduce__(self):
        return (StudiesFailed, (self.outcomes,))


@task(name="find-new-studies", cache_policy=NO_CACHE)
def find_new_studies(job: Job, since: datetime | None) -> dict[str, str | None]:
    """Studies of the source with work to do (``jobs.find_new_studies``)."""
    store = ResultsStore(job.store)
    try:
        return jobs.find_new_studies(job.open_source(), store, job, since)
    finally:
        store.close()


@task(name="wait-for-arrivals", cache_policy=NO_CACHE)
def wait_for_arrivals(job: Job, study_uids: list[str], settle_s: float, max_wait_s: float) -> tuple[list[str], list[str]]:
    """(settled, still arriving) (``jobs.wait_until_settled``)."""
    return jobs.wait_until_settled(job.open_source(), study_uids, settle_s=settle_s, max_wait_s=max_wait_s)


@task(name="process-study", task_run_name="process-{study_uid}", cache_policy=NO_CACHE)
def process_study(job: Job, study_uid: str, only: list[str] | None = None) -> Outcome | State:
    """Retrieve, run the chain, push and record one study (``jobs.process_study``); a failure is
    recorded, and the task run ends Failed with the outcome (one line, no traceback)."""
    outcome = jobs.process_study(job, study_uid, only=only, flow_run_id=str(flow_run.id) if flow_run.id else None)
    if outcome.status == FAILED:
        return Failed(message=outcome.line(), data=outcome)
    return outcome


def _gather(futures: Iterable[PrefectFuture]) -> list[Outcome]:
    return [future.result(raise_on_failure=False) for future in futures]


def task_runner(workers: int = 1, dask: str | None = None) -> TaskRunner:
    """A thread pool of ``workers`` threads; with ``dask`` a Dask cluster instead: the scheduler
    at that address (``tcp://HOST:PORT``), or for ``"local"`` a temporary cluster of ``workers``
    single-threaded worker processes on this machine (loopback only, no dashboard)."""
    if not dask:
        return ThreadPoolTaskRunner(max_workers=workers)
    if importlib.util.find_spec("prefect_dask") is None:
        raise InputError(None, f"--dask {dask}: prefect-dask is not installed (pip install theraflow[dask])")
    from prefect_dask import DaskTaskRunner

    if dask == LOCAL_DASK:
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
            "n_workers": workers, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1", "dashboard_address": None})
    return DaskTaskRunner(address=dask)


@flow(name="theraflow-after-scan", task_runner=ThreadPoolTaskRunner(max_workers=1))
def after_scan(
    source: str | None = None,
    store: str | None = None,
    out: str | None = None,
    overrides: dict[str, Any] | None = None,
    sink: str | None = None,
    settle_s: float = 10.0,
    max_wait_s: float = 600.0,
    calling_aet: str = DEFAULT_AET,
    require_ct: bool = True,
    segmenter: str | None = None,
    region_names: str | None = None,
    lookback_days: float | None = None,
    listmode_inbox: str | None = None,
) -> list[Outcome] | State:
    """Process what is new at ``source`` (a folder, ``dicom://AET@HOST:PORT`` or
    ``dicomweb://…``) since its last successful scan; see the module text. The run ends Failed
    when a study failed (the other studies are still processed and returned with the state)."""
    jobs.spect_parameters(overrides)
    job = Job(source or jobs.default_source(), store or jobs.default_store(), out or jobs.default_out(),
              dict(overrides or {}), sink, calling_aet, require_ct, lookback_days=lookback_days, listmode_inbox=listmode_inbox,
              segmenter=segmenter, region_names=region_names)
    results = ResultsStore(job.store)
    try:
        name = job.open_source().name
        started = jobs.now_utc()
        since = results.last_success(name)
        new = find_new_studies(job, since)
        settled, arriving = wait_for_arrivals(job, list(new), settle_s, max_wait_s) if new else ([], [])
        outcomes = _gather([process_study.submit(job, uid) for uid in settled])
        for outcome in outcomes:
            if jobs.settled(outcome):
                results.remember(name, outcome.study_uid, new[outcome.study_uid])
        outcomes += [Outcome(uid, jobs.ARRIVING, reason=f"still arriving after {max_wait_s:g} s") for uid in arriving]
        if jobs.scan_succeeded(outcomes):
            results.set_last_success(name, started)
    finally:
        results.close()
    return _conclude(outcomes, f"{name}: {len(new)} new, {len(settled)} processed, {len(arriving)} still arriving")


def _conclude(outcomes: list[Outcome], headline: str) -> list[Outcome] | State:
    """Log one line per study, publish the run's summary as a markdown artifact, and end the run
    Failed (with ``StudiesFailed``, which carries the outcomes) when a study failed: a run is as
    bad as its worst study."""
    logger = get_run_logger()
    for outcome in outcomes:
        (logger.error if outcome.status == FAILED else logger.info)(outcome.line())
    logger.info(headline)
    if flow_run.id:
        create_markdown_artifact(key="theraflow-studies", markdown=jobs.markdown_summary(outcomes, headline),
                                 description="theraflow: what became of each study in this run (UIDs only)")
    failed = [o for o in outcomes if o.status == FAILED]
    if failed:
        error = StudiesFailed(outcomes)
        return Failed(message=str(error), data=error)
    return outcomes


@flow(name="theraflow-reprocess", task_runner=ThreadPoolTaskRunner(max_workers=1))
def reprocess(
    study_uid: str,
    overrides: dict[str, Any] | None = None,
    store: str | None = None,
    source: str | None = None,
    out: str | None = None,
    sink: str | None = None,
) -> list[Outcome] | State:
    """Process ``study_uid`` again from the inputs of its latest version with ``overrides``
    over its parameters: a new version row (or the existing one, when that was done before)."""
    results = ResultsStore(store or jobs.default_store())
    try:
        job, inputs = jobs.reprocess_job(results, study_uid, overrides or {}, source=source, out=out, sink=sink)
    finally:
        results.close()
    outcomes = _gather([process_study.submit(job, study_uid, inputs)])
    return _conclude(outcomes, f"reprocess of {study_uid}")


@flow(name="theraflow-study", task_runner=ThreadPoolTaskRunner(max_workers=1))
def study(
    manifest_csv: str,
    out_dir: str,
    grid: dict[str, list[Any]] | None = None,
    overrides: dict[str, Any] | None = None,
    source: str | None = None,
    store: str | None = None,
    deidentify: bool = False,
) -> CohortReport:
    """A cohort: every study of the manifest with every parameter set of ``grid`` (over
    ``overrides``), reconstructed into ``out_dir`` (results are not pushed anywhere), then
    ``results.csv`` (+ Parquet, + PNG). With ``deidentify`` the table carries pseudonyms and
    de-identified copies of the result DICOM go to ``out_dir/export``."""
    logger = get_run_logger()
    entries = jobs.read_manifest(manifest_csv)
    settings = jobs.expand_grid(overrides or {}, grid)
    for setting in settings:
        jobs.spect_parameters(setting)
    store_url = store or jobs.default_store()
    submitted = []
    for entry in entries:
        address, uids = jobs.cohort_studies(entry, source)
        for uid in uids:
            for setting in settings:
                submitted.append((entry, process_study.submit(Job(address, store_url, out_dir, setting, NO_SINK), uid)))
    results = list(zip([entry for entry, _ in submitted], _gather(future for _, future in submitted)))
    export, pseudonyms = None, None
    if deidentify:
        export, pseudonyms = jobs.export_deidentified(results, out_dir, os.environ.get("THERAFLOW_DEID_SALT") or secrets.token_hex(16))
    csv_path, parquet, plot, notes = jobs.write_cohort(jobs.cohort_rows(results, pseudonyms=pseudonyms), out_dir)
    for note in notes:
        logger.info(note)
    failed = sum(outcome.status == FAILED for _, outcome in results)
    logger.info("cohort: %d processing(s), %d failed -> %s", len(results), failed, csv_path)
    return CohortReport(len(results), failed, csv_path, parquet, plot, export, tuple(notes))
