"""Results store: one row per processing of one input set with one parameter set.

SQLAlchemy 2; a SQLite file by default, any SQLAlchemy URL otherwise, in practice PostgreSQL
through psycopg 3 (``postgresql+psycopg://user@host:5432/theraflow``, ``pip install
theraflow[postgres]``). The tables are created on first use; a URL that cannot be used (unknown
dialect or driver, server unreachable) is an ``InputError``. Rows are never rewritten once
finished: a processing is claimed as ``running`` and ends as ``done`` or ``failed``. Reprocessing the same
study with other parameters is a new row with the next version number; a failed attempt stays
as history and a later attempt is a new row beside it. At most one row per key is running or
done at any time (a partial unique index), which makes claiming a key atomic across processes.

The key of a processing is ``input_key(sop_instance_uids, parameters)``: a SHA-256 of the sorted
input SOP Instance UIDs and the canonical JSON of the parameter set.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, create_engine, func, inspect, select, text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator

from recon.errors import InputError

RUNNING, DONE, FAILED = "running", "done", "failed"
# Finished without a result, and not to be tried again with the same inputs: waiting for more
# input (reference regions, a CT), or nothing this pipeline does (e.g. an FDG PET).
WAITING, SKIPPED = "waiting", "skipped"
FINISHED = (DONE, FAILED, WAITING, SKIPPED)
# Why a processing failed: bad input (retrying the same input cannot help), the network
# (retried on a later run), anything else (retried on a later run).
INPUT, NETWORK, INTERNAL = "input", "network", "internal"
_CLAIM_ATTEMPTS = 5


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def input_key(sop_instance_uids: Iterable[str], parameters: Mapping[str, Any]) -> str:
    """The idempotency key of processing these input instances with these parameters."""
    payload = canonical_json({"inputs": sorted(set(sop_instance_uids)), "parameters": dict(parameters)})
    return hashlib.sha256(payload.encode()).hexdigest()


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _UTCDateTime(TypeDecorator):
    """Aware UTC datetimes on every backend (SQLite keeps no time zone)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the results store; use UTC-aware datetimes")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class _Base(DeclarativeBase):
    pass


