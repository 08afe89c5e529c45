"""Compare an eval run with an earlier ``report.json`` and flag regressions.

Backends are paired by label; when neither run labelled a backend alike and both evaluated exactly
one, those two are paired. A quality metric (0-1 scale, higher is better) regresses when it drops
by more than ``quality_tolerance`` (absolute); a latency when it grows by more than
``perf_tolerance`` of the baseline (relative), decode speed when it falls by more than that.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mlx_distill.cli import UserError
from mlx_distill.eval.gates import BaselinePolicy

QUALITY_METRICS = ("lax_f1", "strict_f1", "strict_precision", "strict_recall", "exact_accuracy",
                   "json_validity", "privacy_ok_rate", "fixture_hit_rate",
                   "final_answer_accuracy", "accuracy")
LOWER_IS_BETTER = ("ttft_p50_ms", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms")
HIGHER_IS_BETTER = ("decode_tps",)


class BaselineError(UserError, ValueError):
    """An unreadable baseline report; the message names the file and field."""


def load_baseline(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BaselineError(f"{path}: baseline report not found") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BaselineError(f"{path}: not a JSON report ({exc})") from None
    backends = data.get("backends") if isinstance(data, dict) else None
    if not isinstance(backends, list) or not all(
            isinstance(b, dict) and isinstance(b.get("label"), str)
            and isinstance(b.get("metrics"), dict) for b in backends):
        raise BaselineError(f"{path}: backends: expected a list of {{label, metrics}} objects "
                            "(a report.json written by mlx-distill eval)")
    return data


def pair_backends(current: list[dict[str, Any]],
                  baseline: list[dict[str, Any]]) -> list[tuple[dict, dict]]:
    by_label = {b["label"]: b for b in baseline}
    pairs = [(c, by_label[c["label"]]) for c in current if c["label"] in by_label]
    if not pairs and len(current) == 1 and len(baseline) == 1:
        pairs = [(current[0], baseline[0])]
    return pairs


def _regression(metric: str, old: float, new: float, policy: BaselinePolicy) -> tuple[bool, str]:
    if metric in QUALITY_METRICS:
        return new < old - policy.quality_tolerance, f"-{policy.quality_tolerance:g} abs"
    if metric in LOWER_IS_BETTER:
        return new > old * (1 + policy.perf_tolerance), f"+{policy.perf_tolerance:.0%}"
    return new < old * (1 - policy.perf_tolerance), f"-{policy.perf_tolerance:.0%}"


def compare(current: list[dict[str, Any]], baseline: dict[str, Any], policy: BaselinePolicy,
            source: str = "") -> dict[str, Any]:
    """Every metric both runs measured, per paired backend, with ``regressed`` flags."""
    rows = []
    for now, then in pair_backends(current, baseline["backends"]):
        for metric in (*QUALITY_METRICS, *LOWER_IS_BETTER, *HIGHER_IS_BETTER):
            old, new = then["metrics"].get(metric), now["metrics"].get(metric)
            if not isinstance(old, int | float) or not isinstance(new, int | float):
                continue
            regressed, allowed = _regression(metric, float(old), float(new), policy)
            change = (new - old) / old if old else None
            rows.append({"backend": now["label"], "baseline_backend": then["label"],
                         "metric": metric, "baseline": old, "current": new,
                         "relative_change": change, "allowed": allowed,
                         "regressed": regressed})
    matched = {now["label"] for now, _ in pair_backends(current, baseline["backends"])}
    old_dataset = (baseline.get("fingerprints") or {}).get("dataset_sha256")
    return {
        "path": source,
        "policy": {"quality_tolerance": policy.quality_tolerance,
                   "perf_tolerance": policy.perf_tolerance, "fail": policy.fail},
        "unpaired": [c["label"] for c in current if c["label"] not in matched],
        "baseline_dataset_sha256": old_dataset,
        "comparisons": rows,
        "regressions": [r for r in rows if r["regressed"]],
    }
