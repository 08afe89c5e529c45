"""Put a teacher's sparse top-k distributions onto the student's completion tokens.

Two ways, both ending in the same per-position rule (``carry``):

* **by id** (the teacher uses the student's tokenizer): when the teacher's sampled tokens spell
  exactly the rendered completion, the teacher's own token ids *become* the student's completion,
  even where they differ from the student tokenizer's canonical split of that text. The teacher's
  distribution at step ``j`` is conditioned on the teacher's tokens ``< j``; training the student
  on a re-tokenized sequence would pair each distribution with a prefix it was never computed
  for. The teacher sampled those ids from this very vocabulary, so they are a sequence the
  student can generate. Otherwise (the texts differ, or a token has no id) the record falls back
  to by text.
* **by text**: teacher token byte spans are mapped into the student completion's bytes through
  the equal regions of a byte diff (the template may re-render tool calls, the teacher may not
  report reasoning tokens, ...). A student token gets the teacher distribution only when one
  teacher token covers exactly its byte span; every other position is CE-only (``kd_mask`` 0).

At an aligned position the carried distribution holds each teacher alternative whose bytes are
exactly one student token, plus the sampled token itself (with its own logprob) when the top list
lacks it: it is the target, and its probability is known. The remaining mass
``1 − Σ exp(carried)`` is the tail bucket the loss adds implicitly. Alternatives whose bytes are
not one student token are not carried: their mass lands in the tail.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlx_distill.data.errors import UNDECODABLE, RecordError
from mlx_distill.data.textdiff import matching_blocks
from mlx_distill.data.vocab import REPLACEMENT_CHAR, TokenVocab, teacher_token_bytes

BY_ID = "id"
BY_TEXT = "text"
# OpenAI's spelling of a token that is part of a UTF-8 character: "bytes:\xe2\x80".
_BYTES_SPELLING = re.compile(r"^bytes:((?:\\x[0-9a-fA-F]{2})+)$")


@dataclass
class TeacherTargets:
    """Per completion token ``i`` (the student target at ``prompt_len - 1 + i``): carried ids
    and logprobs, highest first, padded with id 0 / ``-inf``; ``kd_mask[i]`` 1 where aligned."""

    top_ids: np.ndarray  # (n, K) int32
    top_logprobs: np.ndarray  # (n, K) float32
    kd_mask: np.ndarray  # (n,) float32
    method: str  # BY_ID or BY_TEXT

    @property
    def k(self) -> int:
        return self.top_ids.shape[1]

    @property
    def aligned(self) -> int:
        return int(self.kd_mask.sum())


def alternative_bytes(text: str) -> bytes | None:
    """Bytes of a top-list alternative (no ``bytes`` field there), or None when its text is
    lossy (a U+FFFD stands for bytes that are gone)."""
    match = _BYTES_SPELLING.match(text)
    if match:
        return bytes.fromhex(match.group(1).replace("\\x", ""))
    if REPLACEMENT_CHAR in text:
        return None
    return text.encode("utf-8")


def sampled_bytes(token: dict[str, Any]) -> bytes:
    raw = token.get("bytes")
    if raw is None:
        spelled = _BYTES_SPELLING.match(token["token"])
        if spelled:
            return bytes.fromhex(spelled.group(1).replace("\\x", ""))
    return teacher_token_bytes(token["token"], raw)


def carry(token: dict[str, Any], student_id: int, vocab: TokenVocab) -> list[tuple[int, float]]:
    """The teacher distribution at one aligned position, in student ids, highest first.

    ``student_id`` is the student target there (the sampled token's bytes spell it).
    Duplicates (two teacher spellings of one student token) are merged by adding probabilities;
    a total above 1 (rounded logprobs) is scaled down to 1 so the tail is never negative.
    """
    merged: dict[int, float] = {}

    def add(token_id: int, logprob: float) -> None:
        if not math.isfinite(logprob):
            return  # -inf: probability 0 carries nothing
        old = merged.get(token_id)
        merged[token_id] = logprob if old is None else float(np.logaddexp(old, logprob))

    sampled_text = token["token"]
    sampled_listed = False
    for text, logprob in token.get("top") or []:
        # The first entry spelled like the sampled token is it (even when that spelling is
        # lossy: its exact bytes are known); a lossy repeat is some other token.
        if text == sampled_text and not sampled_listed:
            token_id, sampled_listed = student_id, True
        else:
            data = alternative_bytes(text)
            token_id = vocab.id_of(data) if data else None
        if token_id is not None:
            add(token_id, float(logprob))
    if not sampled_listed:
        add(student_id, float(token["logprob"]))
    if not merged:
        return []
    total = math.log(sum(math.exp(lp) for lp in merged.values()))
    shift = total if total > 0 else 0.0
    return sorted(((i, lp - shift) for i, lp in merged.items()), key=lambda p: (-p[1], p[0]))


def _by_id(tokens: list[dict], completion_ids: list[int], vocab: TokenVocab):
    """(new completion ids, [(student index, teacher index)]) or None when by id does not apply."""
    teacher_ids = []
    for tok in tokens:
        token_id = vocab.id_of(sampled_bytes(tok))
        if token_id is None:
            return None
        teacher_ids.append(token_id)
    teacher_text = vocab.text_bytes(teacher_ids)
    rendered = vocab.text_bytes(completion_ids)
    pairs = [(j, j) for j in range(len(teacher_ids))]
    if teacher_text == rendered:
        return teacher_ids, pairs
    eot = completion_ids[-1]
    if teacher_text + vocab.bytes_of(eot) == rendered:
        # APIs often leave the end-of-turn token out of the logprobs: CE-only there.
        return teacher_ids + [eot], pairs
    return None


def _by_text(tokens: list[dict], completion_ids: list[int], vocab: TokenVocab):
    teacher_spans, pos, chunks = [], 0, []
    for tok in tokens:
        data = sampled_bytes(tok)
        chunks.append(data)
        teacher_spans.append((pos, pos + len(data)))
        pos += len(data)
    teacher_text = b"".join(chunks)
    student_spans = vocab.spans(completion_ids)
    student_at = {span: i for i, span in enumerate(student_spans) if span[1] > span[0]}
    blocks = matching_blocks(teacher_text, vocab.text_bytes(completion_ids))
    block_starts = [a for a, _, _ in blocks]
    pairs = []
    for j, (start, end) in enumerate(teacher_spans):
        if end == start:
            continue
        k = bisect_right(block_starts, start) - 1
        if k < 0:
            continue
        a, b, n = blocks[k]
        if end > a + n:
            continue  # the token crosses the edge of an equal region
        i = student_at.get((start - a + b, end - a + b))
        if i is not None:
            pairs.append((i, j))
    return pairs


def align_teacher(
    tokens: list[dict[str, Any]], completion_ids: list[int], vocab: TokenVocab, *, by_id: bool
) -> tuple[list[int], TeacherTargets]:
    """Align a record's teacher ``tokens`` (``KD_RECORD_FIELDS['tokens']``) to the student's
    rendered ``completion_ids`` (ending with the end-of-turn id).

    Returns the completion ids to train on (the teacher's own ids under by-id, else unchanged)
    and the carried distributions, one row per completion token.
    """
    method, result = BY_TEXT, None
    if by_id:
        result = _by_id(tokens, completion_ids, vocab)
    if result is not None:
        method, (completion_ids, pairs) = BY_ID, result
    else:
        pairs = _by_text(tokens, completion_ids, vocab)
    rows: dict[int, list[tuple[int, float]]] = {}
    for i, j in pairs:
        try:
            carried = carry(tokens[j], completion_ids[i], vocab)
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(UNDECODABLE, f"tokens[{j}]: {exc}") from None
        if carried:
            rows[i] = carried
    k = max((len(r) for r in rows.values()), default=1)
    n = len(completion_ids)
    top_ids = np.zeros((n, k), dtype=np.int32)
    top_logprobs = np.full((n, k), -np.inf, dtype=np.float32)
    kd_mask = np.zeros(n, dtype=np.float32)
    for i, carried in rows.items():
        top_ids[i, : len(carried)] = [t for t, _ in carried]
        top_logprobs[i, : len(carried)] = [lp for _, lp in carried]
        kd_mask[i] = 1.0
    return completion_ids, TeacherTargets(top_ids, top_logprobs, kd_mask, method)
