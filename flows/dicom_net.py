"""Where studies come from and where results go, as plain functions and small classes (no Prefect).

Sources (``parse_source``):

- a watched folder (default): DICOM files in any layout, grouped by StudyInstanceUID from their
  headers; ``observe`` tells when a study's files last changed, so a study is processed only once
  its files have been stable for a while;
- a PACS over DIMSE (``dicom://AET@HOST:PORT``): C-FIND at study and image level, retrieval by
  C-GET (default) or C-MOVE to a storage SCP of ours (``?retrieve=move&port=11113``);
- a DICOMweb server (``dicomweb://HOST:PORT/PATH``, ``dicomwebs://`` for https): QIDO-RS and WADO-RS.

Sinks (``parse_sink``): C-STORE, STOW-RS, or a folder. Network operations are retried with
exponential back-off on transient errors (association rejected or aborted, connection refused,
HTTP 429/502/503/504), a bounded number of times within a bounded time.

Series are classified from their headers (``classify``). Log lines carry UIDs, never patient
names or IDs; a storage SCP of ours accepts only configured calling AE titles from configured hosts.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
from socketserver import TCPServer
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

import requests
from pydicom import Dataset, dcmread
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, build_role, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.transport import ThreadedAssociationServer

from recon.errors import InputError

logger = logging.getLogger("theraflow.flows.dicom")

T = TypeVar("T")

DEFAULT_AET = "THERAFLOW"
DEFAULT_MOVE_PORT = 11113
# A PACS cannot say when a study arrived, only its StudyDate: each scan lists the studies dated
# from this long before the last successful scan on (a study sent late, e.g. a camera's queue
# after a weekend outage, is still found); only studies whose instance count changed are inventoried.
DEFAULT_LOOKBACK = timedelta(days=14)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_SUCCESS, _REFUSED_NOT_AUTHORIZED, _OUT_OF_RESOURCES, _CANNOT_UNDERSTAND = 0x0000, 0x0124, 0xA700, 0xC000
_PENDING = (0xFF00, 0xFF01)
_TRANSIENT_HTTP = (429, 502, 503, 504)
# Header fields read from folders and asked in image-level queries (never patient identifiers).
_HEADER_TAGS = (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality", "ImageType",
    "FrameOfReferenceUID", "SeriesDescription", "StudyDate", "StudyTime", "Manufacturer", "SoftwareVersions",
)
OUR_MANUFACTURER = "theraflow"   # Manufacturer of the objects theraflow writes (SEG, SR, report): never inputs
LISTMODE_SUFFIX = ".petsird"      # PETSIRD list-mode files in a watched folder (the PET scanner's raw-data export)


# -- errors and retries ---------------------------------------------------------------------------


class NetworkError(Exception):
    """A network operation failed; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off: ``first_delay_s``, times ``factor`` each attempt up to
    ``max_delay_s``; at most ``attempts`` attempts, none started after ``deadline_s``."""

    attempts: int = 6
    first_delay_s: float = 1.0
    factor: float = 2.0
    max_delay_s: float = 30.0
    deadline_s: float = 300.0


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a network error worth retrying."""
    if isinstance(exc, NetworkError):
        return exc.retryable
    if isinstance(exc, requests.HTTPError):
        return exc.response is not None and exc.response.status_code in _TRANSIENT_HTTP
    return isinstance(exc, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout))


def with_retries(operation: Callable[[], T], what: str, policy: RetryPolicy) -> T:
    """Run ``operation``; on a transient error wait and run it again, within ``policy``.
    Gives up with a non-retryable NetworkError naming ``what`` and the last error."""
    started = time.monotonic()
    delay = policy.first_delay_s
    for attempt in range(1, policy.attempts + 1):
        try:
            return operation()
        except Exception as exc:
            if not is_transient(exc):
                raise
            elapsed = time.monotonic() - started
            if attempt == policy.attempts or elapsed + delay > policy.deadline_s:
                raise NetworkError(f"{what}: gave up after {attempt} attempt(s) in {elapsed:.0f} s: {exc}", retryable=False) from exc
            logger.warning("%s failed (%s); attempt %d of %d in %.1f s", what, exc, attempt + 1, policy.attempts, delay)
            time.sleep(delay)
            delay = min(delay * policy.factor, policy.max_delay_s)
    raise AssertionError("unreachable")


# -- classification and study inventories ---------------------------------------------------------


class SeriesKind(str, Enum):
    """What a series is, for this pipeline."""

    NM_TOMO_RAW = "nm_tomo_raw"   # SPECT projections (NM, Image Type value 3 TOMO): our input
    NM_RECON = "nm_recon"         # reconstructed SPECT (RECON TOMO), ours or the camera's
    LISTMODE = "listmode"         # PET raw data (PETSIRD list mode): our input, reconstructed into a PET series of ours
    PT = "pt"
    CT = "ct"                     # CT images (not localizers): the attenuation map
    SEGMENTATION = "segmentation" # SEG or RTSTRUCT from a segmentation server or a person: organs, reference regions
    OTHER = "other"               # including everything theraflow wrote itself


