"""KD records (one line of ``kd.jsonl``): building one from a teacher's answer, and validating one.

The layout is ``types.KD_RECORD_FIELDS`` under ``types.KD_SCHEMA``. ``validate_record`` is the
one reader-side check, shared by ``teacher generate --resume``, ``teacher merge`` and the training
data code.
"""

from __future__ import annotations

import json
import math
from typing import Any

from mlx_distill.teacher.jsontext import dumps_compact
from mlx_distill.teacher.types import KD_RECORD_FIELDS, KD_SCHEMA, ChatRequest

# Report at most this many problems per record: the first few locate the fault.
MAX_ERRORS = 5
# The record fields ``build_record`` takes from the completion alone.
COMPLETION_FIELDS = frozenset(
    {"text", "reasoning", "tool_calls", "tokens", "usage", "finish_reason"}
)


class RecordError(ValueError):
    """A KD record (or line) that does not follow the documented schema."""


def build_record(
    prompt_id: str,
    request: ChatRequest,
    completion: dict[str, Any],
    *,
    model: str,
    base_host: str,
    cost_usd: float,
    created: float,
) -> dict[str, Any]:
    """The KD record for ``request`` answered by ``completion`` (a ``Completion.to_dict()``).

    Taking the dict form lets cache replays skip rebuilding ``Completion`` objects.
    """
    return {
        "schema": KD_SCHEMA,
        "id": prompt_id,
        "messages": request.messages,
        "tools": request.tools or None,
        "teacher": {
            "model": completion.get("model") or model,
            "base_host": base_host,
            "fingerprint": completion.get("system_fingerprint"),
        },
        "text": completion.get("text") or "",
        "reasoning": completion.get("reasoning"),
        "tool_calls": completion.get("tool_calls") or [],
        "tokens": completion.get("tokens"),
        "usage": completion.get("usage") or {},
        "cost_usd": float(cost_usd),
        "finish_reason": completion.get("finish_reason"),
        "created": float(created),
    }


def dump_record(record: dict[str, Any], plain_fields: frozenset[str] = frozenset()) -> str:
    """One output line (with its newline): field order as documented, UTF-8 kept, no spaces;
    ``ValueError`` for NaN or infinity.

    ``plain_fields``: fields known to hold only plain floats (``jsontext.loads_plain``), e.g.
    ``COMPLETION_FIELDS`` of a record built from a completion read that way.
    """
    ordered = {name: record[name] for name in KD_RECORD_FIELDS}
    return dumps_compact(ordered, plain_fields) + "\n"


