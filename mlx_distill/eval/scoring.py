"""Tool-call scoring: parse predicted calls, match them to gold calls, aggregate metrics.

Strict matching follows the AST checker of the Berkeley Function-Calling Leaderboard (BFCL,
``berkeley-function-call-leaderboard/bfcl/eval_checker/ast_eval/ast_checker.py`` in
ShishirPatil/gorilla: ``simple_function_checker``, ``standardize_string``,
``parallel_function_checker_no_order``). A predicted call matches a gold call when

- the function name is the same;
- every ``required`` parameter is present and no parameter outside the schema's ``properties``
  is given (BFCL ``missing_required`` / ``unexpected_param``);
- every value has the type the tool's JSON schema declares: ``integer`` needs a JSON integer (as
  BFCL, 3.0 is not an integer), ``number`` takes integers and floats (BFCL's int -> float
  promotion), ``bool`` is never a number; ``enum`` membership and ``pattern`` are checked too;
- values equal the gold ones after normalisation: strings through BFCL's ``standardize_string``
  (lowercase; spaces and ``, . / - _ * ^`` removed; ``'`` read as ``"``), numbers within
  ``math.isclose(rel_tol=1e-6, abs_tol=1e-9)``, lists element-wise in order (BFCL
  ``list_checker``), objects key-wise, recursively.

BFCL lists acceptable values per parameter with ``""`` marking "may be omitted"; a gold call here
has one value per parameter, and the schema's ``default`` plays the role of ``""``: a parameter
the gold call omits may be predicted only with its default value, and a gold parameter that equals
its default may be omitted. Parallel calls are matched order-free as a maximum bipartite matching
(BFCL's greedy ``no_order`` checker can miss a matching that exists). Lax matching needs only the
same function name and arguments that parse as a JSON object.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlx_distill.cli import UserError
from mlx_distill.teacher.types import ToolCall, canonical_json

# BFCL's standardize_string removes exactly these characters.
_BFCL_REMOVED = re.compile(r"[ ,./\-_*^]")
# Everything between <tool_call> and </tool_call>; a final block cut off by the end of the text
# (a generation that hit its token limit) is still read, and usually fails to parse.
_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)
REL_TOL = 1e-6
ABS_TOL = 1e-9
# Significant digits numbers are rounded to in lookup keys (the broker cannot hash a tolerance).
KEY_DIGITS = 9


class ScoringError(UserError, ValueError):
    """A malformed eval sample; the message names the sample and field."""


def standardize_string(text: str) -> str:
    """BFCL's string normalisation: drop spaces and ``,./-_*^``, lowercase, ``'`` -> ``"``."""
    return _BFCL_REMOVED.sub("", text).lower().replace("'", '"')


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def values_equal(predicted: Any, gold: Any) -> bool:
    """Equality after normalisation (see the module docstring); types must agree."""
    if isinstance(gold, str):
        return isinstance(predicted, str) and standardize_string(predicted) == standardize_string(
            gold)
    if isinstance(gold, bool) or gold is None:
        return predicted is gold
    if _is_number(gold):
        return _is_number(predicted) and math.isclose(predicted, gold, rel_tol=REL_TOL,
                                                      abs_tol=ABS_TOL)
    if isinstance(gold, list):
        return (isinstance(predicted, list) and len(predicted) == len(gold)
                and all(values_equal(p, g) for p, g in zip(predicted, gold, strict=True)))
    if isinstance(gold, dict):
        return (isinstance(predicted, dict) and predicted.keys() == gold.keys()
                and all(values_equal(predicted[k], gold[k]) for k in gold))
    return predicted == gold


