"""Shared setup for the ``teacher generate`` tests: a teachers.yaml for a FakeTeacher, prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlx_distill.teacher.kdrun import GenerateConfig

# USD per 1M tokens: large enough that every answer costs something visible.
PRICES = {"input_cache_hit": 100.0, "input_cache_miss": 200.0, "output": 1000.0}


def write_teachers(directory: Path, base_url: str, *, api_key_env: str | None = None,
                   max_top_logprobs: int = 20, max_tokens: int = 24, concurrency: int = 64,
                   rpm: int = 1_000_000, prices: dict[str, float] | None = None) -> Path:
    """A teachers.yaml with one teacher, ``fake``, answering at ``base_url``."""
    path = directory / "teachers.yaml"
    spec = {
        "base_url": base_url, "model": "fake-teacher", "api_key_env": api_key_env,
        "pricing": prices or PRICES,
        "tiers": {"t": {"concurrency": concurrency, "rpm": rpm, "tpm": 1_000_000_000}},
        "tier": "t", "max_top_logprobs": max_top_logprobs, "max_tokens": max_tokens,
    }
    path.write_text(json.dumps({"teachers": {"fake": spec}}))  # JSON is YAML
    return path


def prompt_records(n: int, prefix: str = "q") -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i:04d}",
             "messages": [{"role": "user", "content": f"question number {i}"}]}
            for i in range(n)]


def write_prompts(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def config(tmp: Path, teachers: Path, prompts: Path, name: str = "kd.jsonl",
           **overrides: Any) -> GenerateConfig:
    values: dict[str, Any] = {
        "prompts": prompts, "out": tmp / name, "teacher": "fake", "teachers_config": teachers,
        "cache": tmp / "cache", "concurrency": 8, "progress": False, "max_attempts": 2,
        "checkpoint_interval": 5, "top_logprobs": 5,
    }
    values.update(overrides)
    return GenerateConfig(**values)


def cli_args(cfg: GenerateConfig, *extra: str) -> list[str]:
    """The ``teacher generate`` arguments equivalent to ``cfg`` (for subprocess runs)."""
    args = ["--prompts", str(cfg.prompts), "--out", str(cfg.out), "--teacher", cfg.teacher,
            "--teachers-config", str(cfg.teachers_config), "--cache", str(cfg.cache),
            "--concurrency", str(cfg.concurrency), "--max-attempts", str(cfg.max_attempts),
            "--checkpoint-interval", str(cfg.checkpoint_interval), "--no-progress",
            "--shard", str(cfg.shard), "--failure-limit", cfg.failure_limit]
    if cfg.stream:
        args.append("--stream")
    if cfg.top_logprobs is None:
        args.append("--no-logprobs")
    elif cfg.top_logprobs >= 0:
        args += ["--top-logprobs", str(cfg.top_logprobs)]
    if cfg.budget_usd is not None:
        args += ["--budget-usd", repr(cfg.budget_usd)]
    return args + list(extra)


def read_records(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "torn last line"
    return [json.loads(line) for line in data.splitlines()]


def without_created(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Records by id, minus the fetch time (the only field that legitimately differs)."""
    out = {}
    for record in records:
        assert record["id"] not in out, f"duplicate id {record['id']}"
        out[record["id"]] = {k: v for k, v in record.items() if k != "created"}
    return out


def expected_cost(usage: dict[str, int], prices: dict[str, float] | None = None) -> float:
    """The price formula written out: cached prompt tokens at the hit price, the rest at the miss
    price, completion tokens at the output price (USD per 1M tokens)."""
    p = prices or PRICES
    cached, prompt = usage["cached_tokens"], usage["prompt_tokens"]
    return (cached * p["input_cache_hit"] + (prompt - cached) * p["input_cache_miss"]
            + usage["completion_tokens"] * p["output"]) / 1e6
