"""Services and data for the flow tests: a real Orthanc per test module (DIMSE + DICOMweb on
loopback), one real Prefect API server and one throw-away PostgreSQL cluster per test session,
copies of the sample study with new UIDs, and dcmtk's storescu as the camera."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from pydicom import dcmread

from flows import samples

# Our log lines reach the Prefect API too (set before Prefect is first imported).
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "theraflow")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
STORESCU = "/usr/bin/storescu"   # dcmtk's, by full path (pynetdicom installs one of the same name)
ORTHANC_AET, OUR_AET, CAMERA_AET = "ORTHANC", "THERAFLOW", "CAMERA"
SAMPLE = Path(__file__).resolve().parents[1] / "data-samples" / "lu177-iec"
# A quick reconstruction for tests (~10 s on 2 cores), calibrated by the sample's own registry.
FAST = {"iterations": "1", "subsets": "10", "psf": "false", "registry": str(SAMPLE / "sensitivity.json")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():
                return
        except (requests.RequestException, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not ready after {timeout_s:.0f} s")


class Orthanc:
    """An Orthanc on loopback ports, its storage and index in ``folder``; ``move_port`` is where
    our storage SCP listens for C-MOVE."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.http_port, self.dicom_port, self.move_port, camera_port = free_port(), free_port(), free_port(), free_port()
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "theraflow-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {
                "theraflow": [OUR_AET, "127.0.0.1", self.move_port],
                "camera": [CAMERA_AET, "127.0.0.1", camera_port],
            },
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }, indent=2))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicom(self) -> str:
        return f"dicom://{ORTHANC_AET}@127.0.0.1:{self.dicom_port}"

    @property
    def dicomweb(self) -> str:
        return f"dicomweb://127.0.0.1:{self.http_port}/dicom-web"

    def start(self) -> None:
        log = (self.folder / "orthanc.log").open("ab")
        self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=1):
                pass
            return requests.get(f"{self.url}/system", timeout=2).ok

        _wait(ready, 30, "Orthanc", self.proc)

    def kill(self) -> None:
        """Stop at once, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def get(self, path: str):
        response = requests.get(f"{self.url}{path}", timeout=10)
        response.raise_for_status()
        return response.json()

    def series(self, study_uid: str) -> list[dict]:
        """Main tags of each series of a study (by Orthanc's REST API)."""
        found = requests.post(f"{self.url}/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}, timeout=10).json()
        if not found:
            return []
        return self.get(f"/studies/{found[0]}/series")

    def delete_study(self, study_uid: str) -> None:
        """Remove a study (so that later scans of this Orthanc do not see it)."""
        found = requests.post(f"{self.url}/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}, timeout=10).json()
        for orthanc_id in found:
            requests.delete(f"{self.url}/studies/{orthanc_id}", timeout=30).raise_for_status()

    def recon_series(self, study_uid: str) -> list[dict]:
        """Series of the study whose first instance says RECON TOMO."""
        out = []
        for series in self.series(study_uid):
            first = series["Instances"][0]
            tags = self.get(f"/instances/{first}/simplified-tags")
            if "RECON" in str(tags.get("ImageType", "")):
                out.append(series)
        return out


def storescu(orthanc: Orthanc, files: list[Path]) -> None:
    """Send files to Orthanc as the camera does (each in its own transfer syntax)."""
    subprocess.run([STORESCU, "-xr", "-R", "-aet", CAMERA_AET, "-aec", ORTHANC_AET, "127.0.0.1", str(orthanc.dicom_port), *map(str, files)],
                   check=True, capture_output=True, timeout=120)


@dataclass(frozen=True)
class StudyFiles:
    study_uid: str
    nm: list[Path]
    ct: list[Path]

    @property
    def files(self) -> list[Path]:
        return [*self.nm, *self.ct]

    @property
    def sop_uids(self) -> set[str]:
        return {dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID for p in self.files}


def sample_study() -> StudyFiles:
    return StudyFiles(
        str(dcmread(SAMPLE / "nm" / "projections.dcm", stop_before_pixels=True).StudyInstanceUID),
        [SAMPLE / "nm" / "projections.dcm"], sorted((SAMPLE / "ct").glob("*.dcm")),
    )


def clone_study(dest: Path, *, study_time: str = "120000", corrupt: bool = False) -> StudyFiles:
    """The sample study with new Study/Series/SOP/Frame of Reference UIDs and today's date.
    ``corrupt``: the NM pixel data is cut to half its length (a valid file, unusable data)."""
    def cut(ds, kind: str) -> None:
        if corrupt and kind == "nm":
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]

    cloned = samples.clone_sample(dest, study_time=study_time, edit=cut)
    return StudyFiles(cloned.study_uid, cloned.files_by_kind["nm"], cloned.files_by_kind["ct"])


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A real Prefect API server for the session (``prefect server start``), SQLite in tmp."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_API_URL": ""}
    log = (home / "server.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait(lambda: requests.get(f"{url}/health", timeout=2).ok, 120, "Prefect server", proc)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
    finally:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)   # the last flow logs, while the server still listens
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


# -- PostgreSQL -----------------------------------------------------------------------------------

PG_USER = "theraflow"


def postgres_bindir() -> Path | None:
    """The newest Debian PostgreSQL server binaries (``/usr/lib/postgresql/N/bin``), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return found[-1].parent if found else None


class Postgres:
    """A throw-away PostgreSQL cluster: data and unix socket in a temporary folder, TCP on one
    free loopback port, trust authentication for the superuser ``theraflow``. initdb and the
    server refuse to run as root: as root they run as the ``postgres`` system user."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.folder = Path(tempfile.mkdtemp(prefix="theraflow-pg-"))   # not under pytest's root-only tmp
        self.data = self.folder / "data"
        self.port = free_port()
        self._names = itertools.count(1)
        self._as = {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}
        if self._as:
            shutil.chown(self.folder, "postgres", "postgres")

    def _run(self, tool: str, *args: str, timeout_s: float = 120) -> None:
        """One PostgreSQL tool, as the cluster's owner, bounded in time."""
        subprocess.run([str(self.bindir / tool), *args], check=True, capture_output=True, timeout=timeout_s,
                       cwd=self.folder, **self._as)

    def start(self) -> None:
        """initdb, then the server on loopback (no fsync: the data is thrown away)."""
        self._run("initdb", "-D", str(self.data), "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "server.log"), "-o", options, "-w", "-t", "60", "start",
                  timeout_s=90)

    def stop(self) -> None:
        """Fast shutdown (open sessions are ended), then the folder goes."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop", timeout_s=60)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database`` (psycopg 3 driver)."""
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new, empty database; its SQLAlchemy URL."""
        import psycopg

        name = f"theraflow_{next(self._names)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={PG_USER} dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server for the session, on loopback; skipped only where initdb is absent."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server not installed (no /usr/lib/postgresql/*/bin/initdb)")
    server = Postgres(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_location(request, tmp_path) -> str:
    """A new, empty results store: a SQLite file, or a database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "results.sqlite")
    return request.getfixturevalue("postgres").create_database()


@pytest.fixture
def server_store(request, tmp_path) -> str:
    """A new store that workers on other machines could share: a PostgreSQL database, or a
    SQLite file where no PostgreSQL server is installed."""
    if postgres_bindir() is None:
        return str(tmp_path / "results.sqlite")
    return request.getfixturevalue("postgres").create_database()