def normalize_value(value: Any) -> Any:
    """A hashable-by-JSON spelling of ``value``: values that :func:`values_equal` calls equal map
    to the same spelling (numbers are rounded to ``KEY_DIGITS`` significant digits)."""
    if isinstance(value, str):
        return standardize_string(value)
    if isinstance(value, bool) or value is None:
        return value
    if _is_number(value):
        return float(f"{float(value):.{KEY_DIGITS}g}") + 0.0  # + 0.0 folds -0.0 into 0.0
    if isinstance(value, list):
        return [normalize_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): normalize_value(v) for k, v in value.items()}
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def arguments_key(name: str, arguments: dict[str, Any]) -> str:
    """Lookup key for a call: the name plus its normalised arguments, canonical JSON."""
    return canonical_json([name, normalize_value(arguments)])


# ---- predicted calls ----

@dataclass(frozen=True)
class Call:
    """A predicted call; ``name``/``arguments`` are None when the call does not parse."""

    name: str | None
    arguments: dict[str, Any] | None
    raw: str

    @property
    def valid(self) -> bool:
        """The call is valid JSON with a string name and an object of arguments."""
        return self.name is not None and self.arguments is not None


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def _loads(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None


def _decode_arguments(arguments: Any) -> dict[str, Any] | None:
    if isinstance(arguments, str):  # OpenAI wire format: arguments as JSON text
        arguments = _loads(arguments)
    return arguments if isinstance(arguments, dict) else None


def parse_tool_calls(text: str) -> list[Call]:
    """Calls in the chat template's format, ``<tool_call>{"name": ..., "arguments": {...}}
    </tool_call>``, in order of appearance; blocks that do not parse are kept as invalid calls."""
    calls = []
    for match in _TOOL_CALL_BLOCK.finditer(text):
        body = match.group(1).strip()
        obj = _loads(body)
        if not isinstance(obj, dict):
            calls.append(Call(None, None, body))
            continue
        name = obj.get("name")
        calls.append(Call(name if isinstance(name, str) else None,
                          _decode_arguments(obj.get("arguments")), body))
    return calls


def calls_from_openai(tool_calls: Iterable[dict[str, Any] | ToolCall]) -> list[Call]:
    """Calls from structured OpenAI ``tool_calls`` (dicts or :class:`ToolCall`)."""
    calls = []
    for item in tool_calls:
        if isinstance(item, ToolCall):
            name, arguments = item.name, item.arguments
        else:
            function = item.get("function") if isinstance(item, dict) else None
            if not isinstance(function, dict):
                calls.append(Call(None, None, json.dumps(item, default=str)))
                continue
            name, arguments = function.get("name"), function.get("arguments")
        raw = arguments if isinstance(arguments, str) else json.dumps(arguments, default=str)
        calls.append(Call(name if isinstance(name, str) else None, _decode_arguments(arguments),
                          raw))
    return calls


def predicted_calls(text: str = "", tool_calls: Iterable[Any] | None = None) -> list[Call]:
    """All calls in a model answer: structured ``tool_calls`` (an OpenAI endpoint that parsed
    them) followed by any still left in the text."""
    return calls_from_openai(tool_calls or []) + parse_tool_calls(text or "")


# ---- schema checks and call matching ----

_JSON_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": _is_number,
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str] | None:
    # Schemas use ECMA-262 regexes; one Python cannot compile goes unchecked rather than failing
    # every call.
    try:
        return re.compile(pattern)
    except re.error:
        return None


