"""The whole chain after a scan, from the PACS and back, against a real Orthanc and a real Prefect
API server: a pre-therapy PSMA PET/CT with a SEG of reference regions (verdicts and SUVs
against the synthetic truth), the same kind of study first without SEG (recorded waiting, then
completed when the SEG is stored), an FDG PET (skipped with the reason), and a post-therapy
Lu-177 SPECT/CT at two time points of one cycle (organ activities against the simulator's truth,
the second time point registered onto the first, its frame of reference moved by 30 mm).

The PET studies are synthetic (``quant.synthetic``: exact SUVs, organs, lesions); their SEG is
drawn on a CT of finer grid than the PET, as a segmentation server leaves it. The SPECT is the
Lu-177 IEC sample (its own simulator); "organs" are balls around the 37 and 28 mm spheres and
the phantom body, their truth the simulator's activity map summed over the same voxels.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from pydicom import dcmread
from pydicom.uid import generate_uid

from conftest import dciodvfy_errors, run_cli
from flows import samples
from flows.chains import patient_key
from flows.store import DONE, SKIPPED, WAITING, ResultsStore
from flows_fixtures import FAST, SAMPLE, clone_study, orthanc, prefect_api, storescu  # noqa: F401 - fixtures
from flows.dicom_net import DimseSource
from test_flows import PATIENT_IDENTIFIERS, _count_calls, _flow_logs, run_command, slow
from test_safety import hostile_inbox  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]
TRUTH = SAMPLE / "truth"


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chain")
    return {"store": root / "results.sqlite", "out": root / "results"}


def _scan(orthanc, shared, *extra: str) -> int:
    fast = [arg for key, value in FAST.items() for arg in ("--set", f"{key}={value}")]
    return run_command("after-scan", "--source", orthanc.dicom, "--once", "--store", str(shared["store"]), "--out",
                       str(shared["out"]), "--settle", "1", *fast, *extra)


def _psma_study(folder: Path, tracer: str = "PSMA-11", days_ago: int = 0) -> dict:
    files, scene = samples.write_psma_study(folder, tracer=tracer, days_ago=days_ago)
    return {"uid": files.study_uid, "scene": scene, **files.files_by_kind}


def _row(shared, study_uid: str):
    store = ResultsStore(shared["store"])
    try:
        return store.rows(study_uid)
    finally:
        store.close()


@slow
def test_pet_with_seg_end_to_end(orthanc, prefect_api, shared, tmp_path, caplog, capsys, dciodvfy, monkeypatch):
    study = _psma_study(tmp_path)
    storescu(orthanc, study["pet"] + study["ct"] + study["seg"])
    caplog.set_level(logging.INFO)
    assert _scan(orthanc, shared) == 0
    printed = capsys.readouterr().out
    assert f"{study['uid']} v1 done [pet] VISION eligible, TheraP eligible, miPSMA 3" in printed, printed

    [row] = _row(shared, study["uid"])
    assert (row.status, row.route) == (DONE, "pet")
    summary = row.summary
    assert summary["tracer"] == {"agent": "PSMA-11", "family": "PSMA", "from": "name"}
    assert summary["lesions"] == 2 and summary["suv_max"] == pytest.approx(25.0, rel=1e-3)
    truth = study["scene"].reference_suv
    for name in ("liver", "parotid", "blood_pool", "spleen"):     # regions from the SEG on the CT grid, names mapped
        assert summary["references_suv_mean"][name] == pytest.approx(truth[name], rel=0.02), name
    seg_uid = dcmread(study["seg"][0], stop_before_pixels=True).SOPInstanceUID
    assert sorted(summary["regions_from"]["parotid"]) == [f"SEG {seg_uid}: parotid_gland_left", f"SEG {seg_uid}: parotid_gland_right"]

    out = Path(row.output_dir) / "selection"
    for name in ("seg.dcm", "sr.dcm", "report_pdf.dcm"):            # valid DICOM, and in the PACS
        assert dciodvfy_errors(dciodvfy, out / name) == [], name
    pdf = dcmread(out / "report_pdf.dcm")
    assert pdf.MIMETypeOfEncapsulatedDocument == "application/pdf" and bytes(pdf.EncapsulatedDocument).startswith(b"%PDF")
    assert pdf.StudyInstanceUID == study["uid"]
    in_pacs = {s["MainDicomTags"].get("Modality") for s in orthanc.series(study["uid"])}
    assert {"PT", "CT", "SEG", "SR", "DOC"} <= in_pacs
    assert sum(s["MainDicomTags"].get("Modality") == "SEG" for s in orthanc.series(study["uid"])) == 2  # theirs and ours

    steps = [(s.name, s.status) for s in ResultsStore(shared["store"]).steps(row.id)]
    assert steps == [("tracer", DONE), ("reference-regions", DONE), ("selection", DONE), ("report-pdf", DONE)]
    assert _scan(orthanc, shared) == 0                                 # again: our SEG/SR/PDF are no new input
    assert len(_row(shared, study["uid"])) == 1
    inventoried = _count_calls(monkeypatch, DimseSource, "inventory")
    assert _scan(orthanc, shared) == 0                                 # and again: listed at study level only
    assert inventoried == [], "settled studies whose instance count did not change are not inventoried again"

    artifacts = requests.post(f"{prefect_api}/artifacts/filter", timeout=10, json={
        "artifacts": {"key": {"any_": ["theraflow-studies"]}}, "sort": "CREATED_DESC", "limit": 10}).json()
    summary_md = next(a["data"] for a in artifacts if study["uid"] in a["data"])   # the run's summary, in the UI
    assert "VISION eligible, TheraP eligible, miPSMA 3" in summary_md and "| pet | done |" in summary_md
    logged = [record.getMessage() for record in caplog.records] + _flow_logs(prefect_api) + [a["data"] for a in artifacts]
    for line in logged:
        for identifier in (*PATIENT_IDENTIFIERS, "SYN-CHAIN", "SYNTHETIC"):
            assert identifier not in line, line


@slow
def test_pet_waits_for_its_seg_then_completes(orthanc, prefect_api, shared, tmp_path, capsys):
    """A study that reaches the PACS late (dated three days before the last scan) is still found;
    without its SEG it waits, and completes when the SEG is stored."""
    study = _psma_study(tmp_path, tracer="[18F]PSMA1007", days_ago=3)
    storescu(orthanc, study["pet"] + study["ct"])
    assert _scan(orthanc, shared) == 0
    assert "v1 waiting [pet]: waiting for reference regions: no SEG or RTSTRUCT in the study" in capsys.readouterr().out
    assert [(r.version, r.status) for r in _row(shared, study["uid"])] == [(1, WAITING)]
    assert _scan(orthanc, shared) == 0                                 # no busy loop, no duplicate row
    assert len(_row(shared, study["uid"])) == 1

    storescu(orthanc, study["seg"])                                     # the segmentation server answers
    assert _scan(orthanc, shared) == 0
    assert f"{study['uid']} v2 done [pet]" in capsys.readouterr().out
    rows = _row(shared, study["uid"])
    assert [(r.version, r.status) for r in rows] == [(1, WAITING), (2, DONE)]
    assert rows[1].summary["tracer"]["agent"] == "PSMA-1007"           # PROMISE then uses the spleen (PROMISE v2)

    proc = run_cli("results", "--store", str(shared["store"]), "--study", study["uid"], "--json")
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert [(v["version"], v["status"]) for v in listed] == [(1, WAITING), (2, DONE)]
    assert listed[1]["verdicts"]["vision"] is True


@slow
def test_a_study_older_than_the_window_is_reported_then_found_by_a_wider_one(orthanc, prefect_api, shared, tmp_path, capsys):
    """A study dated 20 days before the last scan reaches the PACS: the 14-day window does not list
    it, the scan says so in one warning (once); a scan with a wider window processes it."""
    study = _psma_study(tmp_path, tracer="FDG", days_ago=20)     # FDG: skipped, quick; what matters is that it is seen
    assert _scan(orthanc, shared) == 0                                 # moves the cursor to now if nothing moved it yet
    storescu(orthanc, study["pet"] + study["ct"])

    def warnings() -> list[str]:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)                             # log lines reach the API in the background
        return [m for m in _flow_logs(prefect_api) if study["uid"] in m and "before the look-back window" in m]

    assert _scan(orthanc, shared) == 0
    assert len(warnings()) == 1 and _row(shared, study["uid"]) == []
    store = ResultsStore(shared["store"])
    assert store.seen(orthanc.dicom, study["uid"]).startswith("late:")    # remembered as reported, not as settled
    store.close()
    assert _scan(orthanc, shared) == 0
    assert len(warnings()) == 1                                        # said once
    assert _scan(orthanc, shared, "--lookback", "30") == 0             # a wider window finds it
    assert "skipped [pet]: not a pre-therapy PET: FDG (FDG)" in capsys.readouterr().out
    assert [r.status for r in _row(shared, study["uid"])] == [SKIPPED]


@slow
def test_fdg_pet_is_skipped_with_the_reason(orthanc, prefect_api, shared, tmp_path, capsys):
    study = _psma_study(tmp_path, tracer="FDG")
    storescu(orthanc, study["pet"] + study["ct"] + study["seg"])
    assert _scan(orthanc, shared) == 0
    assert "skipped [pet]: not a pre-therapy PET: FDG (FDG)" in capsys.readouterr().out
    [row] = _row(shared, study["uid"])
    assert row.status == SKIPPED and row.output_dir is None


# -- a post-therapy Lu-177 SPECT/CT at two time points ---------------------------------------------


def _truth_MBq(mask_on_spect: sitk.Image, shift_z: float) -> float:
    """The simulator's activity (MBq) in the voxels of ``mask_on_spect``: the truth map (2.2 mm)
    summed over the points of its grid whose nearest SPECT voxel is in the mask."""
    activity = sitk.ReadImage(str(TRUTH / "activity.nii.gz"))
    moved = sitk.TranslationTransform(3, (0.0, 0.0, shift_z))         # truth point → this frame
    inside = sitk.Resample(mask_on_spect, activity, moved, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    values = sitk.GetArrayViewFromImage(activity)[sitk.GetArrayViewFromImage(inside) != 0]
    return float(values.sum(dtype=np.float64)) * float(np.prod(activity.GetSpacing())) / 1000.0 / 1e6


@slow
def test_spect_two_time_points_of_one_cycle(orthanc, prefect_api, shared, tmp_path, capsys):
    first, second = samples.write_spect_cycle(tmp_path, patient_id="LU-CYCLE-1")
    storescu(orthanc, first.files)
    assert _scan(orthanc, shared) == 0
    [one] = _row(shared, first.study_uid)
    assert (one.status, one.route) == (DONE, "spect") and one.patient_key == patient_key("LU-CYCLE-1")
    for activity in one.summary["activities"]:
        mask = sitk.ReadImage(str(Path(one.output_dir) / "regions" / f"{activity['name']}.nii.gz"))
        truth = _truth_MBq(mask, 0.0)
        assert activity["activity_MBq"] == pytest.approx(truth, rel=0.05), (activity["name"], truth)

    storescu(orthanc, second.files)                                    # no SEG: regions carried from the first
    assert _scan(orthanc, shared) == 0
    capsys.readouterr()
    [two] = _row(shared, second.study_uid)
    assert two.status == DONE and two.cycle_key == one.cycle_key
    registration = two.summary["registration"]
    assert registration["reference"] == {"study_uid": first.study_uid, "version": 1, "route": "spect"}
    # this CT's point p lies at p − 30 mm in the first time point's frame
    assert np.allclose(registration["translation_mm"], (0.0, 0.0, -samples.SHIFT_MM), atol=1.0), registration["translation_mm"]
    for activity in two.summary["activities"]:
        mask = sitk.ReadImage(str(Path(two.output_dir) / "regions" / f"{activity['name']}.nii.gz"))
        truth = _truth_MBq(mask, samples.SHIFT_MM)
        assert activity["activity_MBq"] == pytest.approx(truth, rel=0.05), (activity["name"], truth)
        print(f"time point 2, {activity['name']}: {activity['activity_MBq']:.2f} MBq, truth {truth:.2f} MBq "
              f"({activity['activity_MBq'] / truth - 1:+.1%})")
    steps = ResultsStore(shared["store"]).steps(two.id)
    assert [(s.name, s.status) for s in steps] == [("reconstruction", DONE), ("registration", DONE), ("activities", DONE), ("dosimetry", WAITING)]
    assert steps[-1].reason == "waiting for time points: 2 of 3 of this cycle"
    proc = run_cli("results", "--store", str(shared["store"]), "--patient", "LU-CYCLE-1")
    assert proc.returncode == 0 and proc.stdout.count("done [spect]") == 2, proc.stdout


def _stop(proc: subprocess.Popen) -> str:
    """SIGTERM a long-running ``theraflow`` command, wait for it to stop; its stderr."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=60)[1]
    finally:
        proc.kill()


