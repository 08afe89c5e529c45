"""OpenAI wire formats → ``Completion``: chat and legacy completions, whole bodies and SSE streams.

Parsers tolerate missing and extra fields and never trust a server's ordering: top-k alternatives
are sorted by logprob, highest first (ties by token text, so the result does not depend on the
order the server sent them in). A missing or null logprob becomes NaN (e.g. the first echoed
prompt token, which has no context to be predicted from).

Error classification (``WireError.retryable``):
- Invalid JSON (a body or an SSE event): **retryable**, reason ``bad_json``. Garbled or cut bodies
  come from proxies and dropped connections; asking again usually works.
- Valid JSON of the wrong shape (no ``choices``): **not retryable**, reason ``bad_response``. The
  endpoint does not speak this protocol (wrong base URL); retrying would only repeat it.
- ``{"error": ...}`` inside a 200 body or an SSE event: **retryable**, reason ``api_error``
  (OpenAI reports server errors that happen mid-stream this way).
- A stream that ends without ``[DONE]`` and without a finish_reason (or without the usage it was
  asked to include): **retryable**, reason ``truncated_stream``.
"""

from __future__ import annotations

import codecs
import json
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any

from mlx_distill.teacher import jsontext
from mlx_distill.teacher.errors import WireError
from mlx_distill.teacher.types import Completion, TokenLogprob, ToolCall, Usage

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass
class CompletionRequest:
    """One legacy ``POST {base_url}/completions`` request (plain prompt, optional echo)."""

    prompt: str
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    # None: no logprobs. 0: sampled-token logprobs only. k > 0: also top-k alternatives.
    top_logprobs: int | None = None
    # Also return the prompt's tokens (and their logprobs when asked): prompt scoring.
    echo: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def body(self, model: str, stream: bool = False, bool_logprobs: bool = False) -> dict[str, Any]:
        """``bool_logprobs``: send ``logprobs: true, top_logprobs: k`` (mlx_lm.server) instead of
        the legacy ``logprobs: k``."""
        body: dict[str, Any] = {"model": model, "prompt": self.prompt, "stream": stream,
                                "max_tokens": self.max_tokens, "temperature": self.temperature,
                                "top_p": self.top_p}
        if self.seed is not None:
            body["seed"] = self.seed
        if self.stop:
            body["stop"] = self.stop
        if self.top_logprobs is not None:
            if bool_logprobs:
                body["logprobs"] = True
                if self.top_logprobs > 0:
                    body["top_logprobs"] = self.top_logprobs
            else:
                body["logprobs"] = self.top_logprobs
        if self.echo:
            body["echo"] = True
        if stream:
            body["stream_options"] = {"include_usage": True}
        body.update(self.extra)
        return body


def parse_json(data: bytes | str, what: str = "response body") -> Any:
    try:
        return jsontext.loads(data)
    except ValueError as exc:
        raise WireError("bad_json", f"{what} is not valid JSON ({exc})", retryable=True) from None


def error_message(data: bytes | str) -> str:
    """The server's own error text from an error response (OpenAI ``{"error": {"message"}}``)."""
    try:
        payload = json.loads(data)
    except ValueError:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        return " ".join(text.split())[:300] or "(empty body)"
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict):
            message = error.get("message") or error.get("detail") or error.get("msg")
            if message:
                return str(message)[:1000]
        elif isinstance(error, str):
            return error[:1000]
    return json.dumps(payload)[:300]


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def parse_token(entry: Any) -> TokenLogprob:
    """One ``logprobs.content[]`` entry. mlx_lm.server omits ``token`` (only ``id``): ''."""
    entry = entry if isinstance(entry, dict) else {}
    top = []
    for t in entry.get("top_logprobs") or ():
        if isinstance(t, dict):
            token, logprob = t.get("token", ""), t.get("logprob")
            top.append((token if type(token) is str else str(token),
                        logprob if type(logprob) is float else _float(logprob)))
    raw = entry.get("bytes")
    return TokenLogprob(token=str(entry.get("token") or ""), logprob=_float(entry.get("logprob")),
                        top=_sorted_top(top), bytes=list(raw) if _byte_values(raw) else None)


