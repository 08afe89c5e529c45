"""Shared by the runtime tests: a tokenizer that knows the tool-call template, random checkpoints,
tools covering the schema features, and an independent validity check of tool calls."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
from helpers import random_model, tiny_config

from mlx_distill.checkpoint import save_checkpoint
from mlx_distill.eval.scoring import schema_error
from mlx_distill.tokenizer import load_tokenizer, train_tokenizer

# Enum, integer with bounds, number, anchored string pattern, boolean, required and optional.
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "pattern": "^[a-z]{1,8}$"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        }, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "minimum": -50, "maximum": 5000},
            "b": {"type": "number"},
            "exact": {"type": "boolean"},
        }, "required": ["a", "b"]}}},
    {"type": "function", "function": {
        "name": "set_alarm", "description": "Set an alarm",
        "parameters": {"type": "object", "properties": {
            "time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
            "days": {"type": "integer", "enum": [1, 2, 7]},
        }, "required": ["time", "days"]}}},
]
MESSAGES = [{"role": "user", "content": "what is the weather in zurich"}]
WORDS = "the weather in zurich is sunny rain what add two numbers city unit alarm set".split()


def make_tokenizer(root: Path, vocab_size: int = 600) -> Path:
    """A byte-level BPE trained on chat prompts rendered with :data:`TOOLS`, so a prompt with
    tools stays a few hundred tokens long."""
    rng = random.Random(0)
    corpus = root / "words.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(WORDS, k=8)) for _ in range(200)))
    first = load_tokenizer(train_tokenizer([corpus], 300, root / "first"))
    texts = []
    for i in range(40):
        messages = [{"role": "user", "content": " ".join(rng.choices(WORDS, k=6))}]
        call = {"name": "add", "arguments": {"a": rng.randint(0, 99), "b": 1.5}}
        texts.append(first.apply_chat_template(
            messages + [{"role": "assistant", "tool_calls": [{"type": "function",
                                                              "function": call}]}],
            tools=TOOLS if i % 2 else TOOLS[:1], tokenize=False))
    templated = root / "templated.txt"
    templated.write_text("\n".join(texts))
    return train_tokenizer([templated, corpus], vocab_size, root / "tokenizer")


def make_checkpoint(root: Path, tokenizer_dir: Path, seed: int = 1, **config) -> Path:
    vocab = len(load_tokenizer(tokenizer_dir))
    model = random_model(tiny_config(vocab_size=vocab, max_seq_len=1024, **config), seed=seed)
    return save_checkpoint(model, root / f"ckpt{seed}", tokenizer_dir=tokenizer_dir)


def block(name: str, arguments: dict) -> str:
    """One call as the chat template renders it (``tojson``: json.dumps defaults)."""
    return (f'<tool_call>\n{{"name": "{name}", "arguments": '
            f"{json.dumps(arguments, ensure_ascii=False)}}}\n</tool_call>")


def arguments_valid(function: dict, arguments: object) -> bool:
    """Valid under JSON Schema (jsonschema, with unknown parameters refused as strict scoring
    does) and under the BFCL type rules of our scorer (3.0 is not an integer)."""
    schema = dict(function["parameters"])
    schema.setdefault("additionalProperties", False)
    return (jsonschema.Draft202012Validator(schema).is_valid(arguments)
            and schema_error(arguments, schema, "arguments") is None)


def call_errors(result, tools: list[dict]) -> list[str]:
    """Why ``result``'s tool calls are not all valid calls of ``tools`` (empty: all valid)."""
    functions = {t["function"]["name"]: t["function"] for t in tools}
    errors = []
    for call in result.calls():
        if not call.valid:
            errors.append(f"does not parse: {call.raw!r}")
        elif call.name not in functions:
            errors.append(f"unknown tool {call.name!r}")
        elif not arguments_valid(functions[call.name], call.arguments):
            errors.append(f"{call.name}: invalid arguments {call.arguments!r}")
    return errors
