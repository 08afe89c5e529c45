"""Plain data shared by the teacher client, the KD generator, the cache and the server.

A ``Completion`` is what every teacher backend returns, whatever the wire format; a KD record
(one line of ``kd.jsonl``) is a ``Completion`` plus the request it answered and its provenance.
The record layout is versioned by ``KD_SCHEMA`` and documented field by field in
``KD_RECORD_FIELDS``.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

from mlx_distill.teacher.jsontext import dumps_canonical

# Bump when a KD record's layout changes incompatibly; readers refuse other versions.
KD_SCHEMA = "mlx-distill.kd/1"

KD_RECORD_FIELDS: dict[str, str] = {
    "schema": f"always {KD_SCHEMA!r}",
    "id": "the prompt's id from the prompts file (unique within a run)",
    "messages": "the chat messages sent to the teacher (OpenAI format), without its answer",
    "tools": "OpenAI tool definitions sent with the request, or null",
    "teacher": "{model, base_host, fingerprint}: who answered (fingerprint = server's "
    "system_fingerprint, or null)",
    "text": "the assistant message content ('' when the answer is only tool calls)",
    "reasoning": "reasoning_content of thinking models, or null",
    "tool_calls": "[{id, type: 'function', function: {name, arguments}}] (arguments: JSON text "
    "exactly as the teacher produced it)",
    "tokens": "per generated token {token, logprob, top: [[token, logprob], ...]} with top sorted "
    "by logprob, descending; null when the teacher returned no logprobs",
    "usage": "{prompt_tokens, completion_tokens, total_tokens, cached_tokens}",
    "cost_usd": "what this answer cost when it was first fetched (0 for nothing billed)",
    "finish_reason": "stop | length | tool_calls | content_filter | ...",
    "created": "unix time (float) the answer was first fetched",
}


def canonical_json(value: Any) -> str:
    """One spelling per value: sorted keys, no whitespace, UTF-8 kept (cache keys, checksums).
    Exactly ``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``."""
    return dumps_canonical(value)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class TokenLogprob:
    """One generated (or scored) token: its text, its logprob, and the top-k alternatives."""

    token: str
    logprob: float
    # (token, logprob) pairs sorted by logprob, highest first; may or may not contain ``token``.
    top: list[tuple[str, float]] = field(default_factory=list)
    # UTF-8 bytes of the token when the server sent them (a token can be part of a character).
    bytes: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "token": self.token,
            "logprob": self.logprob,
            "top": [[t, lp] for t, lp in self.top],
        }
        if self.bytes is not None:
            out["bytes"] = list(self.bytes)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenLogprob:
        return cls(
            token=data["token"],
            logprob=float(data["logprob"]),
            top=[(str(t), float(lp)) for t, lp in data.get("top") or []],
            bytes=data.get("bytes"),
        )


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text exactly as produced; parsing is the consumer's job

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToolCall:
        fn = data.get("function") or {}
        return cls(
            id=str(data.get("id") or ""), name=fn["name"], arguments=fn.get("arguments") or ""
        )


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # Prompt tokens served from the provider's context cache (billed at the cache-hit price).
    cached_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Usage:
        data = data or {}
        return cls(**{k: int(data.get(k) or 0) for k in cls.__dataclass_fields__})


@dataclass
class Completion:
    """A teacher's answer to one request, independent of wire format and streaming."""

    text: str = ""
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    tokens: list[TokenLogprob] | None = None
    model: str = ""
    system_fingerprint: str | None = None
    response_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "reasoning": self.reasoning,
            "tool_calls": [c.to_dict() for c in self.tool_calls],
            "finish_reason": self.finish_reason,
            "usage": self.usage.to_dict(),
            "tokens": None if self.tokens is None else [t.to_dict() for t in self.tokens],
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
            "response_id": self.response_id,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Completion:
        tokens = data.get("tokens")
        return cls(
            text=data.get("text") or "",
            reasoning=data.get("reasoning"),
            tool_calls=[ToolCall.from_dict(c) for c in data.get("tool_calls") or []],
            finish_reason=data.get("finish_reason"),
            usage=Usage.from_dict(data.get("usage")),
            tokens=None if tokens is None else [TokenLogprob.from_dict(t) for t in tokens],
            model=data.get("model") or "",
            system_fingerprint=data.get("system_fingerprint"),
            response_id=data.get("response_id"),
        )


@dataclass
class ChatRequest:
    """One chat-completions request, minus the model id (that comes from the teacher spec)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    # None: no logprobs requested. 0: sampled-token logprobs only. k > 0: also top-k alternatives.
    top_logprobs: int | None = None
    # Other OpenAI-compatible body fields passed through verbatim (e.g. tool_choice).
    extra: dict[str, Any] = field(default_factory=dict)

    def sampling(self) -> dict[str, Any]:
        """Fields that change the answer (besides model, messages, tools); part of the cache key."""
        out = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
            "top_logprobs": self.top_logprobs,
        }
        out.update(self.extra)
        return out

    def body(self, model: str, stream: bool = False) -> dict[str, Any]:
        """The JSON body for ``POST {base_url}/chat/completions``."""
        body: dict[str, Any] = {"model": model, "messages": self.messages, "stream": stream}
        if self.tools:
            body["tools"] = self.tools
        body["max_tokens"] = self.max_tokens
        body["temperature"] = self.temperature
        body["top_p"] = self.top_p
        if self.seed is not None:
            body["seed"] = self.seed
        if self.stop:
            body["stop"] = self.stop
        if self.top_logprobs is not None:
            body["logprobs"] = True
            if self.top_logprobs > 0:
                body["top_logprobs"] = self.top_logprobs
        if stream:
            body["stream_options"] = {"include_usage": True}
        body.update(self.extra)
        return body

    def cache_key(self, model: str, teacher_fingerprint: str, cache_schema: int) -> str:
        """sha256 of the canonical request: same key ⇔ same question to the same teacher."""
        return sha256_text(
            canonical_json(
                {
                    "cache_schema": cache_schema,
                    "teacher": teacher_fingerprint,
                    "model": model,
                    "messages": self.messages,
                    "tools": self.tools or None,
                    "sampling": self.sampling(),
                }
            )
        )
