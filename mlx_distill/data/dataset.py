"""Read KD records and SFT conversations (JSON lines) into encoded, teacher-aligned examples.

A line with a ``schema`` field (or without an assistant answer) is a KD record and must pass
``mlx_distill.teacher.records.validate_record``; a line without ``schema`` whose last message is
the assistant's is a plain SFT example (gold answer, no teacher distribution). Every line that is
not used is counted under a reason; the load stops with ``DataError`` when more than
``max_bad_fraction`` of the lines are bad.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_distill.data.align import BY_ID
from mlx_distill.data.encode import (
    TOOL_ARGUMENTS,
    Example,
    encode_kd_record,
    encode_sft_example,
)
from mlx_distill.data.errors import (
    DUPLICATE_ID,
    INVALID_FIELD,
    INVALID_JSON,
    MISSING_FIELD,
    WRONG_SCHEMA,
    BadRecords,
    DataError,
    RecordError,
    check_bad_fraction,
)
from mlx_distill.data.vocab import TokenVocab, tokenizer_fingerprint
from mlx_distill.teacher.records import validate_record
from mlx_distill.teacher.types import KD_RECORD_FIELDS, KD_SCHEMA

ALIGN_MODES = ("auto", "id", "text")
DEFAULT_MAX_BAD_FRACTION = 0.01


@dataclass
class DataReport:
    """What a load read, used, refused and aligned."""

    records: int = 0
    kd: int = 0
    sft: int = 0
    no_teacher_tokens: int = 0  # KD records without logprobs: CE only
    stopped_at_length: int = 0  # teacher hit max_tokens: no label on the end-of-turn
    by_id: int = 0
    by_text: int = 0
    completion_tokens: int = 0  # of KD records with teacher tokens
    aligned_tokens: int = 0
    coverage_by_record: dict[str, float] = field(default_factory=dict)
    bad: BadRecords = field(default_factory=BadRecords)

    @property
    def used(self) -> int:
        return self.kd + self.sft

    @property
    def coverage(self) -> float:
        """Share of completion tokens (of KD records with teacher tokens) that got a teacher
        distribution; 0 when there are none."""
        return self.aligned_tokens / self.completion_tokens if self.completion_tokens else 0.0


@dataclass
class Dataset:
    examples: list[Example]
    report: DataReport
    vocab: TokenVocab

    @property
    def k(self) -> int:
        """Widest carried distribution (the batches' K); 1 when no example has a teacher."""
        return max((e.teacher.k for e in self.examples if e.teacher is not None), default=1)


def _sft_problem(obj: dict[str, Any]) -> str | None:
    messages = obj["messages"]
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"field 'messages[{i}]': expected an object with a string role"
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            return f"field 'messages[{i}].content': expected a string or null"
    tools = obj.get("tools")
    if tools is not None and not isinstance(tools, list):
        return "field 'tools': expected a list or null"
    calls = messages[-1].get("tool_calls") or []
    if not isinstance(calls, list):
        return "field 'messages[-1].tool_calls': expected a list"
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(
            fn.get("arguments"), str | dict
        ):
            return (f"field 'messages[-1].tool_calls[{i}]': expected "
                    "{function: {name, arguments}}")
    return None


def is_sft_example(obj: Any) -> bool:
    """A conversation whose last message is the gold assistant answer, with no KD schema."""
    if not isinstance(obj, dict) or "schema" in obj:
        return False
    messages = obj.get("messages")
    return (isinstance(messages, list) and bool(messages) and isinstance(messages[-1], dict)
            and messages[-1].get("role") == "assistant")


def kd_record_problem(obj: Any) -> tuple[str, str] | None:
    """``(reason, detail)`` for a KD record that cannot be used as is, else None."""
    if not isinstance(obj, dict):
        return INVALID_FIELD, f"expected a JSON object, got {type(obj).__name__}"
    if "schema" in obj and obj["schema"] != KD_SCHEMA:
        return WRONG_SCHEMA, f"schema {obj['schema']!r}; this version reads {KD_SCHEMA!r}"
    missing = [name for name in KD_RECORD_FIELDS if name not in obj]
    if missing:
        return MISSING_FIELD, f"missing field(s) {', '.join(missing)}"
    errors = validate_record(obj)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return INVALID_FIELD, errors[0] + more
    return None


class _Loader:
    def __init__(self, tokenizer: Any, by_id: bool, tool_arguments: str):
        self.tokenizer = tokenizer
        self.vocab = TokenVocab(tokenizer)
        self.by_id = by_id
        self.tool_arguments = tool_arguments
        self.report = DataReport()
        self.examples: list[Example] = []
        self.seen_ids: set[str] = set()

    def line(self, text: str, where: str) -> None:
        self.report.records += 1
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            self.report.bad.add(INVALID_JSON, where, f"not valid JSON ({exc.msg})")
            return
        if is_sft_example(obj):
            self._sft(obj, where)
        else:
            self._kd(obj, where)

    def _kd(self, obj: Any, where: str) -> None:
        problem = kd_record_problem(obj)
        record_id = obj.get("id") if isinstance(obj, dict) else None
        if record_id is not None:
            where = f"{where} (id {record_id!r})"
        if problem is None and record_id in self.seen_ids:
            problem = DUPLICATE_ID, "this id was already read; the first record is kept"
        if problem is not None:
            reason, detail = problem
            self.report.bad.add(reason, where, detail)
            return
        try:
            example = encode_kd_record(obj, self.tokenizer, self.vocab, by_id=self.by_id,
                                       tool_arguments=self.tool_arguments)
        except RecordError as exc:
            self.report.bad.add(exc.reason, where, exc.detail)
            return
        self.seen_ids.add(record_id)
        self._count_kd(example, obj)
        self.examples.append(example)

    def _count_kd(self, example: Example, record: dict[str, Any]) -> None:
        report = self.report
        report.kd += 1
        if record.get("finish_reason") == "length":
            report.stopped_at_length += 1
        if example.teacher is None:
            report.no_teacher_tokens += 1
            return
        n = len(example.completion_ids)
        report.completion_tokens += n
        report.aligned_tokens += example.aligned
        report.coverage_by_record[example.id] = example.aligned / n
        if example.teacher.method == BY_ID:
            report.by_id += 1
        else:
            report.by_text += 1

    def _sft(self, obj: dict[str, Any], where: str) -> None:
        example_id = obj.get("id") if isinstance(obj.get("id"), str) else where
        if "id" in obj:
            where = f"{where} (id {example_id!r})"
        problem = _sft_problem(obj)
        if problem is not None:
            self.report.bad.add(INVALID_FIELD, where, problem)
            return
        if example_id in self.seen_ids:
            self.report.bad.add(DUPLICATE_ID, where, "this id was already read; the first is kept")
            return
        try:
            example = encode_sft_example(obj, self.tokenizer, self.vocab, example_id=example_id,
                                         tool_arguments=self.tool_arguments)
        except RecordError as exc:
            self.report.bad.add(exc.reason, where, exc.detail)
            return
        self.seen_ids.add(example_id)
        self.report.sft += 1
        self.examples.append(example)


def _use_by_id(align: str, tokenizer: Any, teacher_tokenizer: Any) -> bool:
    if align not in ALIGN_MODES:
        raise DataError(f"align: expected one of {ALIGN_MODES}, got {align!r}")
    if align != "auto":
        return align == "id"
    return teacher_tokenizer is not None and (
        tokenizer_fingerprint(teacher_tokenizer) == tokenizer_fingerprint(tokenizer)
    )


def load_dataset(
    paths: str | os.PathLike | list[str | os.PathLike],
    tokenizer: Any,
    *,
    teacher_tokenizer: Any = None,
    align: str = "auto",
    tool_arguments: str = "text",
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
) -> Dataset:
    """Encode every line of the JSONL ``paths`` with the student ``tokenizer``.

    ``align``: ``"id"`` (teacher shares the student's tokenizer), ``"text"``, or ``"auto"``: by id
    when ``teacher_tokenizer`` has the student's vocabulary fingerprint, else by text.
    ``tool_arguments``: pass tool-call arguments to the chat template as the teacher's JSON
    ``"text"`` (templates that print strings verbatim, as ours) or as parsed ``"object"``s
    (templates that ``tojson`` them).
    """
    if tool_arguments not in TOOL_ARGUMENTS:
        raise DataError(f"tool_arguments: expected one of {TOOL_ARGUMENTS}, got {tool_arguments!r}")
    if not 0 <= max_bad_fraction <= 1:
        raise DataError(f"max_bad_fraction: expected a number in [0, 1], got {max_bad_fraction!r}")
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not paths:
        raise DataError("no data files given")
    loader = _Loader(tokenizer, _use_by_id(align, tokenizer, teacher_tokenizer), tool_arguments)
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{path}: data file not found")
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                where = f"{path}:{lineno}"
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    loader.report.records += 1
                    loader.report.bad.add(INVALID_JSON, where, f"not UTF-8 ({exc.reason})")
                    continue
                if text.strip():
                    loader.line(text, where)
    source = ", ".join(map(str, paths))
    check_bad_fraction(loader.report.bad, loader.report.records, max_bad_fraction, source)
    return Dataset(loader.examples, loader.report, loader.vocab)


def split_validation(
    examples: list[Example], fraction: float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """``(train, val)``: an example is held out when the hash of ``(seed, id)`` falls below
    ``fraction``, so its side never depends on file order or on the other examples. With
    ``0 < fraction < 1`` and at least two examples, both sides are non-empty."""
    if not 0 <= fraction < 1:
        raise DataError(f"val_fraction: expected a number in [0, 1), got {fraction!r}")

    def position(example: Example) -> float:
        digest = hashlib.sha256(f"{seed}\0{example.id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    ranked = sorted(examples, key=position)
    cut = sum(position(e) < fraction for e in ranked)
    if fraction > 0 and len(ranked) >= 2:
        cut = min(max(cut, 1), len(ranked) - 1)
    held_out = {id(e) for e in ranked[:cut]}
    return ([e for e in examples if id(e) not in held_out],
            [e for e in examples if id(e) in held_out])
