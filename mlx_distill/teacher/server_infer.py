"""The local teacher server's model side: one checkpoint in memory, sampling with per-token
logprobs, and prompt scoring.

Every logprob here is ``log_softmax`` of the model's raw float32 logits (temperature 1, no top-p):
the model's own distribution, whatever temperature/top-p the sampler used. ``Engine`` serializes
all model work with one lock (MLX is not re-entrant for one model).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_distill.checkpoint import (
    META_FILE,
    CheckpointError,
    load_checkpoint,
    sha256_file,
)
from mlx_distill.tokenizer import _is_byte_level, _token_bytes_table, load_tokenizer

# Rows of logits scored per forward pass: bounds memory at SCORE_CHUNK × vocab floats.
SCORE_CHUNK = 256
PREFILL_CHUNK = 2048
_SPM_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass
class TokenScore:
    """One token's logprob under the model, with the ``top`` most likely alternatives
    (token id, logprob), highest first; ``rank`` (1 = most likely) when asked for."""

    id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    top_logprobs: int = 0


def weights_fingerprint(model_dir: Path) -> str:
    """``fp_`` + the first 16 hex digits of the weights' sha256 (recorded or computed)."""
    meta_path = model_dir / META_FILE
    digest = None
    if meta_path.exists():
        try:
            digest = json.loads(meta_path.read_text(encoding="utf-8")).get("weights_sha256")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            digest = None
    if not digest:
        files = sorted(model_dir.glob("model*.safetensors"))
        if len(files) == 1:
            digest = sha256_file(files[0])
        else:  # sharded: hash of the shards' hashes, in name order
            joined = "".join(f"{p.name}:{sha256_file(p)}\n" for p in files)
            digest = hashlib.sha256(joined.encode()).hexdigest()
    return f"fp_{digest[:16]}"


def _spm_bytes_table(tokenizer: Any, size: int) -> list[bytes]:
    """Token bytes for SentencePiece-style vocabularies (``▁`` for space, ``<0xNN>`` bytes)."""
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    table = []
    for piece in tokenizer.convert_ids_to_tokens(list(range(size))):
        piece = piece or ""
        match = _SPM_BYTE.match(piece)
        if match and piece not in special:
            table.append(bytes([int(match.group(1), 16)]))
        else:
            table.append(piece.replace("\u2581", " ").encode("utf-8"))
    return table


