"""Nothing escapes its folder, nothing stalls the watcher (issue #16): names from data as paths,
the watched inbox with hostile entries, the sensitivity registry, the results store."""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from flows import dicom_net, jobs
from flows.dicom_net import FolderSink, FolderSource
from flows.jobs import CohortEntry, Outcome
from flows.store import ResultsStore
from recon.errors import InputError
from recon.io import safepath
from recon.spect import calibration

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length", "ignore:Failed to encode")

SAMPLE = Path(__file__).resolve().parents[1] / "data-samples" / "lu177-iec"
NM = SAMPLE / "nm" / "projections.dcm"

# Names from data that must never become a path as they are.
HOSTILE_NAMES = [
    pytest.param("..", id="dotdot"),
    pytest.param("../../somewhere", id="traversal"),
    pytest.param("/etc/cron.d/x", id="absolute"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("x" * 300, id="too-long"),
    pytest.param(os.fsdecode(b"caf\xe9"), id="not-utf8"),   # a Latin-1 byte, as a file name decodes it
    pytest.param(".hidden", id="hidden"),
    pytest.param("", id="empty"),
    pytest.param("a\nb", id="newline"),
]


# --------------------------------------------------------------------------- names and paths


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_are_refused_as_path_components(name):
    with pytest.raises(InputError, match="cannot be a folder name"):
        safepath.safe_name(name, "label")


@pytest.mark.parametrize("name", ["SUBJ-0001", "patient 7", "a.b_c+d", "x" * 64])
def test_plain_names_are_kept(name):
    assert safepath.safe_name(name, "label") == name


@pytest.mark.parametrize("parts", [("..", "x"), ("/etc",), ("a", "../../b"), ("a\x00",)])
def test_inside_refuses_what_leads_out(tmp_path, parts):
    with pytest.raises(InputError):
        safepath.inside(tmp_path / "root", *parts)


def test_inside_follows_links_and_refuses_one_leading_out(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok").mkdir()
    assert safepath.inside(root, "ok", "v1") == (root / "ok" / "v1").resolve()
    (root / "escape").symlink_to(tmp_path)
    with pytest.raises(InputError, match="leads outside"):
        safepath.inside(root, "escape", "v1")


def test_check_writable(tmp_path):
    (tmp_path / "file").write_text("x")
    assert safepath.check_writable(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()                       # checked, nothing made
    assert [p.name for p in tmp_path.iterdir()] == ["file"]      # the probe left nothing behind
    for bad, phrase in [(tmp_path / "file", "not a folder"), (tmp_path / "file" / "x", "is a file"),
                        (tmp_path / ("n" * 256), "longer than 255 bytes"), (Path("/proc/theraflow-out"), "cannot write")]:
        with pytest.raises(InputError, match=phrase):
            safepath.check_writable(bad)


# --------------------------------------------------------------------------- cohort labels and export


def _manifest(tmp_path: Path, label: str) -> Path:
    study = tmp_path / "study"
    study.mkdir(exist_ok=True)
    path = tmp_path / "manifest.csv"
    path.write_text(f"study,label\nstudy,{label}\n", encoding="utf-8", errors="surrogateescape")
    return path


@pytest.mark.parametrize("label", ["../../somewhere", "/tmp/x", "..", "x" * 300, "a\tb", ".secret"])
def test_manifest_labels_that_are_not_folder_names_are_refused(tmp_path, label):
    with pytest.raises(InputError, match="line 2: label"):
        jobs.read_manifest(_manifest(tmp_path, label))


def test_manifest_that_is_not_utf8_or_not_text_is_refused(tmp_path):
    (tmp_path / "study").mkdir()
    latin = tmp_path / "latin.csv"
    latin.write_bytes("study,label\nstudy,Müller\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        jobs.read_manifest(latin)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"study,label\nstudy,a\x00b\n")
    with pytest.raises(InputError, match="NUL"):
        jobs.read_manifest(binary)


def _result_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "result"
    (folder / "dicom").mkdir(parents=True)
    shutil.copy(NM, folder / "dicom" / "nm.dcm")
    return folder


@pytest.mark.parametrize("label", ["../../escaped", "/abs/escaped", "..", "a\x00b"])
def test_export_never_writes_outside_its_folder(tmp_path, label):
    """Even a label that slipped past the manifest check cannot lead the export out."""
    out = tmp_path / "cohort"
    results = [(CohortEntry("1.2.3", label), Outcome("1.2.3", "done", version=1, output_dir=str(_result_folder(tmp_path))))]
    with pytest.raises(InputError):
        jobs.export_deidentified(results, out, "salt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"] and not Path("/abs/escaped").exists()


def test_export_with_a_plain_label(tmp_path):
    results = [(CohortEntry("1.2.3", "SUBJ-7"), Outcome("1.2.3", "done", version=1, output_dir=str(_result_folder(tmp_path))))]
    export, pseudonyms = jobs.export_deidentified(results, tmp_path / "cohort", "salt")
    assert pseudonyms == {"1.2.3": "SUBJ-7"}
    assert [p.relative_to(export).as_posix() for p in export.rglob("*.dcm")] == ["SUBJ-7/v1/nm.dcm"]


# --------------------------------------------------------------------------- UIDs that become file names


# UIDs from data that become file and folder names (received instances, results, the inbox).
HOSTILE_UIDS = [
    pytest.param("..", id="dotdot"), pytest.param("../../x", id="traversal"), pytest.param("/etc/x", id="absolute"),
    pytest.param("1.2\x00.3", id="nul"), pytest.param("1." * 40 + "1", id="too-long"), pytest.param("1.2.\xe9", id="not-ascii"),
    pytest.param("1.2.3/4", id="slash"), pytest.param("1.2.a", id="letters"),
]


@pytest.mark.parametrize("uid", HOSTILE_UIDS)
def test_received_instances_with_hostile_uids_are_refused(tmp_path, uid):
    class Event:   # what pynetdicom hands a C-STORE handler
        dataset = dcmread(NM, stop_before_pixels=True)

        @staticmethod
        def encoded_dataset() -> bytes:
            return b"DICM"

    Event.dataset.SOPInstanceUID = uid
    status, sop = dicom_net._write_received(Event(), tmp_path / "in")
    assert (status, sop) == (dicom_net._CANNOT_UNDERSTAND, None)
    assert not (tmp_path / "in").exists()


@pytest.mark.parametrize("uid", HOSTILE_UIDS)
def test_folder_sink_refuses_a_result_with_a_hostile_uid(tmp_path, uid):
    ds = dcmread(NM, stop_before_pixels=True)
    ds.SOPInstanceUID = uid
    ds.save_as(tmp_path / "bad.dcm")
    with pytest.raises(InputError, match="not a valid SOP Instance UID"):
        FolderSink(tmp_path / "outbox").store([tmp_path / "bad.dcm"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.dcm", "outbox"] and not list((tmp_path / "outbox").iterdir())


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_inbox_headers_with_hostile_uids_are_ignored(tmp_path, keyword):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for n, uid in enumerate(p.values[0] for p in HOSTILE_UIDS):
        ds = dcmread(NM, stop_before_pixels=True)
        setattr(ds, keyword, uid)
        ds.save_as(inbox / f"f{n}.dcm")
    shutil.copy(NM, inbox / "good.dcm")
    source = FolderSource(inbox)
    [uid] = source.list_studies(None)
    study = source.inventory(uid)
    assert [p.name for s in study.series.values() for p in s.files.values()] == ["good.dcm"]


# --------------------------------------------------------------------------- the watched inbox


def _deep(folder: Path, levels: int) -> Path:
    """``levels`` nested folders, made without long paths (chdir one level at a time)."""
    here = os.getcwd()
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.chdir(folder)
        for _ in range(levels):
            os.mkdir("d")
            os.chdir("d")
        Path("deep.dcm").write_bytes(NM.read_bytes()[:4096])
    finally:
        os.chdir(here)
        os.close(fd)
    return folder / "d"


def _remove_deep(folder: Path) -> None:
    """Remove what ``_deep`` made, one level at a time (a recursive removal exceeds Python's recursion limit)."""
    here = os.getcwd()
    try:
        os.chdir(folder)
        depth = 0
        while os.path.isdir("d") and not os.path.islink("d"):
            os.chdir("d")
            depth += 1
        for name in os.listdir("."):
            os.unlink(name)
        for _ in range(depth):
            os.chdir("..")
            os.rmdir("d")
    finally:
        os.chdir(here)


@pytest.fixture()
def hostile_inbox(tmp_path) -> Iterator[Path]:
    """The sample study beside a FIFO, a socket, a symlink loop, links out of the inbox, a
    link to a folder, a 1,000-level folder, a file that claims a huge element, junk and a
    truncated header (and a device where we may make one)."""
    inbox = tmp_path / "inbox"
    (inbox / "study" / "ct").mkdir(parents=True)
    shutil.copy(NM, inbox / "study" / "nm.dcm")
    for path in (SAMPLE / "ct").glob("*.dcm"):
        shutil.copy(path, inbox / "study" / "ct")
    os.mkfifo(inbox / "fifo.dcm")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(inbox / "socket.dcm"))
    sock.close()
    (inbox / "loop_a").symlink_to(inbox / "loop_b")
    (inbox / "loop_b").symlink_to(inbox / "loop_a")
    (inbox / "self").symlink_to(inbox, target_is_directory=True)
    (inbox / "outside.dcm").symlink_to(NM)                      # a file outside the inbox
    (inbox / "etc").symlink_to("/etc", target_is_directory=True)
    (inbox / "dangling.dcm").symlink_to(inbox / "nothing")
    _deep(inbox, 1000)
    (inbox / "junk.dcm").write_bytes(os.urandom(10_000))
    (inbox / "truncated.dcm").write_bytes(NM.read_bytes()[:300])
    huge = bytearray(NM.read_bytes()[:2000])
    huge += b"\x09\x00\x10\x00" + b"OB\x00\x00" + (0xFFFFFFF0).to_bytes(4, "little") + b"\x00" * 64   # private OB of ~4 GiB
    (inbox / "huge_claim.dcm").write_bytes(bytes(huge))
    if os.geteuid() == 0:
        os.mknod(inbox / "device.dcm", 0o600 | stat.S_IFCHR, os.makedev(1, 3))   # as /dev/null
    yield inbox
    _remove_deep(inbox)


def test_hostile_inbox_entries_leave_the_valid_study_processed(hostile_inbox, caplog):
    phantom = str(dcmread(NM, stop_before_pixels=True).StudyInstanceUID)
    source = FolderSource(hostile_inbox)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="theraflow.flows.dicom"):
        uids = source.list_studies(None)
        study = source.inventory(phantom)
        source.observe(phantom)
    elapsed = time.monotonic() - started
    assert uids == [phantom]
    assert sum(len(s.instances) for s in study.series.values()) == 1 + len(list((SAMPLE / "ct").glob("*.dcm")))
    assert all(str(p).startswith(str(hostile_inbox / "study")) for s in study.series.values() for p in s.files.values())
    assert elapsed < 20, f"scan took {elapsed:.1f} s"
    skipped = "\n".join(r.getMessage() for r in caplog.records)
    for name, why in [("fifo.dcm", "not a regular file"), ("socket.dcm", "not a regular file"), ("loop_a", "unusable entry"),
                      ("self", "symbolic link to a folder"), ("outside.dcm", "out of the inbox"), ("etc", "out of the inbox"),
                      ("dangling.dcm", "unusable entry"), ("d", "deeper than")]:
        assert any(f"'{name}" in line and why in line for line in skipped.splitlines()), (name, skipped)
    if os.geteuid() == 0:
        assert "'device.dcm': not a regular file" in skipped
    # one line per entry, however often the inbox is scanned
    assert len(caplog.records) == len(set(r.getMessage() for r in caplog.records))


def test_a_hung_header_read_is_skipped(tmp_path, monkeypatch, caplog):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(NM, inbox / "nm.dcm")
    (inbox / "slow.dcm").write_bytes(b"x" * 100)
    real = dicom_net._open_regular

    def hang_on_slow(path):
        if path.name == "slow.dcm":
            time.sleep(3)
        return real(path)

    monkeypatch.setattr(dicom_net, "_open_regular", hang_on_slow)
    monkeypatch.setattr(FolderSource, "HEADER_TIMEOUT_S", 0.2)
    with caplog.at_level(logging.WARNING, logger="theraflow.flows.dicom"):
        assert len(FolderSource(inbox).list_studies(None)) == 1
    assert any("'slow.dcm'" in r.getMessage() and "not read within 0.2 s" in r.getMessage() for r in caplog.records)


def test_header_reads_are_limited_in_size(tmp_path, monkeypatch):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(NM, inbox / "nm.dcm")
    sizes: list[int] = []
    real = dicom_net._read_prefix
    monkeypatch.setattr(dicom_net, "_read_prefix", lambda path, limit, timeout: sizes.append(len(data := real(path, limit, timeout))) or data)
    monkeypatch.setattr(FolderSource, "HEADER_BYTES", 4096)
    assert len(FolderSource(inbox).list_studies(None)) == 1
    assert sizes == [4096] and NM.stat().st_size > 1_000_000


def test_a_fifo_swapped_in_after_the_scan_is_not_copied(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(NM, inbox / "nm.dcm")
    source = FolderSource(inbox)
    study = source.inventory(source.list_studies(None)[0])
    (inbox / "nm.dcm").unlink()
    os.mkfifo(inbox / "nm.dcm")
    started = time.monotonic()
    with pytest.raises(OSError, match="not a regular file"):
        source.retrieve(study, list(study.series), tmp_path / "work")
    assert time.monotonic() - started < 5


# --------------------------------------------------------------------------- sensitivity registry


def _entry(cps: float, window=(187.2, 228.8)) -> calibration.SensitivityEntry:
    return calibration.SensitivityEntry("Symbia", "MEGP", "Lu-177", window, cps, "test")


@pytest.mark.parametrize("cps", [math.nan, math.inf, -math.inf, 0.0, -3.0])
def test_registry_refuses_to_write_a_value_that_is_not_a_positive_number(tmp_path, cps):
    registry = tmp_path / "registry.json"
    calibration.add_to_registry(_entry(9.5), registry)
    before = registry.read_bytes()
    with pytest.raises(InputError, match="refused to write"):
        calibration.add_to_registry(_entry(cps), registry)
    assert registry.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["registry.json"]


@pytest.mark.parametrize(("content", "phrase"), [
    ('{"entries": [{"camera_model": "A", "collimator": "B", "nuclide": "Lu-177", "window_keV": [187, 229], "cps_per_MBq": NaN}]}', "finite"),
    ('{"entries": [{"camera_model": "A", "collimator": "B", "nuclide": "Lu-177", "window_keV": [187, 229], "cps_per_MBq": -1}]}', "not positive"),
    ('{"entries": [{"camera_model": "A", "collimator": "B", "nuclide": "Lu-177", "window_keV": [229, 187], "cps_per_MBq": 9}]}', "lower < upper"),
    ('{"entries": [{"camera_model": "A", "collimator": "B", "nuclide": "Lu-177", "window_keV": [187, 229], "cps_per_MBq": "9"}]}', "a number"),
    ('{"entries": [{"camera_model": 1, "collimator": "B", "nuclide": "Lu-177", "window_keV": [187, 229], "cps_per_MBq": 9}]}', "text"),
    ('{"entries": [{"camera_model": "A", "window_keV": [187, 229], "cps_per_MBq": 9}]}', "entry 1"),
    ('{"entries": {"a": 1}}', "not a list"),
    ('{"entries": [', "JSONDecodeError"),
    ("", "JSONDecodeError"),
])
def test_registry_is_validated_when_read(tmp_path, content, phrase):
    registry = tmp_path / "registry.json"
    registry.write_text(content)
    with pytest.raises(InputError, match="not a sensitivity registry") as caught:
        calibration.load_registry(registry)
    assert phrase in str(caught.value)


def test_shipped_registries_pass_their_own_validation():
    calibration.load_registry(calibration.default_registry())              # shipped empty: no simulated figure for a real camera
    assert calibration.load_registry(SAMPLE / "sensitivity.json")             # the sample's own (simulated) entry


# --------------------------------------------------------------------------- results store


@pytest.mark.parametrize("kind", ["junk", "text", "folder", "parent-file", "nul"])
def test_unusable_store_is_one_input_error(tmp_path, kind):
    location = {"junk": tmp_path / "junk.sqlite", "text": tmp_path / "notes.txt", "folder": tmp_path,
                "parent-file": tmp_path / "notes.txt" / "results.sqlite", "nul": f"{tmp_path}/a\x00b.sqlite"}[kind]
    (tmp_path / "junk.sqlite").write_bytes(os.urandom(4096))
    (tmp_path / "notes.txt").write_text("not a database\n" * 200)
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(InputError, match="results store"):
        ResultsStore(location)
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
