"""The files of a ``teacher generate`` run, next to ``OUT`` (e.g. ``kd.jsonl``):

- ``OUT``: KD records, one per line, appended in completion order (``teacher merge`` sorts by id).
- ``OUT.manifest.json``: run id, run config, prompts sha256, teacher, shard (written once).
- ``OUT.state.json``: checkpoint: record count, byte length and sha256 of ``OUT`` so far, USD
  spent, failed prompts. Written atomically after fsyncing ``OUT``.
- ``OUT.failed.jsonl``: ``{id, reason, status, message, attempts}`` per failed prompt (rewritten
  atomically with each checkpoint).

Invariant: ``OUT[:state.bytes]`` hashes to ``state.sha256``. Lines after that were appended after
the last checkpoint; on resume they are validated and kept, and a torn last line is cut off.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlx_distill.atomic import atomic_write_text
from mlx_distill.cli import UserError
from mlx_distill.teacher.records import RecordError, parse_record_line
from mlx_distill.teacher.types import KD_SCHEMA

MANIFEST_SCHEMA = "mlx-distill.kd-manifest/1"
STATE_SCHEMA = "mlx-distill.kd-state/1"
_READ_CHUNK = 1 << 20
# dump_record writes "schema" then "id" first, so an id can be read without parsing the record.
_ID_PREFIX = ('{"schema":' + json.dumps(KD_SCHEMA) + ',"id":').encode()


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name + ".manifest.json")


def state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state.json")


def failed_path(out: Path) -> Path:
    return out.with_name(out.name + ".failed.jsonl")


@dataclass
class RunState:
    run_id: str
    records: int = 0
    bytes: int = 0
    sha256: str = hashlib.sha256(b"").hexdigest()
    spent_usd: float = 0.0
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)
    finished: bool = False
    stop_reason: str | None = None

    def to_json(self) -> str:
        data = {"schema": STATE_SCHEMA, **asdict(self)}
        data["done"] = self.records + len(self.failed)
        data["updated"] = time.time()
        return json.dumps(data, indent=1, sort_keys=True) + "\n"


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {what} {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} is not a JSON object")
    return data


def load_state(out: Path, run_id: str) -> RunState | None:
    path = state_path(out)
    if not path.exists():
        return None
    data = read_json(path, "checkpoint state")
    if data.get("schema") != STATE_SCHEMA:
        raise UserError(f"{path}: field 'schema': expected {STATE_SCHEMA!r}")
    if data.get("run_id") != run_id:
        raise UserError(
            f"{path} belongs to run {data.get('run_id')!r}, but {manifest_path(out).name} to run "
            f"{run_id!r}; the files were mixed up. Write to a new --out"
        )
    try:
        return RunState(
            run_id=run_id, records=int(data["records"]), bytes=int(data["bytes"]),
            sha256=str(data["sha256"]), spent_usd=float(data["spent_usd"]),
            failed=dict(data.get("failed") or {}), finished=bool(data.get("finished")),
            stop_reason=data.get("stop_reason"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: missing or bad field {exc}") from None


def save_checkpoint_files(out: Path, state: RunState) -> None:
    """Atomically replace the state and failed files (``OUT`` must be fsynced up to state.bytes)."""
    lines = [
        json.dumps({"id": pid, **info}, ensure_ascii=False, sort_keys=True) + "\n"
        for pid, info in sorted(state.failed.items())
    ]
    if lines or failed_path(out).exists():
        atomic_write_text(failed_path(out), "".join(lines))
    atomic_write_text(state_path(out), state.to_json())


def _record_id(line: bytes) -> str:
    if line.startswith(_ID_PREFIX):
        try:
            value, _ = json.JSONDecoder().raw_decode(line[len(_ID_PREFIX):].decode("utf-8"))
            if isinstance(value, str):
                return value
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
    return str(json.loads(line)["id"])


class OutputLog:
    """Append-only ``OUT``: whole lines only, a running sha256, fsync on checkpoint.

    ``append`` holds a line until ``write_pending``, which writes every line held in one
    ``write()`` (a cache replay appends hundreds in one event-loop turn: one system call instead
    of one each). A line held is already in the cache, so a crash before it is written loses
    nothing: ``--resume`` replays it. ``snapshot`` writes first, so a checkpoint only ever
    describes bytes in the file."""

    def __init__(self, path: Path, fd: int, size: int, hasher: Any, records: int) -> None:
        self.path = path
        self.bytes = size  # written; lines held are counted once written
        self.records = records
        self._hasher = hasher
        self._fd = fd  # opened with O_APPEND (and locked) by kdrun
        self._pending: list[bytes] = []

    def append(self, line: str) -> None:
        self._pending.append(line.encode("utf-8"))

    def write_pending(self) -> None:
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        data = b"".join(lines)
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:  # e.g. disk full: a torn line here is cut off by --resume
            raise UserError(f"cannot append to {self.path}: {exc.strerror or exc}") from None
        self._hasher.update(data)
        self.bytes += len(data)
        self.records += len(lines)

    def snapshot(self) -> tuple[int, int, str]:
        """``(records, bytes, sha256)`` of everything appended so far, all of it written."""
        self.write_pending()
        return self.records, self.bytes, self._hasher.copy().hexdigest()

    def fsync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        try:
            self.write_pending()
        finally:
            os.close(self._fd)


def open_fresh(out: Path, fd: int) -> OutputLog:
    return OutputLog(out, fd, 0, hashlib.sha256(), 0)


def recover(
    out: Path, state: RunState, wanted_ids: set[str], fd: int
) -> tuple[OutputLog, set[str]]:
    """Reopen ``OUT`` after a stop or crash. Verifies the checkpointed prefix, keeps valid lines
    appended after it, cuts off a torn last line; returns the log and the ids already done."""
    size = out.stat().st_size if out.exists() else 0
    if size < state.bytes:
        raise UserError(
            f"{out} is shorter than at the last checkpoint ({size} < {state.bytes} bytes): it was "
            "truncated or replaced since. Restore it or write to a new --out"
        )
    hasher = hashlib.sha256()
    done: set[str] = set()
    with open(out, "rb") as f:
        remaining, carry, line_no = state.bytes, b"", 0
        while remaining:
            chunk = f.read(min(_READ_CHUNK, remaining))
            remaining -= len(chunk)
            hasher.update(chunk)
            *lines, carry = (carry + chunk).split(b"\n")
            for line in lines:
                line_no += 1
                done.add(_safe_id(line, out, line_no))
        if hasher.hexdigest() != state.sha256 or carry or line_no != state.records:
            raise UserError(
                f"{out} was modified since the last checkpoint (sha256 mismatch over its first "
                f"{state.bytes} bytes); refusing to mix runs. Restore it or write to a new --out"
            )
        tail = f.read()
    *complete, torn = tail.split(b"\n")
    for line in complete:
        line_no += 1
        where = f"{out}:{line_no} (after the last checkpoint)"
        try:
            record = parse_record_line(line)
        except RecordError as exc:
            raise UserError(f"{where}: not a valid KD record: {exc}") from None
        if record["id"] not in wanted_ids or record["id"] in done:
            why = "duplicate id" if record["id"] in done else "id not among this shard's prompts"
            raise UserError(f"{where}: {why} {record['id']!r}; the file was modified")
        done.add(record["id"])
        hasher.update(line + b"\n")
    keep = size - len(torn)
    if torn:
        print(
            f"warning: {out}: cut off a torn last line ({len(torn)} bytes after byte {keep}); "
            "that answer is in the cache and is rewritten without a new request",
            file=sys.stderr,
        )
        os.ftruncate(fd, keep)
        os.fsync(fd)
    return OutputLog(out, fd, keep, hasher, line_no), done


def _safe_id(line: bytes, out: Path, line_no: int) -> str:
    try:
        return _record_id(line)
    except (ValueError, KeyError, TypeError):
        raise UserError(
            f"{out} was modified since the last checkpoint (sha256 mismatch: line {line_no} is "
            "not a KD record); refusing to mix runs. Restore it or write to a new --out"
        ) from None