def _sorted_top(pairs: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """By logprob, highest first (NaN last), then by token."""
    total = sum(map(_LOGPROB, pairs))
    if total != total:  # NaN (or inf - inf): sort() needs a total order
        return sorted(pairs, key=lambda p: (-p[1] if not math.isnan(p[1]) else math.inf, p[0]))
    pairs.sort(key=_TOKEN)  # two stable passes in C instead of a tuple key per pair
    pairs.sort(key=_LOGPROB, reverse=True)
    return pairs


_TOKEN, _LOGPROB = operator.itemgetter(0), operator.itemgetter(1)


def _byte_values(raw: Any) -> bool:
    """A list of ints 0..255 (``bytes()`` refuses anything else JSON can hold)."""
    if not isinstance(raw, list):
        return False
    try:
        bytes(raw)
    except (TypeError, ValueError):
        return False
    return True


def parse_legacy_tokens(logprobs: dict[str, Any]) -> list[TokenLogprob]:
    """Legacy ``{tokens, token_logprobs, top_logprobs: [dict | null]}``."""
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    out = []
    for i, token in enumerate(tokens):
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        out.append(TokenLogprob(
            token=str(token), logprob=_float(values[i] if i < len(values) else None),
            top=_sorted_top([(str(t), _float(lp)) for t, lp in top.items()])))
    return out


def _choice_tokens(logprobs: Any) -> list[TokenLogprob] | None:
    """Tokens from a choice's ``logprobs`` in either layout; None when there are none."""
    if not isinstance(logprobs, dict):
        return None
    if isinstance(logprobs.get("content"), list):
        tokens = [parse_token(e) for e in logprobs["content"]]
    elif isinstance(logprobs.get("tokens"), list):
        tokens = parse_legacy_tokens(logprobs)
    else:
        return None
    return tokens or None


def parse_usage(usage: Any) -> Usage | None:
    """Usage incl. cached prompt tokens (OpenAI ``prompt_tokens_details.cached_tokens`` or
    Moonshot's top-level ``cached_tokens``)."""
    if not isinstance(usage, dict):
        return None

    def count(value: Any) -> int:
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0

    prompt, completion = count(usage.get("prompt_tokens")), count(usage.get("completion_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = max(count(usage.get("cached_tokens")),
                 count(details.get("cached_tokens")) if isinstance(details, dict) else 0)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=count(usage.get("total_tokens")) or prompt + completion,
                 cached_tokens=cached)


def _tool_call(raw: Any, index: int) -> ToolCall | None:
    if not isinstance(raw, dict):
        return None
    fn = raw.get("function") if isinstance(raw.get("function"), dict) else {}
    arguments = fn.get("arguments")
    if arguments is None:
        arguments = ""
    elif not isinstance(arguments, str):  # a server that sent an object instead of JSON text
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=str(raw.get("id") or f"call_{index}"), name=str(fn.get("name") or ""),
                    arguments=arguments)