class _ResultRow(_Base):
    __tablename__ = "results"
    __table_args__ = (
        UniqueConstraint("study_uid", "version", name="uq_results_study_version"),
        Index(
            "uq_results_active_key", "key", unique=True,
            sqlite_where=text("status != 'failed'"), postgresql_where=text("status != 'failed'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    error_kind: Mapped[str | None] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(Text)
    parameters: Mapped[dict] = mapped_column(JSON)
    inputs: Mapped[list] = mapped_column(JSON)
    started_at: Mapped[datetime] = mapped_column(_UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(_UTCDateTime)
    duration_s: Mapped[float | None] = mapped_column(Float)
    timings: Mapped[dict | None] = mapped_column(JSON)
    provenance: Mapped[dict | None] = mapped_column(JSON)
    total_activity_MBq: Mapped[float | None] = mapped_column(Float)
    output_dir: Mapped[str | None] = mapped_column(Text)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    route: Mapped[str | None] = mapped_column(String(16))
    summary: Mapped[dict | None] = mapped_column(JSON)
    patient_key: Mapped[str | None] = mapped_column(String(64), index=True)
    cycle_key: Mapped[str | None] = mapped_column(String(64), index=True)


class _StepRow(_Base):
    """One step of a processing (reconstruction, reference regions, selection, activities…)."""

    __tablename__ = "steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    numbers: Mapped[dict | None] = mapped_column(JSON)
    seconds: Mapped[float | None] = mapped_column(Float)


# Columns added after the first release: created on stores made before them.
_ADDED_COLUMNS = {"route": "VARCHAR(16)", "summary": "JSON", "patient_key": "VARCHAR(64)", "cycle_key": "VARCHAR(64)"}


@dataclass(frozen=True)
class Step:
    """A step of a processing as recorded: name, status (done, failed, waiting, skipped), the
    reason when not done, its key numbers (JSON-able), its duration (s)."""

    name: str
    status: str
    reason: str | None = None
    numbers: dict | None = None
    seconds: float | None = None


class _Listing(_Base):
    """The fingerprint a source showed of a study when it was last settled (done, waiting,
    skipped, failed on bad input, or nothing to do): a later listing with the same fingerprint
    needs no inventory."""

    __tablename__ = "study_listings"

    source: Mapped[str] = mapped_column(String(512), primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(128))


class _SourceCursor(_Base):
    __tablename__ = "source_cursors"

    source: Mapped[str] = mapped_column(String(512), primary_key=True)
    last_success_at: Mapped[datetime] = mapped_column(_UTCDateTime)


@dataclass(frozen=True)
class ResultRecord:
    """A row of the store, detached from the database."""

    id: int
    key: str
    study_uid: str
    version: int
    status: str
    reason: str | None
    error_kind: str | None
    source: str
    parameters: dict
    inputs: list
    started_at: datetime
    finished_at: datetime | None
    duration_s: float | None
    timings: dict | None
    provenance: dict | None
    total_activity_MBq: float | None
    output_dir: str | None
    flow_run_id: str | None
    route: str | None = None
    summary: dict | None = None
    patient_key: str | None = None
    cycle_key: str | None = None

    @classmethod
    def _of(cls, row: _ResultRow) -> ResultRecord:
        return cls(**{name: getattr(row, name) for name in cls.__dataclass_fields__})


def store_url(location: str | Path) -> str:
    """A SQLAlchemy URL for ``location``: URLs pass through, a path becomes a SQLite file URL."""
    text_ = str(location)
    if "\x00" in text_:
        raise InputError(None, "results store: NUL in its location")
    if "://" in text_:
        return text_
    return f"sqlite:///{Path(text_).expanduser().absolute()}"


def _shown(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("://", 1)[0] + "://…"


def _engine(url: str) -> Engine:
    """An engine for ``url``: SQLite waits up to a minute for a lock; other servers are pinged
    before a pooled connection is reused. An unknown dialect or a driver not installed is bad input."""
    try:
        if url.startswith("sqlite:///"):
            path = Path(url.removeprefix("sqlite:///"))
            if path.exists() and not path.is_file():
                raise InputError(path, "results store is not a file")
            path.parent.mkdir(parents=True, exist_ok=True)
            return create_engine(url, connect_args={"timeout": 60})
        return create_engine(url, pool_pre_ping=True)
    except (ArgumentError, ImportError, ValueError) as exc:
        raise InputError(None, f"results store {_shown(url)}: {exc}") from None
    except OSError as exc:
        raise InputError(None, f"results store {_shown(url)}: cannot create its folder ({exc.strerror or exc})") from None


def _create_tables(engine: Engine, attempts: int = 5) -> None:
    """Create the tables that are missing. Workers opening a new store at once race on each
    ``CREATE TABLE`` ("already exists"); a loser looks again (each look finds more tables made)."""
    for attempt in range(attempts):
        try:
            _Base.metadata.create_all(engine)
            _add_missing_columns(engine)
            return
        except DBAPIError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def _add_missing_columns(engine: Engine) -> None:
    """Columns of ``results`` that a store made by an earlier version lacks (all nullable)."""
    present = {column["name"] for column in inspect(engine).get_columns("results")}
    missing = [name for name in _ADDED_COLUMNS if name not in present]
    if missing:
        with engine.begin() as connection:
            for name in missing:
                connection.execute(text(f"ALTER TABLE results ADD COLUMN {name} {_ADDED_COLUMNS[name]}"))


class ResultsStore:
    """The results table and the per-source cursors, created on first use."""

    def __init__(self, location: str | Path) -> None:
        self.url = store_url(location)
        self.engine = _engine(self.url)
        try:
            _create_tables(self.engine)
        except DBAPIError as exc:   # unreachable, refused, or not a database at all (a junk file)
            self.engine.dispose()
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
            raise InputError(None, f"results store {_shown(self.url)}: cannot open ({reason})") from None

    def close(self) -> None:
        """Close the connections of this store."""
        self.engine.dispose()

    # -- queries ------------------------------------------------------------------------------

    def already_done(self, key: str) -> bool:
        """Whether this input set has been processed with these parameters successfully."""
        with Session(self.engine) as session:
            return session.scalar(select(_ResultRow.id).where(_ResultRow.key == key, _ResultRow.status == DONE)) is not None

    def should_skip(self, key: str) -> str | None:
        """Why a new processing of ``key`` must not start (done, running, or its last attempt
        failed on bad input, which the same input cannot fix), or None."""
        with Session(self.engine) as session:
            rows = session.scalars(select(_ResultRow).where(_ResultRow.key == key).order_by(_ResultRow.id.desc())).all()
        for row in rows:
            if row.status == DONE:
                return f"already done (version {row.version})"
            if row.status in (WAITING, SKIPPED):
                return f"{row.status} (version {row.version}): {row.reason}"
            if row.status == RUNNING:
                return f"running since {row.started_at.isoformat(timespec='seconds')} (version {row.version})"
        if rows and rows[0].error_kind == INPUT:
            return f"failed on bad input (version {rows[0].version}): {rows[0].reason}"
        return None

    def get(self, key: str) -> ResultRecord | None:
        """The latest row of ``key``."""
        with Session(self.engine) as session:
            row = session.scalars(select(_ResultRow).where(_ResultRow.key == key).order_by(_ResultRow.id.desc())).first()
            return None if row is None else ResultRecord._of(row)

    def rows(self, study_uid: str | None = None) -> list[ResultRecord]:
        """All rows (of one study), oldest first."""
        query = select(_ResultRow).order_by(_ResultRow.id)
        if study_uid is not None:
            query = query.where(_ResultRow.study_uid == study_uid)
        with Session(self.engine) as session:
            return [ResultRecord._of(r) for r in session.scalars(query)]

    def latest(self, study_uid: str, status: str | None = DONE) -> ResultRecord | None:
        """The highest version of a study (with that status; any status with None)."""
        query = select(_ResultRow).where(_ResultRow.study_uid == study_uid).order_by(_ResultRow.version.desc())
        if status is not None:
            query = query.where(_ResultRow.status == status)
        with Session(self.engine) as session:
            row = session.scalars(query).first()
            return None if row is None else ResultRecord._of(row)

    # -- writes -------------------------------------------------------------------------------

    def claim(
        self,
        key: str,
        study_uid: str,
        source: str,
        parameters: Mapping[str, Any],
        inputs: Iterable[str],
        *,
        flow_run_id: str | None = None,
        stale_after: timedelta = timedelta(hours=6),
    ) -> ResultRecord | None:
        """Start a processing: a new ``running`` row with the study's next version, or None when
        the key is done or running elsewhere. A row left ``running`` longer than ``stale_after``
        (a crashed worker) is closed as failed first."""
        for _ in range(_CLAIM_ATTEMPTS):
            with Session(self.engine) as session:
                active = session.scalars(select(_ResultRow).where(_ResultRow.key == key, _ResultRow.status != FAILED)).first()
                if active is not None:
                    if active.status != RUNNING or _utcnow() - active.started_at < stale_after:
                        return None
                    active.status, active.error_kind, active.finished_at = FAILED, INTERNAL, _utcnow()
                    active.reason = f"abandoned: still running after {stale_after}"
                    session.commit()
                version = (session.scalar(select(func.max(_ResultRow.version)).where(_ResultRow.study_uid == study_uid)) or 0) + 1
                row = _ResultRow(
                    key=key, study_uid=study_uid, version=version, status=RUNNING, source=source,
                    parameters=dict(parameters), inputs=sorted(set(inputs)), started_at=_utcnow(), flow_run_id=flow_run_id,
                )
                session.add(row)
                try:
                    session.commit()
                except IntegrityError:  # another process claimed the key or took the version: look again
                    session.rollback()
                    continue
                return ResultRecord._of(row)
        return None

    def finish(
        self,
        record: ResultRecord,
        *,
        status: str = DONE,
        reason: str | None = None,
        total_activity_MBq: float | None = None,
        output_dir: str | Path | None = None,
        provenance: Mapping[str, Any] | None = None,
        timings: Mapping[str, float] | None = None,
        summary: Mapping[str, Any] | None = None,
        steps: Iterable[Step] = (),
        **keys: str | None,
    ) -> ResultRecord:
        """Close a running row as done (or waiting, or skipped, with the ``reason``), with its
        key numbers, its ``summary`` (verdicts, numbers per VOI), its steps, and the ``route``,
        ``patient_key`` and ``cycle_key`` given in ``keys``."""
        if status not in (DONE, WAITING, SKIPPED):
            raise ValueError(f"finish with status {status!r}: done, waiting or skipped")
        unknown = set(keys) - {"route", "patient_key", "cycle_key"}
        if unknown:
            raise TypeError(f"unknown fields {sorted(unknown)}")
        return self._close(
            record, status, steps, reason=reason, total_activity_MBq=total_activity_MBq,
            output_dir=None if output_dir is None else str(output_dir), provenance=None if provenance is None else dict(provenance),
            timings=None if timings is None else dict(timings), summary=None if summary is None else dict(summary), **keys,
        )

    def fail(self, record: ResultRecord, reason: str, kind: str = INTERNAL, timings: Mapping[str, float] | None = None,
             steps: Iterable[Step] = (), route: str | None = None) -> ResultRecord:
        """Close a running row as failed, with the reason (one line, no patient identifiers)."""
        if kind not in (INPUT, NETWORK, INTERNAL):
            raise ValueError(f"unknown failure kind {kind!r}")
        return self._close(record, FAILED, steps, reason=reason, error_kind=kind, timings=None if timings is None else dict(timings),
                           route=route)

    def _close(self, record: ResultRecord, status: str, steps: Iterable[Step] = (), **values: Any) -> ResultRecord:
        with Session(self.engine) as session:
            row = session.get(_ResultRow, record.id)
            if row is None or row.status != RUNNING:
                raise RuntimeError(f"result row {record.id} (version {record.version} of {record.study_uid}) is not running")
            row.status = status
            row.finished_at = _utcnow()
            row.duration_s = (row.finished_at - row.started_at).total_seconds()
            for name, value in values.items():
                setattr(row, name, value)
            for step in steps:
                session.add(_StepRow(result_id=row.id, name=step.name, status=step.status, reason=step.reason,
                                     numbers=step.numbers, seconds=step.seconds))
            session.commit()
            return ResultRecord._of(row)

    def steps(self, result_id: int) -> list[Step]:
        """The steps recorded for one row, in order."""
        with Session(self.engine) as session:
            rows = session.scalars(select(_StepRow).where(_StepRow.result_id == result_id).order_by(_StepRow.id))
            return [Step(r.name, r.status, r.reason, r.numbers, r.seconds) for r in rows]

    def patient_rows(self, patient_key: str) -> list[ResultRecord]:
        """Every row of one patient (by pseudonymous key), oldest first."""
        with Session(self.engine) as session:
            return [ResultRecord._of(r) for r in session.scalars(
                select(_ResultRow).where(_ResultRow.patient_key == patient_key).order_by(_ResultRow.id))]

    # -- per-source listings -----------------------------------------------------------------

    def seen(self, source: str, study_uid: str) -> str | None:
        """The fingerprint of ``study_uid`` at ``source`` when it was last settled, or None."""
        with Session(self.engine) as session:
            row = session.get(_Listing, (source, study_uid))
            return None if row is None else row.fingerprint

    def remember(self, source: str, study_uid: str, fingerprint: str | None) -> None:
        """Record the fingerprint of a settled study (nothing for None: such sources inventory every time)."""
        if fingerprint is None:
            return
        with Session(self.engine) as session:
            row = session.get(_Listing, (source, study_uid))
            if row is None:
                session.add(_Listing(source=source, study_uid=study_uid, fingerprint=fingerprint))
            else:
                row.fingerprint = fingerprint
            try:
                session.commit()
            except IntegrityError:   # another worker recorded it first: the same fingerprint
                session.rollback()

    # -- per-source cursor --------------------------------------------------------------------

    def last_success(self, source: str) -> datetime | None:
        """When the last successful scan of ``source`` started."""
        with Session(self.engine) as session:
            row = session.get(_SourceCursor, source)
            return None if row is None else row.last_success_at

    def set_last_success(self, source: str, when: datetime) -> None:
        """Move the cursor of ``source`` to ``when``."""
        with Session(self.engine) as session:
            row = session.get(_SourceCursor, source)
            if row is None:
                session.add(_SourceCursor(source=source, last_success_at=when))
            else:
                row.last_success_at = when
            session.commit()
