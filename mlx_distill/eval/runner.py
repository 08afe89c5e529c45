"""One ``mlx-distill eval`` run: check every input, evaluate each backend, judge the gates, compare
with a baseline, write the report.

Everything the user passes (dataset, fixtures, gates profile, role, baseline, backend specs) is
read and checked before the first backend is opened and before anything is written.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_distill.atomic import atomic_write_text
from mlx_distill.cli import UserError
from mlx_distill.eval import baseline as baseline_mod
from mlx_distill.eval import fingerprints, gates, metrics, perf, report
from mlx_distill.eval.broker import ToolBroker
from mlx_distill.eval.dataset import EvalSet, load_eval_set
from mlx_distill.eval.harness import HarnessOptions, run_samples
from mlx_distill.eval.records import SampleRun

BACKEND_KINDS = ("mlx", "coreml", "openai")
REPORT_FILES = ("report.json", "report.md", report.LATENCY_PNG, report.CATEGORIES_PNG)
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class EvalError(UserError, ValueError):
    """Bad eval arguments; the message names the option and what is expected."""


@dataclass(frozen=True)
class BackendSpec:
    label: str
    kind: str
    location: str  # the checkpoint, package or endpoint, without a ``#`` fragment
    spec: str  # what ``open_backend`` takes
    fragment: str | None = None


def parse_backend(text: str) -> BackendSpec:
    """``[LABEL=]SPEC``, SPEC as ``mlx_distill.runtime.open_backend`` takes it; the label
    defaults to ``KIND:NAME`` (NAME: the checkpoint's or package's file name, or the endpoint)."""
    from mlx_distill.runtime.factory import parse_spec

    label = None
    head, sep, rest = text.partition("=")
    if sep and _LABEL.fullmatch(head):
        label, text = head, rest
    try:
        kind, location, fragment = parse_spec(text)
    except UserError as exc:
        raise EvalError(f"--backend: {exc}") from None
    for path in (location, fragment) if kind != "openai" else ():
        if path is not None and not Path(path).exists():
            raise EvalError(f"--backend {text!r}: {path}: not found")
    if label is None:
        name = location if kind == "openai" else Path(location).name
        label = f"{kind}:{name}"
    return BackendSpec(label, kind, location, text, fragment)


def unique_labels(specs: list[BackendSpec]) -> list[BackendSpec]:
    seen: dict[str, int] = {}
    out = []
    for s in specs:
        seen[s.label] = seen.get(s.label, 0) + 1
        label = s.label if seen[s.label] == 1 else f"{s.label}#{seen[s.label]}"
        out.append(BackendSpec(label, s.kind, s.location, s.spec, s.fragment))
    return out


@dataclass
class EvalConfig:
    data: str
    backends: list[str]
    fixtures: list[str] | None = None  # None: fixtures.jsonl beside the data file, if any
    gates_file: str | None = None
    profile: str = "default"
    role: str | None = None
    roles_file: str | None = None
    baseline: str | None = None
    out: str | None = None
    limit: int | None = None
    task: str = "auto"
    options: HarnessOptions = field(default_factory=HarnessOptions)
    progress: bool = True
    arguments: dict[str, Any] = field(default_factory=dict)  # as given, for the report


@dataclass
class Prepared:
    evalset: EvalSet
    specs: list[BackendSpec]
    fixture_paths: list[Path]
    profile: gates.GateProfile
    targets: Any
    baseline: dict[str, Any] | None
    out_dir: Path


def _fixture_paths(config: EvalConfig) -> list[Path]:
    if config.fixtures is not None:
        return [Path(p) for p in config.fixtures]
    beside = Path(config.data).with_name("fixtures.jsonl")
    return [beside] if beside.is_file() else []


def prepare(config: EvalConfig) -> Prepared:
    """Read and check every input; nothing is opened or written yet."""
    if not config.backends:
        raise EvalError("--backend: give at least one backend to evaluate")
    if config.limit is not None and config.limit < 1:
        raise EvalError(f"--limit: expected a positive integer, got {config.limit}")
    if config.options.max_tokens < 1 or config.options.max_turns < 1:
        raise EvalError("--max-tokens and --max-turns: expected positive integers")
    specs = unique_labels([parse_backend(b) for b in config.backends])
    remote = next((s.label for s in specs if s.kind == "openai"), None)
    if config.options.constrain == "on" and remote is not None:
        raise EvalError(f"--constrain on: {remote} keeps its logits on the server, so its tool "
                        "calls cannot be constrained here; use --constrain auto")
    evalset = load_eval_set(config.data, config.task, config.limit)
    profile = gates.load_profile(config.gates_file, config.profile)
    targets = None
    if config.role is not None:
        from mlx_distill.roles import load_roles

        roles = load_roles(config.roles_file)
        if config.role not in roles:
            raise EvalError(f"--role {config.role}: no such role; expected one of "
                            f"{sorted(roles)}")
        targets = roles[config.role].targets
    prior = baseline_mod.load_baseline(config.baseline) if config.baseline else None
    out_dir = Path(config.out) if config.out else Path("runs") / (
        "eval-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if out_dir.exists() and not out_dir.is_dir():
        raise EvalError(f"--out {out_dir}: exists and is not a directory")
    paths = _fixture_paths(config)
    # Parse the fixtures now: a bad line must stop the run before any backend is opened.
    ToolBroker.from_files(paths, tools=fingerprints.tool_registry(evalset.samples))
    return Prepared(evalset, specs, paths, profile, targets, prior, out_dir)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "backend"


def evaluate_backend(spec: BackendSpec, backend: Any, prep: Prepared, config: EvalConfig,
                     progress: Callable[[SampleRun], None] | None = None
                     ) -> tuple[dict[str, Any], list[SampleRun], dict[str, dict[str, Any]]]:
    """(report section, sample runs, per-sample verdicts) of one opened backend."""
    samples = prep.evalset.samples
    broker = (ToolBroker.from_files(prep.fixture_paths,
                                    tools=fingerprints.tool_registry(samples))
              if prep.fixture_paths else None)
    started = time.perf_counter()
    runs = run_samples(backend, samples, broker, config.options, progress)
    wall = time.perf_counter() - started
    quality, rows = metrics.quality(prep.evalset.task, samples, runs)
    timings = [t.timing for r in runs for t in r.turns]
    performance = perf.summarize(timings)
    performance["wall_s"] = wall
    targets = (perf.check_targets(performance, prep.targets, config.role)
               if prep.targets is not None else None)
    health = None
    if prep.profile.needs_health(prep.evalset.task) and hasattr(backend, "prompt_ids"):
        from mlx_distill.eval.health import probe

        first = samples[0]
        health = probe(backend, backend.prompt_ids(first["messages"], first.get("tools") or None))
    broker_stats = broker.stats() if broker is not None else None
    headline = metrics.headline(prep.evalset.task, quality, performance, broker_stats, health)
    verdicts = gates.check_gates(prep.profile.for_task(prep.evalset.task), headline)
    passed = gates.all_passed(verdicts)
    if targets is not None and prep.profile.enforce_role_targets and not targets["met"]:
        passed = False
    runtime_label = str(getattr(backend, "label", spec.spec))
    section = {
        "label": spec.label, "spec": spec.spec, "kind": spec.kind, "runtime": runtime_label,
        # The MIL interpreter stands in for Core ML off macOS; its figures are not Core ML's.
        "reference": "not Core ML" in runtime_label,
        "constrained_turns": sum(t.constrained for r in runs for t in r.turns),
        "fingerprints": fingerprints.model_fingerprints(
            spec.kind, spec.location, _tokenizer_file(spec, backend)),
        "metrics": headline, "quality": quality, "performance": performance,
        "targets": targets, "health": health, "broker": broker_stats,
        "gates": verdicts, "passed": passed,
        "predictions": f"predictions-{_slug(spec.label)}.jsonl",
    }
    return section, runs, rows


def _tokenizer_file(spec: BackendSpec, backend: Any) -> Path | None:
    """The tokenizer.json the backend encodes with, where there is one on this machine."""
    if spec.kind == "mlx":
        path = Path(spec.location) / "tokenizer.json"
    elif spec.kind == "coreml" and hasattr(backend, "contract"):
        from mlx_distill.runtime.coreml_backend import tokenizer_dir

        path = tokenizer_dir(Path(spec.location), backend.contract, spec.fragment) / \
            "tokenizer.json"
    else:
        return None
    return path if path.is_file() else None


def _predictions_text(runs: list[SampleRun], rows: dict[str, dict[str, Any]]) -> str:
    return "".join(json.dumps({**run.to_dict(), "score": rows.get(run.id)}, ensure_ascii=False,
                              default=str) + "\n" for run in runs)


def _progress_bar(total: int, label: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"eval {label}", unit="sample", disable=not enabled,
                mininterval=0.5, leave=True)


def run_eval(config: EvalConfig, opener: Callable[[str], Any] | None = None
             ) -> tuple[dict[str, Any], Path]:
    """Evaluate every backend and write the report; returns (report, path of report.md).
    ``opener`` turns ``KIND:LOCATION`` into a backend (default: the runtime's ``open_backend``)."""
    if opener is None:
        from mlx_distill.runtime import open_backend as opener
    prep = prepare(config)
    started = time.perf_counter()
    sections, latencies, predictions = [], {}, {}
    for spec in prep.specs:
        backend = opener(spec.spec)
        try:
            with _progress_bar(len(prep.evalset.samples), spec.label, config.progress) as bar:
                section, runs, rows = evaluate_backend(spec, backend, prep, config,
                                                       lambda _run: bar.update())
        finally:
            close = getattr(backend, "close", None)
            if close is not None:
                close()
        sections.append(section)
        latencies[spec.label] = perf.latencies_ms(t.timing for r in runs for t in r.turns)
        predictions[section["predictions"]] = _predictions_text(runs, rows)
    data_fp = fingerprints.data_fingerprints(prep.evalset.path, prep.fixture_paths,
                                             prep.evalset.samples)
    result = {
        "schema": report.REPORT_SCHEMA,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "arguments": config.arguments, "data": str(prep.evalset.path),
        "task": prep.evalset.task, "samples": len(prep.evalset.samples),
        "profile": prep.profile.name, "gates_file": prep.profile.source,
        "role": config.role, "enforce_role_targets": prep.profile.enforce_role_targets,
        "options": vars(config.options) | {"limit": config.limit},
        "category_metric": "accuracy" if prep.evalset.task == "eightball" else "lax F1",
        "fingerprints": data_fp, "environment": fingerprints.environment(),
        "backends": sections, "baseline": None,
        "files": {"predictions": list(predictions)},
        "wall_seconds": time.perf_counter() - started,
    }
    passed = all(s["passed"] for s in sections)
    if prep.baseline is not None:
        policy = prep.profile.baseline
        comparison = baseline_mod.compare(sections, prep.baseline, policy, str(config.baseline))
        old_sha = comparison["baseline_dataset_sha256"]
        comparison["dataset_differs"] = bool(old_sha) and old_sha != data_fp["dataset_sha256"]
        result["baseline"] = comparison
        if comparison["regressions"] and policy.fail:
            passed = False
    result["passed"] = passed
    prep.out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in predictions.items():
        atomic_write_text(prep.out_dir / name, text)
    path = report.write_report(result, prep.out_dir, latencies)
    return result, path
