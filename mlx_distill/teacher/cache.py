"""SQLite cache of teacher answers plus a per-run spend ledger.

One database file, ``DIR/teacher-cache.sqlite3``, keyed by ``ChatRequest.cache_key(model,
spec.fingerprint(), CACHE_SCHEMA)``. An answer and the ledger row that bills its fetch to a run
(retries included) are written in one transaction; attempts billed without an answer get ledger
rows of their own. So after a crash a run's spend is exactly the sum of its ledger rows, and every
answer that was paid for is a cache hit: never requested or billed again.

Durability: WAL mode with ``synchronous=FULL``. Under WAL, NORMAL already survives a killed process
(committed pages sit in the OS page cache), but an OS crash or power cut may drop the last commits;
those are answers already paid for. FULL fsyncs the WAL at every commit. That costs one fsync per
commit, so writes are group-committed: everything queued while a commit runs goes into the next one.

All SQLite work runs on one dedicated thread (the ``a*`` methods), so an asyncio program never
blocks its event loop on the database and writes are serialized. Other processes (e.g. shards run
in parallel with the same ``--cache``) are fine too: SQLite locks, and we wait up to 60 s for them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_distill.cli import UserError
from mlx_distill.teacher import jsontext
from mlx_distill.teacher.types import Completion, canonical_json

# Part of every cache key (ChatRequest.cache_key) and the table layout version (user_version).
CACHE_SCHEMA = 1
DB_NAME = "teacher-cache.sqlite3"
# PRAGMA application_id marks the file as ours: "MDTC" (mlx-distill teacher cache).
APPLICATION_ID = 0x4D445443
BUSY_TIMEOUT_MS = 60_000
# sqlite's default limit on host parameters is 999 on old builds; stay under it.
_LOOKUP_CHUNK = 500

_TABLES = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    completion TEXT NOT NULL,
    cost_usd REAL NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    cost_usd REAL NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (run_id, key)
);
"""


class CacheError(UserError):
    """The cache directory or database cannot be used (one line, names the file)."""


@dataclass(frozen=True)
class CachedAnswer:
    """A stored answer: the ``Completion.to_dict()`` JSON text, what it cost and when it came."""

    completion_json: str
    cost_usd: float
    created: float

    def completion(self) -> Completion:
        return Completion.from_dict(jsontext.loads(self.completion_json))


