"""The demo's task data: the toy task splits, optionally with fewer tools offered per sample, and
the tokenizer corpus rendered from them.

Every toy tool-call sample offers all five tools, whose definitions take ~630 of a prompt's ~670
tokens. On a 2-core CPU that prompt dominates training and generation time, so the demo can offer
``tools_per_sample`` tools instead: the ones the gold answer calls plus seeded random distractors
(controls get distractors only), in a seeded order. The task is otherwise unchanged: the same
samples, splits, held-out test values, gold calls and broker fixtures.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from mlx_distill.eval.broker import fixtures_text
from mlx_distill.tasks import eightball, toolcall
from mlx_distill.tasks.common import (
    manifest,
    read_jsonl,
    split_files,
    stable_int,
    write_task_dir,
)
from mlx_distill.tasks.toolcall_tools import TOOLS

TASKS = ("toolcall", "eightball")


def offered_tools(sample: dict[str, Any], count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` tool definitions for ``sample``: every tool its gold answer calls, then
    distractors drawn with a seed fixed by ``(seed, sample id)``, in a seeded order. ``count``
    below the number of tools called keeps just those; 0 (or >= all tools) offers all."""
    if count <= 0 or count >= len(TOOLS):
        return [dict(t) for t in sample["tools"]]
    rng = random.Random(stable_int("demo-tools", seed, sample["id"]))
    called = {c["name"] for c in (sample["gold"].get("calls") or [])}
    by_name = {t["function"]["name"]: t for t in sample["tools"]}
    others = sorted(set(by_name) - called)
    names = sorted(called) + rng.sample(others, max(0, count - len(called)))
    rng.shuffle(names)
    return [by_name[n] for n in names]


def without_descriptions(tool: dict[str, Any]) -> dict[str, Any]:
    """``tool`` without its ``description`` texts (function and parameters): the schema a
    constrained decoder and the scorer use is unchanged, the prompt ~40% shorter."""
    function = {k: v for k, v in tool["function"].items() if k != "description"}
    params = dict(function.get("parameters") or {})
    params["properties"] = {
        name: {k: v for k, v in spec.items() if k != "description"}
        for name, spec in (params.get("properties") or {}).items()
    }
    return {**tool, "function": {**function, "parameters": params}}


def write_task(task: str, out_dir: Path, counts: tuple[int, int, int], seed: int = 0,
               tools_per_sample: int = 0, tool_descriptions: bool = True) -> Path:
    """Write the task's split files (as ``mlx-distill tasks`` does) into ``out_dir``."""
    if task == "eightball":
        return eightball.write_eightball(out_dir, *counts, seed=seed)
    if task != "toolcall":
        raise ValueError(f"task {task!r}: expected one of {TASKS}")
    splits = toolcall.generate(*counts, seed=seed)
    for samples in splits.values():
        for sample in samples:
            sample["tools"] = offered_tools(sample, tools_per_sample, seed)
            if not tool_descriptions:
                sample["tools"] = [without_descriptions(t) for t in sample["tools"]]
    files = split_files(splits, toolcall.prompt_record, toolcall.sft_record)
    files["fixtures.jsonl"] = fixtures_text(
        f for samples in splits.values() for f in toolcall.fixtures(samples))
    files["tools.json"] = json.dumps(TOOLS, indent=2, ensure_ascii=False) + "\n"
    files["manifest.json"] = manifest(toolcall.TASK, seed, splits, files,
                                      tools_per_sample=tools_per_sample or len(TOOLS))
    return write_task_dir(out_dir, files, toolcall.OUTPUT_FILES)


BUNDLED_CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"


def write_corpus(task_dir: Path, work_dir: Path) -> Path:
    """The tokenizer corpus ``work_dir/corpus.txt``: every train conversation rendered by the
    chat template (so BPE merges what the model will read), plus the bundled English text. The
    template is rendered by a byte-level tokenizer trained first, as the real one will be."""
    from mlx_distill.tokenizer import MIN_VOCAB_SIZE, load_tokenizer, train_tokenizer

    template = load_tokenizer(train_tokenizer([BUNDLED_CORPUS], MIN_VOCAB_SIZE,
                                              work_dir / "template-tokenizer"))
    texts = [template.apply_chat_template(r["messages"], tools=r.get("tools"), tokenize=False)
             for r in read_jsonl(task_dir / "train.sft.jsonl")]
    out_file = work_dir / "corpus.txt"
    out_file.write_text("\n".join(texts) + "\n" + BUNDLED_CORPUS.read_text(encoding="utf-8"),
                        encoding="utf-8")
    return out_file
