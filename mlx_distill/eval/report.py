"""The eval report: ``report.json`` (everything measured), ``report.md`` (tables: backends side by
side, per category, performance, gates, baseline, fingerprints) and the PNG figures it links."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mlx_distill.atomic import atomic_write_text
from mlx_distill.eval import plots

REPORT_SCHEMA = 1
LATENCY_PNG = "latency.png"
CATEGORIES_PNG = "categories.png"
DASH = "–"


def pct(value: Any) -> str:
    """A fraction as a percentage with one decimal; a dash for None."""
    return DASH if value is None else f"{100 * value:.1f}%"


def num(value: Any, digits: int = 1) -> str:
    """A number with thousands separators (floats to ``digits``); yes/no; a dash for None."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def human_size(value: Any) -> str:
    """A byte count in GB/MB/kB/B; a dash for None."""
    if value is None:
        return DASH
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value} B"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table (cells' ``|`` escaped) followed by a blank line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines + [""]


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def _summary_table(report: dict[str, Any]) -> list[str]:
    eightball = report["task"] == "eightball"
    quality = (["accuracy", "privacy"] if eightball else
               ["strict F1", "lax F1", "exact", "JSON valid", "controls w/ call", "privacy",
                "fixture hit", "final answer"])
    header = ["backend", "kind", "size", *quality, "TTFT p50 ms", "p50 ms", "p95 ms", "p99 ms",
              "decode tok/s", "gates"]
    rows = []
    for b in report["backends"]:
        m = b["metrics"]
        if eightball:
            cells = [pct(m["accuracy"]), pct(m["privacy_ok_rate"])]
        else:
            cells = [pct(m["strict_f1"]), pct(m["lax_f1"]), pct(m["exact_accuracy"]),
                     pct(m["json_validity"]), num(m["controls_with_call"]),
                     pct(m["privacy_ok_rate"]), pct(m["fixture_hit_rate"]),
                     pct(m["final_answer_accuracy"])]
        kind = b["kind"] + (" (reference)" if b.get("reference") else "")
        rows.append([b["label"], kind, human_size(b["fingerprints"]["weight_bytes"]), *cells,
                     num(m["ttft_p50_ms"]), num(m["latency_p50_ms"]),
                     num(m["latency_p95_ms"]), num(m["latency_p99_ms"]),
                     num(m["decode_tps"]), _verdict(b["passed"])])
    return markdown_table(header, rows)


def _category_tables(report: dict[str, Any]) -> list[str]:
    lines = []
    for b in report["backends"]:
        per = b["quality"].get("per_category") or {}
        lines.append(f"**{b['label']}**")
        lines.append("")
        if report["task"] == "eightball":
            rows = [[c, num(q["samples"]), num(q["correct"]), pct(q["accuracy"])]
                    for c, q in per.items()]
            lines += markdown_table(["category", "samples", "correct", "accuracy"], rows)
        else:
            rows = [[c, num(q["samples"]), pct(q["strict"]["f1"]), pct(q["lax"]["f1"]),
                     pct(q["exact_accuracy"]), num(q["controls"]["with_call"])]
                    for c, q in per.items()]
            lines += markdown_table(["category", "samples", "strict F1", "lax F1", "exact",
                             "controls w/ call"], rows)
    return lines


def _performance_tables(report: dict[str, Any]) -> list[str]:
    rows = []
    for b in report["backends"]:
        p = b["performance"]
        rows.append([b["label"], num(p["requests"]), num(p["ttft_ms"]["p50"]),
                     num(p["ttft_ms"]["p95"]), num(p["latency_ms"]["p50"]),
                     num(p["latency_ms"]["p95"]), num(p["latency_ms"]["p99"]),
                     num(p["latency_ms"]["mean"]), num(p["latency_ms"]["max"]),
                     num(p["decode_tps"]), num(p["decode_tps_p50"]),
                     num(p["prompt_tokens"]), num(p["completion_tokens"])])
    lines = markdown_table(["backend", "requests", "TTFT p50 ms", "TTFT p95 ms", "p50 ms", "p95 ms",
                    "p99 ms", "mean ms", "max ms", "decode tok/s (pooled)",
                    "decode tok/s (p50)", "prompt tokens", "completion tokens"], rows)
    targeted = [b for b in report["backends"] if b.get("targets")]
    if targeted:
        role = targeted[0]["targets"]["role"]
        enforced = "enforced" if report.get("enforce_role_targets") else "reported, not enforced"
        lines += [f"Targets of role `{role}` ({enforced}):", ""]
        rows = [[b["label"], c["metric"], num(c["value"]),
                 ("≤ " if c["bound"] == "max" else "≥ ") + num(c["target"]),
                 "met" if c["ok"] else "missed"]
                for b in targeted for c in b["targets"]["checks"]]
        lines += markdown_table(["backend", "target", "measured", "required", "status"], rows)
    return lines


def _gates_table(report: dict[str, Any]) -> list[str]:
    rows = [[b["label"], v["gate"], num(v["value"], 4), v["status"]]
            for b in report["backends"] for v in b["gates"]]
    if not rows:
        return [f"Profile `{report['profile']}` sets no gate for task {report['task']}.", ""]
    return markdown_table(["backend", "gate", "value", "status"], rows)


