"""``mlx-distill demo``: the whole pipeline end to end on a toy task, offline.

Stages: write the task splits -> train a byte-level BPE tokenizer on the rendered train
conversations -> train a small teacher on the gold conversations (SFT) -> serve it with
``mlx-distill teacher serve`` (a child process on loopback) and generate KD records for the
train prompts through the HTTP client (SQLite cache, checkpointed output) -> distill a >= 4x
smaller student from those records (top-k forward KL + CE) -> export the student to Core ML
(fp16 and int8, enumerated prefill shapes) and verify each package against MLX -> evaluate the
teacher, the MLX student and the Core ML student on the held-out test split -> write
``report.md`` (tables and plots) in the run directory. Sizes: ``configs/demo/<name>.yaml``.

Exit status: 0 every gate passed (verification and eval); 1 a gate failed (the report is still
written); 2 bad arguments or a stage that could not run (one line on stderr).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import Any

from mlx_distill import fast_blas
from mlx_distill.atomic import atomic_write_text
from mlx_distill.demo_config import DemoConfig, load_demo_config
from mlx_distill.demo_steps import (
    DemoError,
    StageClock,
    evaluate,
    export_and_verify,
    generate_kd,
    train,
    train_config,
    write_size_config,
)

STAGES = 8


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_demo(cfg: DemoConfig, work: Path, progress: bool = True, name: str = "demo"
             ) -> dict[str, Any]:
    """Run every stage into ``work`` (a new directory); returns the summary written to
    ``demo.json``, with ``report`` the path of ``report.md``."""
    from mlx_distill.demo_data import write_corpus, write_task
    from mlx_distill.demo_report import comparison_rows, markdown_table, write_report
    from mlx_distill.model_info import count_parameters
    from mlx_distill.tokenizer import load_tokenizer, train_tokenizer

    if work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise DemoError(f"--out {work}: exists and is not an empty directory; choose a new one")
    work.mkdir(parents=True, exist_ok=True)
    clock = StageClock(STAGES, say=lambda line: print(line, flush=True))
    blas = fast_blas.status()
    print(f"mlx-distill demo ({name}, task {cfg.task}) -> {work}; fast BLAS "
          f"{'on' if blas.enabled else 'off'} ({blas.reason})", flush=True)
    summary: dict[str, Any] = {"name": name, "task": cfg.task, "config": cfg.to_dict(),
                               "dir": str(work)}

    with clock.stage("data", f"toy {cfg.task} splits") as st:
        d = cfg.data
        task_dir = write_task(cfg.task, work / "data", (d.n_train, d.n_val, d.n_test), d.seed,
                              d.tools_per_sample, d.tool_descriptions)
        st.detail = f"{d.n_train} train / {d.n_val} val / {d.n_test} held-out test samples"

    with clock.stage("tokenizer", "byte-level BPE on the rendered train conversations") as st:
        corpus = write_corpus(task_dir, work / "tokenizer-work")
        tok_dir = train_tokenizer([corpus], cfg.tokenizer.vocab_size, work / "tokenizer")
        vocab = len(load_tokenizer(tok_dir).get_vocab())
        st.detail = f"vocab {vocab}"

    sizes = {role: write_size_config(getattr(cfg, role), f"demo-{role}", vocab,
                                     work / f"{role}-size.yaml") for role in ("teacher", "student")}
    params = {role: count_parameters(getattr(cfg, role).model.model_config(vocab))
              for role in sizes}
    ratio = params["teacher"] / params["student"]
    print(f"teacher {params['teacher']:,} parameters, student {params['student']:,}: "
          f"{ratio:.2f}x smaller", flush=True)
    if ratio < cfg.student.min_ratio:
        raise DemoError(f"student.model: the student must be >= {cfg.student.min_ratio}x smaller "
                        f"than the teacher; it is {ratio:.2f}x")
    summary["parameters"] = {**params, "ratio": ratio, "vocab": vocab}

    with clock.stage("teacher", "SFT on the gold train conversations") as st:
        config = train_config(cfg, "teacher", work, tok_dir, sizes["teacher"],
                              [task_dir / "train.sft.jsonl"], progress)
        teacher_ckpt, summary["teacher"] = train(config, _log)
        st.detail = _train_detail(summary["teacher"])

    kd_file = work / "kd" / "kd.jsonl"
    kd_file.parent.mkdir()
    with clock.stage("kd-generate", "mlx-distill teacher serve on loopback -> KD records"
                     ) as st:
        summary["kd"] = generate_kd(cfg, teacher_ckpt, task_dir / "train.prompts.jsonl",
                                    kd_file, progress)
        st.detail = (f"{summary['kd']['records']} records from {summary['kd']['url']} "
                     f"(top-{cfg.kd.top_logprobs} logprobs)")

    with clock.stage("student", "KD: top-k forward KL + CE on the teacher's records") as st:
        config = train_config(cfg, "student", work, tok_dir, sizes["student"],
                              [Path(summary["kd"]["merged"])], progress)
        student_ckpt, summary["student"] = train(config, _log)
        st.detail = _train_detail(summary["student"])

    packages = {}
    with clock.stage("coreml", "export " + ", ".join(cfg.export.precisions)
                     + " + verify against MLX") as st:
        (work / "coreml").mkdir()
        for precision in cfg.export.precisions:
            packages[precision] = export_and_verify(cfg, student_ckpt, work / "coreml",
                                                    precision)
        st.detail = ", ".join(f"{p} {'pass' if v['passed'] else 'FAIL'} (cos >= "
                              f"{v['min_cosine']:.5f})" for p, v in packages.items())
    summary["coreml"] = packages

    with clock.stage("eval", "teacher, MLX student, Core ML student on held-out test") as st:
        chosen = packages[cfg.eval.coreml]["package"]
        backends = [f"teacher=mlx:{teacher_ckpt}", f"student=mlx:{student_ckpt}",
                    f"student-coreml-{cfg.eval.coreml}=coreml:{chosen}"]
        eval_result, eval_md = evaluate(cfg, work, backends, progress)
        st.detail = "; ".join(_eval_detail(b, eval_result["task"])
                              for b in eval_result["backends"])

    with clock.stage("report", "report.md") as st:
        summary["stages"] = [vars(s) for s in clock.stages]
        summary["checkpoints"] = {"teacher": str(teacher_ckpt), "student": str(student_ckpt)}
        summary["eval_report"] = str(eval_md)
        summary["passed"] = eval_result["passed"] and all(p["passed"] for p in packages.values())
        report = write_report(summary, eval_result, work, clock)
        st.detail = str(report)
    summary["stages"] = [vars(s) for s in clock.stages]
    summary["total_s"] = clock.elapsed
    summary["report"] = str(report)
    atomic_write_text(work / "demo.json", json.dumps(summary, indent=2, default=str) + "\n")
    header, rows = comparison_rows(eval_result, params)
    print("\n" + "\n".join(clock.table()) + "\n\n" + "\n".join(markdown_table(header, rows)))
    return summary


def _train_detail(s: dict[str, Any]) -> str:
    val = f", val loss {s['val_loss']:.3f}" if s.get("val_loss") is not None else ""
    return f"{s['steps']} steps, loss {s['loss']:.3f}{val}"


def _eval_detail(backend: dict[str, Any], task: str) -> str:
    m = backend["metrics"]
    if task == "eightball":
        return f"{backend['label']} accuracy {m['accuracy']:.2f}"
    return f"{backend['label']} lax F1 {m['lax_f1']:.2f} strict F1 {m['strict_f1']:.2f}"


def _default_out(name: str) -> Path:
    return Path("runs") / f"{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{name}"


def _main(args: argparse.Namespace) -> int:
    # Everything the demo loads is local; never let transformers or mlx-lm reach for the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    name = "quick" if args.quick else args.config
    cfg = load_demo_config(name, args.set or [])
    label = Path(name).stem
    work = Path(args.out) if args.out else _default_out(label)
    summary = run_demo(cfg, work, progress=not args.no_progress, name=label)
    print(f"\nreport: {summary['report']}")
    print(f"total time: {summary['total_s']:.1f} s "
          f"({summary['total_s'] / 60:.1f} min)")
    if not summary["passed"]:
        print("demo: a gate failed (see the report)", file=sys.stderr)
        return 1
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run the pipeline end to end on a toy task (offline)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples: mlx-distill demo  |  mlx-distill demo --config eightball  |  "
        "mlx-distill demo --quick --out /tmp/demo",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--config", default="toolcall", metavar="NAME|YAML",
                       help="configs/demo/NAME.yaml or a YAML path (default %(default)s)")
    which.add_argument("--quick", action="store_true",
                       help="the CI-sized run (configs/demo/quick.yaml; ~3 minutes)")
    p.add_argument("--out", metavar="DIR",
                   help="run directory (default runs/<timestamp>-<config>); must be new or empty")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set teacher.steps=100 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_main)
