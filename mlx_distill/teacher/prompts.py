"""Prompts files for ``teacher generate``: parsing, validation, sharding, and requests.

One JSON object per line: ``id`` (non-empty string, unique), ``messages`` (OpenAI chat format),
optional ``tools`` / ``tool_choice``, and optional per-prompt sampling overrides ``max_tokens``,
``temperature``, ``top_p``, ``seed``, ``stop``, ``top_logprobs``. Blank lines are skipped. Unknown
keys are errors: a misspelt ``temprature`` silently ignored would cost money.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_distill.cli import UserError
from mlx_distill.teacher.types import ChatRequest

ROLES = ("system", "developer", "user", "assistant", "tool")
OVERRIDES = ("max_tokens", "temperature", "top_p", "seed", "stop", "top_logprobs")
ALLOWED_KEYS = ("id", "messages", "tools", "tool_choice", *OVERRIDES)


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the prompts whose ``shard_of(id, count)`` equals ``index``."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index_text, count_text = text.split("/")
            index, count = int(index_text), int(count_text)
        except ValueError:
            raise UserError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
        if count < 1 or not 0 <= index < count:
            raise UserError(f"--shard {text!r}: expected 0 <= i < n and n >= 1")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def contains(self, prompt_id: str) -> bool:
        return shard_of(prompt_id, self.count) == self.index


def shard_of(prompt_id: str, count: int) -> int:
    """Shard of a prompt, from a stable hash of its id: independent of line order, Python's hash
    seed and the platform, so ``--shard 0/n .. n-1/n`` partition any prompts file exactly."""
    digest = hashlib.sha256(prompt_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass
class Prompt:
    id: str
    line: int
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestDefaults:
    """Sampling used when a prompt does not override it (from the command line)."""

    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    top_logprobs: int | None = None

    def request(self, prompt: Prompt) -> ChatRequest:
        o = prompt.overrides
        stop = o.get("stop", list(self.stop) if self.stop else None)
        return ChatRequest(
            messages=prompt.messages,
            tools=prompt.tools,
            max_tokens=o.get("max_tokens", self.max_tokens),
            temperature=float(o.get("temperature", self.temperature)),
            top_p=float(o.get("top_p", self.top_p)),
            seed=o.get("seed", self.seed),
            stop=stop,
            top_logprobs=o.get("top_logprobs", self.top_logprobs),
            extra={} if prompt.tool_choice is None else {"tool_choice": prompt.tool_choice},
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


class _LineError(Exception):
    def __init__(self, field_name: str, expected: str, value: Any = ..., *, got: str | None = None):
        shown = got if got is not None else ("" if value is ... else f", got {_short(value)}")
        super().__init__(f"field '{field_name}': expected {expected}{shown}")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _LineError("messages", "a non-empty list of {role, content} objects", messages)
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _LineError(where, "an object {role, content}", message)
        role = message.get("role")
        if role not in ROLES:
            raise _LineError(f"{where}.role", "one of " + ", ".join(ROLES), role)
        content = message.get("content")
        if content is None:
            if not (role == "assistant" and message.get("tool_calls")):
                raise _LineError(f"{where}.content", "a string or a list of content parts",
                                 got=" (missing or null)")
        elif isinstance(content, list):
            if not all(isinstance(part, dict) for part in content):
                raise _LineError(f"{where}.content", "a list of content-part objects", content)
        elif not isinstance(content, str):
            raise _LineError(f"{where}.content", "a string or a list of content parts", content)


def _check_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise _LineError("tools", "a list of tool definitions or null", tools)
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise _LineError(f"tools[{i}]", "{type: 'function', function: {name, ...}}", tool)
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _LineError(f"tools[{i}].function.name", "a non-empty string", fn.get("name"))


def _check_overrides(record: dict[str, Any], max_top_logprobs: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    checks = {
        "max_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "temperature": (lambda v: _is_number(v) and 0 <= v <= 2, "a number in [0, 2]"),
        "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "seed": (lambda v: v is None or _is_int(v), "an integer or null"),
        "stop": (
            lambda v: v is None or isinstance(v, str)
            or (isinstance(v, list) and all(isinstance(s, str) and s for s in v)),
            "a string or a list of non-empty strings",
        ),
        "top_logprobs": (
            lambda v: v is None or (_is_int(v) and 0 <= v <= max_top_logprobs),
            f"an integer in [0, {max_top_logprobs}] (the teacher's maximum) or null",
        ),
    }
    for name in OVERRIDES:
        if name not in record:
            continue
        value = record[name]
        ok, expected = checks[name]
        if not ok(value):
            raise _LineError(name, expected, value)
        out[name] = [value] if name == "stop" and isinstance(value, str) else value
    return out


def parse_prompt(record: Any, line: int, max_top_logprobs: int = 20) -> Prompt:
    """One validated prompt; raises ``_LineError`` naming the field."""
    if not isinstance(record, dict):
        raise _LineError("<line>", "a JSON object {id, messages, ...}", record)
    unknown = sorted(k for k in record if k not in ALLOWED_KEYS)
    if unknown:
        raise _LineError(unknown[0], "one of the known keys: " + ", ".join(ALLOWED_KEYS),
                         got=" (unknown key)")
    prompt_id = record.get("id")
    if not isinstance(prompt_id, str) or not prompt_id:
        raise _LineError("id", "a non-empty string", prompt_id if "id" in record else ...)
    _check_messages(record.get("messages"))
    _check_tools(record.get("tools"))
    tool_choice = record.get("tool_choice")
    if tool_choice is not None and not isinstance(tool_choice, str | dict):
        raise _LineError("tool_choice", "a string or an object", tool_choice)
    return Prompt(
        id=prompt_id,
        line=line,
        messages=record["messages"],
        tools=record.get("tools") or None,
        tool_choice=tool_choice,
        overrides=_check_overrides(record, max_top_logprobs),
    )


def parse_prompts(data: bytes, source: str, max_top_logprobs: int = 20) -> list[Prompt]:
    """All prompts of a file's bytes, validated up front. The error names the first bad line and
    says how many more there are, so one run over the file finds every problem's count."""
    prompts: list[Prompt] = []
    first_line: dict[str, int] = {}
    errors: list[str] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            try:
                record = json.loads(raw)
            except UnicodeDecodeError:
                raise _LineError("<line>", "UTF-8 text", got=" (invalid bytes)") from None
            except json.JSONDecodeError as exc:
                raise _LineError("<line>", "one JSON object per line",
                                 got=f" ({exc.msg} at column {exc.colno})") from None
            prompt = parse_prompt(record, number, max_top_logprobs)
            if prompt.id in first_line:
                raise _LineError("id", "ids unique within the file",
                                 got=f" (duplicate {prompt.id!r}, first on line "
                                     f"{first_line[prompt.id]})")
        except _LineError as exc:
            errors.append(f"{source}:{number}: {exc}")
            continue
        first_line[prompt.id] = number
        prompts.append(prompt)
    if errors:
        more = f" ({len(errors) - 1} more bad lines)" if len(errors) > 1 else ""
        raise UserError(errors[0] + more)
    if not prompts:
        raise UserError(f"{source}: no prompts (expected one JSON object per line)")
    return prompts


def load_prompts(path: str | Path, max_top_logprobs: int = 20) -> tuple[list[Prompt], str]:
    """``(prompts, sha256 of the file's bytes)``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read prompts file {path}: {exc.strerror or exc}") from None
    return parse_prompts(data, str(path), max_top_logprobs), hashlib.sha256(data).hexdigest()