@slow
def test_pacs_pushes_to_our_storage_scp(orthanc, prefect_api, tmp_path):
    """The integration hospitals use: the PACS pushes a study (C-STORE from Orthanc, as after a
    routing rule) to ``after-scan --listen``, which writes it into the watched folder and
    processes it on the next scan; only the allowed AE title from its host may send."""
    study = _psma_study(tmp_path / "study")
    storescu(orthanc, study["pet"] + study["ct"] + study["seg"])
    inbox, store, out = tmp_path / "inbox", tmp_path / "push.sqlite", tmp_path / "results"
    code = ("import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "run", "after-scan", "--watch", str(inbox), "--store", str(store),
                             "--out", str(out), "--interval", "2", "--settle", "2",
                             "--listen", f"THERAFLOW@127.0.0.1:{orthanc.move_port}", "--allow", "ORTHANC@127.0.0.1"],
                            cwd=ROOT, env={**os.environ, "PREFECT_API_URL": prefect_api},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rows = []
    try:
        orthanc_id = requests.post(f"{orthanc.url}/tools/lookup", data=study["uid"], timeout=10).json()[0]["ID"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:      # the listener is up once the command has parsed and bound
            pushed = requests.post(f"{orthanc.url}/modalities/theraflow/store", json={"Resources": [orthanc_id]}, timeout=60)
            if pushed.ok:
                break
            time.sleep(1)
        assert pushed.ok, pushed.text
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not rows:
            if store.exists():
                rows = [r for r in ResultsStore(store).rows(study["uid"]) if r.status == DONE]
            time.sleep(1)
    finally:
        err = _stop(proc)
    assert rows and rows[0].summary["verdicts"]["vision"] is True, err[-3000:]
    assert len(list(inbox.rglob("*.dcm"))) == len(study["pet"]) + len(study["ct"]) + 1
    assert proc.returncode == 0, err[-2000:]


@slow
def test_serve_runs_the_deployment(prefect_api, tmp_path):
    """``theraflow serve`` registers the after-scan deployment (schedule: interval) and runs it
    when asked (as the schedule or a person in the UI does): the study dropped in the inbox is
    processed by the served run, which ends Completed."""
    study = _psma_study(tmp_path / "study")
    inbox, store, out = tmp_path / "inbox", tmp_path / "served.sqlite", tmp_path / "results"
    inbox.mkdir()
    name = f"test-{generate_uid()[-8:]}"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--watch", str(inbox), "--store", str(store),
                             "--out", str(out), "--settle", "0", "--interval", "3600", "--name", name],
                            cwd=ROOT, env={**os.environ, "PREFECT_API_URL": prefect_api},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = None
    try:
        deadline = time.monotonic() + 120
        deployment = None
        while deployment is None and time.monotonic() < deadline and proc.poll() is None:
            answer = requests.get(f"{prefect_api}/deployments/name/theraflow-after-scan/{name}", timeout=10)
            deployment = answer.json() if answer.ok else time.sleep(1)
        assert deployment is not None, "deployment not registered"
        assert deployment["schedules"][0]["schedule"]["interval"] == 3600
        for path in study["pet"] + study["ct"] + study["seg"]:
            target = inbox / path.parent.name / path.name
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(path.read_bytes())
        deadline = time.monotonic() + 60
        while True:  # a loaded server may answer an error at first
            answer = requests.post(f"{prefect_api}/deployments/{deployment['id']}/create_flow_run", json={}, timeout=10)
            if answer.ok or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert answer.ok, f"{answer.status_code} {answer.text[:300]}"
        run = answer.json()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            state = requests.get(f"{prefect_api}/flow_runs/{run['id']}", timeout=10).json()["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED"):
                break
            time.sleep(2)
    finally:
        err = _stop(proc)
    assert state == "COMPLETED", err[-3000:]
    [row] = ResultsStore(store).rows(study["uid"])
    assert row.status == DONE and row.summary["verdicts"]["therap"] is True


