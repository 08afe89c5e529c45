"""Quality metrics of a backend's eval run, and the flat headline metrics gates and baselines
read.

Tool-call scoring (:mod:`.scoring`) judges the first assistant turn: the calls a sample asks for.
Multi-turn samples (those with gold ``turns``) are also followed past the tool results; their
final answer is compared with the gold one as text, surrounding whitespace ignored. Privacy checks
every output against everything the model was shown: the prompt messages, the tool definitions
and the tool results fed back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlx_distill.eval.privacy import privacy_ok
from mlx_distill.eval.records import SampleRun
from mlx_distill.eval.scoring import score_dataset
from mlx_distill.tasks import eightball
from mlx_distill.teacher.types import canonical_json

# Samples whose privacy findings are listed in the report (the counts cover all of them).
MAX_LISTED_FAILURES = 20


def input_texts(sample: dict[str, Any], run: SampleRun) -> list[str]:
    texts = [m["content"] for m in sample["messages"] if isinstance(m.get("content"), str)]
    if sample.get("tools"):
        texts.append(canonical_json(sample["tools"]))
    texts += [r["content"] for r in run.tool_results if isinstance(r.get("content"), str)]
    return texts


def privacy_summary(samples: Sequence[dict[str, Any]], runs: Sequence[SampleRun]
                    ) -> dict[str, Any]:
    failures = []
    for sample, run in zip(samples, runs, strict=True):
        inputs = input_texts(sample, run)
        findings = [f for text in run.output_texts() for f in privacy_ok(text, inputs)[1]]
        if findings:
            failures.append({"id": run.id,
                             "findings": [{"kind": f.kind, "text": f.text} for f in findings]})
    ok = len(runs) - len(failures)
    return {"samples": len(runs), "ok": ok, "rate": ok / len(runs) if runs else None,
            "failures": failures[:MAX_LISTED_FAILURES]}


def gold_final_answer(sample: dict[str, Any]) -> str | None:
    answers = [m.get("content") for m in sample.get("turns") or [] if m.get("role") == "assistant"]
    return answers[-1] if answers and isinstance(answers[-1], str) else None


def multi_turn_summary(samples: Sequence[dict[str, Any]], runs: Sequence[SampleRun]
                       ) -> dict[str, Any]:
    pairs = [(s, r) for s, r in zip(samples, runs, strict=True) if gold_final_answer(s) is not None]
    completed = [(s, r) for s, r in pairs if r.final_text is not None]
    correct = sum(r.final_text.strip() == gold_final_answer(s).strip() for s, r in completed)
    outcomes: dict[str, int] = {}
    for _, run in pairs:
        outcomes[run.outcome] = outcomes.get(run.outcome, 0) + 1
    return {"samples": len(pairs), "completed": len(completed), "final_exact": correct,
            "final_answer_accuracy": correct / len(pairs) if pairs else None,
            "outcomes": dict(sorted(outcomes.items()))}


def _score_rows(scores: list[Any]) -> dict[str, dict[str, Any]]:
    return {s.id: {"exact": s.exact, "strict_tp": s.strict_tp, "lax_tp": s.lax_tp,
                   "gold": s.gold, "predicted": s.predicted, "errors": s.errors}
            for s in scores}


def quality(task: str, samples: Sequence[dict[str, Any]], runs: Sequence[SampleRun]
            ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(dataset metrics, per-sample verdicts by id) for ``task``."""
    if task == "eightball":
        texts = [r.first_text for r in runs]
        metrics = eightball.score(samples, texts)
        rows = {r.id: {"correct": eightball.answer_correct(s, t)}
                for s, r, t in zip(samples, runs, texts, strict=True)}
    else:
        metrics = score_dataset(samples, [r.first_calls for r in runs])
        rows = _score_rows(metrics.pop("scores"))
        metrics["multi_turn"] = multi_turn_summary(samples, runs)
    metrics["privacy"] = privacy_summary(samples, runs)
    return metrics, rows


def headline(task: str, quality_metrics: dict[str, Any], perf: dict[str, Any],
             broker: dict[str, Any] | None, health: dict[str, Any] | None) -> dict[str, Any]:
    """The flat metric names ``configs/gates.yaml`` and baselines use; None = not measured."""
    out: dict[str, Any] = {"privacy_ok_rate": quality_metrics["privacy"]["rate"]}
    if task == "eightball":
        out["accuracy"] = quality_metrics["accuracy"]
    else:
        q = quality_metrics
        out.update(
            lax_f1=q["lax"]["f1"], strict_f1=q["strict"]["f1"],
            strict_precision=q["strict"]["precision"], strict_recall=q["strict"]["recall"],
            exact_accuracy=q["exact_accuracy"], json_validity=q["json_validity"]["rate"],
            controls_with_call=q["controls"]["with_call"] if q["controls"]["samples"] else None,
            fixture_hit_rate=(broker or {}).get("hit_rate"),
            final_answer_accuracy=q["multi_turn"]["final_answer_accuracy"],
        )
    out.update(
        ttft_p50_ms=perf["ttft_ms"]["p50"], latency_p50_ms=perf["latency_ms"]["p50"],
        latency_p95_ms=perf["latency_ms"]["p95"], latency_p99_ms=perf["latency_ms"]["p99"],
        decode_tps=perf["decode_tps"],
        shapes_ok=(health or {}).get("shapes_ok"), logits_ok=(health or {}).get("logits_ok"),
    )
    return out
