"""Errors and the bad-record ledger: every record that is not used is counted under a reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from mlx_distill.cli import UserError

# Reasons a record is not used; each is counted and reported, none is dropped silently.
INVALID_JSON = "invalid JSON"
MISSING_FIELD = "missing field"
WRONG_SCHEMA = "wrong schema version"
INVALID_FIELD = "invalid field"
EMPTY_COMPLETION = "empty completion"
UNDECODABLE = "undecodable"
DUPLICATE_ID = "duplicate id"
BAD_REASONS = (INVALID_JSON, MISSING_FIELD, WRONG_SCHEMA, INVALID_FIELD, EMPTY_COMPLETION,
               UNDECODABLE, DUPLICATE_ID)
# How many example messages are kept per reason for the report.
EXAMPLES_PER_REASON = 3


class DataError(UserError, ValueError):
    """Bad training data or options; the message names the file/record and what is expected."""


class RecordError(ValueError):
    """One record cannot be used; ``reason`` is one of ``BAD_REASONS``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class BadRecords:
    """Counts per reason, plus the first few ``where: detail`` messages of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str, detail: str) -> None:
        self.counts[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < EXAMPLES_PER_REASON:
            kept.append(f"{where}: {detail}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{reason}: {n}" for reason, n in self.counts.most_common())

    def lines(self) -> list[str]:
        out = []
        for reason, n in self.counts.most_common():
            out.append(f"  {reason}: {n}")
            out.extend(f"    e.g. {message}" for message in self.examples.get(reason, []))
        return out


def check_bad_fraction(bad: BadRecords, total: int, max_bad_fraction: float, source: str) -> None:
    """Stop (``DataError``) when more than ``max_bad_fraction`` of ``total`` records are bad."""
    if total == 0:
        raise DataError(f"{source}: no records")
    if bad.total > max_bad_fraction * total:
        first = next(iter(bad.examples.values()))[0]
        raise DataError(
            f"{source}: {bad.total} of {total} records are bad ({bad.total / total:.1%} > "
            f"max_bad_fraction "
            f"{max_bad_fraction:g}): {bad.summary()}; first: {first}"
        )
