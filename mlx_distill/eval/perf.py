"""Performance figures of an eval run: time to first token, request latency percentiles and decode
speed, checked against a deployment role's targets (``configs/roles.yaml``).

A request is one generation call (a multi-turn sample makes several); the figures are the
runtime's own (``GenerationResult``: ``total_s``, ``ttft_s``, ``token_latencies_s``), so
templating and grammar setup count towards TTFT and latency. Percentiles interpolate linearly
between order statistics (numpy's default, Hyndman & Fan type 7). Decode speed counts the tokens
after the first over the time after the first token arrived: prefill is TTFT's business.
``decode_tps`` is the pooled rate (all decode tokens over all decode time); requests without
per-token timing (one token, or an endpoint that returns whole completions) are left out of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

PERCENTILES = (50, 95, 99)


@dataclass(frozen=True)
class RequestTiming:
    """One generation call: seconds to the end and to the first token (None where the backend
    cannot observe it, e.g. an endpoint that returns whole completions), and the decode phase:
    the tokens after the first and the seconds they took."""

    latency_s: float
    ttft_s: float | None
    decode_tokens: int
    decode_s: float
    completion_tokens: int
    prompt_tokens: int = 0


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation; None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside [0, 100]")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _distribution_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    ms = [s * 1000.0 for s in seconds]
    out: dict[str, float | None] = {f"p{q}": percentile(ms, q) for q in PERCENTILES}
    out["mean"] = sum(ms) / len(ms) if ms else None
    out["max"] = max(ms) if ms else None
    return out


def summarize(timings: Iterable[RequestTiming]) -> dict[str, Any]:
    """TTFT and latency distributions (ms), decode tokens/s and token counts."""
    timings = list(timings)
    decoding = [t for t in timings if t.decode_tokens > 0 and t.decode_s > 0]
    decode_tokens = sum(t.decode_tokens for t in decoding)
    decode_s = sum(t.decode_s for t in decoding)
    per_request = [t.decode_tokens / t.decode_s for t in decoding]
    return {
        "requests": len(timings),
        "ttft_ms": _distribution_ms([t.ttft_s for t in timings if t.ttft_s is not None]),
        "latency_ms": _distribution_ms([t.latency_s for t in timings]),
        "decode_tps": decode_tokens / decode_s if decode_s > 0 else None,
        "decode_tps_p50": percentile(per_request, 50),
        "prompt_tokens": sum(t.prompt_tokens for t in timings),
        "completion_tokens": sum(t.completion_tokens for t in timings),
    }


def latencies_ms(timings: Iterable[RequestTiming]) -> list[float]:
    return [t.latency_s * 1000.0 for t in timings]


def check_targets(summary: dict[str, Any], targets: Any, role: str) -> dict[str, Any]:
    """Each role target (``mlx_distill.roles.Targets``) against ``summary``: latency percentiles
    must be at most their target, decode speed at least its target; an unmeasured figure fails."""
    measured = {
        "latency_p50_ms": (summary["latency_ms"]["p50"], targets.latency_p50_ms, "max"),
        "latency_p95_ms": (summary["latency_ms"]["p95"], targets.latency_p95_ms, "max"),
        "decode_tps": (summary["decode_tps"], targets.decode_tps, "min"),
    }
    checks = []
    for metric, (value, target, bound) in measured.items():
        ok = value is not None and (value <= target if bound == "max" else value >= target)
        checks.append({"metric": metric, "value": value, "target": target, "bound": bound,
                       "ok": ok})
    return {"role": role, "checks": checks, "met": all(c["ok"] for c in checks)}