def token_text(data: bytes) -> str:
    """A token's text: its UTF-8 decode, or OpenAI's ``bytes:\\xNN…`` spelling when the token is
    part of a character (the exact bytes are always in the ``bytes`` field too)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def _sample(logits: mx.array, temperature: float, top_p: float, key: mx.array) -> mx.array:
    if temperature == 0:
        return mx.argmax(logits, axis=-1)
    scaled = logits / temperature
    if top_p < 1.0:
        # Nucleus: keep the most likely tokens until their tempered probability reaches top_p
        # (always at least one), as OpenAI and mlx-lm define it.
        probs = mx.softmax(scaled, axis=-1)
        ordered = mx.sort(probs)[::-1]
        before = mx.cumsum(ordered) - ordered
        n_keep = mx.maximum(mx.sum(before < top_p), 1)
        threshold = mx.take(ordered, n_keep - 1)
        scaled = mx.where(probs >= threshold, scaled, -mx.inf)
    return mx.random.categorical(scaled, key=key)


def _top(logprobs: mx.array, k: int) -> tuple[mx.array, mx.array]:
    ids = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., :k]
    return ids, mx.take_along_axis(logprobs, ids, axis=-1)


def _sorted_top(ids: list[int], values: list[float]) -> list[tuple[int, float]]:
    # Highest first; equal logprobs in id order, so the order never depends on the partition.
    return sorted(zip(ids, values, strict=True), key=lambda pair: (-pair[1], pair[0]))


class Engine:
    """A checkpoint (ours or mlx-lm's) and its tokenizer, ready to sample and score."""

    def __init__(self, model_dir: str | Path, model_id: str | None = None):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"{self.model_dir}: not a checkpoint directory")
        self.model = load_checkpoint(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.model_id = model_id or self.model_dir.resolve().name
        self.fingerprint = weights_fingerprint(self.model_dir)
        self.context_length = self.model.config.max_seq_len
        self.vocab_size = self.model.config.vocab_size
        self.eos_ids = set(getattr(self.tokenizer, "eos_token_ids", None) or [])
        if _is_byte_level(self.tokenizer):
            table = _token_bytes_table(self.tokenizer)
        else:
            table = _spm_bytes_table(self.tokenizer, len(self.tokenizer))
        # Ids past the tokenizer's vocabulary (a padded embedding) decode to nothing.
        self.token_bytes = table + [b""] * max(0, self.vocab_size - len(table))
        self._texts: dict[int, str] = {}
        self.lock = threading.Lock()

    # ---- tokens ----

    def text_of(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = token_text(self.token_bytes[token_id])
        return text

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render_chat(self, messages: list[dict], tools: list[dict] | None) -> str:
        """The templated prompt text, ending with the assistant turn's opening."""
        return self.tokenizer.apply_chat_template(
            messages, tools=tools or None, add_generation_prompt=True, tokenize=False
        )

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``special``: let the tokenizer add its BOS/EOS (raw prompts)."""
        return list(self.tokenizer.encode(text, add_special_tokens=special))

    def encode_prompt(self, text: str) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token", None)
        # As mlx-lm: add the tokenizer's special tokens unless the text already starts with BOS.
        return self.encode(text, special=bos is None or not text.startswith(bos))

    # ---- model ----

    def generate(self, ids: list[int], sampling: Sampling) -> Iterator[TokenScore]:
        """Sample up to ``max_tokens`` tokens after ``ids`` (stops after an eos token).

        Holds the model lock until the iterator is exhausted or closed. The same ``seed`` gives
        the same tokens: each step draws from its own key split off ``mx.random.key(seed)``.
        """
        with self.lock:
            if sampling.max_tokens <= 0:
                return
            yield from self._generate(ids, sampling)

    def _generate(self, ids: list[int], sampling: Sampling) -> Iterator[TokenScore]:
        model, k = self.model, min(sampling.top_logprobs, self.vocab_size)
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(64)
        key = mx.random.key(seed % (1 << 64))
        cache = model.make_cache()

        def step(tokens: mx.array, step_key: mx.array) -> list[mx.array]:
            logits = model(tokens[None], cache)[0, -1].astype(mx.float32)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            token = _sample(logits, sampling.temperature, sampling.top_p, step_key)
            out = [token, logprobs[token]]
            if k:
                out.extend(_top(logprobs, k))
            return out

        prompt = mx.array(ids)
        # Prefill all but the last prompt token: only the cache is evaluated, never the logits.
        while prompt.size > 1:
            chunk = prompt[: min(PREFILL_CHUNK, prompt.size - 1)]
            model(chunk[None], cache)
            mx.eval([c.state for c in cache])
            prompt = prompt[chunk.size:]
        key, sub = mx.random.split(key)
        current = step(prompt, sub)
        mx.async_eval(current)
        for n in range(1, sampling.max_tokens + 1):
            upcoming = None
            if n < sampling.max_tokens:
                # Build token n+1's graph before reading token n back (as mlx_lm.generate).
                key, sub = mx.random.split(key)
                upcoming = step(current[0][None], sub)
                mx.async_eval(upcoming)
            token = int(current[0].item())
            top = _sorted_top(current[2].tolist(), current[3].tolist()) if k else []
            yield TokenScore(token, float(current[1].item()), top)
            if token in self.eos_ids or upcoming is None:
                return
            current = upcoming

    def score(
        self, ids: list[int], start: int, top_k: int = 0, rank: bool = False
    ) -> list[TokenScore]:
        """Logprob of each ``ids[p]`` given ``ids[:p]`` for ``start <= p < len(ids)``
        (``start >= 1``: the first token has no context), with its top-k alternatives."""
        if start < 1:
            raise ValueError("start: the first token has no logprob; start at 1 or later")
        with self.lock:
            return self._score(ids, start, min(top_k, self.vocab_size), rank)

    def _score(self, ids: list[int], start: int, k: int, rank: bool) -> list[TokenScore]:
        cache = self.model.make_cache()
        tokens = mx.array(ids)
        out: list[TokenScore] = []
        # Logits row a predicts ids[a + 1]: rows start-1 .. len-2 are needed.
        for begin in range(0, len(ids) - 1, SCORE_CHUNK):
            end = min(begin + SCORE_CHUNK, len(ids) - 1)
            logits = self.model(tokens[begin:end][None], cache)[0]
            first = max(start - 1, begin)
            if first >= end:
                mx.eval([c.state for c in cache])
                continue
            rows = logits[first - begin:].astype(mx.float32)
            logprobs = rows - mx.logsumexp(rows, axis=-1, keepdims=True)
            targets = tokens[first + 1:end + 1]
            chosen = mx.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
            arrays = [chosen]
            if rank:
                arrays.append(mx.sum(logprobs > chosen[:, None], axis=-1) + 1)
            if k:
                arrays.extend(_top(logprobs, k))
            mx.eval(arrays, [c.state for c in cache])
            chosen_list = chosen.tolist()
            ranks = arrays[1].tolist() if rank else None
            tops = (arrays[-2].tolist(), arrays[-1].tolist()) if k else None
            for i, target in enumerate(ids[first + 1:end + 1]):
                out.append(TokenScore(
                    target, chosen_list[i],
                    _sorted_top(tops[0][i], tops[1][i]) if tops else [],
                    ranks[i] if ranks else None,
                ))
        return out
