"""The demo's ``report.md``: teacher vs MLX student vs Core ML student (quality, size, latency),
the models, the KD data, the Core ML verification, the stage timings, and the plots."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path
from typing import Any

from mlx_distill.atomic import atomic_write_text
from mlx_distill.eval.report import DASH, markdown_table, num, pct


def _mb(n: int | None) -> str:
    return DASH if n is None else f"{n / 1e6:.2f} MB"


def runtime_name(backend: dict[str, Any]) -> str:
    if backend["kind"] == "coreml":
        return "MIL reference interpreter (not Core ML)" if backend.get("reference") else "Core ML"
    return {"mlx": "MLX"}.get(backend["kind"], backend["kind"])


def comparison_rows(eval_result: dict[str, Any], params: dict[str, int]
                    ) -> tuple[list[str], list[list[str]]]:
    """The headline table: one row per evaluated backend (teacher, students)."""
    eightball = eval_result["task"] == "eightball"
    quality = (["accuracy"] if eightball else
               ["strict F1", "lax F1", "exact", "JSON valid", "controls w/ call"])
    header = ["model", "runtime", "params", "weights", *quality, "TTFT p50 ms", "p50 ms",
              "p95 ms", "decode tok/s", "gates"]
    rows = []
    for b in eval_result["backends"]:
        m = b["metrics"]
        cells = ([pct(m["accuracy"])] if eightball else
                 [pct(m["strict_f1"]), pct(m["lax_f1"]), pct(m["exact_accuracy"]),
                  pct(m["json_validity"]), num(m["controls_with_call"])])
        role = "teacher" if b["label"] == "teacher" else "student"
        rows.append([b["label"], runtime_name(b), num(params[role]),
                     _mb(b["fingerprints"]["weight_bytes"]), *cells, num(m["ttft_p50_ms"]),
                     num(m["latency_p50_ms"]), num(m["latency_p95_ms"]),
                     num(m["decode_tps"]), "PASS" if b["passed"] else "FAIL"])
    return header, rows


def _models(summary: dict[str, Any]) -> list[str]:
    cfg, p = summary["config"], summary["parameters"]
    rows = []
    for role in ("teacher", "student"):
        m, s = cfg[role]["model"], summary[role]
        rows.append([role, f"{m['n_layers']} x d{m['d_model']}, {m['n_heads']}/{m['n_kv_heads']} "
                     f"heads, ffn {m['d_ff']}", num(p[role]), num(s["steps"]),
                     num(s["loss"], 3), num(s["val_loss"], 3)])
    lines = markdown_table(["model", f"shape (vocab {p['vocab']})", "params", "steps",
                            "final train loss", "val loss (gold val split)"], rows)
    return lines + [f"The student has {p['ratio']:.2f}x fewer parameters than the teacher.", ""]


def _coreml(summary: dict[str, Any]) -> list[str]:
    rows = []
    for v in summary["coreml"].values():
        top1 = DASH if v["min_top1"] is None else pct(v["min_top1"])
        rows.append([v["precision"], _mb(v["weight_bytes"]), ", ".join(map(str, v["shapes"])),
                     ", ".join(map(str, v["shapes_ran"])), f"{v['min_cosine']:.5f}", top1,
                     f"{v['max_abs_error']:.3g}", f"{v['decode_equal']}/{v['decode_steps']}",
                     "PASS" if v["passed"] else "FAIL: " + "; ".join(v["failures"])])
    runtime = next(iter(summary["coreml"].values()))["runtime"]
    lines = [f"Each package is checked by `verify-coreml` against the student checkpoint in MLX "
             f"(runtime: {runtime}): prefill logits at every enumerated shape on random and real "
             "ids, then a greedy decode loop through the KV-cache state.", ""]
    header = ["precision", "weights", "enumerated shapes", "shapes run", "min cosine", "min top-1",
              "max abs err", "decode = MLX", "gates"]
    return lines + markdown_table(header, rows)


def _stages(clock: Any) -> list[str]:
    rows = [[s.name, f"{s.wall_s:.1f}", f"{s.cpu_s:.1f}", s.detail] for s in clock.stages]
    rows.append(["**total**", f"**{clock.elapsed:.1f}**",
                 f"{sum(s.cpu_s for s in clock.stages):.1f}", ""])
    return markdown_table(["stage", "wall s", "CPU s", "result"], rows)


def write_report(summary: dict[str, Any], eval_result: dict[str, Any], work: Path,
                 clock: Any) -> Path:
    """Write ``work/report.md``; figures are linked relative to it."""
    verdict = "PASS" if summary["passed"] else "FAIL"
    kd, cfg = summary["kd"], summary["config"]
    header, rows = comparison_rows(eval_result, summary["parameters"])
    n_eval = eval_result["samples"]
    lines = [
        f"# mlx-distill demo: {summary['task']} ({summary['name']}): {verdict}", "",
        f"- run `{work}`, {_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')}, "
        f"{clock.elapsed:.1f} s wall on {platform.system()} {platform.machine()} with "
        f"{os.cpu_count()} CPUs",
        "- teacher trained on the gold train conversations -> served by `mlx-distill teacher "
        f"serve` on loopback -> {kd['records']} KD records for the train prompts through the "
        "HTTP client (cache + checkpoints) -> student distilled from them -> Core ML "
        f"{' and '.join(cfg['export']['precisions'])} -> evaluated on {n_eval} held-out test "
        "samples (unseen argument values and phrasings)", "",
        "## Teacher vs student vs Core ML student", "",
        *markdown_table(header, rows),
        *([] if eval_result["task"] == "eightball" else [
            "Strict F1 counts a call only when every argument value is right after normalisation "
            "(BFCL AST rules); lax F1 needs the right function name and parseable arguments. "
            "Controls w/ call: no-tool samples answered with a call.", ""]),
        f"Gates: profile `{eval_result['profile']}` of `{eval_result['gates_file']}`. Latency is "
        "per request on this machine (greedy, JSON-schema-constrained tool calls). "
        "A runtime labelled *not Core ML* is the MIL reference interpreter: its timings say "
        "nothing about Core ML or the Neural Engine.", "",
        "![request latency](eval/latency.png)", "",
        f"![{eval_result['category_metric']} per category](eval/categories.png)", "",
        "Full eval report (per category, performance, gates, fingerprints): "
        "[eval/report.md](eval/report.md).", "",
        "## Models", "", *_models(summary),
        "![teacher loss](teacher/loss_curve.png) ![student loss](student/loss_curve.png)", "",
        "## KD data", "",
        f"{kd['records']} records in `kd/kd.jsonl` from the teacher server at {kd['url']} "
        f"(temperature {cfg['kd']['temperature']}, top-{cfg['kd']['top_logprobs']} logprobs per "
        f"token, {kd['cache_hits']} cache hits, {kd['wall_s']:.1f} s). `teacher merge` sorted "
        "them by id into `kd/kd.merged.jsonl`, the student's training data (generation order "
        "varies with concurrency; the merged order does not).", "",
        "## Core ML export and verification", "", *_coreml(summary),
        "## Stages", "", *_stages(clock),
    ]
    path = work / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
