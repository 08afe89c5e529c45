"""Encode one training record (a KD record or a plain SFT conversation) into student tokens.

The prompt is ``template(messages, tools, add_generation_prompt=True)``; the completion is the rest
of ``template(messages + [assistant], tools)`` up to and including the end-of-turn token. The two
parts are encoded separately and concatenated: at inference the prompt is encoded alone and the
model continues from those ids, so a joint encoding (which may merge tokens across the boundary)
would train on sequences the model never sees. The full render must start with the prompt render
(else the record is refused, naming it).

Arrays are target-aligned: position ``t`` reads ``inputs[t] = ids[t]`` and predicts
``targets[t] = ids[t + 1]``. Completion token ``i`` is the target at ``prompt_len - 1 + i``; the
loss mask is 1 exactly there, so nothing in the prompt is a label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlx_distill.data.align import TeacherTargets, align_teacher
from mlx_distill.data.errors import EMPTY_COMPLETION, INVALID_FIELD, UNDECODABLE, RecordError
from mlx_distill.data.vocab import TokenVocab

KIND_KD = "kd"
KIND_SFT = "sft"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = b"<tool_call>", b"</tool_call>"
TOOL_ARGUMENTS = ("text", "object")


@dataclass
class Example:
    """One encoded record. ``tool_mask`` and ``teacher`` hold one row per completion token."""

    id: str
    ids: np.ndarray  # (N,) int32: prompt then completion (ending with end-of-turn)
    prompt_len: int
    tool_mask: np.ndarray  # (N - prompt_len,) float32: 1 inside tool-call JSON
    teacher: TeacherTargets | None = None
    # False when the teacher stopped at max_tokens: its answer has no real end, so the appended
    # end-of-turn token is not a label.
    train_on_end: bool = True
    kind: str = KIND_KD

    @property
    def length(self) -> int:
        """Number of target positions (``len(ids) - 1``)."""
        return len(self.ids) - 1

    @property
    def completion_ids(self) -> np.ndarray:
        return self.ids[self.prompt_len:]

    @property
    def aligned(self) -> int:
        return 0 if self.teacher is None else self.teacher.aligned

    def supervised_run(self, length: int | None = None) -> tuple[int, int]:
        """``(start, count)``: the one run of positions ``arrays(length)`` may put a loss on."""
        start = self.prompt_len - 1
        size = self.length if length is None else length
        return start, max(0, min(self.length, size) - start)

    def arrays(self, length: int | None = None, k: int = 1, pad_id: int = 0) -> dict[str, Any]:
        """Dense target-aligned arrays of ``length`` positions (default: all), truncated at the
        end or padded (pad id, masks 0, ``top_logprobs`` −inf); ``k`` carried entries per row
        (a teacher row with more is cut to its ``k`` most likely: the rest joins the tail)."""
        size = self.length if length is None else length
        n = min(self.length, size)
        start, rows = self.supervised_run(size)
        out = {
            "inputs": np.full(size, pad_id, dtype=np.int32),
            "targets": np.full(size, pad_id, dtype=np.int32),
            "loss_mask": np.zeros(size, dtype=np.float32),
            "kd_mask": np.zeros(size, dtype=np.float32),
            "tool_mask": np.zeros(size, dtype=np.float32),
            "top_ids": np.zeros((size, k), dtype=np.int32),
            "top_logprobs": np.full((size, k), -np.inf, dtype=np.float32),
        }
        out["inputs"][:n] = self.ids[:n]
        out["targets"][:n] = self.ids[1 : n + 1]
        if rows == 0:
            return out
        out["loss_mask"][start:n] = 1.0
        if not self.train_on_end and n == self.length:
            out["loss_mask"][n - 1] = 0.0
        out["tool_mask"][start:n] = self.tool_mask[:rows]
        if self.teacher is not None:
            width = min(k, self.teacher.k)
            out["kd_mask"][start:n] = self.teacher.kd_mask[:rows] * out["loss_mask"][start:n]
            out["top_ids"][start:n, :width] = self.teacher.top_ids[:rows, :width]
            out["top_logprobs"][start:n, :width] = self.teacher.top_logprobs[:rows, :width]
        return out


def assistant_message(text: str, reasoning: str | None, tool_calls: list[dict]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text or ""}
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def _arguments_as_objects(messages: list[dict]) -> list[dict]:
    """Messages with tool-call arguments parsed to objects (for templates that ``tojson`` them)."""
    out = []
    for m, message in enumerate(messages):
        calls = message.get("tool_calls")
        if not calls:
            out.append(message)
            continue
        parsed = []
        for c, call in enumerate(calls):
            fn = dict(call.get("function") or {})
            args = fn.get("arguments")
            if isinstance(args, str):
                try:
                    fn["arguments"] = json.loads(args)
                except json.JSONDecodeError:
                    fn["arguments"] = None
                if not isinstance(fn["arguments"], dict):
                    where = f"messages[{m}].tool_calls[{c}].function.arguments"
                    raise RecordError(INVALID_FIELD,
                                      f"{where}: expected a JSON object, got {args!r}")
            parsed.append({**call, "function": fn})
        out.append({**message, "tool_calls": parsed})
    return out


def _render(tokenizer: Any, messages: list[dict], tools: Any, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools or None, add_generation_prompt=generation_prompt, tokenize=False
        )
    except Exception as exc:  # jinja2 raises TemplateError, TypeError, UndefinedError, ...
        reason = f"chat template failed ({type(exc).__name__}: {exc})"
        raise RecordError(UNDECODABLE, reason) from None


def render_turn(
    tokenizer: Any,
    vocab: TokenVocab,
    messages: list[dict],
    tools: list[dict] | None,
    assistant: dict[str, Any],
    *,
    tool_arguments: str = "text",
) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)``; the completion ends with the end-of-turn id."""
    if tool_arguments == "object":
        messages, [assistant] = _arguments_as_objects(messages), _arguments_as_objects([assistant])
    prompt = _render(tokenizer, messages, tools, True)
    full = _render(tokenizer, [*messages, assistant], tools, False)
    if not full.startswith(prompt):
        at = next((i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b),
                  min(len(prompt), len(full)))
        raise RecordError(
            UNDECODABLE,
            f"the chat template's prompt render is not a prefix of the full render (first "
            f"difference at character {at}: {prompt[at:at + 20]!r} vs {full[at:at + 20]!r})",
        )
    prompt_ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    rest = list(tokenizer.encode(full[len(prompt):], add_special_tokens=False))
    ends = [i for i, token_id in enumerate(rest) if token_id in vocab.eos_ids]
    if not ends:
        raise RecordError(UNDECODABLE, "the chat template renders no end-of-turn token after the "
                          "assistant turn")
    # The last one: a literal end token inside the answer must not cut the answer short.
    return prompt_ids, rest[: ends[-1] + 1]


