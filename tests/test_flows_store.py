"""The results store on SQLite and on a real PostgreSQL server (a throw-away cluster per test
session, on loopback): rows, versions on reprocessing, nothing overwritten, the idempotency key
and atomic claims across workers. Every store test runs on both backends."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError

from flows.store import DONE, FAILED, INPUT, NETWORK, RUNNING, ResultsStore, _ResultRow, input_key, store_url
from flows_fixtures import postgres, store_location  # noqa: F401 - fixtures
from recon.errors import InputError

WORKERS = 4


def test_key_is_order_free_and_parameter_bound():
    assert input_key(["1.2", "1.1"], {"a": 1, "b": 2}) == input_key(["1.1", "1.2", "1.1"], {"b": 2, "a": 1})
    assert input_key(["1.1"], {"a": 1}) != input_key(["1.1"], {"a": 2})
    assert input_key(["1.1"], {"a": 1}) != input_key(["1.2"], {"a": 1})


def test_store_urls():
    url = "postgresql+psycopg://theraflow@db.example.org:5432/theraflow"
    assert store_url(url) == url
    assert store_url("results.sqlite").startswith("sqlite:////") and store_url("results.sqlite").endswith("/results.sqlite")


def test_unusable_store_urls(postgres):
    """Bad input, in one line without the password: an unknown dialect, a driver that is not
    installed, a database that does not exist on a running server."""
    missing = postgres.url("no_such_database").replace("theraflow@", "theraflow:secret@")
    for url, why in (("postgres://u:secret@127.0.0.1/x", "Can't load plugin"), ("mysql+nosuchdriver://u:secret@127.0.0.1/x", "plugin"),
                     (missing, "cannot open")):
        with pytest.raises(InputError, match=why) as info:
            ResultsStore(url)
        assert "secret" not in str(info.value) and "\n" not in str(info.value)


def test_store_versions_and_failures(store_location, tmp_path):
    store = ResultsStore(store_location)
    study = "1.2.3"
    first = store.claim("k1", study, "src", {"iterations": 1}, ["1.1", "1.2"])
    assert first.version == 1 and first.status == RUNNING
    assert store.claim("k1", study, "src", {"iterations": 1}, ["1.1"]) is None          # running elsewhere
    done = store.finish(first, total_activity_MBq=12.5, output_dir=tmp_path / "v1", provenance={"x": 1}, timings={"total_s": 1.0})
    assert done.status == DONE and done.duration_s >= 0 and store.already_done("k1")
    assert done.inputs == ["1.1", "1.2"] and done.provenance == {"x": 1} and done.total_activity_MBq == 12.5
    assert store.claim("k1", study, "src", {"iterations": 1}, ["1.1"]) is None          # done: never again
    with pytest.raises(RuntimeError):
        store.fail(done, "late")                                                        # a finished row stays as it is
    bad = store.fail(store.claim("k2", study, "src", {"iterations": 2}, ["1.1"]), "truncated pixel data", INPUT)
    assert bad.version == 2 and "bad input" in store.should_skip("k2")
    flaky = store.fail(store.claim("k3", study, "src", {"iterations": 3}, ["1.1"]), "association aborted", NETWORK)
    assert store.should_skip("k3") is None                                              # a later run retries it
    retry = store.claim("k3", study, "src", {"iterations": 3}, ["1.1"])
    assert retry.version == 4 and flaky.version == 3
    assert [r.version for r in store.rows(study)] == [1, 2, 3, 4]
    assert store.latest(study).version == 1 and store.latest(study, status=None).version == 4
    stale = store.claim("k4", study, "src", {}, ["1.1"])
    assert store.claim("k4", study, "src", {}, ["1.1"], stale_after=timedelta(0)).version == stale.version + 1
    assert store.get("k4").status == RUNNING and store.rows(study)[-2].reason.startswith("abandoned")
    assert store.rows(study)[:3] == [done, bad, flaky]                                  # history as it was written
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert store.last_success("src") is None
    store.set_last_success("src", when)
    assert store.last_success("src") == when
    store.close()


def test_one_active_row_per_key(store_location):
    """The partial unique index: a second running or done row of a key is refused by the
    database itself, a failed one (history) is not."""
    store = ResultsStore(store_location)
    store.claim("k", "1.2.3", "src", {}, ["1.1"])
    row = dict(key="k", study_uid="1.2.3", source="src", parameters={}, inputs=["1.1"], started_at=datetime.now(timezone.utc))
    with store.engine.begin() as connection:
        connection.execute(insert(_ResultRow).values(version=2, status=FAILED, **row))
    with pytest.raises(IntegrityError), store.engine.begin() as connection:
        connection.execute(insert(_ResultRow).values(version=3, status=DONE, **row))
    assert [(r.version, r.status) for r in store.rows()] == [(1, RUNNING), (2, FAILED)]
    store.close()


def _race(workers: int, work) -> list:
    """``work(i)`` in ``workers`` threads, started together; the results in thread order."""
    start = threading.Barrier(workers)
    results: list = [None] * workers
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            start.wait(timeout=60)
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert not errors, errors
    return results


def test_claims_are_atomic_across_workers(store_location):
    """Workers with their own connections open a new store at once (creating its tables), then
    claim the same key at once: exactly one gets it. Claims of different parameter sets of one
    study at once get one version each."""
    stores = _race(WORKERS, lambda i: ResultsStore(store_location))
    try:
        same = _race(WORKERS, lambda i: stores[i].claim("k", "1.2.3", f"worker-{i}", {}, ["1.1"]))
        assert sum(record is not None for record in same) == 1
        others = _race(WORKERS, lambda i: stores[i].claim(f"k{i}", "1.2.3", f"worker-{i}", {"subsets": i}, ["1.1"]))
        assert sorted(record.version for record in others) == list(range(2, WORKERS + 2))
        assert len(stores[0].rows("1.2.3")) == WORKERS + 1
    finally:
        for store in stores:
            store.close()
