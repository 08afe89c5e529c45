"""A ``teacher generate`` run's configuration, and starting or resuming it: manifest, output
lock, recovery of ``OUT``.

A run is identified by the ``run_id`` in ``OUT.manifest.json``. Resuming requires the same prompts
file (sha256), shard, teacher and request settings: anything else would mix two runs in one file.
Concurrency, budget, retries and checkpoint interval may change between invocations.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import mlx_distill
from mlx_distill.atomic import atomic_write_text
from mlx_distill.cli import UserError
from mlx_distill.teacher.cache import CACHE_SCHEMA
from mlx_distill.teacher.kdstate import (
    MANIFEST_SCHEMA,
    OutputLog,
    RunState,
    load_state,
    manifest_path,
    open_fresh,
    read_json,
    recover,
    state_path,
)
from mlx_distill.teacher.prompts import RequestDefaults, Shard
from mlx_distill.teacher.types import KD_SCHEMA

if TYPE_CHECKING:
    from mlx_distill.teacher.config import TeacherSpec

EXIT_OK, EXIT_BUDGET, EXIT_FAILURES, EXIT_FAILURE_LIMIT, EXIT_INTERRUPTED = 0, 3, 4, 5, 130


@dataclass
class GenerateConfig:
    prompts: Path
    out: Path
    teacher: str
    cache: Path | None = None
    checkpoint_interval: int = 50
    concurrency: int = 16
    budget_usd: float | None = None
    shard: Shard = field(default_factory=Shard)
    resume: bool = False
    model: str | None = None
    tier: str | None = None
    teachers_config: Path | None = None
    max_tokens: int | None = None  # None: the teacher's max_tokens from teachers.yaml
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    top_logprobs: int | None = -1  # -1: the teacher's maximum; None: no logprobs
    stream: bool = False
    max_attempts: int = 6
    timeout_s: float = 120.0
    failure_limit: str = "10%"
    progress: bool | None = None  # None: only on a terminal

    def cache_dir(self) -> Path:
        return self.cache or self.out.with_name(self.out.name + ".cache")


@dataclass
class GenerateResult:
    exit_code: int
    stop_reason: str | None
    records: int
    new_records: int
    total: int
    cache_hits: int
    cache_misses: int
    failures: dict[str, int]
    failed_ids: list[str]
    spent_usd: float
    reserved_usd: float
    budget_usd: float | None
    wall_s: float


def parse_failure_limit(text: str) -> tuple[float, bool]:
    """``'10%'`` → (0.10, True): a fraction of the prompts attempted; ``'25'`` → (25, False)."""
    try:
        if text.endswith("%"):
            value = float(text[:-1]) / 100
            if 0 <= value <= 1:
                return value, True
        elif int(text) >= 0:
            return int(text), False
    except ValueError:
        pass
    raise UserError(f"--failure-limit {text!r}: expected a percentage like 10% or a count like 25")


def resolve_teacher(cfg: GenerateConfig) -> tuple[TeacherSpec, RequestDefaults]:
    """Check the numeric options, load the teacher, and fix the request defaults."""
    from mlx_distill.teacher.config import api_key, load_teacher

    if cfg.checkpoint_interval < 1 or cfg.concurrency < 1 or cfg.max_attempts < 1:
        raise UserError("--checkpoint-interval, --concurrency and --max-attempts must be >= 1")
    if cfg.budget_usd is not None and not 0 <= cfg.budget_usd < float("inf"):
        raise UserError(f"--budget-usd {cfg.budget_usd}: expected a finite number >= 0")
    if not 0 <= cfg.temperature <= 2 or not 0 < cfg.top_p <= 1:
        raise UserError(f"--temperature {cfg.temperature} / --top-p {cfg.top_p}: expected "
                        "0 <= temperature <= 2 and 0 < top_p <= 1")
    spec = load_teacher(cfg.teacher, model=cfg.model, tier=cfg.tier, path=cfg.teachers_config)
    api_key(spec)  # a missing key fails now, before any file is written
    top = spec.max_top_logprobs if cfg.top_logprobs == -1 else cfg.top_logprobs
    if top is not None and not 0 <= top <= spec.max_top_logprobs:
        raise UserError(f"--top-logprobs {top}: expected 0..{spec.max_top_logprobs} "
                        f"(teacher {spec.name}'s maximum)")
    return spec, RequestDefaults(
        max_tokens=cfg.max_tokens or spec.max_tokens, temperature=cfg.temperature,
        top_p=cfg.top_p, seed=cfg.seed, stop=cfg.stop, top_logprobs=top,
    )


# Manifest entries that must match when resuming, and the flag that sets each.
_MUST_MATCH = {
    ("shard", "index"): "--shard", ("shard", "count"): "--shard",
    ("teacher", "base_url"): "--teacher", ("teacher", "model"): "--model",
    ("teacher", "fingerprint"): "--teacher",
    ("request", "max_tokens"): "--max-tokens", ("request", "temperature"): "--temperature",
    ("request", "top_p"): "--top-p", ("request", "seed"): "--seed", ("request", "stop"): "--stop",
    ("request", "top_logprobs"): "--top-logprobs",
}


@dataclass
class RunFiles:
    run_id: str
    state: RunState
    log: OutputLog
    done: set[str]
    resumed: bool


def public_url(url: str) -> str:
    """``url`` without user:password or query, which can carry credentials."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def build_manifest(cfg: GenerateConfig, spec: TeacherSpec, defaults: RequestDefaults,
                   prompts_sha: str, prompt_count: int, shard_count: int) -> dict[str, Any]:
    """The run's manifest. Holds the API key's variable NAME, never its value."""
    return {
        "schema": MANIFEST_SCHEMA,
        "kd_schema": KD_SCHEMA,
        "cache_schema": CACHE_SCHEMA,
        "run_id": uuid.uuid4().hex,
        "created": time.time(),
        "tool_version": mlx_distill.__version__,
        "prompts": {"path": str(cfg.prompts), "sha256": prompts_sha, "count": prompt_count,
                    "in_shard": shard_count},
        "shard": {"index": cfg.shard.index, "count": cfg.shard.count,
                  "by": "int(sha256(id)[:8 bytes]) mod count"},
        "teacher": {"name": spec.name, "base_url": public_url(spec.base_url), "model": spec.model,
                    "tier": spec.tier, "fingerprint": spec.fingerprint(),
                    "api_key_env": spec.api_key_env},
        "request": {"max_tokens": defaults.max_tokens, "temperature": defaults.temperature,
                    "top_p": defaults.top_p, "seed": defaults.seed,
                    "stop": list(defaults.stop) if defaults.stop else None,
                    "top_logprobs": defaults.top_logprobs},
        "config": {"cache": str(cfg.cache_dir()), "checkpoint_interval": cfg.checkpoint_interval,
                   "concurrency": cfg.concurrency, "budget_usd": cfg.budget_usd,
                   "stream": cfg.stream, "max_attempts": cfg.max_attempts,
                   "timeout_s": cfg.timeout_s, "failure_limit": cfg.failure_limit},
    }


