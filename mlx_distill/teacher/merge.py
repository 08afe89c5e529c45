"""``teacher merge``: combine KD shard files into one, deterministically.

Every line of every input is validated (``records.validate_record``; errors name file:line). Records
are de-duplicated by id: copies that differ only in ``created`` (the same answer replayed from the
cache by another run) collapse to the earliest; copies that differ otherwise are an error, naming
both places. The output is sorted by id (Unicode code point order), re-serialized in the documented
field order, and written atomically: same inputs in any order ⇒ byte-identical output.

Memory holds an index (id → file, offset), not the records, so shards larger than RAM merge fine.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlx_distill.cli import UserError
from mlx_distill.teacher.records import RecordError, dump_record, parse_record_line
from mlx_distill.teacher.types import canonical_json


@dataclass
class _Entry:
    file: int
    line: int
    offset: int
    length: int
    digest: str
    created: float


@dataclass
class MergeResult:
    records: int
    duplicates: int
    per_file: dict[str, int]


def _content_digest(record: dict) -> str:
    rest = {k: v for k, v in record.items() if k != "created"}
    return hashlib.sha256(canonical_json(rest).encode("utf-8")).hexdigest()


def _index(paths: list[Path]) -> tuple[dict[str, _Entry], int, dict[str, int]]:
    index: dict[str, _Entry] = {}
    duplicates = 0
    per_file: dict[str, int] = {}
    for file_no, path in enumerate(paths):
        count = 0
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below, read line by line
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
        with f:
            offset = 0
            for line_no, line in enumerate(f, start=1):
                where = f"{path}:{line_no}"
                if not line.endswith(b"\n"):
                    raise UserError(f"{where}: torn last line (no newline); finish that shard "
                                    "with `teacher generate --resume` first")
                try:
                    record = parse_record_line(line)
                except RecordError as exc:
                    raise UserError(f"{where}: {exc}") from None
                entry = _Entry(file_no, line_no, offset, len(line), _content_digest(record),
                               float(record["created"]))
                offset += len(line)
                count += 1
                previous = index.get(record["id"])
                if previous is None:
                    index[record["id"]] = entry
                    continue
                if previous.digest != entry.digest:
                    raise UserError(
                        f"{where}: id {record['id']!r} conflicts with "
                        f"{paths[previous.file]}:{previous.line} (same id, different answer); "
                        "remove one of them or merge shards of one run only"
                    )
                duplicates += 1
                if entry.created < previous.created:
                    index[record["id"]] = entry
        per_file[str(path)] = count
    return index, duplicates, per_file


def merge_files(inputs: list[str | Path], out: str | Path) -> MergeResult:
    paths = [Path(p) for p in inputs]
    out = Path(out)
    index, duplicates, per_file = _index(paths)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the data set from other users
    handles = [open(p, "rb") for p in paths]  # noqa: SIM115 - closed in finally
    try:
        with os.fdopen(fd, "wb") as dst:
            for record_id in sorted(index):
                entry = index[record_id]
                src = handles[entry.file]
                src.seek(entry.offset)
                record = parse_record_line(src.read(entry.length))
                dst.write(dump_record(record).encode("utf-8"))
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        for handle in handles:
            handle.close()
    with contextlib.suppress(OSError):
        dir_fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return MergeResult(records=len(index), duplicates=duplicates, per_file=per_file)


def run_merge(inputs: list[str], out: str) -> int:
    result = merge_files(inputs, out)
    print(
        f"merged {len(inputs)} files ({sum(result.per_file.values())} lines) into {out}: "
        f"{result.records} records, {result.duplicates} duplicates dropped",
        file=sys.stderr,
    )
    return 0