def parse_record_line(line: str | bytes) -> dict[str, Any]:
    """Parse and validate one line; raises ``RecordError`` with the first problems."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordError(f"not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    errors = validate_record(obj)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise RecordError(errors[0] + more)
    return obj


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and not (isinstance(value, float) and math.isnan(value))
    )


def _is_opt_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


class _Checker:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def fail(self, where: str, expected: str, value: Any = None, show: bool = True) -> None:
        if len(self.errors) < MAX_ERRORS:
            got = f", got {_short(value)}" if show else ""
            self.errors.append(f"field '{where}': expected {expected}{got}")

    def check(self, ok: bool, where: str, expected: str, value: Any = None) -> bool:
        if not ok:
            self.fail(where, expected, value)
        return ok


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if _jsonable(value) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def validate_record(obj: Any) -> list[str]:
    """Problems with one parsed KD record ('' list when it is valid), each naming its field."""
    c = _Checker()
    if not isinstance(obj, dict):
        c.fail("<record>", "a JSON object", obj)
        return c.errors
    if "schema" in obj and obj["schema"] != KD_SCHEMA:
        # Another layout version: its other fields cannot be judged by this one's rules.
        c.fail("schema", repr(KD_SCHEMA), obj["schema"])
        return c.errors
    missing = [k for k in KD_RECORD_FIELDS if k not in obj]
    if missing:
        c.fail(missing[0], "present (required field missing)", show=False)
    unknown = sorted(k for k in obj if k not in KD_RECORD_FIELDS)
    if unknown:
        c.fail(unknown[0], "no such field (unknown field)", show=False)
    if "id" in obj:
        prompt_id = obj["id"]
        c.check(isinstance(prompt_id, str) and prompt_id != "", "id", "a non-empty string",
                prompt_id)
    if "messages" in obj:
        _check_messages(c, obj["messages"])
    if "tools" in obj:
        tools = obj["tools"]
        if c.check(tools is None or isinstance(tools, list), "tools", "a list or null", tools):
            for i, tool in enumerate(tools or []):
                c.check(isinstance(tool, dict), f"tools[{i}]", "an object", tool)
    if "teacher" in obj:
        _check_teacher(c, obj["teacher"])
    if "text" in obj:
        c.check(isinstance(obj["text"], str), "text", "a string", obj["text"])
    if "reasoning" in obj:
        c.check(_is_opt_str(obj["reasoning"]), "reasoning", "a string or null", obj["reasoning"])
    if "tool_calls" in obj:
        _check_tool_calls(c, obj["tool_calls"])
    if "tokens" in obj:
        _check_tokens(c, obj["tokens"])
    if "usage" in obj:
        _check_usage(c, obj["usage"])
    if "cost_usd" in obj:
        cost = obj["cost_usd"]
        c.check(_is_number(cost) and cost >= 0, "cost_usd", "a number >= 0", cost)
    if "finish_reason" in obj:
        reason = obj["finish_reason"]
        c.check(_is_opt_str(reason), "finish_reason", "a string or null", reason)
    if "created" in obj:
        created = obj["created"]
        c.check(_is_number(created) and created > 0, "created", "unix time > 0", created)
    return c.errors


def _check_messages(c: _Checker, messages: Any) -> None:
    if not c.check(
        isinstance(messages, list) and len(messages) > 0, "messages", "a non-empty list", messages
    ):
        return
    for i, message in enumerate(messages):
        if not c.check(isinstance(message, dict), f"messages[{i}]", "an object", message):
            continue
        role = message.get("role")
        c.check(isinstance(role, str) and role != "", f"messages[{i}].role", "a string", role)


def _check_teacher(c: _Checker, teacher: Any) -> None:
    if not c.check(isinstance(teacher, dict), "teacher", "an object", teacher):
        return
    for key, ok, expected in (
        ("model", isinstance(teacher.get("model"), str), "a string"),
        ("base_host", isinstance(teacher.get("base_host"), str), "a string"),
        ("fingerprint", _is_opt_str(teacher.get("fingerprint")), "a string or null"),
    ):
        if key not in teacher:
            c.fail(f"teacher.{key}", "present (required field missing)", show=False)
        else:
            c.check(ok, f"teacher.{key}", expected, teacher.get(key))


def _check_tool_calls(c: _Checker, calls: Any) -> None:
    if not c.check(isinstance(calls, list), "tool_calls", "a list", calls):
        return
    for i, call in enumerate(calls):
        where = f"tool_calls[{i}]"
        if not c.check(isinstance(call, dict), where, "an object", call):
            continue
        c.check(isinstance(call.get("id"), str), f"{where}.id", "a string", call.get("id"))
        c.check(call.get("type") == "function", f"{where}.type", "'function'", call.get("type"))
        fn = call.get("function")
        if c.check(isinstance(fn, dict), f"{where}.function", "an object", fn):
            name, args = fn.get("name"), fn.get("arguments")
            c.check(isinstance(name, str), f"{where}.function.name", "a string", name)
            c.check(isinstance(args, str), f"{where}.function.arguments", "JSON text", args)


def _logprob_ok(value: Any) -> bool:
    # A logprob is <= 0; allow float rounding above zero and -inf for impossible tokens.
    return _is_number(value) and value <= 1e-4


def _tokens_plainly_valid(tokens: list) -> bool:
    """The common case, checked fast (tokens dominate a record's size): float logprobs <= 0
    (NaN fails every comparison), [str, float] pairs, descending. False: look closer."""
    for tok in tokens:
        if type(tok) is not dict or type(tok.get("token")) is not str:
            return False
        lp, top = tok.get("logprob"), tok.get("top")
        if type(lp) is not float or not lp <= 1e-4 or type(top) is not list:
            return False
        previous = 1e-4
        for pair in top:
            if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not str:
                return False
            value = pair[1]
            if type(value) is not float or not value <= previous:
                return False
            previous = value
        raw = tok.get("bytes")
        if raw is not None and (type(raw) is not list or not _byte_values(raw)):
            return False
    return True


def _byte_values(raw: list) -> bool:
    """All ints (not bools) in 0..255, checked by C loops: ``bytes()`` rejects the rest."""
    if not set(map(type, raw)) <= {int}:
        return False
    try:
        bytes(raw)
    except ValueError:
        return False
    return True


def _check_tokens(c: _Checker, tokens: Any) -> None:
    if tokens is None:
        return
    if not c.check(isinstance(tokens, list), "tokens", "a list or null", tokens):
        return
    if not _tokens_plainly_valid(tokens):
        check_tokens_in_detail(c, tokens)


def check_tokens_in_detail(c: _Checker, tokens: list) -> None:
    for i, tok in enumerate(tokens):
        where = f"tokens[{i}]"
        if not c.check(isinstance(tok, dict), where, "an object {token, logprob, top}", tok):
            continue
        c.check(isinstance(tok.get("token"), str), f"{where}.token", "a string", tok.get("token"))
        lp = tok.get("logprob")
        c.check(_logprob_ok(lp), f"{where}.logprob", "a number <= 0", lp)
        top = tok.get("top")
        if not c.check(isinstance(top, list), f"{where}.top", "a list", top):
            continue
        previous = math.inf
        for j, pair in enumerate(top):
            ok = (
                isinstance(pair, list)
                and len(pair) == 2
                and isinstance(pair[0], str)
                and _logprob_ok(pair[1])
            )
            if not c.check(ok, f"{where}.top[{j}]", "a [token, logprob <= 0] pair", pair):
                break
            if pair[1] > previous:
                c.fail(f"{where}.top", "sorted by logprob, descending", show=False)
                break
            previous = pair[1]
        raw = tok.get("bytes")
        if raw is not None:
            ok = isinstance(raw, list) and all(_is_int(b) and 0 <= b <= 255 for b in raw)
            c.check(ok, f"{where}.bytes", "a list of byte values 0..255 or absent", raw)


def _check_usage(c: _Checker, usage: Any) -> None:
    if not c.check(isinstance(usage, dict), "usage", "an object", usage):
        return
    for key in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens"):
        value = usage.get(key)
        c.check(_is_int(value) and value >= 0, f"usage.{key}", "an integer >= 0", value)
