"""Flows on a real DICOM network: Orthanc (DIMSE + DICOMweb) on loopback, a real Prefect API
server, dcmtk's storescu as the camera, the sample Lu-177 study reconstructed quickly.

``after-scan`` runs end to end three ways (C-GET, C-MOVE to our listener, DICOMweb); the cohort
flow runs on a thread pool and on a small Dask cluster. Tests marked ``slow`` reconstruct (about
10-15 s each on 2 cores); THERAFLOW_SKIP_SLOW=1 skips them. The flow tests share one results
store per module, as one server would: each run only adds what is new. The store itself, on
SQLite and PostgreSQL, is tested in test_flows_store.py.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
import requests
from pydicom import Dataset, dcmread

from flows import commands, deid, dicom_net, jobs
from flows.dicom_net import (
    DicomWebSink, DicomWebSource, DimseSource, FolderSource, NetworkError, RetryPolicy, SeriesKind, StorageSCP, classify,
    with_retries,
)
from flows.store import DONE, FAILED, INPUT, NETWORK, ResultsStore
from flows_fixtures import (  # noqa: F401 - fixtures
    FAST, ORTHANC_AET, OUR_AET, SAMPLE, STORESCU, Orthanc, clone_study, free_port, orthanc, postgres, prefect_api, sample_study,
    server_store, storescu,
)
from recon.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
PATIENT_IDENTIFIERS = ("Phantom^IEC", "Phantom", "IEC-LU177")
slow = pytest.mark.skipif(os.environ.get("THERAFLOW_SKIP_SLOW") == "1", reason="slow: reconstructs (THERAFLOW_SKIP_SLOW=1)")


def run_command(*argv: str) -> int:
    """``theraflow run …`` in this process, through a parser built like flows.cli's."""
    from flows.cli import _Parser

    parser = _Parser(prog="theraflow")
    commands.add_parsers(parser.add_subparsers(dest="group", required=True, parser_class=_Parser))
    args = parser.parse_args(["run", *argv])
    try:
        return args.func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """The results store and output root the flow tests share."""
    root = tmp_path_factory.mktemp("theraflow")
    return {"store": root / "results.sqlite", "out": root / "results"}


# -- plain functions, no services -----------------------------------------------------------------


def _header(modality: str, image_type: list[str]) -> Dataset:
    ds = Dataset()
    ds.Modality, ds.ImageType = modality, image_type
    return ds


@pytest.mark.parametrize("modality, image_type, kind", [
    ("NM", ["ORIGINAL", "PRIMARY", "TOMO", "EMISSION"], SeriesKind.NM_TOMO_RAW),
    ("NM", ["DERIVED", "PRIMARY", "RECON TOMO", "EMISSION"], SeriesKind.NM_RECON),
    ("NM", ["ORIGINAL", "PRIMARY", "STATIC", "EMISSION"], SeriesKind.OTHER),
    ("PT", ["ORIGINAL", "PRIMARY"], SeriesKind.PT),
    ("CT", ["ORIGINAL", "PRIMARY", "AXIAL"], SeriesKind.CT),
    ("CT", ["ORIGINAL", "PRIMARY", "LOCALIZER"], SeriesKind.OTHER),
])
def test_classify(modality, image_type, kind):
    assert classify(_header(modality, image_type)) is kind


def test_plan_of_the_sample_folder():
    source = FolderSource(SAMPLE)
    uids = source.list_studies(None)
    assert len(uids) == 2                                   # the phantom and the calibration source
    plans = {uid: jobs.plan_study(source.inventory(uid)) for uid in uids}
    phantom = sample_study()
    assert plans[phantom.study_uid].inputs == sorted(phantom.sop_uids) and plans[phantom.study_uid].problem is None
    others = [plan for uid, plan in plans.items() if uid != phantom.study_uid]
    assert others == [None]                                 # planar calibration: nothing to reconstruct
    plan = plans[phantom.study_uid]
    nm_uid = next(iter(plan.study.series[plan.nm_series[0]].instances))
    nm_only = jobs.plan_study(source.inventory(phantom.study_uid), only=[nm_uid])
    assert nm_only.ct_series is None and "no CT series" in nm_only.problem
    gone = jobs.plan_study(source.inventory(phantom.study_uid), only=[*phantom.sop_uids, "1.2.3.4"])
    assert "no longer at the source" in gone.problem


