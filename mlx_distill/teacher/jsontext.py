"""JSON text spelled byte for byte as ``json`` spells it, written and read by ``orjson``.

``kd.jsonl`` lines and cached answers are ``json.dumps(..., ensure_ascii=False,
separators=(",", ":"))`` text. orjson writes the same bytes (UTF-8 kept, the same escapes) several
times faster, with two exceptions handled here: it writes NaN and ±inf as ``null`` where
``allow_nan=False`` must raise ``ValueError``, and it may spell floats below 1e-4 or from 1e16 on
differently (``0.00001`` for ``1e-05``). Those floats are handed to orjson as their ``repr``, which
is what ``json`` writes. Anything else orjson cannot take (integers beyond 64 bits, non-string
keys, tuples, subclasses) goes through ``json`` itself.

Finding those floats means looking at every value, which costs more than orjson's whole write.
``loads_plain`` tells from the text, with a few byte searches, when there are none to find: a
caller that writes such a value again passes its keys as ``plain_keys`` and they are not looked at.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from typing import Any

import orjson

# Floats in [_PLAIN_MIN, _PLAIN_MAX) (and zero): repr and orjson both write the shortest
# round-trip digits in positional notation, so their spellings agree.
_PLAIN_MIN, _PLAIN_MAX = 1e-4, 1e16
_NOT_FINITE = "Out of range float values are not JSON compliant"
_SCALARS = frozenset({str, int, bool, type(None)})
_STR = frozenset({str})
# JSON text as bytes, reshaped so that substring tests find number shapes: digits become 0, E
# becomes e, and what may delimit a number (:,[]} and whitespace) becomes ','.
_SHAPE = bytes.maketrans(b"0123456789E:[]} \t\n\r", b"0000000000e" + b"," * 8)
# A float outside the plain range has an exponent, 16 digits before the point (a 16-digit one may
# round up to 1e16) or a fraction under 1e-4 ("0.0000"). Strings can show the same shapes; that
# only costs the slow path.
_DIGITS_E, _LONG_INTEGER_PART, _SMALL_FRACTION = b"0e", b"0" * 16 + b".", b"0.0000"
# What comes before the digits ahead of a number's exponent: a delimiter, its point, or its sign
# after a delimiter. Digits after a letter, a quote or a dash within a word ("fp_3e...",
# "chatcmpl-9e...") are inside a string.
_DELIMITER, _MINUS, _POINT = ord(","), ord("-"), ord(".")
# orjson reads integers outside the 64-bit range as floats; json keeps them exact.
_LONG_INTEGER = b"0" * 19 + b","


class _UseJson(Exception):
    """A value orjson would not write exactly as ``json`` does."""


def dumps_compact(value: Any, plain_keys: frozenset[str] | tuple[str, ...] = ()) -> str:
    """``json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)``.

    ``plain_keys``: keys of the dict ``value`` whose values hold only plain floats (finite, zero
    or in [1e-4, 1e16)), e.g. because ``loads_plain`` said so; they are not looked at.
    """
    try:
        return orjson.dumps(_checked(value, plain_keys)).decode("utf-8")
    except (_UseJson, orjson.JSONEncodeError):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def dumps_canonical(value: Any, plain_keys: frozenset[str] | tuple[str, ...] = ()) -> str:
    """``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``: the
    spelling of cache keys and stored answers (``types.canonical_json``), NaN and ±inf included.
    ``plain_keys`` as for ``dumps_compact``."""
    try:
        return orjson.dumps(_checked(value, plain_keys),
                            option=orjson.OPT_SORT_KEYS).decode("utf-8")
    except (_UseJson, ValueError, orjson.JSONEncodeError):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _checked(value: Any, plain_keys: frozenset[str] | tuple[str, ...]) -> Any:
    """``value`` ready for orjson: floats outside the plain range as Fragments of their repr
    (``_spelled_as_json``), except in the values of ``plain_keys``, which are not looked at."""
    if not plain_keys:
        return _spelled_as_json(value)
    if type(value) is not dict or not set(map(type, value)) <= _STR:
        raise _UseJson
    return {k: v if k in plain_keys else _spelled_as_json(v) for k, v in value.items()}


def written_plainly(value: Any) -> bool:
    """Whether every float in ``value`` is plain, judged from orjson's own spelling of it (a C
    pass, several times faster than looking at each float): no exponent, no fraction under
    1e-4, no 16-digit integer part and no null (orjson's NaN and ±inf, or a None: either way
    the slow path). What a caller checks before naming a key in ``plain_keys``."""
    try:
        raw = orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return b"null" not in raw and _spelled_plainly(raw, _shape(raw))


def loads(text: str | bytes) -> Any:
    """``json.loads(text)``, including its extensions (NaN, Infinity, lone surrogates, integers
    beyond 64 bits, UTF-16 and UTF-32 bytes)."""
    value = _loads(text, _shape(text))
    return json.loads(text) if value is _JSON_READ else value


def loads_plain(text: str) -> tuple[Any, bool]:
    """``json.loads(text)``, and whether every float in it is plain: finite (orjson refuses NaN,
    Infinity and numbers that overflow) and spelled without exponent between 1e-4 and 1e16."""
    raw = text.encode("utf-8", "surrogatepass")
    shape = _shape(raw)
    value = _loads(text, shape)
    if value is _JSON_READ:
        return json.loads(text), False
    return value, _spelled_plainly(raw, shape)


_JSON_READ = object()  # _loads' answer when only json can read the text exactly


def _shape(text: str | bytes) -> bytes:
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    return (raw + b",").translate(_SHAPE)


def _spelled_plainly(raw: bytes, shape: bytes) -> bool:
    """No float in the JSON text ``raw`` (whose ``_shape`` is ``shape``) spelled outside the
    plain range: no exponent, no 16-digit integer part, no fraction under 1e-4."""
    return (_LONG_INTEGER_PART not in shape and not _has_exponent(shape)
            and _SMALL_FRACTION not in raw)


def _loads(text: str | bytes, shape: bytes) -> Any:
    if _LONG_INTEGER in shape:
        return _JSON_READ
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:  # NaN, Infinity, lone surrogates, not UTF-8: json reads them
        return _JSON_READ


def _has_exponent(shape: bytes) -> bool:
    """Whether some digits followed by e (a hex id in a string, or an exponent) may be a number."""
    at = shape.find(_DIGITS_E)
    while at >= 0:
        start = len(shape[:at + 1].rstrip(b"0"))  # where the run of digits before e begins
        before = shape[start - 1] if start > 0 else _DELIMITER
        if before == _MINUS:
            before = shape[start - 2] if start > 1 else _DELIMITER
        if before == _DELIMITER or before == _POINT:
            return True
        at = shape.find(_DIGITS_E, at + 2)
    return False


def _plain(value: Any) -> bool:
    return type(value) is float and (_PLAIN_MIN <= abs(value) < _PLAIN_MAX or value == 0.0)


def _odd_float(value: float) -> orjson.Fragment:
    if not math.isfinite(value):
        raise ValueError(_NOT_FINITE)
    return orjson.Fragment(float.__repr__(value))


def _spelled_as_json(value: Any) -> Any:
    """``value`` with each float outside the plain range swapped for a Fragment of its repr;
    containers are copied only where something changed."""
    kind = type(value)
    if kind is dict:
        if not set(map(type, value)) <= _STR:
            raise _UseJson  # json writes other keys as strings; orjson refuses them
        return _replaced(value, value.items(), dict)
    if kind is list:
        if len(value) > 8 and set(map(type, value)) <= _SCALARS:
            return value  # e.g. byte values: checked by C loops, not one by one
        return _replaced(value, enumerate(value), list)
    if kind in _SCALARS:
        return value
    if kind is float:
        return value if _plain(value) else _odd_float(value)
    raise _UseJson


def _replaced(container: Any, items: Iterable[tuple[Any, Any]], copy: Callable) -> Any:
    """``container`` (a dict or list, whose ``items`` are given) with its items spelled as json;
    scalars are looked at here, not by a call each: the loop runs once per float of a record."""
    changed = None
    for key, item in items:
        kind = type(item)
        if kind is str or kind is int or item is None or kind is bool:
            continue
        if kind is float:
            if _PLAIN_MIN <= abs(item) < _PLAIN_MAX or item == 0.0:
                continue
            new = _odd_float(item)
        elif kind is list and len(item) == 2 and type(item[0]) is str and _plain(item[1]):
            continue  # a [token, logprob] pair, the commonest container in a KD record
        else:
            new = _spelled_as_json(item)
            if new is item:
                continue
        if changed is None:
            changed = copy(container)
        changed[key] = new
    return container if changed is None else changed