def _values(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip().upper() for v in value.split("\\")]
    if isinstance(value, Iterable):
        return [str(v).strip().upper() for v in value]
    return [str(value).strip().upper()]


_OUR_SOFTWARE = re.compile(r"^theraflow \d", re.IGNORECASE)   # SoftwareVersions of theraflow's writers: "theraflow 0.1.0"


def _ours(header: Dataset, modality: str) -> bool:
    """Whether theraflow wrote this object: a SEG, SR or report of ours, or a reconstruction of
    ours (their SoftwareVersions name theraflow and its version)."""
    if modality in ("SEG", "SR", "DOC") and str(header.get("Manufacturer", "")).strip().lower() == OUR_MANUFACTURER:
        return True
    return any(_OUR_SOFTWARE.match(value) for value in _values(header.get("SoftwareVersions")))


def classify(header: Dataset) -> SeriesKind:
    """Classify one instance (all of a series alike) from Modality, Image Type and Manufacturer."""
    modality = str(header.get("Modality", "")).upper()
    image_type = _values(header.get("ImageType"))
    if _ours(header, modality):
        return SeriesKind.OTHER
    if modality in ("SEG", "RTSTRUCT"):
        return SeriesKind.SEGMENTATION
    if modality == "NM":
        if any("RECON" in value for value in image_type):
            return SeriesKind.NM_RECON
        return SeriesKind.NM_TOMO_RAW if "TOMO" in image_type[2:3] else SeriesKind.OTHER
    if modality == "PT":
        return SeriesKind.LISTMODE if "LISTMODE" in image_type else SeriesKind.PT
    if modality == "CT":
        return SeriesKind.OTHER if "LOCALIZER" in image_type else SeriesKind.CT
    return SeriesKind.OTHER


def is_uid(text: str) -> bool:
    """A syntactically valid DICOM UID (also safe as a file name)."""
    return 0 < len(text) <= 64 and _UID.match(text) is not None


@dataclass
class Series:
    """One series of a study: its kind and instances (SOP Instance UID → SOP Class UID)."""

    uid: str
    modality: str
    kind: SeriesKind
    frame_of_reference_uid: str
    description: str
    instances: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)   # folder sources: SOP Instance UID → file


@dataclass
class Study:
    """A study's series, from headers."""

    uid: str
    date: str = ""
    time: str = ""
    series: dict[str, Series] = field(default_factory=dict)

    def of_kind(self, kind: SeriesKind) -> list[Series]:
        return [s for s in self.series.values() if s.kind == kind]

    def add(self, header: Dataset, path: Path | None = None) -> None:
        """Add one instance's header (and file)."""
        self.date = self.date or str(header.get("StudyDate", ""))
        self.time = self.time or str(header.get("StudyTime", ""))
        uid = str(header.SeriesInstanceUID)
        series = self.series.get(uid)
        if series is None:
            series = self.series[uid] = Series(
                uid, str(header.get("Modality", "")), classify(header),
                str(header.get("FrameOfReferenceUID", "")), str(header.get("SeriesDescription", "")),
            )
        sop = str(header.SOPInstanceUID)
        series.instances[sop] = str(header.get("SOPClassUID", ""))
        if path is not None:
            series.files[sop] = path


def _header_ok(header: Dataset) -> bool:
    return all(is_uid(str(header.get(name, ""))) for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))


def _sort_key(study: Study) -> tuple[str, str, str]:
    return (study.date, study.time, study.uid)


@dataclass(frozen=True)
class Observation:
    """What a source can tell about a study's arrival: a fingerprint that changes while
    instances arrive, and when it last changed (epoch seconds) when the source knows."""

    fingerprint: Hashable
    changed_at: float | None


class Source(Protocol):
    """A place studies come from."""

    name: str

    def list_studies(self, since: datetime | None) -> list[str]:
        """Study Instance UIDs that may hold new data since ``since`` (all when None), oldest first."""

    def listing(self, since: datetime | None, before_window: bool = False) -> dict[str, str | None]:
        """``list_studies`` with a cheap fingerprint of each study (its instance count from a
        study-level query; None where the source has none), to inventory only what changed.
        ``before_window``: the studies dated just before the look-back window (sources listed by
        StudyDate; empty for others), to report late arrivals."""

    def inventory(self, study_uid: str) -> Study:
        """The study's series and instances."""

    def observe(self, study_uid: str) -> Observation:
        """The study's arrival state."""

    def retrieve(self, study: Study, series_uids: Iterable[str], dest: Path) -> dict[str, Path]:
        """Fetch these series into ``dest/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``; all of
        their instances or an error. Returns SOP Instance UID → file."""


class Sink(Protocol):
    """A place results go."""

    name: str

    def store(self, files: list[Path]) -> None:
        """Send these DICOM files."""


