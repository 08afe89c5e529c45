"""Token bytes of a byte-level BPE vocabulary, in both directions, and a vocabulary fingerprint.

Alignment works on bytes, not strings: a byte-level token can be part of a UTF-8 character, so
its text is lossy while its bytes are exact.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from mlx_distill.data.errors import DataError

REPLACEMENT_CHAR = "\ufffd"


class TokenVocab:
    """``bytes_of(id)`` and ``id_of(bytes)`` for one tokenizer (an mlx-lm wrapper or HF tokenizer).

    When several ids spell the same bytes, ``id_of`` prefers the added (special) token: a teacher
    that emitted ``<|im_end|>`` emitted the special token, not the characters.
    """

    def __init__(self, tokenizer: Any):
        from mlx_distill.tokenizer import _is_byte_level, _token_bytes_table

        if not _is_byte_level(tokenizer):
            name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
            raise DataError(
                f"{name}: not a byte-level BPE tokenizer; token byte spans (needed to align "
                "teacher tokens and find tool-call spans) are only exact for byte-level BPE"
            )
        self.tokenizer = tokenizer
        self.table: list[bytes] = _token_bytes_table(tokenizer)
        added = set(tokenizer.get_added_vocab().values())
        self._ids: dict[bytes, int] = {}
        # Regular tokens first, added tokens last so they win on equal bytes.
        for token_id in sorted(range(len(self.table)), key=lambda i: (i in added, i)):
            if self.table[token_id]:
                self._ids[self.table[token_id]] = token_id
        self.eos_ids: frozenset[int] = frozenset(_eos_ids(tokenizer))
        self.pad_id: int = _pad_id(tokenizer)

    def bytes_of(self, token_id: int) -> bytes:
        # Ids past the tokenizer's vocabulary (a padded model vocab) decode to nothing.
        return self.table[token_id] if 0 <= token_id < len(self.table) else b""

    def id_of(self, data: bytes) -> int | None:
        return self._ids.get(data)

    def text_bytes(self, ids) -> bytes:
        return b"".join(self.bytes_of(int(i)) for i in ids)

    def spans(self, ids) -> list[tuple[int, int]]:
        """Byte span ``[start, end)`` of every token in the concatenated text of ``ids``."""
        out, pos = [], 0
        for token_id in ids:
            end = pos + len(self.bytes_of(int(token_id)))
            out.append((pos, end))
            pos = end
        return out

    def fingerprint(self) -> str:
        return tokenizer_fingerprint(self.tokenizer)


def _eos_ids(tokenizer: Any) -> set[int]:
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids:
        return {int(i) for i in ids}
    eos = getattr(tokenizer, "eos_token_id", None)
    return set() if eos is None else {int(eos)}


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return 0 if pad is None else int(pad)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the vocabulary (piece → id, added tokens included): equal ⇔ same token ids."""
    vocab = sorted(tokenizer.get_vocab().items())
    added = sorted(tokenizer.get_added_vocab().items())
    payload = json.dumps({"vocab": vocab, "added": added}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def teacher_token_bytes(token: str, raw: list[int] | None) -> bytes:
    """Exact bytes of a teacher token: its ``bytes`` field when present, else its UTF-8 text."""
    if raw is not None:
        return bytes(raw)
    return token.encode("utf-8")
