"""Sampled tokens to text for the local teacher server: stop strings, tool calls, and which tokens
belong to which piece of text.

:class:`TextAssembler` turns the token stream into deltas. A streamed response sends one chunk per
delta; a plain response joins them, so both carry the same text, tool calls and logprobs.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass, field

from mlx_distill.generate import _held_back
from mlx_distill.teacher.server_infer import TokenScore
from mlx_distill.teacher.types import ToolCall

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"
_JSON_SPACE = " \t\n\r"
_DECODER = json.JSONDecoder()


@dataclass
class Delta:
    """New text, the tokens that produced it, and on the last delta why generation ended."""

    text: str = ""
    tokens: list[TokenScore] = field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: list[ToolCall] | None = None


def joined(deltas: list[Delta]) -> Delta:
    """The deltas of one generation as a single one (what a non-streamed response carries)."""
    last = deltas[-1]
    return Delta("".join(d.text for d in deltas), [t for d in deltas for t in d.tokens],
                 last.finish_reason, last.tool_calls)


class TextAssembler:
    """Feed sampled tokens with :meth:`add`; call :meth:`finish` if the tokens ran out (length).

    Text is decoded from the exact token bytes (whole characters only). Held back, and only
    released once it cannot be: a suffix that may grow into a stop string, and (when parsing tool
    calls) whitespace or a ``<tool_call>`` prefix that may start a call. A token travels with the
    delta holding its first character; a stop string cuts the text, and tokens lying wholly inside
    the cut-off part are dropped. End-of-turn tokens produce no text and no logprobs entry.
    """

    def __init__(
        self, token_bytes: list[bytes], eos_ids: set[int], stops: list[str], parse_tools: bool
    ):
        self._token_bytes = token_bytes
        self._eos_ids = eos_ids
        self._stops = stops
        self._parse_tools = parse_tools
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._emitted = 0
        self._pending: list[tuple[int, TokenScore]] = []  # (first character, token)
        self._tool_start: int | None = None
        self.done = False

    def add(self, token: TokenScore) -> Delta | None:
        if self.done:
            raise RuntimeError("add() after the final delta")
        if token.id in self._eos_ids:
            return self._final("stop")
        start = len(self._text)
        data = self._token_bytes[token.id] if 0 <= token.id < len(self._token_bytes) else b""
        self._text += self._utf8.decode(data)
        self._pending.append((start, token))
        unsent = self._text[self._emitted:]
        if self._stops:
            hits = [i for i in (unsent.find(s) for s in self._stops) if i >= 0]
            if hits:
                return self._final("stop", cut=self._emitted + min(hits))
        limit = len(self._text) - (_held_back(unsent, self._stops) if self._stops else 0)
        if self._parse_tools:
            limit = min(limit, self._tool_limit())
        return self._emit(limit)

    def finish(self, reason: str = "length") -> Delta:
        """The last delta when generation ended without an end-of-turn token or stop string."""
        if self.done:
            raise RuntimeError("finish() after the final delta")
        return self._final(reason)

    def _tool_limit(self) -> int:
        if self._tool_start is None:
            found = self._text.find(TOOL_OPEN, self._emitted)
            if found >= 0:
                self._tool_start = found
        if self._tool_start is not None:
            limit = self._tool_start
        else:
            limit = len(self._text) - _held_back(self._text[self._emitted:], [TOOL_OPEN])
        # Whitespace before a call is not content: hold it until something else follows.
        while limit > self._emitted and self._text[limit - 1].isspace():
            limit -= 1
        return limit

    def _take_tokens(self, limit: int | None) -> list[TokenScore]:
        taken = [t for start, t in self._pending if limit is None or start < limit]
        self._pending = [(s, t) for s, t in self._pending if limit is not None and s >= limit]
        return taken

    def _emit(self, limit: int) -> Delta | None:
        limit = max(limit, self._emitted)
        text = self._text[self._emitted:limit]
        self._emitted = limit
        tokens = self._take_tokens(limit)
        return Delta(text, tokens) if text or tokens else None

    def _final(self, reason: str, cut: int | None = None) -> Delta:
        self.done = True
        if cut is None:
            self._text += self._utf8.decode(b"", final=True)
            end, tokens = len(self._text), self._take_tokens(None)
        else:
            end, tokens = cut, self._take_tokens(cut)
        text, tool_calls = self._text[self._emitted:end], None
        if self._tool_start is not None and self._tool_start < end and reason == "stop":
            tool_calls = parse_tool_calls(self._text[self._tool_start:end])
            if tool_calls:
                # Content is what precedes the first call, less trailing whitespace.
                text = self._text[self._emitted:self._tool_start].rstrip()
                reason = "tool_calls"
        self._emitted = end
        return Delta(text, tokens, reason, tool_calls)


# ---- tool calls ----

def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _JSON_SPACE:
        pos += 1
    return pos


def _object_members(text: str, pos: int) -> tuple[dict[str, tuple[object, int, int]], int] | None:
    """Parse the JSON object at ``pos``: {key: (value, value start, value end)} and its end, so
    a member's exact source text can be kept. None if it is not valid JSON or repeats a key."""
    if pos >= len(text) or text[pos] != "{":
        return None
    members: dict[str, tuple[object, int, int]] = {}
    pos = _skip_space(text, pos + 1)
    if pos < len(text) and text[pos] == "}":
        return members, pos + 1
    while True:
        try:
            key, pos = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        pos = _skip_space(text, pos)
        if not isinstance(key, str) or key in members or text[pos:pos + 1] != ":":
            return None
        start = _skip_space(text, pos + 1)
        try:
            value, end = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError:
            return None
        members[key] = (value, start, end)
        pos = _skip_space(text, end)
        if text[pos:pos + 1] == "}":
            return members, pos + 1
        if text[pos:pos + 1] != ",":
            return None
        pos = _skip_space(text, pos + 1)


def tool_call_id(index: int, name: str, arguments: str) -> str:
    """Deterministic, so the same seed gives the same response byte for byte."""
    digest = hashlib.sha256(f"{index}\n{name}\n{arguments}".encode()).hexdigest()
    return f"call_{digest[:24]}"


def parse_tool_calls(text: str) -> list[ToolCall] | None:
    """Parse ``text`` made only of ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
    blocks (whitespace around and between them allowed), as the ChatML/Qwen template renders them.

    ``arguments`` keeps the JSON text exactly as generated (an object), or the string's value when
    the model wrote the arguments as a JSON string. None when anything else is in the text, a
    block is not such an object, or there is no block.
    """
    calls: list[ToolCall] = []
    pos = 0
    while (pos := _skip_space(text, pos)) < len(text):
        if not text.startswith(TOOL_OPEN, pos):
            return None
        parsed = _object_members(text, _skip_space(text, pos + len(TOOL_OPEN)))
        if parsed is None:
            return None
        members, end = parsed
        pos = _skip_space(text, end)
        if not text.startswith(TOOL_CLOSE, pos):
            return None
        pos += len(TOOL_CLOSE)
        name = members.get("name", (None,))[0]
        if not isinstance(name, str) or not name or set(members) - {"name", "arguments"}:
            return None
        if "arguments" not in members:
            arguments = "{}"
        else:
            value, start, stop = members["arguments"]
            if isinstance(value, dict):
                arguments = text[start:stop]
            elif isinstance(value, str):
                arguments = value
            else:
                return None
        calls.append(ToolCall(tool_call_id(len(calls), name, arguments), name, arguments))
    return calls or None