def _check_complete(study: Study, series_uids: Iterable[str], got: Mapping[str, Path], what: str) -> dict[str, Path]:
    expected = {sop for uid in series_uids for sop in study.series[uid].instances}
    missing = expected - set(got)
    if missing:
        raise NetworkError(f"{what}: incomplete, {len(expected) - len(missing)} of {len(expected)} instances of study {study.uid}")
    return {sop: got[sop] for sop in expected}


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".part", dir=path.parent)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


# -- watched folder ---------------------------------------------------------------------------


def listmode_header(path: Path) -> Dataset | None:
    """A PETSIRD file's exam information as the header of one instance of a LISTMODE series of
    its study (None when unreadable or without UIDs: not a study's raw data)."""
    from recon.io.petsird_listmode import read_exam

    try:
        exam = read_exam(path)
    except InputError:
        return None
    header = Dataset()
    header.StudyInstanceUID, header.SeriesInstanceUID = exam.study_instance_uid, exam.series_instance_uid
    header.SOPInstanceUID = exam.sop_instance_uid
    header.Modality, header.ImageType = "PT", ["ORIGINAL", "PRIMARY", "LISTMODE"]
    header.FrameOfReferenceUID = exam.frame_of_reference_uid
    when = exam.start_of_study or exam.start_of_acquisition
    header.StudyDate, header.StudyTime = ("", "") if when is None else (f"{when:%Y%m%d}", f"{when:%H%M%S}")
    return header if _header_ok(header) else None


@dataclass
class _FileEntry:
    size: int
    changed: float
    header: Dataset | None


def _open_regular(path: Path) -> int:
    """A descriptor of ``path`` opened for reading only when it is a regular file, not a link,
    a FIFO, a socket or a device (opening does not block on a FIFO); OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{ascii(str(path))} is not a regular file")
    return fd


def _read_prefix(path: Path, limit: int, timeout_s: float) -> bytes | None:
    """At most ``limit`` bytes from the start of the regular file ``path``, read on a daemon
    thread; None when that takes longer than ``timeout_s`` (a hung file system: the thread is
    left behind, the scan goes on)."""
    result: list[bytes] = []
    failure: list[OSError] = []

    def read() -> None:
        try:
            fd = _open_regular(path)
            with os.fdopen(fd, "rb") as handle:
                result.append(handle.read(limit))
        except OSError as exc:
            failure.append(exc)

    reader = threading.Thread(target=read, name="inbox-header", daemon=True)
    reader.start()
    reader.join(timeout_s)
    if failure:
        raise failure[0]
    return result[0] if result else None


class FolderSource:
    """DICOM files under ``root`` (any layout, hidden names ignored), grouped by study.

    The inbox is not trusted: only regular files are read (FIFOs, sockets and devices are
    skipped), folders are walked without recursion down to ``MAX_DEPTH`` levels, symbolic links
    to folders are never followed and links to files only when they stay inside the inbox, and
    each header is read from at most ``HEADER_BYTES`` bytes within ``HEADER_TIMEOUT_S``. Every
    entry skipped for such a reason gets one log line (once per source), and never stops the scan.
    """

    MAX_DEPTH = 32
    HEADER_BYTES = 4 << 20
    HEADER_TIMEOUT_S = 10.0

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        if not self.root.is_dir():
            raise InputError(self.root, "source folder does not exist")
        self.name = str(self.root)
        self._cache: dict[Path, _FileEntry] = {}
        self._reported: set[tuple[Path, str]] = set()

    def _skip(self, path: Path, why: str) -> None:
        """One log line per skipped entry and reason (names as ASCII: no control characters)."""
        if (path, why) not in self._reported:
            self._reported.add((path, why))
            logger.warning("inbox %s: skipped %s: %s", self.root, ascii(os.path.relpath(path, self.root)), why)

    def _files(self) -> Iterator[tuple[Path, os.stat_result]]:
        """Regular files under the root (links to regular files inside it as their targets),
        walked with a stack."""
        real_root = self.root.resolve()
        stack = [(self.root, 0)]
        while stack:
            folder, depth = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError as exc:
                self._skip(folder, f"folder cannot be listed ({exc.strerror or exc})")
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                path = Path(entry.path)
                try:
                    info = entry.stat(follow_symlinks=False)
                    if stat.S_ISLNK(info.st_mode):
                        target = path.resolve(strict=True)
                        if not target.is_relative_to(real_root):
                            self._skip(path, "symbolic link leading out of the inbox")
                            continue
                        info = target.stat()
                        if stat.S_ISDIR(info.st_mode):
                            self._skip(path, "symbolic link to a folder (not followed)")
                            continue
                        path = target
                except (OSError, RuntimeError) as exc:   # vanished, dangling, or a loop of links
                    self._skip(path, f"unusable entry ({getattr(exc, 'strerror', None) or exc})")
                    continue
                if stat.S_ISDIR(info.st_mode):
                    if depth + 1 > self.MAX_DEPTH:
                        self._skip(path, f"deeper than {self.MAX_DEPTH} folder levels")
                    else:
                        stack.append((path, depth + 1))
                elif stat.S_ISREG(info.st_mode):
                    yield path, info
                else:
                    self._skip(path, "not a regular file (FIFO, socket or device)")

    def _scan(self) -> dict[Path, _FileEntry]:
        seen: dict[Path, _FileEntry] = {}
        for path, info in self._files():
            changed = max(info.st_mtime, info.st_ctime)   # copies may keep an old mtime
            entry = self._cache.get(path)
            if entry is None or entry.size != info.st_size or entry.changed != changed:
                entry = _FileEntry(info.st_size, changed, self._read_header(path))
            seen[path] = entry
        self._cache = seen
        return seen

    def _read_header(self, path: Path) -> Dataset | None:
        if path.name.endswith(LISTMODE_SUFFIX):
            return listmode_header(path)
        try:
            data = _read_prefix(path, self.HEADER_BYTES, self.HEADER_TIMEOUT_S)
        except OSError as exc:
            self._skip(path, f"cannot be read ({exc.strerror or exc})")
            return None
        if data is None:
            self._skip(path, f"header not read within {self.HEADER_TIMEOUT_S:g} s")
            return None
        try:
            header = dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
        except Exception:  # noqa: BLE001 - not DICOM, or damaged: not ours to read
            return None
        return header if _header_ok(header) else None

    def _studies(self, entries: Mapping[Path, _FileEntry]) -> dict[str, Study]:
        studies: dict[str, Study] = {}
        for path, entry in sorted(entries.items()):
            if entry.header is not None:
                uid = str(entry.header.StudyInstanceUID)
                studies.setdefault(uid, Study(uid)).add(entry.header, path)
        return studies

    def list_studies(self, since: datetime | None) -> list[str]:
        entries = self._scan()
        studies = self._studies(entries)
        if since is not None:
            cutoff = since.timestamp() - 1.0
            recent = {str(e.header.StudyInstanceUID) for e in entries.values() if e.header is not None and e.changed > cutoff}
            studies = {uid: s for uid, s in studies.items() if uid in recent}
        return [s.uid for s in sorted(studies.values(), key=_sort_key)]

    def listing(self, since: datetime | None, before_window: bool = False) -> dict[str, str | None]:
        """Studies with files changed since ``since`` (a folder knows when files arrived: no window)."""
        return {} if before_window else dict.fromkeys(self.list_studies(since))

    def inventory(self, study_uid: str) -> Study:
        study = self._studies(self._scan()).get(study_uid)
        if study is None:
            raise InputError(self.root, f"no files of study {study_uid}")
        return study

    def observe(self, study_uid: str) -> Observation:
        """Changes to the study's files, and to files whose header cannot be read yet (they may
        be the study's, still being written)."""
        entries = self._scan()
        mine = [(str(p), e.size, e.changed) for p, e in entries.items()
                if e.header is None or str(e.header.StudyInstanceUID) == study_uid]
        return Observation(tuple(sorted(mine)), max((m[2] for m in mine), default=None))

    def retrieve(self, study: Study, series_uids: Iterable[str], dest: Path) -> dict[str, Path]:
        series_uids = list(series_uids)
        got: dict[str, Path] = {}
        for uid in series_uids:
            for sop, path in study.series[uid].files.items():
                target = dest / uid / f"{sop}.dcm"
                target.parent.mkdir(parents=True, exist_ok=True)
                with os.fdopen(_open_regular(path), "rb") as source, target.open("wb") as copy:
                    shutil.copyfileobj(source, copy)
                got[sop] = target
        return _check_complete(study, series_uids, got, f"copy from {self.root}")


