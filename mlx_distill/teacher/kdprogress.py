"""Progress bar, end-of-run summary and secret redaction for ``teacher generate``."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mlx_distill.teacher.errors import redact

# The postfix (hits, failures, USD) is re-rendered at most this often.
_POSTFIX_EVERY_S = 0.25


def redactor(spec: Any) -> Callable[[str], str]:
    """Removes the API key's value from text (server messages can echo a key back)."""
    name = getattr(spec, "api_key_env", None)
    secret = os.environ.get(name, "").strip() if name else ""
    return lambda text: redact(text, secret or None)


class Progress:
    """tqdm bar: done/total, rate and ETA, plus cache hits, failures and USD spent."""

    def __init__(self, total: int, initial: int, enabled: bool | None, budget: Any) -> None:
        self.budget = budget
        self.hits = 0
        self.failed = 0
        self._shown = 0.0
        self.bar = tqdm(
            total=total, initial=initial, unit="rec", file=sys.stderr, dynamic_ncols=True,
            smoothing=0.05, disable=None if enabled is None else not enabled,
            desc="teacher generate",
        )
        self._postfix(force=True)

    def _postfix(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._shown >= _POSTFIX_EVERY_S:
            self._shown = now
            self.bar.set_postfix_str(
                f"hits={self.hits} failed={self.failed} spent=${self.budget.spent:.4f}",
                refresh=force,
            )

    def advance(self, hit: bool = False, failed: bool = False) -> None:
        self.hits += hit
        self.failed += failed
        self._postfix()
        self.bar.update(1)

    def note(self, message: str) -> None:
        self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self._postfix(force=True)
        self.bar.close()


def format_summary(result: Any, out: Path) -> str:
    cap = "no cap" if result.budget_usd is None else f"cap ${result.budget_usd:.4f}"
    failures = ", ".join(f"{k}: {v}" for k, v in sorted(result.failures.items())) or "none"
    lines = [
        f"records: {result.records}/{result.total} in {out} (+{result.new_records} this run); "
        f"cache hits {result.cache_hits}, misses {result.cache_misses}",
        f"failures this run: {failures}; failed prompts outstanding: {len(result.failed_ids)}",
        f"spent ${result.spent_usd:.4f} ({cap}, reserved ${result.reserved_usd:.4f}); "
        f"wall {result.wall_s:.1f} s",
    ]
    left = result.total - result.records
    if result.stop_reason == "budget":
        lines.append(f"stopped: the next request's worst-case cost does not fit the budget; "
                     f"{left} prompts left. Raise --budget-usd and rerun with --resume")
    elif result.stop_reason == "failure_limit":
        lines.append(f"stopped: failures exceeded --failure-limit; {left} prompts left "
                     f"(see {out.name}.failed.jsonl); fix the cause and rerun with --resume")
    elif result.stop_reason == "interrupted":
        lines.append(f"interrupted: {left} prompts left; rerun with --resume to continue")
    elif result.failed_ids:
        lines.append(f"{len(result.failed_ids)} prompt(s) failed (see {out.name}.failed.jsonl); "
                     "rerun with --resume to retry them")
    return "\n".join(lines)
