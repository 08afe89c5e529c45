"""The local teacher server's wire format: request validation (OpenAI-style 400s that name the
field) and JSON / SSE encoding."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response

MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error response in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = (
            message, param, status, code, kind
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


class JsonResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        # allow_nan=False: a non-finite logprob is a bug to surface, never invalid JSON to send.
        return dumps(content).encode("utf-8")


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def sse(payload: Any) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {dumps(payload)}\n\n"


def usage_dict(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": 0}}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(body: dict, name: str, default: Any, lo: int | None = None,
         hi: int | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise ApiError(f"{name}: expected an integer, got {value!r}", name, code="invalid_type")
    if lo is not None and value < lo:
        raise ApiError(f"{name}: expected an integer >= {lo}, got {value}", name,
                       code="integer_below_min_value")
    if hi is not None and value > hi:
        raise ApiError(f"{name}: expected an integer from {lo} to {hi}, got {value}", name,
                       code="integer_above_max_value")
    return value


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not lo <= value <= hi:
        raise ApiError(f"{name}: expected a number from {lo} to {hi}, got {value!r}", name)
    return float(value)


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(f"{name}: expected true or false, got {value!r}", name)
    return value


def _stops(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or any(not isinstance(s, str) or not s for s in stops):
        raise ApiError(f"stop: expected a non-empty string or a list of them, got {value!r}",
                       "stop")
    return stops


def _unsupported(body: dict) -> None:
    """Refuse options that would change the answer but that this server does not implement."""
    if body.get("n") not in (None, 1):
        raise ApiError("n: only n=1 is supported", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(f"{name}: only 0 is supported", name)
    if body.get("logit_bias"):
        raise ApiError("logit_bias: not supported", "logit_bias")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise ApiError("response_format: only {\"type\": \"text\"} is supported", "response_format")


@dataclass
class Common:
    """Sampling and output options shared by chat and legacy completions."""

    max_tokens: int | None  # None: up to the end of the context window
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    stream: bool
    include_usage: bool


def _common(body: dict, min_tokens: int) -> Common:
    _unsupported(body)
    max_tokens = _int(body, "max_tokens", None, lo=min_tokens)
    if max_tokens is None:
        max_tokens = _int(body, "max_completion_tokens", None, lo=min_tokens)
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError("stream_options: expected an object", "stream_options")
    include_usage = _bool(options or {}, "include_usage", False)
    if options is not None and not stream:
        raise ApiError("stream_options: only allowed when stream is true", "stream_options")
    return Common(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=_int(body, "seed", None),
        stops=_stops(body),
        stream=stream,
        include_usage=include_usage,
    )


def _content_text(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                part.get("text"), str
            ):
                raise ApiError(f"{where}.content[{i}]: only text parts are supported", where)
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(f"{where}.content: expected a string or a list of text parts", where)


def parse_messages(body: dict) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages: expected a non-empty list of messages", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(f"{where}: expected an object", where)
        role = message.get("role")
        if role not in MESSAGE_ROLES:
            raise ApiError(f"{where}.role: expected one of {list(MESSAGE_ROLES)}, got {role!r}",
                           where)
        content = _content_text(message.get("content"), where)
        if content is None and not (role == "assistant" and message.get("tool_calls")):
            raise ApiError(f"{where}.content: required", where)
        tool_calls = message.get("tool_calls")
        if tool_calls is not None and not isinstance(tool_calls, list):
            raise ApiError(f"{where}.tool_calls: expected a list", where)
        # The template knows system/user/assistant/tool; OpenAI's developer role is a system one.
        cleaned = {**message, "role": "system" if role == "developer" else role,
                   "content": content or ""}
        out.append(cleaned)
    return out


def parse_tools(body: dict) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ApiError("tools: expected a list of tool definitions", "tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(f"tools[{i}]: expected {{type: function, function: {{name, ...}}}}",
                           "tools")
    return tools or None


@dataclass
class ChatParams:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    common: Common
    logprobs: bool
    top_logprobs: int
    prompt_logprobs: int | None  # vLLM's extension: top-k per prompt token
    parse_tool_calls: bool


def parse_chat(body: dict, max_top: int) -> ChatParams:
    messages, tools = parse_messages(body), parse_tools(body)
    common = _common(body, min_tokens=1)
    logprobs = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, lo=0, hi=max_top)
    if top is not None and not logprobs:
        raise ApiError("top_logprobs: requires logprobs to be true", "top_logprobs")
    prompt_logprobs = _int(body, "prompt_logprobs", None, lo=0, hi=max_top)
    if prompt_logprobs is not None and common.stream:
        raise ApiError("prompt_logprobs: not available with stream=true (use /v1/score)",
                       "prompt_logprobs")
    tool_choice = body.get("tool_choice")
    if tool_choice not in (None, "auto", "none"):
        raise ApiError("tool_choice: only \"auto\" and \"none\" are supported", "tool_choice")
    return ChatParams(messages, tools, common, logprobs, top or 0, prompt_logprobs,
                      parse_tool_calls=bool(tools) and tool_choice != "none")


@dataclass
class CompletionParams:
    prompt: str | list[int]
    common: Common
    logprobs: int | None
    echo: bool


def parse_completion(body: dict, max_top: int, vocab_size: int) -> CompletionParams:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(_is_int(t) and 0 <= t < vocab_size for t in prompt):
            raise ApiError(f"prompt: expected a string or a non-empty list of token ids in "
                           f"0..{vocab_size - 1} (one prompt per request)", "prompt")
    elif not isinstance(prompt, str) or not prompt:
        raise ApiError("prompt: expected a non-empty string or a list of token ids "
                       "(one prompt per request)", "prompt")
    return CompletionParams(
        prompt=prompt,
        common=_common(body, min_tokens=0),
        logprobs=_int(body, "logprobs", None, lo=0, hi=max_top),
        echo=_bool(body, "echo", False),
    )


@dataclass
class ScoreParams:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    completion: str | None
    completion_ids: list[int] | None
    top_logprobs: int


def parse_score(body: dict, max_top: int, vocab_size: int) -> ScoreParams:
    messages, tools = parse_messages(body), parse_tools(body)
    completion, ids = body.get("completion"), body.get("completion_ids")
    if (completion is None) == (ids is None):
        raise ApiError("completion: give exactly one of completion (text) or completion_ids",
                       "completion")
    if completion is not None and (not isinstance(completion, str) or not completion):
        raise ApiError("completion: expected a non-empty string", "completion")
    if ids is not None and (not isinstance(ids, list) or not ids
                            or not all(_is_int(t) and 0 <= t < vocab_size for t in ids)):
        raise ApiError(f"completion_ids: expected a non-empty list of token ids in "
                       f"0..{vocab_size - 1}", "completion_ids")
    top = _int(body, "top_logprobs", 0, lo=0, hi=max_top)
    return ScoreParams(messages, tools, completion, ids, top)