class ListModeInbox:
    """A source (a PACS, DICOMweb or a folder) together with a folder where the PET scanner
    exports its PETSIRD list-mode files: each file joins the study its exam information names
    (StudyInstanceUID), whose other series (the CT) stay at the source. Listing, inventory,
    arrival and retrieval combine both; results go where the source's go."""

    def __init__(self, source: Source, folder: str | Path) -> None:
        self.source = source
        self.folder = FolderSource(folder)
        self.name = source.name

    def listing(self, since: datetime | None, before_window: bool = False) -> dict[str, str | None]:
        if before_window:
            return self.source.listing(since, before_window=True)
        found = dict(self.source.listing(since))
        found.update(dict.fromkeys(self.folder.list_studies(since)))   # no fingerprint: always inventoried
        return found

    def list_studies(self, since: datetime | None) -> list[str]:
        return list(self.listing(since))

    def inventory(self, study_uid: str) -> Study:
        try:
            study = self.source.inventory(study_uid)
        except InputError:              # a folder source without the study: the list mode alone
            study = Study(study_uid)
        try:
            raw = self.folder.inventory(study_uid)
        except InputError:
            return study
        for series in raw.of_kind(SeriesKind.LISTMODE):
            study.series[series.uid] = series
        return study

    def observe(self, study_uid: str) -> Observation:
        at_source = _observation_of(self.inventory(study_uid)).fingerprint
        return Observation((at_source, self.folder.observe(study_uid).fingerprint), None)

    def retrieve(self, study: Study, series_uids: Iterable[str], dest: Path) -> dict[str, Path]:
        series_uids = list(series_uids)
        raw = [uid for uid in series_uids if study.series[uid].kind == SeriesKind.LISTMODE]
        got = self.folder.retrieve(study, raw, dest) if raw else {}
        rest = [uid for uid in series_uids if uid not in raw]
        if rest:
            got.update(self.source.retrieve(study, rest, dest))
        return got


