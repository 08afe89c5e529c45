"""Shared by the local teacher server tests: the dense reference and HTTP/SSE helpers."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Weather in Zürich? 😀"},
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}}]


class Reference:
    """Logprobs from one full forward pass of the whole sequence: no KV cache, no sampling."""

    def __init__(self, forward, tokenizer):
        self.forward, self.tok = forward, tokenizer

    def prompt_ids(self, messages, tools=None) -> list[int]:
        return list(self.tok.apply_chat_template(messages, tools=tools,
                                                 add_generation_prompt=True))

    def rows(self, ids: list[int]) -> np.ndarray:
        """Row i: log-probabilities of the token after ids[:i + 1]."""
        logits = np.array(self.forward(mx.array(ids)[None])[0].astype(mx.float32), np.float64)
        top = logits.max(axis=-1, keepdims=True)
        return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))

    def token_bytes(self, token_id: int) -> bytes:
        """From the vocabulary piece through mlx-lm's GPT-2 byte decoder (added tokens: as is)."""
        from mlx_lm.tokenizer_utils import _byte_decoder

        piece = self.tok.convert_ids_to_tokens(int(token_id))
        if piece in self.tok.get_added_vocab():
            return piece.encode("utf-8")
        return bytes(_byte_decoder()[ch] for ch in piece)

    def token_text(self, token_id: int) -> str:
        data = self.token_bytes(token_id)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: OpenAI's spelling
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)
        assert text == self.tok.decode([int(token_id)])
        return text

    def check(self, rows: np.ndarray, entries: list[dict], k: int) -> None:
        assert len(rows) == len(entries)
        for row, entry in zip(rows, entries, strict=True):
            assert entry["logprob"] == pytest.approx(row[entry["id"]], abs=1e-4)
            top = entry["top_logprobs"]
            expected = np.argsort(-row, kind="stable")[:k]
            assert [t["id"] for t in top] == expected.tolist()
            assert [t["logprob"] for t in top] == pytest.approx(row[expected].tolist(), abs=1e-4)
            for item in (entry, *top):
                assert bytes(item["bytes"]) == self.token_bytes(item["id"])
                assert item["token"] == self.token_text(item["id"])


def stream_events(client, path, body) -> list[dict]:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def chat_from_stream(events: list[dict]) -> dict:
    """The streamed chunks folded into the fields of a plain response."""
    text, entries, finish, usage, calls = "", [], None, None, []
    for event in events:
        if not event["choices"]:
            usage = event["usage"]
            continue
        choice = event["choices"][0]
        text += choice["delta"].get("content") or ""
        calls += choice["delta"].get("tool_calls") or []
        entries += (choice["logprobs"] or {}).get("content") or []
        finish = choice["finish_reason"] or finish
    return {"content": text, "entries": entries, "finish": finish, "usage": usage, "calls": calls}


def post(client, path, body, status=200) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    return response.json()