class TeacherCache:
    """Answers by cache key, a spend ledger by run id, and hit/miss counters."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        self.hits = 0
        self.misses = 0
        if self.directory.exists() and not self.directory.is_dir():
            raise CacheError(f"--cache {self.directory} is a file; expected a directory")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create cache directory {self.directory}: {exc}") from None
        self._db = self._open()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kd-cache")
        self._lock = threading.Lock()
        # One connection: callers on other threads and the cache thread take turns on it.
        self._db_lock = threading.RLock()
        # Writes waiting for the next group commit, and whether one is queued on the thread.
        self._pending: list[tuple[tuple, asyncio.Future]] = []
        self._flush_scheduled = False

    # -- opening ---------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False,
                isolation_level=None,
            )
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        except sqlite3.OperationalError as exc:
            raise CacheError(f"cannot open cache {self.path}: {exc}") from None
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                self._claim(db)
                if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.execute("SELECT key, completion, cost_usd, created FROM answers LIMIT 0")
                db.execute("SELECT run_id, key, cost_usd, created FROM ledger LIMIT 0")
                return db
            except sqlite3.OperationalError as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                # Shards opening a new cache together: SQLite reports the journal-mode switch
                # as busy at once instead of waiting, so retry until the busy timeout.
                if _is_busy(exc) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                db.close()
                if _is_busy(exc):
                    raise CacheError(f"cannot open cache {self.path}: {exc}") from None
                raise CacheError(self._foreign(str(exc))) from None
            except sqlite3.DatabaseError as exc:
                db.close()
                raise CacheError(self._foreign(str(exc))) from None
            except CacheError:
                db.close()
                raise

    def _claim(self, db: sqlite3.Connection) -> None:
        """Check the file is ours (or empty) and create the tables, under the write lock.

        Reading the ids and creating the tables in one transaction means a second opener sees
        either an empty file or a finished cache, never tables without our id.
        """
        db.execute("BEGIN IMMEDIATE")
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        has_tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0
        # An empty database (no tables, no id) is ours to initialise: a crash during our own first
        # open leaves exactly that.
        if app_id != APPLICATION_ID and (has_tables or app_id != 0):
            db.execute("ROLLBACK")
            raise CacheError(self._foreign("it belongs to another program"))
        if app_id == APPLICATION_ID and version > CACHE_SCHEMA:
            db.execute("ROLLBACK")
            raise CacheError(
                f"cache {self.path} has layout version {version}, newer than this mlx-distill "
                f"understands ({CACHE_SCHEMA}); use a newer mlx-distill or another --cache"
            )
        for statement in filter(str.strip, _TABLES.split(";")):
            db.execute(statement)
        db.execute(f"PRAGMA application_id={APPLICATION_ID}")
        db.execute(f"PRAGMA user_version={CACHE_SCHEMA}")
        db.execute("COMMIT")

    def _foreign(self, why: str) -> str:
        return (
            f"{self.path} is not an mlx-distill teacher cache ({why}); "
            "move it away or choose another --cache directory"
        )

    # -- synchronous API (any thread; calls take turns on the one connection) --------------
    def get(self, key: str) -> CachedAnswer | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: list[str]) -> dict[str, CachedAnswer]:
        """Stored answers for those of ``keys`` that are cached; counts hits and misses."""
        found: dict[str, CachedAnswer] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _LOOKUP_CHUNK):
            chunk = unique[start : start + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._query(
                f"SELECT key, completion, cost_usd, created FROM answers WHERE key IN ({marks})",
                chunk,
            )
            for key, completion, cost, created in rows:
                found[key] = CachedAnswer(completion, cost, created)
        with self._lock:
            self.hits += sum(1 for k in keys if k in found)
            self.misses += sum(1 for k in keys if k not in found)
        return found

    def put(
        self, key: str, completion: Completion | dict, cost_usd: float, run_id: str | None,
        created: float | None = None, ledger_usd: float | None = None,
    ) -> CachedAnswer:
        """Store one answer and bill it to ``run_id`` in the same transaction.

        ``cost_usd`` is the answer's own cost; ``ledger_usd`` (default: the same) what fetching it
        cost the run, including earlier attempts that were billed and failed."""
        row = self._row(key, completion, cost_usd, run_id, created, ledger_usd)
        return self._write_batch([row])[0]

    def record_charge(self, run_id: str, label: str, cost_usd: float) -> concurrent.futures.Future:
        """Bill ``run_id`` for something that left no answer (attempts that failed after being
        charged). Queued on the cache thread; the returned future completes once durable."""
        return self._executor.submit(self._write_charge, run_id, label, float(cost_usd))

    def _write_charge(self, run_id: str, label: str, cost_usd: float) -> None:
        try:
            with self._db_lock:
                self._db.execute(
                    "INSERT OR IGNORE INTO ledger (run_id, key, cost_usd, created) "
                    "VALUES (?, ?, ?, ?)", (run_id, "charge:" + label, cost_usd, time.time()),
                )
        except sqlite3.DatabaseError as exc:
            raise CacheError(f"cache {self.path} cannot be written: {exc}") from None

    def run_spent(self, run_id: str) -> float:
        """USD billed to ``run_id``: the sum of its ledger rows (exact after any crash)."""
        rows = self._query("SELECT COALESCE(SUM(cost_usd), 0) FROM ledger WHERE run_id = ?",
                           [run_id])
        return float(rows[0][0])

    def run_keys(self, run_id: str) -> int:
        return int(self._query("SELECT count(*) FROM ledger WHERE run_id = ?", [run_id])[0][0])

    def __len__(self) -> int:
        return int(self._query("SELECT count(*) FROM answers", [])[0][0])

    def _query(self, sql: str, params: list[Any]) -> list[tuple]:
        try:
            with self._db_lock:
                return self._db.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise CacheError(f"cache {self.path} cannot be read: {exc}") from None

    @staticmethod
    def _row(key, completion, cost_usd, run_id, created, ledger_usd) -> tuple:
        created = time.time() if created is None else float(created)
        if isinstance(completion, Completion):
            # The tokens are most of an answer: orjson writes them as json does when plain.
            data = completion.to_dict()
            plain = ("tokens",) if jsontext.written_plainly(data["tokens"]) else ()
            payload = jsontext.dumps_canonical(data, plain)
        else:
            payload = canonical_json(completion)
        ledger = float(cost_usd if ledger_usd is None else ledger_usd)
        return (key, payload, float(cost_usd), created, run_id, ledger)

    def _write_batch(self, rows: list[tuple]) -> list[CachedAnswer]:
        """One transaction for all rows. An answer already stored wins (first fetch is the truth);
        the ledger bills each (run, key) at most once."""
        try:
            with self._db_lock:
                return self._write_rows(rows)
        except sqlite3.DatabaseError as exc:
            raise CacheError(f"cache {self.path} cannot be written: {exc}") from None

    def _write_rows(self, rows: list[tuple]) -> list[CachedAnswer]:
        stored: list[CachedAnswer] = []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for key, payload, cost, created, run_id, ledger in rows:
                self._db.execute(
                    "INSERT OR IGNORE INTO answers (key, completion, cost_usd, created) "
                    "VALUES (?, ?, ?, ?)", (key, payload, cost, created),
                )
                if run_id is not None:
                    self._db.execute(
                        "INSERT OR IGNORE INTO ledger (run_id, key, cost_usd, created) "
                        "VALUES (?, ?, ?, ?)", (run_id, key, ledger, created),
                    )
                row = self._db.execute(
                    "SELECT completion, cost_usd, created FROM answers WHERE key = ?", (key,)
                ).fetchone()
                stored.append(CachedAnswer(*row))
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
                self._db.execute("ROLLBACK")
            raise
        return stored

    # -- asyncio API ------------------------------------------------------------------------
    async def aget_many(self, keys: list[str]) -> dict[str, CachedAnswer]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.get_many, keys)

    async def aput(
        self, key: str, completion: Completion | dict, cost_usd: float, run_id: str | None,
        created: float | None = None, ledger_usd: float | None = None,
    ) -> CachedAnswer:
        """Like ``put``, group-committed with writes queued meanwhile; returns once durable."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        row = self._row(key, completion, cost_usd, run_id, created, ledger_usd)
        with self._lock:
            self._pending.append((row, future))
            schedule = not self._flush_scheduled
            self._flush_scheduled = True
        if schedule:
            loop.run_in_executor(self._executor, self._flush, loop)
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
            self._flush_scheduled = False
        if not batch:
            return
        futures = [future for _, future in batch]
        try:
            stored = self._write_batch([row for row, _ in batch])
        except BaseException as exc:  # handed to every waiter
            loop.call_soon_threadsafe(_fail_all, futures, exc)
            return
        loop.call_soon_threadsafe(_resolve_all, futures, stored)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        try:
            self._db.close()
        except sqlite3.Error:
            pass


def _resolve_all(futures: list[asyncio.Future], values: list[CachedAnswer]) -> None:
    for future, value in zip(futures, values, strict=True):
        if not future.done():
            future.set_result(value)


def _fail_all(futures: list[asyncio.Future], error: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text