def test_retries_back_off_and_give_up(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(dicom_net.time, "sleep", sleeps.append)
    calls = iter([ConnectionRefusedError("refused"), NetworkError("association aborted"), "ok"])

    def flaky():
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    policy = RetryPolicy(attempts=4, first_delay_s=0.5, factor=2, max_delay_s=0.8, deadline_s=60)
    assert with_retries(flaky, "test", policy) == "ok" and sleeps == [0.5, 0.8]
    sleeps.clear()

    def always():
        raise ConnectionRefusedError("refused")

    with pytest.raises(NetworkError, match="gave up after 4 attempt") as info:
        with_retries(always, "test", policy)
    assert not info.value.retryable and sleeps == [0.5, 0.8, 0.8]
    with pytest.raises(NetworkError, match="gave up after 1 attempt"):       # the deadline bounds time too
        with_retries(always, "test", RetryPolicy(attempts=10, first_delay_s=5, deadline_s=1))
    with pytest.raises(ValueError):                                          # not a network error: at once
        with_retries(lambda: int("x"), "test", policy)


class _FakeSource:
    """'busy' changes at every look; 'quiet' never does; 'old' says when it last changed."""

    def __init__(self) -> None:
        self.looks = 0

    def observe(self, uid: str) -> dicom_net.Observation:
        self.looks += 1
        if uid == "busy":
            return dicom_net.Observation(self.looks, None)
        return dicom_net.Observation("same", time.time() - 3600 if uid == "old" else None)


def test_waiting_for_arrivals():
    started = time.monotonic()
    settled, arriving = jobs.wait_until_settled(_FakeSource(), ["busy", "quiet", "old"], settle_s=0.3, max_wait_s=1.0, poll_s=0.1)
    assert sorted(settled) == ["old", "quiet"] and arriving == ["busy"]
    assert 1.0 <= time.monotonic() - started < 5
    settled, _ = jobs.wait_until_settled(_FakeSource(), ["old"], settle_s=60, max_wait_s=60)
    assert settled == ["old"]                                             # known to be old: no wait
    done = jobs.Outcome("1.2", DONE)
    assert jobs.scan_succeeded([done, jobs.Outcome("1.3", FAILED, error_kind=INPUT)])
    assert not jobs.scan_succeeded([done, jobs.Outcome("1.4", FAILED, error_kind=NETWORK)])
    assert not jobs.scan_succeeded([done, jobs.Outcome("1.5", jobs.ARRIVING)])


def test_task_runners():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.pipeline import task_runner

    assert isinstance(task_runner(2), ThreadPoolTaskRunner) and task_runner(2)._max_workers == 2
    remote = task_runner(2, "tcp://127.0.0.1:8786")
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://127.0.0.1:8786"
    local = task_runner(2, "local")
    assert local.address is None and local.cluster_kwargs["n_workers"] == 2 and local.cluster_kwargs["threads_per_worker"] == 1
    assert local.cluster_kwargs["host"] == "127.0.0.1" and local.cluster_kwargs["dashboard_address"] is None


def test_dask_option(monkeypatch, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"study\n{SAMPLE}\n")
    for bad in ("8786", "http://127.0.0.1:8786", "tcp://127.0.0.1"):
        with pytest.raises(SystemExit) as exited:
            run_command("study", str(manifest), "--out", str(tmp_path / "o"), "--dask", bad)
        assert exited.value.code == 2
        assert capsys.readouterr().err.startswith("error: argument --dask")
    monkeypatch.setenv("THERAFLOW_DASK_ADDRESS", "tcp://scheduler:8786")
    from flows.cli import _Parser

    parser = _Parser(prog="theraflow")
    commands.add_parsers(parser.add_subparsers(dest="group", required=True, parser_class=_Parser))
    assert parser.parse_args(["run", "study", str(manifest), "--out", "o"]).dask == "tcp://scheduler:8786"
    assert parser.parse_args(["run", "study", str(manifest), "--out", "o", "--dask", "local"]).dask == "local"
    assert not (tmp_path / "o").exists()


def test_parameters_from_assignments():
    overrides = jobs.parse_assignments(["iterations=2", "psf=false", "scatter=dew"])
    params = jobs.spect_parameters(overrides)
    assert (params.algorithm.iterations, params.psf, params.scatter) == (2, False, "dew")
    assert jobs.parameters_dict(params)["iterations"] == 2 and "beta" not in jobs.parameters_dict(params)
    for bad in (["iterations"], ["colour=red"], ["iterations=two"], ["scatter=magic"], ["psf=maybe"]):
        with pytest.raises(InputError):
            jobs.parse_assignments(bad)
    grid = jobs.parse_grid(["subsets=5, 10"])
    assert jobs.expand_grid({"psf": "false"}, grid) == [{"psf": "false", "subsets": "5"}, {"psf": "false", "subsets": "10"}]
    with pytest.raises(InputError):
        jobs.parse_grid(["subsets=5,ten"])


def test_deidentify_sample(tmp_path):
    source = SAMPLE / "nm" / "projections.dcm"
    original = dcmread(source)
    original.add_new((0x0009, 0x0010), "LO", "ACME")      # a private block
    original.add_new((0x0009, 0x1001), "LO", "Phantom^IEC")
    original.OperatorsName = "Doe^Jane"
    original.save_as(tmp_path / "in.dcm", enforce_file_format=True)
    out = deid.deidentify_file(tmp_path / "in.dcm", tmp_path / "out.dcm", "SUBJ-0001", "salt")
    text = out.read_bytes()
    for identifier in (*PATIENT_IDENTIFIERS, "Doe^Jane", "ACME"):
        assert identifier.encode() not in text
    ds = dcmread(out)
    assert ds.PatientName == "SUBJ-0001" and ds.PatientIdentityRemoved == "YES"
    assert ds.StudyInstanceUID != original.StudyInstanceUID and ds.SOPClassUID == original.SOPClassUID
    again = deid.deidentify(dcmread(tmp_path / "in.dcm"), "SUBJ-0001", "salt")
    assert again.StudyInstanceUID == ds.StudyInstanceUID                  # the same salt links exports
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.AcquisitionDate == original.AcquisitionDate                 # dates kept for decay


def test_bad_command_lines(tmp_path, capsys):
    assert run_command("after-scan", "--source", str(tmp_path / "missing"), "--once") == 2
    assert "source folder does not exist" in capsys.readouterr().err
    assert run_command("after-scan", "--source", "dicom://127.0.0.1:104", "--once") == 2
    assert "dicom://AET@HOST:PORT" in capsys.readouterr().err
    assert run_command("after-scan", "--source", str(tmp_path), "--once", "--set", "iterations=0") == 2
    assert "iterations" in capsys.readouterr().err
    assert run_command("reprocess", "not-a-uid", "--store", str(tmp_path / "r.sqlite")) == 2
    for store in ("postgres://theraflow:secret@127.0.0.1/theraflow", f"postgresql+psycopg://theraflow:secret@127.0.0.1:{free_port()}/x"):
        capsys.readouterr()
        assert run_command("after-scan", "--source", str(tmp_path), "--once", "--store", store) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: results store postgres") and err.count("\n") == 1 and "secret" not in err
    manifest = tmp_path / "m.csv"
    manifest.write_text("folder\nx\n")
    assert run_command("study", str(manifest), "--out", str(tmp_path / "o")) == 2
    assert "'study' column" in capsys.readouterr().err


def test_cli_imports_no_prefect():
    code = "import sys, flows.cli, flows.commands; assert 'prefect' not in sys.modules, 'prefect imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# -- network pieces, no reconstruction ------------------------------------------------------------


def test_storage_scp_accepts_only_configured_callers(tmp_path):
    port = free_port()
    nm = SAMPLE / "nm" / "projections.dcm"

    def send(aet: str) -> int:
        return subprocess.run([STORESCU, "-aet", aet, "-aec", OUR_AET, "127.0.0.1", str(port), str(nm)],
                              capture_output=True, timeout=60).returncode

    with StorageSCP(OUR_AET, ("127.0.0.1", port), tmp_path / "in", {"PACS": ["127.0.0.1"]}) as scp:
        assert send("INTRUDER") != 0 and not scp.received          # calling AE title not configured
        assert send("PACS") == 0 and len(scp.received) == 1
    with StorageSCP(OUR_AET, ("127.0.0.1", port), tmp_path / "in2", {"PACS": ["192.0.2.1"]}) as scp:
        assert send("PACS") != 0 and not scp.received              # right AE title, wrong host


def test_dimse_move_dicomweb_and_stow(orthanc, tmp_path):
    study = clone_study(tmp_path / "study", study_time="080000")
    storescu(orthanc, study.files)
    expected = study.sop_uids
    for source in (DimseSource("127.0.0.1", orthanc.dicom_port, ORTHANC_AET, retrieve_method="move", move_port=orthanc.move_port),
                   DicomWebSource(f"http://127.0.0.1:{orthanc.http_port}/dicom-web")):
        assert study.study_uid in source.list_studies(None)
        assert study.study_uid in source.list_studies(datetime.now(timezone.utc))      # today's study
        inventory = source.inventory(study.study_uid)
        kinds = sorted(s.kind.value for s in inventory.series.values())
        assert kinds == ["ct", "nm_tomo_raw"]
        files = source.retrieve(inventory, list(inventory.series), tmp_path / type(source).__name__)
        assert set(files) == expected and all(p.stat().st_size > 0 for p in files.values())
    # STOW: a de-identified copy is a new instance in a new study
    copy = deid.deidentify_file(study.nm[0], tmp_path / "stow.dcm", "SUBJ-STOW", "salt")
    DicomWebSink(f"http://127.0.0.1:{orthanc.http_port}/dicom-web").store([copy])
    copy_study = str(dcmread(copy, stop_before_pixels=True).StudyInstanceUID)
    assert len(orthanc.series(copy_study)) == 1
    for uid in (study.study_uid, copy_study):                            # not for the flow tests to find
        orthanc.delete_study(uid)


# -- flows end to end -------------------------------------------------------------------------------


def _scan_args(source: str, shared, *extra: str) -> list[str]:
    fast = [arg for key, value in FAST.items() for arg in ("--set", f"{key}={value}")]
    return ["after-scan", "--source", source, "--once", "--store", str(shared["store"]), "--out", str(shared["out"]),
            "--settle", "1", *fast, *extra]


def _flow_logs(api: str) -> list[str]:
    response = requests.post(f"{api}/logs/filter", json={"limit": 200, "sort": "TIMESTAMP_DESC"}, timeout=10)
    response.raise_for_status()
    return [entry["message"] for entry in response.json()]


@dataclass(frozen=True)
class Retrieval:
    """How an after-scan reaches Orthanc: the source address, the method of the source class
    that must do the retrieval, and the source name the store records."""

    address: Callable[[Orthanc], str]
    owner: type
    method: str
    recorded: Callable[[Orthanc], str]


RETRIEVALS = {
    "dimse-c-get": Retrieval(lambda o: o.dicom, DimseSource, "_get", lambda o: o.dicom),
    "dimse-c-move": Retrieval(lambda o: f"{o.dicom}?retrieve=move&port={o.move_port}", DimseSource, "_move", lambda o: o.dicom),
    "dicomweb": Retrieval(lambda o: o.dicomweb, DicomWebSource, "retrieve", lambda o: f"{o.url}/dicom-web"),
}


def _count_calls(monkeypatch, owner: type, name: str) -> list[int]:
    """Count calls of ``owner.name`` (still calling it); the list grows by one per call."""
    calls: list[int] = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@slow
@pytest.mark.parametrize("retrieval", list(RETRIEVALS))
def test_after_scan_end_to_end(retrieval, orthanc, prefect_api, shared, tmp_path, monkeypatch, caplog, capsys):
    """The camera sends the sample SPECT/CT to Orthanc; ``after-scan --once`` finds it, retrieves
    it (C-GET, C-MOVE to our listener, or WADO-RS), reconstructs and pushes the result back
    (C-STORE or STOW-RS); one row in the store; a second scan adds nothing. The C-GET run sends
    the sample itself (the reprocess test goes on from it), the others a copy with new UIDs, as
    the store is shared: studies done by an earlier run are skipped whatever the source."""
    way = RETRIEVALS[retrieval]
    address = way.address(orthanc)
    caplog.set_level(logging.INFO)
    study = sample_study() if retrieval == "dimse-c-get" else clone_study(tmp_path / "study", study_time="070000")
    storescu(orthanc, study.files)                                       # the camera sends the study
    retrieved = _count_calls(monkeypatch, way.owner, way.method)
    started = time.monotonic()
    assert run_command(*_scan_args(address, shared)) == 0
    elapsed = time.monotonic() - started
    printed = capsys.readouterr().out
    assert f"{study.study_uid} v1 done" in printed, printed
    assert retrieved, f"not retrieved by {way.owner.__name__}.{way.method}"

    store = ResultsStore(shared["store"])
    rows = store.rows(study.study_uid)
    assert len(rows) == 1 and rows[0].status == DONE and set(rows[0].inputs) == study.sop_uids
    assert rows[0].total_activity_MBq > 0 and rows[0].source == way.recorded(orthanc)
    output = Path(rows[0].output_dir)
    assert (output / "recon.nii.gz").exists() and (output / "dicom" / "NM_RECON.dcm").exists()
    assert rows[0].provenance["inputs"]["study_instance_uid"] == study.study_uid
    recon = orthanc.recon_series(study.study_uid)                        # the result is back in the PACS
    assert len(recon) == 1
    pushed = dcmread(output / "dicom" / "NM_RECON.dcm", stop_before_pixels=True)
    assert recon[0]["MainDicomTags"]["SeriesInstanceUID"] == pushed.SeriesInstanceUID

    before = len(store.rows())
    assert run_command(*_scan_args(address, shared)) == 0                # again: nothing new
    assert len(store.rows()) == before and len(orthanc.recon_series(study.study_uid)) == 1
    source = dicom_net.parse_source(address)
    assert jobs.find_new_studies(source, store, jobs.Job(address, "", "", FAST), None) == {}  # listed or not: its key is done
    store.close()

    logged = [record.getMessage() for record in caplog.records] + _flow_logs(prefect_api)
    assert any(study.study_uid in line for line in logged)
    for line in logged:
        for identifier in PATIENT_IDENTIFIERS:
            assert identifier not in line, line
    print(f"after-scan end to end ({retrieval}): {elapsed:.1f} s")


@slow
def test_reprocess_adds_a_version(orthanc, prefect_api, shared, capsys):
    study = sample_study()
    store = ResultsStore(shared["store"])
    first = store.latest(study.study_uid)
    if first is None:
        pytest.skip("needs test_after_scan_end_to_end")
    before = sorted(Path(first.output_dir).rglob("*"))
    assert run_command("reprocess", study.study_uid, "--store", str(shared["store"]), "--set", "subsets=6") == 0
    assert f"{study.study_uid} v2 done" in capsys.readouterr().out
    rows = store.rows(study.study_uid)
    assert [(r.version, r.status) for r in rows] == [(1, DONE), (2, DONE)]
    assert rows[1].parameters == {**rows[0].parameters, "subsets": 6} and rows[1].inputs == rows[0].inputs
    assert Path(rows[1].output_dir).parent == Path(first.output_dir).parent
    assert sorted(Path(first.output_dir).rglob("*")) == before            # the old version is untouched
    assert len(orthanc.recon_series(study.study_uid)) == 2
    assert run_command("reprocess", study.study_uid, "--store", str(shared["store"]), "--set", "subsets=6") == 0
    assert "skipped" in capsys.readouterr().out and len(store.rows(study.study_uid)) == 2


@slow
def test_pacs_outage_and_corrupt_study(orthanc, prefect_api, shared, tmp_path, monkeypatch, caplog):
    """One scan, two new studies. The first has a corrupt NM file: it fails, with the reason
    recorded, and the scan goes on. While Orthanc sends the second, it dies and comes back 2 s
    later: the retrieval is retried and the study processed once, with every instance."""
    from flows.pipeline import StudiesFailed, after_scan

    caplog.set_level(logging.INFO, logger="theraflow")
    corrupt = clone_study(tmp_path / "corrupt", study_time="090000", corrupt=True)
    good = clone_study(tmp_path / "good", study_time="100000")
    storescu(orthanc, corrupt.files)
    storescu(orthanc, good.files)
    received = {"n": 0}
    original = dicom_net._write_received

    def crash_on_fifth_instance(event, dest):
        if event.dataset.StudyInstanceUID == good.study_uid:
            received["n"] += 1
            if received["n"] == 5:
                orthanc.kill()
                threading.Timer(2.0, orthanc.start).start()
        return original(event, dest)

    monkeypatch.setattr(dicom_net, "_write_received", crash_on_fifth_instance)
    scan = dict(source=orthanc.dicom, store=str(shared["store"]), out=str(shared["out"]), overrides=FAST, settle_s=1)
    with pytest.raises(StudiesFailed) as failed_run:                   # the run is as bad as its worst study
        after_scan(**scan)
    outcomes = failed_run.value.outcomes
    runs = requests.post(f"{prefect_api}/flow_runs/filter", timeout=10, json={"sort": "START_TIME_DESC", "limit": 1}).json()
    assert runs[0]["state"]["type"] == "FAILED" and corrupt.study_uid in runs[0]["state"]["message"]
    assert [(o.study_uid, o.status) for o in outcomes] == [(corrupt.study_uid, FAILED), (good.study_uid, DONE)]   # others: done before
    assert received["n"] > len(good.sop_uids)                            # the retry fetched the rest again
    assert any("attempt 2 of" in r.getMessage() for r in caplog.records)

    store = ResultsStore(shared["store"])
    failed = store.rows(corrupt.study_uid)
    assert len(failed) == 1 and failed[0].status == FAILED and failed[0].error_kind == INPUT
    assert "pixel data" in failed[0].reason and failed[0].output_dir is None
    done = store.rows(good.study_uid)
    assert [(r.version, r.status) for r in done] == [(1, DONE)] and set(done[0].inputs) == good.sop_uids
    assert len(done[0].provenance["inputs"]["ct_sop_instance_uids"]) == len(good.ct)
    assert orthanc.recon_series(corrupt.study_uid) == [] and len(orthanc.recon_series(good.study_uid)) == 1

    assert after_scan(**scan) == []                                      # done is done, bad input is not retried
    assert len(store.rows(corrupt.study_uid)) == 1 and len(store.rows(good.study_uid)) == 1


def test_after_scan_keeps_scanning_until_stopped(prefect_api, tmp_path):
    """Without --once: a scan every --interval seconds (here of an empty folder) until SIGTERM,
    which stops it after the current scan, exit status 0."""
    inbox, store = tmp_path / "inbox", tmp_path / "loop.sqlite"
    inbox.mkdir()
    code = ("import sys; from flows.cli import _Parser; from flows import commands; p = _Parser(prog='theraflow'); "
            "commands.add_parsers(p.add_subparsers(dest='group', required=True, parser_class=_Parser)); "
            "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")
    proc = subprocess.Popen([sys.executable, "-c", code, "run", "after-scan", "--source", str(inbox), "--store", str(store),
                             "--interval", "1", "--settle", "0"], cwd=ROOT, env={**os.environ, "PREFECT_API_URL": prefect_api},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set = set()
    deadline = time.monotonic() + 120
    while len(seen) < 2 and time.monotonic() < deadline and proc.poll() is None:
        if store.exists():
            cursor = ResultsStore(store).last_success(str(inbox))
            if cursor is not None:
                seen.add(cursor)
        time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert len(seen) >= 2, err[-2000:]                                    # two scans, each moved the cursor
    assert proc.returncode == 0, err[-2000:]


@slow
def test_watched_folder_waits_for_arrivals(prefect_api, tmp_path):
    from flows.pipeline import after_scan

    study = clone_study(tmp_path / "camera", study_time="130000")
    inbox, outbox, store = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "folder.sqlite"
    inbox.mkdir()
    shutil.copy(study.nm[0], inbox / "nm.dcm")

    def camera():                                                        # the CT trickles in over ~3 s
        for path in study.ct:
            shutil.copy(path, inbox / f".{path.name}.part")
            os.replace(inbox / f".{path.name}.part", inbox / path.name)
            time.sleep(0.05)

    writer = threading.Thread(target=camera)
    writer.start()
    outcomes = after_scan(source=str(inbox), store=str(store), out=str(tmp_path / "out"), overrides=FAST, sink=str(outbox),
                          settle_s=1.5, max_wait_s=60)
    writer.join()
    assert [(o.study_uid, o.status) for o in outcomes] == [(study.study_uid, DONE)]
    rows = ResultsStore(store).rows()
    assert len(rows) == 1 and set(rows[0].inputs) == study.sop_uids      # waited for every CT slice
    assert len(list(outbox.glob("*.dcm"))) == 1
    assert after_scan(source=str(inbox), store=str(store), out=str(tmp_path / "out"), overrides=FAST, settle_s=1.5) == []
    assert len(ResultsStore(store).rows()) == 1


@slow
def test_study_cohort_table(prefect_api, shared, tmp_path, capsys):
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"study,label\n{SAMPLE},phantom\n")
    out = tmp_path / "cohort"
    # after the tests above, both settings are done already (by after-scan and reprocess): reused
    code = run_command("study", str(manifest), "--out", str(out), "--store", str(shared["store"]),
                       "--set", "iterations=1", "--set", "psf=false", "--set", f"registry={FAST['registry']}",
                       "--grid", "subsets=10,6", "--deidentify")
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, captured.err + printed
    assert "pyarrow not installed" in printed and (out / "results.png").stat().st_size > 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    phantom = [r for r in rows if r["status"] in (DONE, "skipped") and r["total_activity_MBq"]]
    assert sorted(r["subsets"] for r in phantom) == ["10", "6"] and {r["label"] for r in phantom} == {"phantom"}
    assert len({r["study_uid"] for r in phantom}) == 1
    assert {r["study_uid"] for r in rows} == {"phantom", "phantom-2"}    # the calibration study: the other pseudonym
    assert not any(r["output_dir"] for r in rows)                         # pseudonyms only
    exported = sorted((out / "export" / phantom[0]["study_uid"]).rglob("*.dcm"))
    assert len(exported) == 2
    for path in exported:
        assert dcmread(path).PatientName == phantom[0]["study_uid"]
        for identifier in PATIENT_IDENTIFIERS[:1] + PATIENT_IDENTIFIERS[2:]:
            assert identifier.encode() not in path.read_bytes()


def _table(path: Path) -> list[dict[str, str]]:
    """A cohort table without what differs from run to run (durations, output folders)."""
    return [{k: v for k, v in row.items() if k not in ("duration_s", "output_dir")} for row in csv.DictReader(path.open())]


@slow
def test_study_on_dask_matches_thread_pool(prefect_api, server_store, tmp_path, capsys):
    """The cohort flow on a small Dask cluster (two single-threaded workers in this process,
    TCP on loopback) with a server store gives the same table as on the default thread pool."""
    from distributed import LocalCluster

    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"study,label\n{SAMPLE},phantom\n")
    fast = [arg for key, value in FAST.items() for arg in ("--set", f"{key}={value}")]
    assert run_command("study", str(manifest), "--out", str(tmp_path / "threads"), "--store", str(tmp_path / "t.sqlite"), *fast) == 0
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        code = run_command("study", str(manifest), "--out", str(tmp_path / "dask"), "--store", server_store, *fast,
                           "--dask", cluster.scheduler_address)
        executed = sum(worker.state.executed_count for worker in cluster.workers.values())
    captured = capsys.readouterr()
    assert code == 0, captured.err + captured.out
    assert executed >= 2                                                  # both manifest studies ran on the workers
    expected = _table(tmp_path / "threads" / "results.csv")
    assert sorted(row["status"] for row in expected) == [DONE, "skipped"]  # the phantom; the planar calibration
    assert _table(tmp_path / "dask" / "results.csv") == expected
    assert [r.status for r in ResultsStore(server_store).rows()] == [DONE]
