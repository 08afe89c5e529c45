"""What the fake teacher answers (a pure function of the request body) and its wire formatting."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from typing import Any

VOCAB = (
    "the", "teacher", "student", "weather", "in", "Zürich", "is", "sunny", "rain", "naïve",
    "model", "token", "日本", "😀", "data", "tool", "answer", "cat", "42", "{", "}", "über", "ok",
    "distill", "logit", "GQA", "café", "x", "of", "and",
)  # fmt: skip
ANSWER_KEYS_IGNORED = ("model", "stream", "stream_options")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


class Answer:
    """What the fake teacher 'generated' for one body, before wire formatting."""

    def __init__(self, body: dict[str, Any], model: str, completions: bool):
        digest = hashlib.sha256(
            _canonical({k: v for k, v in body.items() if k not in ANSWER_KEYS_IGNORED}).encode()
        ).hexdigest()
        rng = random.Random(int(digest, 16))
        self.id = ("cmpl-" if completions else "chatcmpl-") + digest[:20]
        max_tokens = int(body.get("max_tokens") or (16 if completions else 512))
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        if completions:
            k = body.get("logprobs")
            self.top_k = None if k is None else int(k)
        else:
            self.top_k = int(body.get("top_logprobs") or 0) if body.get("logprobs") else None

        self.reasoning: str | None = None
        n_reasoning = 0
        if "thinking" in model and not completions:
            n_reasoning = min(rng.randint(2, 5), max_tokens - 1)
            self.reasoning = " ".join(rng.choice(VOCAB) for _ in range(n_reasoning)) or None
        budget = max_tokens - n_reasoning

        self.tool_call: dict[str, Any] | None = None
        tools = body.get("tools") or []
        users = [m for m in body.get("messages") or [] if m.get("role") == "user"]
        wants_tool = bool(users) and "tool" in _text_of(users[-1].get("content")).lower()
        self.tokens: list[tuple[str, float, list[tuple[str, float]]]] = []
        if tools and wants_tool and not completions:
            fn = tools[rng.randrange(len(tools))]["function"]
            props = (fn.get("parameters") or {}).get("properties") or {}
            args = {name: self._argument(rng, spec) for name, spec in sorted(props.items())}
            arguments = json.dumps(args, ensure_ascii=False)
            self.tool_call = {"id": "call_" + digest[20:32], "name": fn["name"],
                              "arguments": arguments}
            self.finish_reason = "tool_calls"
            n_content = len(arguments) // 4 + 3
        else:
            self.finish_reason = "stop"
            words = [rng.choice(VOCAB) for _ in range(rng.randint(3, 12))]
            for i, word in enumerate(words):
                if len(self.tokens) >= budget:
                    self.finish_reason = "length"
                    break
                if word in stops:
                    break
                text = word if i == 0 else " " + word
                self.tokens.append((text, *self._logprobs(rng, text)))
            n_content = len(self.tokens)
        self.text = "".join(t for t, _, _ in self.tokens)

        self.prompt: list[tuple[str, float | None, list[tuple[str, float]] | None]] = []
        if completions:
            prompt = body.get("prompt") or ""
            prompt = prompt[0] if isinstance(prompt, list) else prompt
            if body.get("echo"):
                for i, piece in enumerate(re.findall(r"\s*\S+|\s+", str(prompt))):
                    if i == 0:
                        self.prompt.append((piece, None, None))
                    else:
                        lp, top = self._logprobs(rng, piece)
                        self.prompt.append((piece, lp, top))
            prompt_tokens = len(str(prompt).split()) + 1
        else:
            prompt_tokens = sum(
                len(_text_of(m.get("content")).split()) + 4 for m in body.get("messages") or []
            ) + len(_canonical(tools)) // 8 * bool(tools)
        self.usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n_content + n_reasoning,
            "total_tokens": prompt_tokens + n_content + n_reasoning,
            "prompt_tokens_details": {"cached_tokens": prompt_tokens // 2 if rng.random() < 0.5
                                      else 0},
        }

    @staticmethod
    def _argument(rng: random.Random, spec: dict[str, Any]) -> Any:
        kind = spec.get("type")
        if kind in ("integer", "number"):
            return rng.randint(0, 100)
        if kind == "boolean":
            return rng.random() < 0.5
        return rng.choice(VOCAB)

    def _logprobs(self, rng: random.Random, token: str) -> tuple[float, list[tuple[str, float]]]:
        """The token's logprob and its top-k alternatives (it among them), in unsorted order."""
        k = self.top_k or 0
        weights = [rng.random() ** 2 + 0.01 for _ in range(max(k, 1) + 1)]
        total = sum(weights)
        logprob = math.log(weights[0] / total)
        if k == 0:
            return logprob, []
        others = [w for w in VOCAB if w != token.strip()]
        rng.shuffle(others)
        top = [(token, logprob)] + [
            (" " + others[i % len(others)] + "·" * (i // len(others)), math.log(w / total))
            for i, w in enumerate(weights[1:k])
        ]
        rng.shuffle(top)
        if len(top) >= 2 and all(top[i][1] >= top[i + 1][1] for i in range(len(top) - 1)):
            top[0], top[-1] = top[-1], top[0]  # sorted by chance: make sure the client must sort
        return logprob, top


def _token_entry(token: str, logprob: float, top: list[tuple[str, float]]) -> dict[str, Any]:
    return {
        "token": token, "logprob": logprob, "bytes": list(token.encode()),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top],
    }


class Renderer:
    """Wire formatting of an ``Answer``: chat/completions, non-streamed body or SSE events."""

    def __init__(self, answer: Answer, model: str, fingerprint: str):
        self.a = answer
        self.head = {"id": answer.id, "created": 1_700_000_000, "model": model,
                     "system_fingerprint": fingerprint}

    def chat_body(self) -> dict[str, Any]:
        a = self.a
        message: dict[str, Any] = {"role": "assistant", "content": a.text or None}
        if a.reasoning is not None:
            message["reasoning_content"] = a.reasoning
        if a.tool_call:
            message["tool_calls"] = [{"id": a.tool_call["id"], "type": "function", "function": {
                "name": a.tool_call["name"], "arguments": a.tool_call["arguments"]}}]
        logprobs = None
        if a.top_k is not None and not a.tool_call:
            logprobs = {"content": [_token_entry(*t) for t in a.tokens]}
        choice = {"index": 0, "message": message, "logprobs": logprobs,
                  "finish_reason": a.finish_reason}
        return {**self.head, "object": "chat.completion", "choices": [choice], "usage": a.usage}

    def chat_events(self, include_usage: bool) -> list[dict[str, Any]]:
        a = self.a

        def chunk(delta: dict[str, Any], logprobs=None, finish=None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {**self.head, "object": "chat.completion.chunk", "choices": [choice]}

        events = [chunk({"role": "assistant", "content": ""})]
        if a.reasoning:
            words = a.reasoning.split(" ")
            events += [chunk({"reasoning_content": (" " if i else "") + w})
                       for i, w in enumerate(words)]
        if a.tool_call:
            call = a.tool_call
            events.append(chunk({"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                                 "function": {"name": call["name"],
                                                              "arguments": ""}}]}))
            args = call["arguments"]
            cuts = sorted({0, len(args), len(args) // 3, 2 * len(args) // 3})
            events += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[i:j]}}]})
                       for i, j in zip(cuts, cuts[1:], strict=False)]
        # Group tokens 1, 2, 3, 1, 2, 3, ... per chunk so multi-entry logprob lists occur too.
        i, size = 0, 1
        while i < len(a.tokens):
            group = a.tokens[i:i + size]
            logprobs = None
            if a.top_k is not None:
                logprobs = {"content": [_token_entry(*t) for t in group]}
            events.append(chunk({"content": "".join(t for t, _, _ in group)}, logprobs))
            i, size = i + size, size % 3 + 1
        events.append(chunk({}, finish=a.finish_reason))
        if include_usage:
            events.append({**self.head, "object": "chat.completion.chunk", "choices": [],
                           "usage": a.usage})
        return events

    def _legacy_logprobs(self, tokens) -> dict[str, Any] | None:
        if self.a.top_k is None:
            return None
        return {
            "tokens": [t for t, _, _ in tokens],
            "token_logprobs": [lp for _, lp, _ in tokens],
            "top_logprobs": [None if top is None else dict(top) for _, _, top in tokens],
        }

    def completions_body(self) -> dict[str, Any]:
        a = self.a
        tokens = a.prompt + a.tokens
        choice = {"index": 0, "text": "".join(t for t, _, _ in tokens),
                  "logprobs": self._legacy_logprobs(tokens), "finish_reason": a.finish_reason}
        return {**self.head, "object": "text_completion", "choices": [choice], "usage": a.usage}

    def completions_events(self, include_usage: bool) -> list[dict[str, Any]]:
        a = self.a
        events = []
        for group in [a.prompt, *[[t] for t in a.tokens]]:
            if group:
                choice = {"index": 0, "text": "".join(t for t, _, _ in group),
                          "logprobs": self._legacy_logprobs(group), "finish_reason": None}
                events.append({**self.head, "object": "text_completion", "choices": [choice]})
        events.append({**self.head, "object": "text_completion", "choices": [
            {"index": 0, "text": "", "logprobs": None, "finish_reason": a.finish_reason}]})
        if include_usage:
            events.append({**self.head, "object": "text_completion", "choices": [],
                           "usage": a.usage})
        return events
