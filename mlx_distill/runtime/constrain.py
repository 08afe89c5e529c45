"""JSON-schema-constrained tool calls: one grammar over the chat template's tool-call format,
applied as a token mask wherever a backend holds the logits.

Engine: llguidance (Microsoft's Low-level Guidance: Rust core, MIT, a wheel with no dependencies).
Chosen over xgrammar because xgrammar's wheel requires torch (0.2.8's METADATA declares
``Requires-Dist: torch>=1.10.0`` and ``triton``), and this project stays torch-free. llguidance
takes Lark grammars with inline JSON schemas (``%json``) and special tokens (``<tool_call>``), so
free text, the block markers and every tool's schema are one grammar. Measured on the 2-core dev
box: a mask costs 0.09 / 0.23 / 0.69 ms per token for vocabularies of 600 / 32k / 131k tokens;
llguidance's tokenizer view is built once per tokenizer (0.05 / 0.8 / 6 s, cached) and a tool
list's grammar once per backend (~10-40 ms, cached). Its ``llguidance.mlx`` helper is a Metal
kernel (no CPU), so masks are applied with ``mx.where``/numpy instead.

The grammar, by ``tool_choice`` (OpenAI's values):

- ``"auto"``: a plain-text answer, or optional text followed by tool-call blocks;
- ``"required"``: tool-call blocks only; ``{"type": "function", "function": {"name": N}}``: the
  same, calling only N;
- ``"none"``: plain text only.

``parallel_tool_calls=False`` allows one block instead of several. A block is exactly what the
template renders: ``<tool_call>`` "\\n" JSON "\\n" ``</tool_call>`` ("\\n" between blocks), the
markers being the special tokens the template's text tokenizes to. The JSON is ``{"name": <const>,
"arguments": <the tool's parameters schema>}`` (anyOf over the tools) in the template's spelling:
``tojson``'s ", " and ": " separators, no other whitespace, keys in schema order. Argument objects
that do not say otherwise get ``additionalProperties: false``: strict (BFCL) scoring counts an
unknown parameter as an error, so the mask rules it out. Plain text may not contain the string
``<tool_call>`` spelled with ordinary tokens either, since scoring would read it as a block the
grammar never checked.
"""

from __future__ import annotations

import copy
import json
import time
import weakref
from typing import Any

import numpy as np

from mlx_distill.runtime.types import BackendError

TOOL_CHOICES = ("auto", "required", "none")
# The template renders arguments with `tojson` (json.dumps defaults): ", " and ": ", no newlines.
JSON_SPELLING = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
OPEN, CLOSE = "<tool_call>", "</tool_call>"
# Text that never contains "<tool_call>", in llguidance's regex algebra (& and ~).
TEXT_RULE = r"TEXT: /(.|\n)+/ & ~/(.|\n)*<tool_call>(.|\n)*/"


class ConstraintError(BackendError):
    """The tools or tool_choice cannot be turned into a grammar; the message names the tool."""


# ---- the grammar ----

def _functions(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The function definitions of OpenAI tools (or bare definitions), checked."""
    if not isinstance(tools, list) or not tools:
        raise ConstraintError("tools: expected a non-empty list of tool definitions")
    functions, names = [], set()
    for i, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        where = f"tools[{i}]"
        if not isinstance(function, dict):
            raise ConstraintError(f"{where}: expected an object with a 'function' definition")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ConstraintError(f"{where}.function.name: expected a non-empty string")
        if name in names:
            raise ConstraintError(f"{where}.function.name: {name!r} is defined twice")
        params = function.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ConstraintError(f"{where}.function.parameters: expected a JSON schema object")
        names.add(name)
        functions.append(function)
    return functions


def arguments_schema(function: dict[str, Any]) -> dict[str, Any]:
    """The schema the arguments must match (a copy; see the module doc for the closed object)."""
    params = copy.deepcopy(function.get("parameters")) or {"type": "object", "properties": {}}
    if params.get("type", "object") == "object" and "additionalProperties" not in params:
        params["additionalProperties"] = False
    return params


def call_schema(functions: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON schema of one block's body: ``{"name": const, "arguments": ...}`` per tool."""
    options = [{
        "type": "object",
        "properties": {"name": {"const": f["name"]}, "arguments": arguments_schema(f)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    } for f in functions]
    return {"anyOf": options, "x-guidance": JSON_SPELLING}


def _chosen(functions: list[dict[str, Any]], tool_choice: Any) -> tuple[str, list[dict]]:
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            raise ConstraintError(f"tool_choice: expected one of {TOOL_CHOICES} or "
                                  f'{{"type": "function", "function": {{"name": ...}}}}, '
                                  f"got {tool_choice!r}")
        return tool_choice, functions
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) \
        else None
    if not isinstance(name, str):
        raise ConstraintError(f"tool_choice: expected a string or "
                              f'{{"type": "function", "function": {{"name": ...}}}}, '
                              f"got {tool_choice!r}")
    picked = [f for f in functions if f["name"] == name]
    if not picked:
        raise ConstraintError(f"tool_choice: no tool named {name!r}; tools: "
                              f"{[f['name'] for f in functions]}")
    return "required", picked


def tool_call_grammar(tools: list[dict[str, Any]], tool_choice: Any = "auto",
                      parallel_tool_calls: bool = True, special_markers: bool = True) -> str:
    """The Lark grammar (llguidance dialect) for an answer to a request with ``tools``.
    ``special_markers``: the block markers are special tokens (``<tool_call>`` syntax) rather
    than literal text, as in our tokenizers."""
    mode, functions = _chosen(_functions(tools), tool_choice)
    if special_markers:
        call = f'call: {OPEN} "\\n" call_json "\\n" {CLOSE}'
    else:
        call = f'call: "{OPEN}\\n" call_json "\\n{CLOSE}"'
    calls = 'call ("\\n" call)*' if parallel_tool_calls else "call"
    start = {"auto": f"start: TEXT? | TEXT? {calls}", "required": f"start: {calls}",
             "none": "start: TEXT?"}[mode]
    lines = ["%llguidance {}", start, TEXT_RULE]
    if mode != "none":
        lines += [call, f"call_json: %json {json.dumps(call_schema(functions))}"]
    return "\n".join(lines) + "\n"


# ---- tokenizer and matcher ----

_LL_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def ll_tokenizer(tokenizer: Any, vocab_size: int):
    """llguidance's view of ``tokenizer`` (an mlx-lm wrapper or a fast HF tokenizer), padded to
    the model's ``vocab_size``; cached (building one takes 0.05 s at 600 tokens, 6 s at 131k)."""
    import llguidance.hf
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    cached = _LL_TOKENIZERS.get(tokenizer, {})
    if vocab_size not in cached:
        hf = tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer
        if len(hf) > vocab_size:
            raise ConstraintError(f"the tokenizer has {len(hf)} tokens but the model's "
                                  f"vocabulary only {vocab_size}")
        eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id])
        try:
            cached[vocab_size] = llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size,
                                                              eos_token=eos)
        except ValueError as exc:
            raise ConstraintError(f"constrained decoding needs a fast tokenizer ({exc})") from None
        _LL_TOKENIZERS[tokenizer] = cached
    return cached[vocab_size]