class FolderSink:
    """Copies result files into a folder (e.g. an outbox another system watches)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.name = str(self.root)

    def store(self, files: list[Path]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for path in files:
            sop = str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).get("SOPInstanceUID", ""))
            if not is_uid(sop):   # the file name: never a path of its own
                raise InputError(path, f"{sop[:40]!r} is not a valid SOP Instance UID")
            _write_atomic(self.root / f"{sop}.dcm", path.read_bytes())


# -- DIMSE --------------------------------------------------------------------------------------


def _write_received(event: Event, dest: Path) -> tuple[int, str | None]:
    """Write one received C-STORE dataset, as sent, to ``dest/<series>/<sop>.dcm``."""
    try:
        header = event.dataset
        series, sop = str(header.SeriesInstanceUID), str(header.SOPInstanceUID)
    except Exception:  # noqa: BLE001 - a dataset we cannot read: refuse it, keep the association
        return _CANNOT_UNDERSTAND, None
    if not (is_uid(series) and is_uid(sop)):
        return _CANNOT_UNDERSTAND, None
    try:
        _write_atomic(dest / series / f"{sop}.dcm", event.encoded_dataset())
    except OSError:
        logger.exception("cannot write instance %s", sop)
        return _OUT_OF_RESOURCES, None
    return _SUCCESS, sop


def _resolve_hosts(hosts: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for host in hosts:
        try:
            out.add(str(ipaddress.ip_address(host)))
        except ValueError:
            out.update(socket.gethostbyname_ex(host)[2])
    return out


class _HostCheckingServer(ThreadedAssociationServer):
    """An association server that drops connections from hosts not in ``allowed_hosts``."""

    def __init__(self, *args, allowed_hosts: set[str], **kwargs) -> None:
        self.allowed_hosts = allowed_hosts
        super().__init__(*args, **kwargs)

    def shutdown(self) -> None:
        """Stop serving and close the socket (this server is not in the AE's own list)."""
        TCPServer.shutdown(self)
        self.server_close()

    def verify_request(self, request, client_address) -> bool:
        host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        if host not in self.allowed_hosts:
            logger.warning("storage SCP: refused a connection from %s (not an allowed host)", host)
            return False
        return True


class StorageSCP:
    """A C-STORE SCP that writes what it receives into ``dest/<series>/<sop>.dcm``.

    Only calling AE titles in ``allowed`` are accepted (association rejected otherwise), only
    from their hosts (connection dropped from other hosts; an allowed AE title from another
    allowed host is refused per instance). Use as a context manager."""

    def __init__(self, ae_title: str, bind: tuple[str, int], dest: Path, allowed: Mapping[str, Iterable[str]]) -> None:
        if not allowed:
            raise ValueError("a storage SCP needs at least one allowed calling AE title")
        self.dest = Path(dest)
        self.bind = bind
        self.allowed = {aet: _resolve_hosts(hosts) for aet, hosts in allowed.items()}
        self.received: set[str] = set()
        self._lock = threading.Lock()
        self._ae = AE(ae_title=ae_title)
        self._ae.require_calling_aet = list(self.allowed)
        for context in AllStoragePresentationContexts:
            self._ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self._server: _HostCheckingServer | None = None

    def _on_store(self, event: Event) -> int:
        calling, host = event.assoc.requestor.ae_title, event.assoc.requestor.address
        if host not in self.allowed.get(calling, set()):
            logger.warning("storage SCP: refused an instance from %s at %s", calling, host)
            return _REFUSED_NOT_AUTHORIZED
        status, sop = _write_received(event, self.dest)
        if sop is not None:
            with self._lock:
                self.received.add(sop)
        return status

    def __enter__(self) -> StorageSCP:
        hosts = set().union(*self.allowed.values())
        try:
            self._server = self._ae.make_server(
                self.bind, evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
                server_class=_HostCheckingServer, allowed_hosts=hosts,
            )
        except OSError as exc:   # port taken, e.g. by another process's retrieval: try again later
            raise NetworkError(f"storage SCP cannot listen on {self.bind[0]}:{self.bind[1]}: {exc}") from exc
        threading.Thread(target=self._server.serve_forever, name=f"storage-scp-{self.bind[1]}", daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


# One C-MOVE at a time per storage SCP port in this process (several workers, one port).
_MOVE_LOCKS: dict[int, threading.Lock] = {}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _date_range(since: datetime | None, lookback: timedelta, before: bool = False) -> str:
    """A StudyDate range from ``lookback`` before ``since`` on ('' for everything); with
    ``before``, the window of the same length just before that one."""
    if since is None:
        return ""
    start = (since - lookback).astimezone()
    if before:
        return f"{start - lookback:%Y%m%d}-{start - timedelta(days=1):%Y%m%d}"
    return f"{start:%Y%m%d}-"


def _listing(matches: Iterable[tuple[Dataset, str | None]]) -> dict[str, str | None]:
    """Study UID → fingerprint, oldest study first."""
    studies = [(Study(str(m.get("StudyInstanceUID", "")), str(m.get("StudyDate", "")), str(m.get("StudyTime", ""))), fingerprint)
               for m, fingerprint in matches]
    return {study.uid: fingerprint for study, fingerprint in sorted(studies, key=lambda item: _sort_key(item[0])) if is_uid(study.uid)}


def _observation_of(study: Study) -> Observation:
    """What a remote source shows of a study: its series and their instance counts."""
    return Observation(tuple(sorted((s.uid, len(s.instances)) for s in study.series.values())), None)


@dataclass
class DimseSource:
    """A PACS over DIMSE: C-FIND, then C-GET or C-MOVE (to our storage SCP on ``move_port``)."""

    host: str
    port: int
    called_aet: str
    calling_aet: str = DEFAULT_AET
    retrieve_method: str = "get"
    move_port: int = DEFAULT_MOVE_PORT
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    lookback: timedelta = DEFAULT_LOOKBACK
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.retrieve_method not in ("get", "move"):
            raise InputError(None, f"retrieve method {self.retrieve_method!r}: get or move")

    @property
    def name(self) -> str:
        return f"dicom://{self.called_aet}@{self.host}:{self.port}"

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        return ae

    def _associate(self, ae: AE, **kwargs) -> Association:
        assoc = ae.associate(self.host, self.port, ae_title=self.called_aet, **kwargs)
        if not assoc.is_established:
            state = "rejected" if assoc.is_rejected else "aborted or refused"
            raise NetworkError(f"association with {self.name} {state}")
        return assoc

    def find(self, query: Dataset) -> list[Dataset]:
        """C-FIND (study root), retried; the matches."""

        def once() -> list[Dataset]:
            ae = self._ae()
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
            assoc = self._associate(ae)
            try:
                matches, final = [], None
                for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                    if not status:
                        raise NetworkError(f"C-FIND on {self.name}: association lost")
                    if status.Status in _PENDING and identifier is not None:
                        matches.append(identifier)
                    else:
                        final = status.Status
                if final != _SUCCESS:
                    raise NetworkError(f"C-FIND on {self.name}: status 0x{final:04X}")
                return matches
            finally:
                if assoc.is_established:
                    assoc.release()

        return with_retries(once, f"C-FIND {query.QueryRetrieveLevel} on {self.name}", self.retry)

    def list_studies(self, since: datetime | None) -> list[str]:
        return list(self.listing(since))

    def listing(self, since: datetime | None, before_window: bool = False) -> dict[str, str | None]:
        """Studies dated from ``lookback`` before ``since`` on (a study-level C-FIND), each with
        its number of instances as fingerprint; with ``before_window``, those of the window of the
        same length just before (late arrivals that the scans no longer list)."""
        if before_window and since is None:
            return {}
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        query.StudyTime = ""
        query.NumberOfStudyRelatedInstances = ""
        query.StudyDate = _date_range(since, self.lookback, before_window)
        return _listing([(m, str(m.get("NumberOfStudyRelatedInstances", "")) or None) for m in self.find(query)])

    def inventory(self, study_uid: str) -> Study:
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        for name in _HEADER_TAGS:
            setattr(query, name, "")
        query.StudyInstanceUID = study_uid
        study = Study(study_uid)
        for match in self.find(query):
            if _header_ok(match):
                study.add(match)
        return study

    def observe(self, study_uid: str) -> Observation:
        return _observation_of(self.inventory(study_uid))

    def retrieve(self, study: Study, series_uids: Iterable[str], dest: Path) -> dict[str, Path]:
        series_uids = list(series_uids)
        got: dict[str, Path] = {}

        def once() -> dict[str, Path]:
            got.update(_files_in(dest))
            todo = [uid for uid in series_uids if not set(study.series[uid].instances) <= set(got)]
            if todo:
                (self._move if self.retrieve_method == "move" else self._get)(study, todo, dest)
                got.update(_files_in(dest))
            return _check_complete(study, series_uids, got, f"C-{self.retrieve_method.upper()} from {self.name}")

        return with_retries(once, f"retrieval of study {study.uid} from {self.name}", self.retry)

    @staticmethod
    def _series_query(study_uid: str, series_uid: str) -> Dataset:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = series_uid
        return query

    @staticmethod
    def _run_retrieve(send: Callable, query: Dataset, model: str, what: str) -> None:
        final = None
        for status, _ in send(query, model):
            if not status:
                raise NetworkError(f"{what}: association lost")
            if status.Status not in _PENDING:
                final = status.Status
        if final != _SUCCESS:
            raise NetworkError(f"{what}: status 0x{final:04X}")

    def _get(self, study: Study, series_uids: list[str], dest: Path) -> None:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        sop_classes = sorted({c for uid in series_uids for c in study.series[uid].instances.values()})
        for sop_class in sop_classes:
            ae.add_requested_context(sop_class, ALL_TRANSFER_SYNTAXES)
        roles = [build_role(sop_class, scp_role=True) for sop_class in sop_classes]
        handlers = [(evt.EVT_C_STORE, lambda event: _write_received(event, dest)[0])]
        assoc = self._associate(ae, ext_neg=roles, evt_handlers=handlers)
        try:
            for uid in series_uids:
                query = self._series_query(study.uid, uid)
                self._run_retrieve(assoc.send_c_get, query, StudyRootQueryRetrieveInformationModelGet, f"C-GET of series {uid}")
        finally:
            if assoc.is_established:
                assoc.release()

    def _move(self, study: Study, series_uids: list[str], dest: Path) -> None:
        bind = "127.0.0.1" if _is_loopback(self.host) else "0.0.0.0"
        with _MOVE_LOCKS.setdefault(self.move_port, threading.Lock()), \
                StorageSCP(self.calling_aet, (bind, self.move_port), dest, {self.called_aet: [self.host]}):
            ae = self._ae()
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
            assoc = self._associate(ae)
            try:
                for uid in series_uids:
                    query = self._series_query(study.uid, uid)
                    send = lambda q, m: assoc.send_c_move(q, self.calling_aet, m)  # noqa: E731
                    self._run_retrieve(send, query, StudyRootQueryRetrieveInformationModelMove, f"C-MOVE of series {uid}")
            finally:
                if assoc.is_established:
                    assoc.release()


def _files_in(dest: Path) -> dict[str, Path]:
    """Retrieved files (``dest/<series>/<sop>.dcm``) by SOP Instance UID."""
    return {p.stem: p for p in dest.glob("*/*.dcm")} if dest.exists() else {}


@dataclass
class DimseSink:
    """C-STORE to a PACS, each file in its own transfer syntax."""

    host: str
    port: int
    called_aet: str
    calling_aet: str = DEFAULT_AET
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float = 60.0

    @property
    def name(self) -> str:
        return f"dicom://{self.called_aet}@{self.host}:{self.port}"

    def store(self, files: list[Path]) -> None:
        headers = {path: dcmread(path, stop_before_pixels=True) for path in files}

        def once() -> None:
            ae = AE(ae_title=self.calling_aet)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
            for header in headers.values():
                ae.add_requested_context(header.SOPClassUID, header.file_meta.TransferSyntaxUID)
            assoc = ae.associate(self.host, self.port, ae_title=self.called_aet)
            if not assoc.is_established:
                raise NetworkError(f"association with {self.name} {'rejected' if assoc.is_rejected else 'aborted or refused'}")
            try:
                for path, header in headers.items():
                    status = assoc.send_c_store(path)
                    if not status:
                        raise NetworkError(f"C-STORE to {self.name}: association lost")
                    code = status.Status
                    if code != _SUCCESS and code & 0xF000 != 0xB000:   # neither success nor a warning
                        raise NetworkError(
                            f"C-STORE of {header.SOPInstanceUID} to {self.name}: status 0x{code:04X}",
                            retryable=code & 0xFF00 == _OUT_OF_RESOURCES,   # out of resources: try later
                        )
            finally:
                if assoc.is_established:
                    assoc.release()

        with_retries(once, f"C-STORE of {len(files)} file(s) to {self.name}", self.retry)


# -- DICOMweb -----------------------------------------------------------------------------------


def _redact(url: str) -> str:
    """The URL without user name and password."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


class _DicomWeb:
    def __init__(self, url: str, retry: RetryPolicy = RetryPolicy()) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.url = url
        self.name = _redact(url)
        self.retry = retry
        self.client = DICOMwebClient(url=url)
        self.client.set_http_retry_params(retry=False)   # ours retries connection errors too


class DicomWebSource(_DicomWeb):
    """A DICOMweb server: QIDO-RS to list and classify, WADO-RS to retrieve."""

    def __init__(self, url: str, retry: RetryPolicy = RetryPolicy(), lookback: timedelta = DEFAULT_LOOKBACK) -> None:
        super().__init__(url, retry)
        self.lookback = lookback

    def list_studies(self, since: datetime | None) -> list[str]:
        return list(self.listing(since))

    def listing(self, since: datetime | None, before_window: bool = False) -> dict[str, str | None]:
        """Studies dated from ``lookback`` before ``since`` on (QIDO-RS), each with its number of
        instances as fingerprint; ``before_window`` as for ``DimseSource.listing``."""
        if before_window and since is None:
            return {}
        date = _date_range(since, self.lookback, before_window)
        filters = {"StudyDate": date} if date else None
        found = with_retries(lambda: self.client.search_for_studies(search_filters=filters, fields=["NumberOfStudyRelatedInstances"]),
                             f"QIDO studies on {self.name}", self.retry)
        return _listing([(d, str(d.get("NumberOfStudyRelatedInstances", "")) or None) for d in map(Dataset.from_json, found)])

    def inventory(self, study_uid: str) -> Study:
        fields = [name for name in _HEADER_TAGS if name not in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
        found = with_retries(
            lambda: self.client.search_for_instances(study_instance_uid=study_uid, fields=fields),
            f"QIDO instances of study {study_uid} on {self.name}", self.retry,
        )
        study = Study(study_uid)
        for header in map(Dataset.from_json, found):
            if _header_ok(header):
                study.add(header)
        return study

    def observe(self, study_uid: str) -> Observation:
        return _observation_of(self.inventory(study_uid))

    def retrieve(self, study: Study, series_uids: Iterable[str], dest: Path) -> dict[str, Path]:
        series_uids = list(series_uids)

        def once() -> dict[str, Path]:
            got = _files_in(dest)
            for uid in series_uids:
                for sop in study.series[uid].instances:
                    if sop not in got:
                        instance = self.client.retrieve_instance(study.uid, uid, sop)
                        target = dest / uid / f"{sop}.dcm"
                        target.parent.mkdir(parents=True, exist_ok=True)
                        part = target.with_name(f".{sop}.part")
                        instance.save_as(part, enforce_file_format=True)
                        os.replace(part, target)
                        got[sop] = target
            return _check_complete(study, series_uids, got, f"WADO from {self.name}")

        return with_retries(once, f"retrieval of study {study.uid} from {self.name}", self.retry)


class DicomWebSink(_DicomWeb):
    """STOW-RS to a DICOMweb server."""

    def store(self, files: list[Path]) -> None:
        datasets = [dcmread(path) for path in files]
        with_retries(lambda: self.client.store_instances(datasets), f"STOW of {len(files)} file(s) to {self.name}", self.retry)


# -- addresses ------------------------------------------------------------------------------------


def _dicomweb_url(text: str) -> str | None:
    for prefix, scheme in (("dicomweb://", "http://"), ("dicomwebs://", "https://")):
        if text.startswith(prefix):
            rest = text.removeprefix(prefix)
            return rest if rest.startswith(("http://", "https://")) else scheme + rest
    return text if text.startswith(("http://", "https://")) else None


def _dimse_address(text: str) -> tuple[str, str, int, dict[str, str]]:
    parts = urlsplit(text)
    if not parts.username or not parts.hostname or not parts.port:
        raise InputError(None, f"{text}: expected dicom://AET@HOST:PORT")
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return parts.username, parts.hostname, parts.port, options


def is_folder_address(text: str) -> bool:
    """Whether a source address names a folder (not dicom://, dicomweb:// or http(s)://)."""
    return not text.startswith("dicom://") and _dicomweb_url(text) is None


def parse_source(text: str, *, calling_aet: str = DEFAULT_AET, retry: RetryPolicy = RetryPolicy(),
                 lookback: timedelta = DEFAULT_LOOKBACK) -> Source:
    """``dicom://AET@HOST:PORT[?retrieve=get|move&port=N]``, ``dicomweb://HOST:PORT/PATH``
    (``dicomwebs://`` or an http(s) URL), or a folder."""
    if text.startswith("dicom://"):
        called, host, port, options = _dimse_address(text)
        unknown = set(options) - {"retrieve", "port"}
        if unknown:
            raise InputError(None, f"{text}: unknown option(s) {', '.join(sorted(unknown))} (retrieve, port)")
        try:
            move_port = int(options.get("port", DEFAULT_MOVE_PORT))
        except ValueError:
            raise InputError(None, f"{text}: port must be a number") from None
        return DimseSource(host, port, called, calling_aet, options.get("retrieve", "get"), move_port, retry, lookback)
    url = _dicomweb_url(text)
    if url is not None:
        return DicomWebSource(url, retry, lookback)
    return FolderSource(Path(text.removeprefix("file://")).expanduser())


def parse_sink(text: str, *, calling_aet: str = DEFAULT_AET, retry: RetryPolicy = RetryPolicy()) -> Sink:
    """``dicom://AET@HOST:PORT`` (C-STORE), ``dicomweb://…`` (STOW-RS) or a folder."""
    if text.startswith("dicom://"):
        called, host, port, options = _dimse_address(text)
        if options:
            raise InputError(None, f"{text}: a C-STORE destination takes no options")
        return DimseSink(host, port, called, calling_aet, retry)
    url = _dicomweb_url(text)
    if url is not None:
        return DicomWebSink(url, retry)
    return FolderSink(Path(text.removeprefix("file://")).expanduser())


def default_sink(source: Source) -> Sink | None:
    """Results go back where the study came from: the same PACS or DICOMweb server; none for a folder."""
    if isinstance(source, ListModeInbox):
        return default_sink(source.source)
    if isinstance(source, DimseSource):
        return DimseSink(source.host, source.port, source.called_aet, source.calling_aet, source.retry)
    if isinstance(source, DicomWebSource):
        return DicomWebSink(source.url, source.retry)
    return None
