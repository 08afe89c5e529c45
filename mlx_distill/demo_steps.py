"""The demo's stages, each a thin call into the library: data, tokenizer, training (teacher and
student through ``mlx-distill train``'s runner), KD generation through the local teacher server,
Core ML export + verification, and evaluation. :mod:`mlx_distill.demo` runs them in order."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlx_distill.atomic import atomic_write_text
from mlx_distill.cli import UserError
from mlx_distill.demo_config import DemoConfig, TrainSection


class DemoError(UserError):
    """A stage could not produce what the next one needs; the message says which and why."""


@dataclass
class Stage:
    name: str
    wall_s: float
    cpu_s: float
    detail: str = ""


@dataclass
class StageClock:
    """Times each stage (wall and this process's CPU seconds) and prints its start and end."""

    total: int
    say: Any = print
    stages: list[Stage] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[Stage]:
        self.say(f"[{len(self.stages) + 1}/{self.total}] {name}: {what}")
        wall, cpu = time.perf_counter(), time.process_time()
        record = Stage(name, 0.0, 0.0)
        yield record
        record.wall_s = time.perf_counter() - wall
        record.cpu_s = time.process_time() - cpu
        self.stages.append(record)
        self.say(f"      {record.detail + '; ' if record.detail else ''}"
                 f"{record.wall_s:.1f} s")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def table(self) -> list[str]:
        rows = [f"{'stage':<16} {'wall s':>8} {'cpu s':>8}  result"]
        rows += [f"{s.name:<16} {s.wall_s:>8.1f} {s.cpu_s:>8.1f}  {s.detail}" for s in self.stages]
        rows.append(f"{'total':<16} {self.elapsed:>8.1f} "
                    f"{sum(s.cpu_s for s in self.stages):>8.1f}")
        return rows


# ---- training ----

def write_size_config(section: TrainSection, name: str, vocab_size: int, path: Path) -> Path:
    """A size YAML (``configs/sizes`` format) for ``section.model`` with the tokenizer's vocab."""
    from mlx_distill.model_info import count_parameters

    config = section.model.model_config(vocab_size)
    body = {"name": name, "nominal_params": count_parameters(config),
            "notes": "written by mlx-distill demo", "model": config.to_dict()}
    atomic_write_text(path, yaml.safe_dump(body, sort_keys=False))
    return path


def train_config(cfg: DemoConfig, role: str, work: Path, tokenizer: Path, size: Path,
                 records: list[Path], progress: bool) -> dict[str, Any]:
    """The ``mlx-distill train`` config of the teacher (SFT on gold conversations, CE only) or
    the student (offline KD from the teacher's records: top-k forward KL + CE)."""
    section = cfg.teacher if role == "teacher" else cfg.student
    task = work / "data"
    data: dict[str, Any] = {
        "val": [str(task / "val.sft.jsonl")], "batch_size": section.batch_size,
        "shapes": section.shapes, "max_bad_fraction": 0.05,
    }
    if role == "teacher":
        data["sft"] = [str(p) for p in records]
        loss: dict[str, Any] = {"kind": "ce", "alpha": 1.0}
    else:
        # Teacher and student share the tokenizer, so top-k entries align by token id.
        data.update(train=[str(p) for p in records], teacher_tokenizer=str(tokenizer))
        s = cfg.student
        loss = {"kind": "forward_kl", "alpha": s.alpha, "temperature": s.kd_temperature,
                "tool_weight": s.tool_weight}
    return {
        "out": str(work / role),
        "student": {"size": str(size), "tokenizer": str(tokenizer)},
        "data": data,
        "teacher": {"mode": "offline"},
        "loss": loss,
        "optim": {"lr": section.lr, "warmup_steps": section.warmup_steps},
        "train": {"steps": section.steps, "eval_every": section.steps, "eval_batches": 4,
                  "keep_last": 1, "seed": cfg.data.seed, "progress": progress, "plot": True},
    }


def train(config: dict[str, Any], log) -> tuple[Path, dict[str, Any]]:
    """Run the trainer; returns (final checkpoint dir, summary)."""
    from mlx_distill.train_config import config_from_dict
    from mlx_distill.train_run import run_training

    result = run_training(config_from_dict(config, "demo"), log=log)
    if result.latest is None:
        raise DemoError(f"{config['out']}: training wrote no checkpoint")
    return result.latest, {"steps": result.steps, "loss": result.last.get("loss"),
                           "val_loss": result.best_val}


# ---- KD data through the teacher server ----

@contextmanager
def teacher_server(checkpoint: Path, log_file: Path, model_id: str = "demo-teacher",
                   start_timeout_s: float = 180.0) -> Iterator[str]:
    """Run ``mlx-distill teacher serve CHECKPOINT --port 0`` as a child process on loopback and
    yield its base URL; the server is stopped (SIGTERM, then SIGKILL) on exit. Its log goes to
    ``log_file``. A separate process, as a user would run it, and on a core of its own."""
    command = [sys.executable, "-m", "mlx_distill", "teacher", "serve", str(checkpoint),
               "--host", "127.0.0.1", "--port", "0", "--model-id", model_id,
               "--log-level", "warning"]
    with open(log_file, "w", encoding="utf-8") as log:
        server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            yield _await_url(server, log_file, start_timeout_s)
        finally:
            _stop(server)


def _await_url(server: subprocess.Popen, log_file: Path, timeout_s: float) -> str:
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:  # stdout is read on a thread so the wait can time out
        for line in server.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True, name="teacher-serve-stdout").start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line is None:
            break
        match = re.search(r" at (http://\S+)$", line.strip())
        if line.startswith("serving ") and match:
            return match.group(1)
    _stop(server)
    tail = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
    raise DemoError(f"mlx-distill teacher serve did not start within {timeout_s:.0f} s "
                    f"(exit {server.returncode}); {tail[0] if tail else 'no output'} "
                    f"(log: {log_file})")


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def generate_kd(cfg: DemoConfig, teacher_ckpt: Path, prompts: Path, out: Path,
                progress: bool) -> dict[str, Any]:
    """Serve the teacher on loopback (``mlx-distill teacher serve``, a child process) and ask it
    every prompt through the KD client (SQLite cache, checkpointed output). Returns the run's
    summary; raises DemoError unless every prompt has a record."""
    from mlx_distill.teacher.kdgen import Generator
    from mlx_distill.teacher.kdprogress import format_summary
    from mlx_distill.teacher.kdrun import EXIT_OK, GenerateConfig
    from mlx_distill.teacher.merge import merge_files

    k = cfg.kd
    with teacher_server(teacher_ckpt, out.parent / "teacher-serve.log") as url:
        result = Generator(GenerateConfig(
            prompts=prompts, out=out, teacher=url, temperature=k.temperature,
            top_logprobs=k.top_logprobs, max_tokens=k.max_tokens, seed=cfg.data.seed,
            concurrency=k.concurrency, checkpoint_interval=k.checkpoint_interval,
            progress=progress)).generate()
    print(format_summary(result, out), file=sys.stderr)
    if result.exit_code != EXIT_OK:
        raise DemoError(f"{out}: teacher generate stopped ({result.stop_reason or 'failures'}); "
                        f"{result.records}/{result.total} records, see {out}.failed.jsonl")
    # Records land in completion order, which concurrency makes vary from run to run; `teacher
    # merge` sorts them by id, so the student sees the same data order for the same seed.
    merged = out.with_name(out.stem + ".merged.jsonl")
    merge_files([out], merged)
    return {"url": url, "records": result.records, "cache_hits": result.cache_hits,
            "wall_s": result.wall_s, "merged": str(merged)}


