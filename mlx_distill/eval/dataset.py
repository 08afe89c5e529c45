"""Eval datasets: read and check an eval JSONL, and tell which task it holds.

A line is a sample as :mod:`mlx_distill.tasks.common` writes them: ``id``, ``category``,
``messages``, ``tools``, ``gold`` (``{"calls": [...]}`` or ``{"no_call": true}``), optional
``gold_answer`` and ``turns``. Two tasks are scored:

- ``toolcall``: tool-call F1 and the other :mod:`.scoring` metrics;
- ``eightball``: exact match of the answer text (:func:`mlx_distill.tasks.eightball.score`).

``auto`` picks ``eightball`` when no sample offers tools, every gold is ``no_call`` and every
sample has a ``gold_answer`` (nothing to call, one right text), and ``toolcall`` otherwise.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_distill.cli import UserError
from mlx_distill.eval.scoring import ScoringError, gold_calls

TASKS = ("toolcall", "eightball")
ROLES = ("system", "user", "assistant", "tool")


class EvalDataError(UserError, ValueError):
    """A malformed eval file; the message names the file, line and field."""


@dataclass(frozen=True)
class EvalSet:
    path: Path
    task: str
    samples: list[dict[str, Any]]


def _check_messages(messages: Any, where: str, field: str) -> None:
    if not isinstance(messages, list):
        raise EvalDataError(f"{where}: {field}: expected a list of chat messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise EvalDataError(f"{where}: {field}[{i}].role: expected one of {list(ROLES)}")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise EvalDataError(f"{where}: {field}[{i}].content: expected a string or null")


def check_sample(sample: Any, where: str) -> dict[str, Any]:
    """``sample`` if it is a well-formed eval sample; EvalDataError naming the field if not."""
    if not isinstance(sample, dict):
        raise EvalDataError(f"{where}: expected a JSON object per line")
    if not isinstance(sample.get("id"), str) or not sample["id"]:
        raise EvalDataError(f"{where}: id: expected a non-empty string")
    if not isinstance(sample.get("category", ""), str):
        raise EvalDataError(f"{where}: category: expected a string")
    _check_messages(sample.get("messages"), where, "messages")
    if not sample["messages"]:
        raise EvalDataError(f"{where}: messages: expected at least one message")
    tools = sample.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict)
                                                                   for t in tools)):
        raise EvalDataError(f"{where}: tools: expected a list of tool definitions (objects)")
    try:
        gold_calls(sample)
    except ScoringError as exc:
        raise EvalDataError(f"{where}: {str(exc).split(': ', 1)[1]}") from None
    answer = sample.get("gold_answer")
    if answer is not None and not isinstance(answer, str):
        raise EvalDataError(f"{where}: gold_answer: expected a string")
    if "turns" in sample:
        _check_messages(sample["turns"], where, "turns")
    return sample


def detect_task(samples: list[dict[str, Any]]) -> str:
    """``eightball`` for answer-only samples (see the module docstring), else ``toolcall``."""
    answer_only = all(
        not s.get("tools") and s["gold"].get("no_call") is True
        and isinstance(s.get("gold_answer"), str)
        for s in samples
    )
    return "eightball" if samples and answer_only else "toolcall"


def load_eval_set(path: str | os.PathLike, task: str = "auto", limit: int | None = None) -> EvalSet:
    """Read ``path`` (every sample checked, ids unique), keep the first ``limit`` samples and
    resolve ``task`` (``auto`` or one of :data:`TASKS`)."""
    path = Path(path)
    if task != "auto" and task not in TASKS:
        raise EvalDataError(f"task {task!r}: expected auto or one of {list(TASKS)}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise EvalDataError(f"{path}: eval file not found") from None
    except IsADirectoryError:
        raise EvalDataError(f"{path}: is a directory, expected an eval JSONL file") from None
    except UnicodeDecodeError:
        raise EvalDataError(f"{path}: not UTF-8 text") from None
    samples: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalDataError(f"{where}: invalid JSON ({exc.msg})") from None
        sample = check_sample(record, where)
        if sample["id"] in seen:
            raise EvalDataError(f"{where}: id: {sample['id']!r} repeats line {seen[sample['id']]}")
        seen[sample["id"]] = number
        samples.append(sample)
    if not samples:
        raise EvalDataError(f"{path}: no samples")
    if limit is not None:
        samples = samples[:limit]
    resolved = detect_task(samples) if task == "auto" else task
    if resolved == "eightball":
        missing = next((s["id"] for s in samples if not isinstance(s.get("gold_answer"), str)),
                       None)
        if missing is not None:
            raise EvalDataError(f"{path}: sample {missing}: gold_answer: the eightball task needs "
                                "the expected answer text")
    return EvalSet(path, resolved, samples)
