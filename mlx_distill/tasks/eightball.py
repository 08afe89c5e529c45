"""Toy Magic 8-Ball task: a yes/no question -> one of the 20 classic answers.

The answer is a learnable function of the question: each answer belongs to one topic word
(``TOPICS[i]`` -> ``ANSWERS[i]``), and every question mentions exactly one topic. Whose topic it
is, the time expression and the phrasing vary and carry no signal; the held-out test split uses
owners, times and question templates that train and val never use, with the same topics.
Scoring is exact match of the answer (surrounding whitespace ignored).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlx_distill.tasks.common import (
    SPLITS,
    allocate,
    check_counts,
    draw_samples,
    manifest,
    split_files,
    split_rng,
    write_task_dir,
)
from mlx_distill.tasks.toolcall import prompt_record, sft_record

TASK = "eightball"
SYSTEM_PROMPT = "You are a Magic 8-Ball. Answer every question with one of your 20 answers."
# The 20 answers of the original Magic 8-Ball: 10 affirmative, 5 non-committal, 5 negative.
ANSWERS = (
    "It is certain.", "It is decidedly so.", "Without a doubt.", "Yes, definitely.",
    "You may rely on it.", "As I see it, yes.", "Most likely.", "Outlook good.", "Yes.",
    "Signs point to yes.",
    "Reply hazy, try again.", "Ask again later.", "Better not tell you now.",
    "Cannot predict now.", "Concentrate and ask again.",
    "Don't count on it.", "My reply is no.", "My sources say no.", "Outlook not so good.",
    "Very doubtful.",
)
TOPICS = (
    "job", "exam", "trip", "party", "garden", "promotion", "concert", "wedding", "puppy",
    "marathon", "lottery", "interview", "startup", "novel", "bakery", "harvest", "election",
    "audition", "voyage", "tournament",
)
CATEGORIES = ("affirmative",) * 10 + ("non_committal",) * 5 + ("negative",) * 5
TEMPLATES = {
    "train": (
        "Will {owner} {topic} go well {time}?", "Is {owner} {topic} going to work out {time}?",
        "Can I count on {owner} {topic} {time}?", "Will {owner} {topic} be a success {time}?",
        "Magic 8-Ball, is {owner} {topic} safe {time}?",
        "Should I expect good news about {owner} {topic} {time}?",
    ),
    "test": (
        "Does {owner} {topic} look promising {time}?",
        "Will things turn out fine with {owner} {topic} {time}?",
        "Is luck on the side of {owner} {topic} {time}?",
        "Tell me, 8-Ball: will {owner} {topic} pay off {time}?",
    ),
}
OWNERS = {
    "train": ("my", "our", "Alice's", "Ben's", "Chloe's", "David's", "Emma's", "Farid's",
              "Grace's", "Hugo's", "Ines's", "Jonas's"),
    "test": ("their", "Kemal's", "Lucia's", "Mateo's", "Noor's", "Olga's", "Priya's"),
}
TIMES = {
    "train": ("today", "tomorrow", "this week", "next month", "this year", "on Monday",
              "on Friday", "soon"),
    "test": ("tonight", "next weekend", "this autumn", "before spring", "on Sunday"),
}


def answer_for(question: str) -> str:
    """The gold answer: the answer of the one topic word the question mentions."""
    words = set(re.findall(r"[a-z]+", question.lower()))
    found = [i for i, topic in enumerate(TOPICS) if topic in words]
    if len(found) != 1:
        raise ValueError(f"question must mention exactly one topic of {TOPICS}: {question!r}")
    return ANSWERS[found[0]]


def _make(topic: str, rng: random.Random, split: str) -> dict[str, Any]:
    phrasing = "test" if split == "test" else "train"
    question = rng.choice(TEMPLATES[phrasing]).format(
        topic=topic, owner=rng.choice(OWNERS[phrasing]), time=rng.choice(TIMES[phrasing]))
    answer = answer_for(question)
    return {
        "id": "", "split": split, "category": CATEGORIES[ANSWERS.index(answer)],
        "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                     {"role": "user", "content": question}],
        "tools": [], "gold": {"no_call": True}, "gold_answer": answer,
    }


def generate(n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, list[dict]]:
    """The three splits, deterministic in the arguments; topics are balanced in every split."""
    check_counts(n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)
    splits: dict[str, list[dict[str, Any]]] = {}
    used: set[str] = set()
    for split, n in zip(SPLITS, (n_train, n_val, n_test), strict=True):
        rng = split_rng(TASK, seed, split)
        topics = allocate(n, dict.fromkeys(TOPICS, 1.0), rng)
        samples = draw_samples(topics, lambda t, r, s=split: _make(t, r, s), rng, used)
        for i, sample in enumerate(samples):
            sample["id"] = f"{TASK}-{split}-{i:05d}"
        used |= {s["messages"][-1]["content"] for s in samples}
        splits[split] = samples
    return splits


def answer_correct(sample: dict[str, Any], text: str) -> bool:
    return text.strip() == sample["gold_answer"]


def score(samples: Sequence[dict[str, Any]], texts: Sequence[str]) -> dict[str, Any]:
    """Exact-match accuracy overall and per category (affirmative / non_committal / negative)."""
    if len(samples) != len(texts):
        raise ValueError(f"{len(samples)} samples but {len(texts)} answers")
    correct = [answer_correct(s, t) for s, t in zip(samples, texts, strict=True)]

    def summary(flags: list[bool]) -> dict[str, Any]:
        return {"samples": len(flags), "correct": sum(flags),
                "accuracy": sum(flags) / len(flags) if flags else None}

    out = summary(correct)
    out["per_category"] = {
        c: summary([ok for s, ok in zip(samples, correct, strict=True) if s["category"] == c])
        for c in sorted({s["category"] for s in samples})
    }
    return out


def write_eightball(out_dir: str | os.PathLike, n_train: int, n_val: int, n_test: int,
                    seed: int = 0) -> Path:
    """Write ``{split}.jsonl``, ``{split}.prompts.jsonl``, ``{split}.sft.jsonl`` and
    ``manifest.json`` atomically."""
    splits = generate(n_train, n_val, n_test, seed)
    files = split_files(splits, prompt_record, sft_record)
    files["manifest.json"] = manifest(TASK, seed, splits, files, rule=(
        "answer = ANSWERS[i] for the topic word TOPICS[i] the question mentions"))
    owned = [f"{s}{x}" for s in SPLITS for x in (".jsonl", ".prompts.jsonl", ".sft.jsonl")]
    return write_task_dir(out_dir, files, [*owned, "manifest.json"])
