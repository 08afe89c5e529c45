"""The SQLite answer cache and spend ledger: round trips, ledger sums, group commits from asyncio,
durability across kill -9, and one clear error for files that are not our cache."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_distill.teacher.cache import DB_NAME, CacheError, TeacherCache
from mlx_distill.teacher.types import (
    Completion,
    TokenLogprob,
    ToolCall,
    Usage,
    canonical_json,
)


def completion(text: str = "hello", n_tokens: int = 3) -> Completion:
    tokens = [TokenLogprob(f"t{i}", -0.5 * i, [(f"t{i}", -0.5 * i), ("x", -9.0)])
              for i in range(n_tokens)]
    return Completion(text=text, reasoning="because", finish_reason="stop",
                      tool_calls=[ToolCall("c1", "get", '{"a": 1}')],
                      usage=Usage(10, n_tokens, 10 + n_tokens, 4), tokens=tokens,
                      model="m", system_fingerprint="fp")


def independent_rows(path, sql: str) -> list[tuple]:
    """Read the database through a separate connection, as another process would."""
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_put_get_round_trip_and_counters(tmp_path):
    cache = TeacherCache(tmp_path / "c")
    try:
        original = completion()
        assert cache.get("k1") is None
        stored = cache.put("k1", original, 0.25, "run-a", created=123.0)
        assert (stored.cost_usd, stored.created) == (0.25, 123.0)
        got = cache.get("k1")
        assert got.completion().to_dict() == original.to_dict()
        assert (cache.hits, cache.misses) == (1, 1)
        assert cache.get_many(["k1", "k2", "k1"]).keys() == {"k1"}
        assert (cache.hits, cache.misses) == (3, 2)
    finally:
        cache.close()


def test_wal_and_full_sync_are_on(tmp_path):
    cache = TeacherCache(tmp_path)
    try:
        assert cache._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert cache._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        cache.close()


def test_first_answer_wins_and_the_ledger_bills_each_run_once(tmp_path):
    cache = TeacherCache(tmp_path)
    try:
        cache.put("k", completion("first"), 1.0, "run-a")
        again = cache.put("k", completion("second"), 2.0, "run-a")  # same run, same key
        assert json.loads(again.completion_json)["text"] == "first" and again.cost_usd == 1.0
        cache.put("k", completion("third"), 3.0, "run-b", ledger_usd=3.5)  # another run paid too
        cache.put("j", completion(), 0.5, "run-a", ledger_usd=0.75)  # a retry was billed as well
        cache.record_charge("run-a", "lost-attempt", 0.125).result()
        cache.put("free", completion(), 0.0, None)  # no run: nothing billed
        assert cache.run_spent("run-a") == 1.0 + 0.75 + 0.125
        assert cache.run_spent("run-b") == 3.5
        assert cache.run_spent("nobody") == 0.0
        assert len(cache) == 3
    finally:
        cache.close()
    ledger = independent_rows(tmp_path / DB_NAME,
                              "SELECT run_id, key, cost_usd FROM ledger ORDER BY run_id, key")
    assert ledger == [("run-a", "charge:lost-attempt", 0.125), ("run-a", "j", 0.75),
                      ("run-a", "k", 1.0), ("run-b", "k", 3.5)]


def test_concurrent_async_puts_are_all_durable(tmp_path):
    cache = TeacherCache(tmp_path)

    async def writer(i: int):
        await asyncio.sleep(0.001 * (i % 7))
        return await cache.aput(f"k{i}", completion(f"a{i}"), 0.001 * i, "run")

    async def run():
        return await asyncio.gather(*(writer(i) for i in range(200)))

    try:
        stored = asyncio.run(run())
        assert [json.loads(s.completion_json)["text"] for s in stored] == [
            f"a{i}" for i in range(200)]
    finally:
        cache.close()
    rows = independent_rows(tmp_path / DB_NAME, "SELECT count(*), sum(cost_usd) FROM ledger")
    assert rows[0][0] == 200 and math.isclose(rows[0][1], 0.001 * sum(range(200)))


def test_answers_acknowledged_before_kill_9_survive(tmp_path):
    child = textwrap.dedent(f"""
        import asyncio, sys
        sys.path.insert(0, {str(os.getcwd())!r})
        from mlx_distill.teacher.cache import TeacherCache
        from mlx_distill.teacher.types import Completion
        cache = TeacherCache({str(tmp_path)!r})
        async def main():
            i = 0
            while True:
                await cache.aput(f"k{{i}}", Completion(text="x" * 2000), 0.5, "run")
                print(i, flush=True)
                i += 1
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        acknowledged = -1
        while acknowledged < 40:
            acknowledged = int(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    cache = TeacherCache(tmp_path)  # opens (and recovers the WAL) cleanly
    try:
        got = cache.get_many([f"k{i}" for i in range(acknowledged + 1)])
        assert len(got) == acknowledged + 1
        assert cache.run_spent("run") == 0.5 * cache.run_keys("run") >= 0.5 * (acknowledged + 1)
    finally:
        cache.close()


@pytest.mark.parametrize("content, why", [
    (b"this is not sqlite at all" * 100, "file is not a database"),
    ("table", "it belongs to another program"),
    ("app", "it belongs to another program"),
])
def test_foreign_or_corrupt_database_is_one_clear_error(tmp_path, content, why):
    path = tmp_path / DB_NAME
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE t (x)" if content == "table" else "PRAGMA application_id=7")
        db.commit()
        db.close()
    before = path.read_bytes()
    with pytest.raises(CacheError) as info:
        TeacherCache(tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and why in message
    assert "not an mlx-distill teacher cache" in message
    assert path.read_bytes() == before  # never touched


def test_cache_path_that_is_a_file_or_newer_layout(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CacheError, match="is a file; expected a directory"):
        TeacherCache(tmp_path / "f")
    TeacherCache(tmp_path / "c").close()
    db = sqlite3.connect(tmp_path / "c" / DB_NAME)
    db.execute("PRAGMA user_version=99")
    db.commit()
    db.close()
    with pytest.raises(CacheError, match="layout version 99, newer"):
        TeacherCache(tmp_path / "c")


def test_shards_opening_a_new_cache_together_all_succeed(tmp_path):
    # Regression: a concurrent journal-mode switch reported "database is locked" at once, and a
    # second opener could see the tables before the id and call the cache foreign.
    import threading

    for trial in range(15):
        directory = tmp_path / f"c{trial}"
        errors: list[Exception] = []

        def open_and_close(directory=directory, errors=errors) -> None:
            try:
                TeacherCache(directory).close()
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=open_and_close) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**9, 10**9),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    cache = TeacherCache(tmp_path_factory.mktemp("h"))
    yield cache
    cache.close()


@settings(max_examples=60, deadline=None)
@given(payload=st.dictionaries(st.text(max_size=10), json_values, max_size=6),
       messages=st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                                "content": st.text(max_size=30)}),
                         min_size=1, max_size=3))
def test_any_json_answer_round_trips_exactly(shared_cache, payload, messages):
    key = hashlib.sha256(canonical_json([messages, payload]).encode()).hexdigest()
    shared_cache.put(key, payload, 0.0, None)
    assert json.loads(shared_cache.get(key).completion_json) == json.loads(
        canonical_json(payload))