# ---- Core ML ----

def export_and_verify(cfg: DemoConfig, student_ckpt: Path, out_dir: Path,
                      precision: str) -> dict[str, Any]:
    """Export the student at ``precision`` with the enumerated shapes, then verify the package
    against the checkpoint in MLX (verify-coreml's gates). Returns sizes and the verdict."""
    from converters.export import ExportError, export_coreml
    from converters.verify import read_contract, verify_package

    x = cfg.export
    pkg = out_dir / f"student-{precision}.mlpackage"
    started = time.perf_counter()
    try:
        export_coreml(student_ckpt, pkg, precision=precision, shapes=x.shapes,
                      max_context=x.max_context, layout=x.layout)
    except ExportError as exc:
        raise DemoError(f"export {precision}: {exc}") from None
    exported = time.perf_counter() - started
    contract = read_contract(pkg)
    report = verify_package(pkg, student_ckpt, seed=cfg.data.seed, steps=x.decode_steps)
    atomic_write_text(out_dir / f"verify-{precision}.json", json.dumps(report, indent=2) + "\n")
    rows, decode = report["prefill"], report["decode"]
    decisive = [r["top1"] for r in rows if r["top1"] is not None]
    return {
        "precision": precision, "package": str(pkg), "runtime": report["runtime"],
        "shapes": contract["prefill_shapes"], "max_context": contract["max_context"],
        "weight_bytes": contract["sizes"]["weight_blob_bytes"],
        "export_s": exported, "verify_s": time.perf_counter() - started - exported,
        "shapes_ran": sorted({r["length"] for r in rows}),
        "min_cosine": min(r["cosine"] for r in rows),
        "min_top1": min(decisive) if decisive else None,
        "max_abs_error": max(r["max_abs_error"] for r in rows),
        "decode_equal": decode["equal_tokens"], "decode_steps": decode["steps"],
        "decode_cosine": decode["cosine"], "gates": report["gates"],
        "passed": report["passed"], "failures": report["failures"],
    }


# ---- evaluation ----

def evaluate(cfg: DemoConfig, work: Path, backends: list[str], progress: bool
             ) -> tuple[dict[str, Any], Path]:
    """``mlx-distill eval`` of ``backends`` on the held-out test split (gates: ``eval.profile``);
    the broker replays the task's fixtures."""
    from mlx_distill.eval.harness import HarnessOptions
    from mlx_distill.eval.runner import EvalConfig, run_eval

    e = cfg.eval
    return run_eval(EvalConfig(
        data=str(work / "data" / "test.jsonl"), backends=backends, profile=e.profile,
        out=str(work / "eval"), limit=e.limit or None,
        options=HarnessOptions(max_tokens=e.max_tokens), progress=progress))
