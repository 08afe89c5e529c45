"""Equal regions of two byte strings (the teacher's raw text and the student's rendered completion).

``difflib.SequenceMatcher`` on raw bytes is slow on long texts and, with its default ``autojunk``,
ignores every frequent byte (spaces, common letters), so matching is done in three stages: common
prefix and suffix, then a line-level diff, then a byte-level diff only inside the lines that
differ.
"""

from __future__ import annotations

from difflib import SequenceMatcher

Block = tuple[int, int, int]  # (start in a, start in b, length): a[i:i+n] == b[j:j+n]


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n
    # Binary search on slice equality: C-speed comparisons instead of a Python loop per byte.
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _byte_blocks(a: bytes, b: bytes, a0: int, b0: int) -> list[Block]:
    matcher = SequenceMatcher(None, a, b, autojunk=False)
    return [(a0 + i, b0 + j, n) for i, j, n in matcher.get_matching_blocks() if n]


def _line_blocks(a: bytes, b: bytes, a0: int, b0: int) -> list[Block]:
    lines_a, lines_b = a.splitlines(keepends=True), b.splitlines(keepends=True)
    starts_a = _starts(lines_a)
    starts_b = _starts(lines_b)
    blocks: list[Block] = []
    matcher = SequenceMatcher(None, lines_a, lines_b, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        sa, ea, sb, eb = starts_a[i1], starts_a[i2], starts_b[j1], starts_b[j2]
        if op == "equal":
            blocks.append((a0 + sa, b0 + sb, ea - sa))
        elif op == "replace":
            blocks.extend(_byte_blocks(a[sa:ea], b[sb:eb], a0 + sa, b0 + sb))
    return blocks


def _starts(lines: list[bytes]) -> list[int]:
    out, pos = [0], 0
    for line in lines:
        pos += len(line)
        out.append(pos)
    return out


def _merge(blocks: list[Block]) -> list[Block]:
    merged: list[Block] = []
    for i, j, n in blocks:
        if n <= 0:
            continue
        if merged and merged[-1][0] + merged[-1][2] == i and merged[-1][1] + merged[-1][2] == j:
            pi, pj, pn = merged[-1]
            merged[-1] = (pi, pj, pn + n)
        else:
            merged.append((i, j, n))
    return merged


def matching_blocks(a: bytes, b: bytes) -> list[Block]:
    """Equal regions ``(i, j, n)`` with ``a[i:i+n] == b[j:j+n]``, increasing in both ``i`` and
    ``j`` and non-overlapping; adjacent regions are merged."""
    if a == b:
        return [(0, 0, len(a))] if a else []
    prefix = _common_prefix(a, b)
    rest_a, rest_b = a[prefix:], b[prefix:]
    suffix = _common_prefix(rest_a[::-1], rest_b[::-1])
    mid_a = rest_a[: len(rest_a) - suffix]
    mid_b = rest_b[: len(rest_b) - suffix]
    blocks: list[Block] = [(0, 0, prefix)]
    if mid_a and mid_b:
        blocks.extend(_line_blocks(mid_a, mid_b, prefix, prefix))
    blocks.append((len(a) - suffix, len(b) - suffix, suffix))
    return _merge(blocks)