def tool_regions(text: bytes, tool_calls: list[dict]) -> list[tuple[int, int]]:
    """Byte ranges of tool-call JSON in a rendered completion: between ``<tool_call>`` and
    ``</tool_call>`` when the template uses those tags, else each call's arguments text."""
    regions = []
    if TOOL_CALL_OPEN in text:
        pos = 0
        while (open_at := text.find(TOOL_CALL_OPEN, pos)) >= 0:
            start = open_at + len(TOOL_CALL_OPEN)
            close_at = text.find(TOOL_CALL_CLOSE, start)
            end = len(text) if close_at < 0 else close_at
            regions.append((start, end))
            pos = end
        return regions
    pos = 0
    for call in tool_calls:
        args = (call.get("function") or {}).get("arguments")
        if not isinstance(args, str) or not args:
            continue
        data = args.encode("utf-8")
        found = text.find(data, pos)
        if found >= 0:
            regions.append((found, found + len(data)))
            pos = found + len(data)
    return regions


def tool_token_mask(ids: list[int], vocab: TokenVocab, tool_calls: list[dict]) -> np.ndarray:
    """1 for tokens overlapping tool-call JSON, per token of ``ids``."""
    mask = np.zeros(len(ids), dtype=np.float32)
    regions = tool_regions(vocab.text_bytes(ids), tool_calls)
    if not regions:
        return mask
    for i, (start, end) in enumerate(vocab.spans(ids)):
        if any(start < r_end and r_start < end for r_start, r_end in regions):
            mask[i] = 1.0
    return mask


def _check_not_empty(text: str, tool_calls: list) -> None:
    if not text and not tool_calls:
        raise RecordError(EMPTY_COMPLETION, "no text and no tool calls")


def encode_kd_record(
    record: dict[str, Any],
    tokenizer: Any,
    vocab: TokenVocab,
    *,
    by_id: bool = False,
    tool_arguments: str = "text",
) -> Example:
    """Encode a validated KD record; its teacher tokens (if any) aligned by id or by text."""
    text, calls = record["text"], record["tool_calls"] or []
    _check_not_empty(text, calls)
    assistant = assistant_message(text, record["reasoning"], calls)
    prompt_ids, completion_ids = render_turn(
        tokenizer, vocab, record["messages"], record["tools"], assistant,
        tool_arguments=tool_arguments,
    )
    teacher = None
    if record["tokens"] is not None:
        completion_ids, teacher = align_teacher(
            record["tokens"], completion_ids, vocab, by_id=by_id
        )
    ids = np.array(prompt_ids + list(completion_ids), dtype=np.int32)
    return Example(
        id=record["id"],
        ids=ids,
        prompt_len=len(prompt_ids),
        tool_mask=tool_token_mask(list(completion_ids), vocab, calls),
        teacher=teacher,
        train_on_end=record.get("finish_reason") != "length",
        kind=KIND_KD,
    )


def encode_sft_example(
    example: dict[str, Any],
    tokenizer: Any,
    vocab: TokenVocab,
    *,
    example_id: str,
    tool_arguments: str = "text",
) -> Example:
    """Encode ``{"messages": [..., assistant], "tools"?: [...]}``: the last (assistant) message is
    the gold completion; there is no teacher distribution (``kd_mask`` 0)."""
    *history, answer = example["messages"]
    calls = answer.get("tool_calls") or []
    _check_not_empty(answer.get("content") or "", calls)
    assistant = assistant_message(answer.get("content") or "", answer.get("reasoning_content"),
                                  calls)
    prompt_ids, completion_ids = render_turn(
        tokenizer, vocab, history, example.get("tools"), assistant, tool_arguments=tool_arguments
    )
    return Example(
        id=example_id,
        ids=np.array(prompt_ids + completion_ids, dtype=np.int32),
        prompt_len=len(prompt_ids),
        tool_mask=tool_token_mask(completion_ids, vocab, calls),
        kind=KIND_SFT,
    )