def _markers_are_special(tokenizer: Any, ll_tok) -> bool:
    ids = [tokenizer.encode(marker, add_special_tokens=False) for marker in (OPEN, CLOSE)]
    return all(len(i) == 1 and ll_tok.is_special_token(i[0]) for i in ids)


class ToolGrammar:
    """A compiled grammar for one tokenizer, tool list and choice; :meth:`mask` starts one
    generation's mask."""

    def __init__(self, tokenizer: Any, vocab_size: int, tools: list[dict[str, Any]],
                 tool_choice: Any = "auto", parallel_tool_calls: bool = True):
        import llguidance

        started = time.perf_counter()
        ll_tok = ll_tokenizer(tokenizer, vocab_size)
        self.vocab_size = vocab_size
        self.special_markers = _markers_are_special(tokenizer, ll_tok)
        self.lark = tool_call_grammar(tools, tool_choice, parallel_tool_calls,
                                      self.special_markers)
        grammar = llguidance.LLMatcher.grammar_from_lark(self.lark)
        self._pristine = llguidance.LLMatcher(ll_tok, grammar, log_level=0)
        if self._pristine.is_error():
            raise ConstraintError(_explain(ll_tok, _functions(tools),
                                           self._pristine.get_error()))
        self.setup_s = time.perf_counter() - started

    def mask(self) -> TokenMask:
        return TokenMask(self._pristine.deep_copy(), self.vocab_size)


def _explain(ll_tok, functions: list[dict[str, Any]], error: str) -> str:
    """Name the first tool whose schema llguidance cannot compile (else the whole error)."""
    import llguidance

    for i, function in enumerate(functions):
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            {**arguments_schema(function), "x-guidance": JSON_SPELLING})
        matcher = llguidance.LLMatcher(ll_tok, grammar, log_level=0)
        if matcher.is_error():
            return (f"tools[{i}] ({function['name']}): parameters schema cannot be enforced: "
                    f"{matcher.get_error().splitlines()[0]}")
    return f"tool-call grammar: {error.splitlines()[0] if error else 'invalid'}"


class TokenMask:
    """The tokens the grammar allows next (:meth:`allowed`), advanced by each sampled token.
    ``seconds``/``steps`` add up the time spent in llguidance and on unpacking the mask."""

    def __init__(self, matcher, vocab_size: int):
        import llguidance.numpy

        self._matcher = matcher
        self._fill = llguidance.numpy.fill_next_token_bitmask
        self._bits = llguidance.numpy.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size
        self.seconds = 0.0
        self.steps = 0

    def allowed(self) -> np.ndarray:
        """Boolean (vocab_size,): True where the token may come next."""
        started = time.perf_counter()
        self._fill(self._matcher, self._bits)
        # Bit i of 32-bit word w is token 32·w + i: little-endian bytes, low bit first.
        words = self._bits.astype("<i4", copy=False)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: self.vocab_size]
        allowed = bits.view(np.bool_)
        self.seconds += time.perf_counter() - started
        if not allowed.any():
            raise ConstraintError(f"the grammar allows no token here "
                                  f"({self._matcher.get_error() or 'dead end'})")
        return allowed

    def advance(self, token: int) -> None:
        started = time.perf_counter()
        ok = self._matcher.consume_token(int(token))
        self.seconds += time.perf_counter() - started
        self.steps += 1
        if not ok:
            raise ConstraintError(f"token {token} violates the tool-call grammar "
                                  f"({self._matcher.get_error()})")

    @property
    def ms_per_token(self) -> float | None:
        return 1e3 * self.seconds / self.steps if self.steps else None