def check_resumable(old: dict[str, Any], new: dict[str, Any], path: Path) -> None:
    """Raise ``UserError`` naming the first setting that differs from the run being resumed."""
    if old.get("schema") != MANIFEST_SCHEMA or old.get("kd_schema") != KD_SCHEMA:
        raise UserError(f"{path}: not a {MANIFEST_SCHEMA} manifest for {KD_SCHEMA} records; "
                        "write to a new --out")
    old_sha = (old.get("prompts") or {}).get("sha256")
    if old_sha != new["prompts"]["sha256"]:
        raise UserError(
            f"prompts file {new['prompts']['path']} changed since the run in {path.name} started "
            f"(sha256 {new['prompts']['sha256'][:12]}… ≠ {str(old_sha)[:12]}…); resume with the "
            "original prompts file or write to a new --out"
        )
    for (section, key), flag in _MUST_MATCH.items():
        before, now = (old.get(section) or {}).get(key), new[section][key]
        if json.dumps(before) != json.dumps(now):
            raise UserError(
                f"{flag}: {section}.{key} is {now!r} now but {before!r} in the run being resumed "
                f"({path}); resume with the same settings or write to a new --out"
            )


def _lock(out: Path) -> int:
    """Open ``OUT`` for appending, holding an exclusive lock so two runs never share a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{out} is being written by another teacher generate process") from None
    return fd


def open_run(cfg: GenerateConfig, spec: TeacherSpec, defaults: RequestDefaults, prompts_sha: str,
             prompt_count: int, shard_ids: set[str]) -> RunFiles:
    out = cfg.out
    manifest = build_manifest(cfg, spec, defaults, prompts_sha, prompt_count, len(shard_ids))
    mpath, spath = manifest_path(out), state_path(out)
    out_size = out.stat().st_size if out.exists() else 0
    if out.exists() and not out.is_file():
        raise UserError(f"--out {out} is not a regular file")
    if not cfg.resume:
        leftovers = [p for p in (mpath, spath) if p.exists()]
        if out_size or leftovers:
            what = out if out_size else leftovers[0]
            raise UserError(f"{what} already exists (never overwritten); pass --resume to "
                            "continue that run, or choose a new --out")
    elif not mpath.exists():
        if out_size:
            raise UserError(f"cannot resume {out}: its manifest {mpath.name} is missing")
        print(f"note: nothing to resume at {out}; starting a new run", file=sys.stderr)
    else:
        old = read_json(mpath, "manifest")
        check_resumable(old, manifest, mpath)
        run_id = str(old["run_id"])
        fd = _lock(out)
        try:
            state = load_state(out, run_id)
            if state is None:
                if out.stat().st_size:
                    raise UserError(f"cannot resume {out}: its checkpoint {spath.name} is missing")
                state = RunState(run_id)
            log, done = recover(out, state, shard_ids, fd)
        except BaseException:
            os.close(fd)
            raise
        return RunFiles(run_id, state, log, done, resumed=True)
    fd = _lock(out)
    try:
        if out.stat().st_size:  # appeared between the check and the lock
            raise UserError(f"{out} already exists (never overwritten); choose a new --out")
        atomic_write_text(mpath, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    except BaseException:
        os.close(fd)
        raise
    run_id = manifest["run_id"]
    return RunFiles(run_id, RunState(run_id), open_fresh(out, fd), set(), resumed=False)
