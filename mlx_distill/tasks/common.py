"""Conventions shared by the toy task generators: splits, sample records, JSONL files, output
directories, and seeded helpers.

A sample is one JSON object per line: ``id``, ``split``, ``category``, ``messages`` (OpenAI chat
messages up to the turn the model must produce), ``tools`` (OpenAI tool definitions; ``[]`` when
none), ``gold`` (``{"calls": [{name, arguments}]}`` or ``{"no_call": true}``), ``gold_answer`` (the
assistant text the model should produce) and, for multi-turn samples, ``turns`` (the messages that
follow the gold assistant turn).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mlx_distill.atomic import atomic_directory
from mlx_distill.cli import UserError

SPLITS = ("train", "val", "test")
# Draws of a sample before accepting one whose user text repeats an earlier one in the same split,
# and before giving up on finding one that no other split uses.
MAX_UNIQUE_DRAWS = 40
MAX_DRAWS = 2000


class TaskError(UserError, ValueError):
    """Bad task-generator input; the message names the field and what is expected."""


def stable_int(*parts: Any) -> int:
    """A 64-bit integer fixed by ``parts`` alone (same value on every machine and run)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split_rng(task: str, seed: int, split: str) -> random.Random:
    # String seeds are hashed with SHA-512 by random.seed, so this is stable across runs.
    return random.Random(f"{task}:{seed}:{split}")


def allocate(n: int, weights: dict[str, float], rng: random.Random) -> list[str]:
    """``n`` category labels in proportion to ``weights`` (largest remainder), shuffled.

    Every category with positive weight appears once ``n`` is at least the number of categories.
    """
    total = sum(weights.values())
    exact = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(v) for k, v in exact.items()}
    floor = 1 if n >= len(weights) else 0  # small n: one of each before the rest
    counts = {k: max(c, floor) for k, c in counts.items()}
    while sum(counts.values()) > n:
        k = max((c for c in counts if counts[c] > floor), key=lambda c: (counts[c] - exact[c], c))
        counts[k] -= 1
    order = sorted(weights, key=lambda k: (-(exact[k] - counts[k]), k))
    for k in order[: n - sum(counts.values())]:
        counts[k] += 1
    labels = [k for k in weights for _ in range(counts[k])]
    rng.shuffle(labels)
    return labels


def user_text(sample: dict[str, Any]) -> str:
    return next(m["content"] for m in reversed(sample["messages"]) if m["role"] == "user")


def draw_samples(
    labels: list[str],
    make: Callable[[str, random.Random], dict[str, Any]],
    rng: random.Random,
    forbidden: set[str],
) -> list[dict[str, Any]]:
    """One sample per label from ``make(label, rng)``. User texts in ``forbidden`` (other splits)
    are never used; repeats within the split are accepted only when fresh draws run out."""
    seen: set[str] = set()
    samples = []
    for label in labels:
        chosen = repeat = None
        for attempt in range(MAX_DRAWS):
            sample = make(label, rng)
            text = user_text(sample)
            if text in forbidden:
                continue
            if text not in seen:
                chosen = sample
                break
            repeat = repeat or sample
            if attempt >= MAX_UNIQUE_DRAWS:
                chosen = repeat
                break
        if chosen is None:
            raise TaskError(f"category {label!r}: no prompt left that the other splits do not "
                            "use; ask for fewer samples")
        seen.add(user_text(chosen))
        samples.append(chosen)
    return samples


def jsonl_text(records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """JSON objects, one per non-blank line; errors name ``file:line``."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TaskError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise TaskError(f"{path}: not UTF-8 text") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise TaskError(f"{path}:{number}: expected a JSON object per line")
        records.append(record)
    return records


def check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TaskError(f"{name}: expected a non-negative integer, got {value!r}")


def write_task_dir(out_dir: str | os.PathLike, files: dict[str, str], owned: Iterable[str]) -> Path:
    """Replace ``out_dir`` atomically with ``files`` (name -> text). A directory holding anything
    but files named in ``owned`` is refused, so unrelated data is never wiped."""
    out_dir = Path(out_dir)
    owned = set(owned) | set(files)
    if out_dir.exists() and not out_dir.is_dir():
        raise TaskError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in owned)
        if foreign:
            raise TaskError(f"{out_dir}: directory holds other files ({foreign[0]}, …); "
                            "choose a new directory or one written by this generator")
    with atomic_directory(out_dir) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
    return out_dir


def split_files(splits: dict[str, list[dict[str, Any]]],
                prompt: Callable[[dict[str, Any]], dict[str, Any]],
                sft: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, str]:
    """``{split}.jsonl`` (eval samples), ``{split}.prompts.jsonl`` ({id, messages, tools}, for
    ``mlx-distill teacher generate``) and ``{split}.sft.jsonl`` (full gold conversations)."""
    files = {}
    for split, samples in splits.items():
        files[f"{split}.jsonl"] = jsonl_text(samples)
        files[f"{split}.prompts.jsonl"] = jsonl_text(prompt(s) for s in samples)
        files[f"{split}.sft.jsonl"] = jsonl_text(sft(s) for s in samples)
    return files


def manifest(task: str, seed: int, splits: dict[str, list[dict[str, Any]]],
             files: dict[str, str], **extra: Any) -> str:
    counts = {split: len(samples) for split, samples in splits.items()}
    categories = {
        split: dict(sorted(_count(s["category"] for s in samples).items()))
        for split, samples in splits.items()
    }
    digests = {name: hashlib.sha256(text.encode("utf-8")).hexdigest()
               for name, text in sorted(files.items())}
    body = {"task": task, "seed": seed, "counts": counts, "categories": categories,
            "sha256": digests, **extra}
    return json.dumps(body, indent=2, ensure_ascii=False) + "\n"


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out