def _first_choice(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise WireError("bad_response", f"expected a JSON object, got {type(data).__name__}",
                        retryable=False)
    if "error" in data and not data.get("choices"):
        raise WireError("api_error", error_message(json.dumps(data)), retryable=True)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise WireError("bad_response", "no choices in the response (is base_url an "
                        "OpenAI-compatible API root such as https://host/v1?)", retryable=False)
    return next((c for c in choices if isinstance(c, dict) and c.get("index", 0) == 0), choices[0])


def _completion(data: dict[str, Any], **fields: Any) -> Completion:
    return Completion(
        usage=parse_usage(data.get("usage")) or Usage(),
        model=str(data.get("model") or ""),
        system_fingerprint=data.get("system_fingerprint") or None,
        response_id=data.get("id") or None,
        **fields,
    )


def parse_chat(data: Any) -> Completion:
    """A non-streamed ``/chat/completions`` response body (already JSON-decoded)."""
    choice = _first_choice(data)
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    calls = message.get("tool_calls") if isinstance(message.get("tool_calls"), list) else []
    completion = _completion(
        data,
        text=message.get("content") if isinstance(message.get("content"), str) else "",
        reasoning=message.get("reasoning_content") or message.get("reasoning") or None,
        tool_calls=[c for i, raw in enumerate(calls) if (c := _tool_call(raw, i))],
        finish_reason=choice.get("finish_reason") or None,
        tokens=_choice_tokens(choice.get("logprobs")),
    )
    if completion.usage == Usage() and isinstance(choice.get("usage"), dict):
        completion.usage = parse_usage(choice["usage"]) or Usage()
    return completion


def parse_completions(data: Any) -> Completion:
    """A non-streamed ``/completions`` response body (legacy or chat-style logprobs)."""
    choice = _first_choice(data)
    return _completion(
        data,
        text=choice.get("text") if isinstance(choice.get("text"), str) else "",
        finish_reason=choice.get("finish_reason") or None,
        tokens=_choice_tokens(choice.get("logprobs")),
    )


def parse_response(body: bytes | str, kind: str) -> Completion:
    """A whole response body; ``kind`` is "chat" or "completions"."""
    data = parse_json(body)
    return parse_chat(data) if kind == "chat" else parse_completions(data)


class StreamAccumulator:
    """Merges an SSE stream of chunks into one ``Completion``.

    Feed raw bytes as they arrive (``feed``; any split, even inside a UTF-8 character or a CRLF)
    or ready-made lines (``feed_line``), then call ``finish``.
    """

    def __init__(self, kind: str = "chat", *, expect_usage: bool = False):
        self.kind = kind
        self.expect_usage = expect_usage
        self.done = False
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._pending = ""
        self._data: list[str] = []
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}
        self._tokens: list[TokenLogprob] | None = None
        self._finish: str | None = None
        self._usage: Usage | None = None
        self._head: dict[str, Any] = {}

    @property
    def has_output(self) -> bool:
        """Whether any answer text, reasoning or tool call has arrived yet."""
        return bool(self._text or self._reasoning or self._calls)

    def feed(self, chunk: bytes) -> None:
        text = self._pending + self._decode(chunk)
        hold_cr = text.endswith("\r")  # maybe the first half of a CRLF split across chunks
        if hold_cr:
            text = text[:-1]
        *lines, rest = _LINE_BREAK.split(text)
        self._pending = rest + ("\r" if hold_cr else "")
        for line in lines:
            self.feed_line(line)

    def _decode(self, chunk: bytes, final: bool = False) -> str:
        try:
            return self._decoder.decode(chunk, final)
        except UnicodeDecodeError as exc:
            raise WireError("bad_json", f"the stream is not valid UTF-8 ({exc})",
                            retryable=True) from None

    def feed_line(self, line: str) -> None:
        if line == "":
            self._dispatch()
        elif not line.startswith(":"):  # ':' starts a comment (keep-alive pings)
            name, _, value = line.partition(":")
            if name == "data":
                self._data.append(value[1:] if value.startswith(" ") else value)

    def _dispatch(self) -> None:
        if not self._data:
            return
        data, self._data = "\n".join(self._data), []
        if self.done:
            return
        if data.strip() == "[DONE]":
            self.done = True
            return
        chunk = parse_json(data, "a streamed event")
        if not isinstance(chunk, dict):
            raise WireError("bad_response", f"streamed event is not an object: {data[:100]}",
                            retryable=False)
        if "error" in chunk and not chunk.get("choices"):
            raise WireError("api_error", error_message(data), retryable=True)
        self._merge(chunk)

    def _merge(self, chunk: dict[str, Any]) -> None:
        for key in ("model", "system_fingerprint", "id"):
            if chunk.get(key):
                self._head[key] = chunk[key]
        usage = parse_usage(chunk.get("usage"))
        if usage is not None:
            self._usage = usage
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if self.kind == "chat":
                self._merge_delta(choice.get("delta") if isinstance(choice.get("delta"), dict)
                                  else {})
            elif isinstance(choice.get("text"), str):
                self._text.append(choice["text"])
            tokens = _choice_tokens(choice.get("logprobs"))
            if tokens:
                self._tokens = (self._tokens or []) + tokens
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
            usage = parse_usage(choice.get("usage"))  # Moonshot streams usage inside the choice
            if usage is not None:
                self._usage = usage

    def _merge_delta(self, delta: dict[str, Any]) -> None:
        if isinstance(delta.get("content"), str):
            self._text.append(delta["content"])
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str):
            self._reasoning.append(reasoning)
        for position, fragment in enumerate(delta.get("tool_calls") or []):
            if not isinstance(fragment, dict):
                continue
            index = fragment.get("index", position)
            slot = self._calls.setdefault(index, {"id": "", "name": "", "arguments": []})
            if fragment.get("id"):
                slot["id"] = str(fragment["id"])
            fn = fragment.get("function") if isinstance(fragment.get("function"), dict) else {}
            if fn.get("name"):
                slot["name"] += str(fn["name"])
            arguments = fn.get("arguments")
            if isinstance(arguments, str):
                slot["arguments"].append(arguments)
            elif arguments is not None:
                slot["arguments"].append(json.dumps(arguments, ensure_ascii=False))

    def finish(self) -> Completion:
        """The merged completion; raises ``WireError("truncated_stream")`` for a cut stream."""
        try:  # a last event the server did not end with a blank line, maybe cut short
            tail = self._pending + self._decode(b"", final=True)
            self._pending = ""
            if tail:
                self.feed_line(tail.rstrip("\r"))
            self._dispatch()
        except WireError as exc:
            if exc.reason != "bad_json":
                raise
            raise WireError("truncated_stream", f"the stream ended inside an event ({exc})",
                            retryable=True) from None
        if not self.done and (self._finish is None or (self.expect_usage and self._usage is None)):
            what = "a finish_reason" if self._finish is None else "the usage it was asked for"
            raise WireError("truncated_stream", f"the stream ended without [DONE] or {what}",
                            retryable=True)
        calls = [ToolCall(id=slot["id"] or f"call_{index}", name=slot["name"],
                          arguments="".join(slot["arguments"]))
                 for index, slot in sorted(self._calls.items())]
        return Completion(
            text="".join(self._text),
            reasoning="".join(self._reasoning) or None,
            tool_calls=calls,
            finish_reason=self._finish,
            usage=self._usage or Usage(),
            tokens=self._tokens,
            model=str(self._head.get("model") or ""),
            system_fingerprint=self._head.get("system_fingerprint") or None,
            response_id=self._head.get("id") or None,
        )