@slow
def test_listmode_joins_its_study_in_the_pacs(orthanc, prefect_api, shared, tmp_path, capsys):
    """The PET scanner exports PETSIRD list mode into a folder (``--listmode-inbox``); its CT
    (and a SEG of regions) go to the PACS. Before the CT arrives the list mode waits for it; then
    it is reconstructed into a PET series of ours, sent to the PACS in its study, and quantified:
    the phantom's spheres (10:1 over the background that the SEG calls "liver") are its lesions."""
    sample = ROOT / "data-samples" / "ga68-iec-pet"
    truth = json.loads((sample / "truth" / "phantom.json").read_text())
    study_uid = truth["uids"]["study"]
    exports = tmp_path / "pet-exports"
    exports.mkdir()
    (exports / "exam.petsird").write_bytes((sample / "listmode.petsird").read_bytes())
    args = ("--listmode-inbox", str(exports), "--lookback", "365")   # the sample is dated weeks ago
    assert _scan(orthanc, shared, *args) == 0
    assert "waiting [pet]: waiting for the CT of the list-mode study" in capsys.readouterr().out
    seg = samples.write_phantom_regions(sample / "ct", tmp_path / "seg" / "seg.dcm")
    storescu(orthanc, [*sorted((sample / "ct").glob("*.dcm")), seg])   # the CT and its segmentation reach the PACS
    assert _scan(orthanc, shared, *args) == 0
    printed = capsys.readouterr().out
    assert f"{study_uid} v2 done [pet]" in printed, printed
    [first, second] = _row(shared, study_uid)
    assert (first.status, second.status) == (WAITING, DONE) and second.total_activity_MBq > 0
    steps = [(s.name, s.status) for s in ResultsStore(shared["store"]).steps(second.id)]
    assert steps == [("reconstruction", DONE), ("tracer", DONE), ("reference-regions", DONE), ("selection", DONE),
                     ("report-pdf", DONE)]
    summary = second.summary
    assert summary["tracer"]["agent"] == "PSMA-11"
    background_suv = summary["references_suv_mean"]["liver"]
    assert summary["lesions"] >= 4 and summary["suv_max"] > 5.0 * background_suv   # the spheres (10:1), reconstructed
    ours = [s for s in orthanc.series(study_uid) if s["MainDicomTags"].get("Modality") == "PT"]   # in the PACS, its study
    assert len(ours) == 1 and len(ours[0]["Instances"]) == len(list((Path(second.output_dir) / "pet" / "dicom").glob("*.dcm")))
    assert _scan(orthanc, shared, *args) == 0                          # our PET series, SEG, SR, PDF are no new input
    assert len(_row(shared, study_uid)) == 2


@slow
def test_hostile_inbox_entries_leave_the_study_processed(hostile_inbox, prefect_api, tmp_path, capsys):
    """A FIFO, a socket, a symlink loop, links out of the inbox, a 1,000-level folder, junk and a
    file claiming a 4 GiB element beside the sample SPECT/CT: one after-scan processes the study."""
    fast = [arg for key, value in FAST.items() for arg in ("--set", f"{key}={value}")]
    assert run_command("after-scan", "--watch", str(hostile_inbox), "--once", "--settle", "0", "--store",
                       str(tmp_path / "hostile.sqlite"), "--out", str(tmp_path / "results"), *fast) == 0
    printed = capsys.readouterr().out
    assert printed.count(" done [spect] ") == 1 and "failed" not in printed, printed