def _same_json(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def schema_error(value: Any, schema: dict[str, Any], where: str) -> str | None:
    """Why ``value`` does not fit ``schema`` (type, enum, pattern, items, properties), or None."""
    declared = schema.get("type")
    types = [declared] if isinstance(declared, str) else list(declared or [])
    known = [t for t in types if t in _JSON_TYPES]
    if known and not any(_JSON_TYPES[t](value) for t in known):
        return f"type_error:{where}: expected {'/'.join(known)}, got {json.dumps(value)}"
    if "enum" in schema and not any(_same_json(value, e) for e in schema["enum"]):
        return f"enum_error:{where}: {json.dumps(value)} not in {json.dumps(schema['enum'])}"
    if isinstance(value, str) and isinstance(schema.get("pattern"), str):
        pattern = _compiled(schema["pattern"])
        if pattern is not None and pattern.search(value) is None:
            return f"pattern_error:{where}: {json.dumps(value)} !~ {schema['pattern']}"
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            if error := schema_error(item, schema["items"], f"{where}[{i}]"):
                return error
    if isinstance(value, dict) and isinstance(schema.get("properties"), dict):
        for key in schema.get("required") or []:
            if key not in value:
                return f"missing_required:{where}.{key}"
        for key, item in value.items():
            if key in schema["properties"]:
                if error := schema_error(item, schema["properties"][key], f"{where}.{key}"):
                    return error
            elif schema.get("additionalProperties") is False:
                return f"unexpected_param:{where}.{key}"
    return None


def tool_schemas(tools: Iterable[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Function name -> function definition, from OpenAI tools or bare function definitions."""
    out = {}
    for tool in tools or []:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            out[function["name"]] = function
    return out


def _is_default(value: Any, schema: dict[str, Any]) -> bool:
    return "default" in schema and values_equal(value, schema["default"])


def strict_error(call: Call, gold: dict[str, Any], function: dict[str, Any] | None) -> str | None:
    """Why ``call`` fails to match ``gold`` ({name, arguments}) under the BFCL rules, or None.

    Without a ``function`` definition the gold arguments stand in for the schema: all required,
    no others allowed, no type checks beyond value equality."""
    if not call.valid:
        return "invalid_json"
    if call.name != gold["name"]:
        return f"wrong_func_name: {call.name} != {gold['name']}"
    expected = gold["arguments"]
    params = (function or {}).get("parameters") or {}
    if function is None:
        properties: dict[str, Any] = {k: {} for k in expected}
        required = list(expected)
    else:
        properties = params.get("properties") or {}
        required = list(params.get("required") or [])
    given = call.arguments
    for key in required:
        if key not in given:
            return f"missing_required:{key}"
    for key, value in given.items():
        if key not in properties:
            return f"unexpected_param:{key}"
        if error := schema_error(value, properties[key], key):
            return error
        if key in expected:
            if not values_equal(value, expected[key]):
                return f"value_error:{key}: {json.dumps(value)} != {json.dumps(expected[key])}"
        elif not _is_default(value, properties[key]):
            return f"unexpected_param:{key} (not in the gold call and not its default)"
    for key, value in expected.items():
        if key not in given:
            if not _is_default(value, properties.get(key, {})):
                return f"missing_optional:{key}"
    return None


def lax_match(call: Call, gold: dict[str, Any]) -> bool:
    return call.valid and call.name == gold["name"]


def max_matching(compatible: Sequence[Sequence[bool]]) -> list[tuple[int, int]]:
    """A maximum bipartite matching (Kuhn's augmenting paths): sorted (row, column) pairs with
    ``compatible[row][column]`` true, no row or column used twice, as many pairs as possible."""
    n_cols = len(compatible[0]) if compatible else 0
    owner = [-1] * n_cols

    def augment(row: int, visited: list[bool]) -> bool:
        for col in range(n_cols):
            if compatible[row][col] and not visited[col]:
                visited[col] = True
                if owner[col] == -1 or augment(owner[col], visited):
                    owner[col] = row
                    return True
        return False

    for row in range(len(compatible)):
        augment(row, [False] * n_cols)
    return sorted((row, col) for col, row in enumerate(owner) if row != -1)


# ---- samples and datasets ----

def gold_calls(sample: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The sample's gold calls, or None for a ``no_call`` control."""
    where = f"sample {sample.get('id', '?')}"
    gold = sample.get("gold")
    if not isinstance(gold, dict):
        raise ScoringError(f"{where}: gold: expected an object with 'calls' or 'no_call'")
    if gold.get("no_call") is True:
        return None
    calls = gold.get("calls")
    if not isinstance(calls, list) or not calls:
        raise ScoringError(f"{where}: gold.calls: expected a non-empty list "
                           "(or gold.no_call: true)")
    for i, call in enumerate(calls):
        if (not isinstance(call, dict) or not isinstance(call.get("name"), str)
                or not isinstance(call.get("arguments"), dict)):
            raise ScoringError(f"{where}: gold.calls[{i}]: expected {{name: string, "
                               "arguments: object}")
    return calls


@dataclass
class SampleScore:
    id: str
    category: str
    no_call: bool
    gold: int
    predicted: int
    valid: int
    strict_tp: int
    lax_tp: int
    errors: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """All gold calls matched strictly and nothing else called (controls: no call at all)."""
        return self.strict_tp == self.gold == self.predicted


def score_sample(sample: dict[str, Any], calls: Sequence[Call]) -> SampleScore:
    golds = gold_calls(sample) or []
    functions = tool_schemas(sample.get("tools"))
    verdicts = [[strict_error(c, g, functions.get(g["name"])) for c in calls] for g in golds]
    strict = max_matching([[v is None for v in row] for row in verdicts])
    lax = max_matching([[lax_match(c, g) for c in calls] for g in golds])
    matched_gold = {g for g, _ in strict}
    errors = []
    for g, row in enumerate(verdicts):
        if g not in matched_gold:
            same_name = [v for c, v in zip(calls, row, strict=True) if c.name == golds[g]["name"]]
            errors.append(f"{golds[g]['name']}: {same_name[0] if same_name else 'not called'}")
    if not golds and calls:
        errors.append(f"spurious call on a no-call sample: {calls[0].name or 'invalid_json'}")
    return SampleScore(
        id=str(sample.get("id", "")), category=str(sample.get("category", "")),
        no_call=not golds, gold=len(golds), predicted=len(calls),
        valid=sum(c.valid for c in calls), strict_tp=len(strict), lax_tp=len(lax), errors=errors,
    )


def prf(tp: int, fp: int, fn: int) -> dict[str, float | int]:
    """Micro precision/recall/F1. With nothing predicted and nothing expected all three are 1;
    an empty side otherwise scores 0."""
    precision = tp / (tp + fp) if tp + fp else float(fn == 0)
    recall = tp / (tp + fn) if tp + fn else float(fp == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def _summary(scores: Sequence[SampleScore]) -> dict[str, Any]:
    gold = sum(s.gold for s in scores)
    predicted = sum(s.predicted for s in scores)
    valid = sum(s.valid for s in scores)
    strict_tp = sum(s.strict_tp for s in scores)
    lax_tp = sum(s.lax_tp for s in scores)
    controls = [s for s in scores if s.no_call]
    return {
        "samples": len(scores),
        "strict": prf(strict_tp, predicted - strict_tp, gold - strict_tp),
        "lax": prf(lax_tp, predicted - lax_tp, gold - lax_tp),
        "exact_accuracy": sum(s.exact for s in scores) / len(scores) if scores else None,
        "json_validity": {"rate": valid / predicted if predicted else None, "valid": valid,
                          "calls": predicted},
        "controls": {"samples": len(controls),
                     "with_call": sum(s.predicted > 0 for s in controls),
                     "spurious_calls": sum(s.predicted for s in controls)},
    }


def aggregate(scores: Sequence[SampleScore]) -> dict[str, Any]:
    """Dataset metrics plus the same metrics per category."""
    categories = sorted({s.category for s in scores})
    out = _summary(scores)
    out["per_category"] = {
        c: _summary([s for s in scores if s.category == c]) for c in categories
    }
    return out


def score_dataset(samples: Sequence[dict[str, Any]],
                  predictions: Sequence[str | Sequence[Call]]) -> dict[str, Any]:
    """Score raw answers (text in the template's format, or lists of :class:`Call`) against
    their samples; returns :func:`aggregate`'s metrics plus the per-sample ``scores``."""
    if len(samples) != len(predictions):
        raise ScoringError(f"{len(samples)} samples but {len(predictions)} predictions")
    scores = [
        score_sample(s, parse_tool_calls(p) if isinstance(p, str) else list(p))
        for s, p in zip(samples, predictions, strict=True)
    ]
    out = aggregate(scores)
    out["scores"] = scores
    return out