def _baseline_section(baseline: dict[str, Any]) -> list[str]:
    lines = [f"Baseline `{baseline['path']}`: {len(baseline['comparisons'])} figures compared, "
             f"{len(baseline['regressions'])} regressed.", ""]
    if baseline.get("dataset_differs"):
        lines += ["The baseline evaluated a different dataset (sha256 differs).", ""]
    if baseline["unpaired"]:
        lines += [f"No baseline for: {', '.join(baseline['unpaired'])}.", ""]
    rows = [[r["backend"], r["metric"], num(r["baseline"], 4), num(r["current"], 4),
             pct(r["relative_change"]), r["allowed"], "REGRESSED" if r["regressed"] else "ok"]
            for r in baseline["comparisons"]]
    if rows:
        lines += markdown_table(["backend", "metric", "baseline", "current", "change", "allowed",
                         "status"], rows)
    return lines


def _details(report: dict[str, Any]) -> list[str]:
    lines = []
    for b in report["backends"]:
        q = b["quality"]
        mt = q.get("multi_turn")
        if mt and mt["samples"]:
            outcomes = ", ".join(f"{k} {v}" for k, v in mt["outcomes"].items())
            lines.append(f"- {b['label']}: multi-turn {mt['samples']} samples, "
                         f"{mt['completed']} reached a final answer, {mt['final_exact']} exact "
                         f"({outcomes}).")
        if b.get("broker"):
            s = b["broker"]
            lines.append(f"- {b['label']}: tool broker {s['fixtures']} fixtures, {s['calls']} "
                         f"calls, {s['hits']} hits.")
        for failure in q["privacy"]["failures"]:
            kinds = ", ".join(sorted({f["kind"] for f in failure["findings"]}))
            lines.append(f"- {b['label']}: sample {failure['id']} leaked new PII ({kinds}).")
        if b.get("health"):
            h = b["health"]
            lines.append(f"- {b['label']}: health probe at lengths {h['lengths']}: "
                         f"shapes ran {num(h['shapes_ok'])}, logits finite and non-zero "
                         f"{num(h['logits_ok'])}.")
    return lines + [""] if lines else []


def _fingerprints(report: dict[str, Any]) -> list[str]:
    f = report["fingerprints"]
    rows = [["dataset", f["dataset"], f["dataset_sha256"]],
            ["tool registry", "canonical JSON of the samples' tools", f["tool_registry_sha256"]]]
    rows += [["fixtures", path, sha] for path, sha in f["fixtures_sha256"].items()]
    for b in report["backends"]:
        fp = b["fingerprints"]
        for name, sha in (fp["weights_sha256"] or {}).items():
            rows.append([f"{b['label']} weights", name, sha])
        if fp["tokenizer_sha256"]:
            rows.append([f"{b['label']} tokenizer", fp["tokenizer"], fp["tokenizer_sha256"]])
    env = report["environment"]
    rows.append(["git", "commit", env["git_sha"] or DASH])
    lines = markdown_table(["what", "file", "sha256"],
                           [[a, f"`{b}`", f"`{c}`"] for a, b, c in rows])
    versions = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    return lines + [f"Python {env['python']} on {env['platform']}; {versions}.", ""]


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Eval report: {_verdict(report['passed'])}", "",
        f"- data: `{report['data']}` ({report['samples']} samples, task {report['task']})",
        f"- gates: profile `{report['profile']}` of `{report['gates_file']}`",
        f"- created {report['created']}; {report['wall_seconds']:.1f} s",
        f"- per-sample predictions: {', '.join(f'`{p}`' for p in report['files']['predictions'])}",
        "", "## Backends", "",
    ]
    lines += _summary_table(report)
    if any(b.get("reference") for b in report["backends"]):
        lines += ["(reference): run by the MIL reference interpreter, not Core ML; its timings say "
                  "nothing about Core ML or the Neural Engine.", ""]
    lines += [f"![Request latency]({LATENCY_PNG})", "",
              f"![{report['category_metric']} per category]({CATEGORIES_PNG})", ""]
    lines += ["## Per category", ""] + _category_tables(report)
    lines += ["## Performance", ""] + _performance_tables(report)
    lines += ["## Gates", ""] + _gates_table(report)
    if report.get("baseline"):
        lines += ["## Baseline", ""] + _baseline_section(report["baseline"])
    details = _details(report)
    if details:
        lines += ["## Details", ""] + details
    lines += ["## Fingerprints", ""] + _fingerprints(report)
    return "\n".join(lines)


def category_series(report: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    key = "accuracy" if report["task"] == "eightball" else None
    out = {}
    for b in report["backends"]:
        per = b["quality"].get("per_category") or {}
        out[b["label"]] = {c: (q[key] if key else q["lax"]["f1"]) for c, q in per.items()}
    return out


def write_report(report: dict[str, Any], out_dir: str | os.PathLike,
                 latencies: dict[str, list[float]]) -> Path:
    """Write the figures, ``report.json`` and ``report.md`` (last, so a report.md present means
    the rest is there); returns the markdown's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots.latency_histogram(latencies, out_dir / LATENCY_PNG)
    plots.category_bars(category_series(report), report["category_metric"],
                        out_dir / CATEGORIES_PNG)
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(out_dir / "report.md", render_markdown(report))
    return out_dir / "report.md"
