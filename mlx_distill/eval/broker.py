"""A tool broker that replays recorded tool results instead of running tools.

Fixtures are JSONL lines ``{"name": ..., "arguments": {...}, "result": ...}``. A call finds its
fixture by the function name plus its arguments normalised as the scorer compares them
(:func:`mlx_distill.eval.scoring.arguments_key`): ``{"city": "Paris"}`` and
``{"city": "paris "}`` hit the same fixture. Given the tool definitions, the broker also fills
omitted optional parameters with their schema ``default`` first, so a call that spells out a
default finds the fixture recorded without it and vice versa.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlx_distill.atomic import atomic_write_text
from mlx_distill.cli import UserError
from mlx_distill.eval.scoring import arguments_key, tool_schemas

# Misses remembered for the report (the counts keep going past this).
MAX_RECORDED_MISSES = 50


class BrokerError(UserError, ValueError):
    """A bad fixture file or fixture; the message names the file and line."""


def result_content(result: Any) -> str:
    """The text a tool message carries for ``result`` (JSON unless it already is text)."""
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)


class ToolBroker:
    """Replays fixtures: ``call(name, arguments)`` returns the recorded result or None."""

    def __init__(self, fixtures: Iterable[dict[str, Any]] = (),
                 tools: Iterable[dict[str, Any]] | None = None):
        self._functions = tool_schemas(tools)
        self._results: dict[str, Any] = {}
        self._origins: dict[str, str] = {}
        self.hits = 0
        self.misses = 0
        self.missed: list[dict[str, Any]] = []
        for i, fixture in enumerate(fixtures):
            self.add_fixture(fixture, where=f"fixture {i}")

    @classmethod
    def from_files(cls, paths: Iterable[str | os.PathLike],
                   tools: Iterable[dict[str, Any]] | None = None) -> ToolBroker:
        broker = cls(tools=tools)
        for path in map(Path, paths):
            for number, fixture in _read_lines(path):
                broker.add_fixture(fixture, where=f"{path}:{number}")
        return broker

    def _with_defaults(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        function = self._functions.get(name)
        properties = ((function or {}).get("parameters") or {}).get("properties") or {}
        filled = dict(arguments)
        for key, schema in properties.items():
            if key not in filled and isinstance(schema, dict) and "default" in schema:
                filled[key] = schema["default"]
        return filled

    def key(self, name: str, arguments: dict[str, Any]) -> str:
        return arguments_key(name, self._with_defaults(name, arguments))

    def add_fixture(self, fixture: Any, where: str = "fixture") -> None:
        if not isinstance(fixture, dict):
            raise BrokerError(f"{where}: expected an object {{name, arguments, result}}")
        name, arguments = fixture.get("name"), fixture.get("arguments")
        if not isinstance(name, str) or not name:
            raise BrokerError(f"{where}: name: expected a non-empty string")
        if not isinstance(arguments, dict):
            raise BrokerError(f"{where}: arguments: expected a JSON object")
        if "result" not in fixture:
            raise BrokerError(f"{where}: result: missing (any JSON value, null included)")
        key = self.key(name, arguments)
        if key in self._results and self._results[key] != fixture["result"]:
            raise BrokerError(f"{where}: {name} with these arguments already has a different "
                              f"result (from {self._origins[key]})")
        self._results[key] = fixture["result"]
        self._origins.setdefault(key, where)

    def __len__(self) -> int:
        return len(self._results)

    def call(self, name: Any, arguments: Any) -> Any:
        """The recorded result for the call, or None (a miss). ``arguments`` may be an object or
        its JSON text; a call that does not parse is a miss."""
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                arguments = None
        if isinstance(name, str) and isinstance(arguments, dict):
            key = self.key(name, arguments)
            if key in self._results:
                self.hits += 1
                return self._results[key]
        self.misses += 1
        if len(self.missed) < MAX_RECORDED_MISSES:
            self.missed.append({"name": name, "arguments": arguments})
        return None

    @property
    def calls(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float | None:
        """Hits over calls; None before the first call."""
        return self.hits / self.calls if self.calls else None

    def stats(self) -> dict[str, Any]:
        return {"fixtures": len(self), "calls": self.calls, "hits": self.hits,
                "misses": self.misses, "hit_rate": self.hit_rate, "missed": list(self.missed)}

    def reset_counts(self) -> None:
        self.hits = self.misses = 0
        self.missed = []


def _read_lines(path: Path) -> Iterable[tuple[int, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BrokerError(f"{path}: fixture file not found") from None
    except UnicodeDecodeError:
        raise BrokerError(f"{path}: fixture file is not UTF-8 text") from None
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise BrokerError(f"{path}:{number}: invalid JSON ({exc.msg})") from None


def fixtures_text(fixtures: Iterable[dict[str, Any]]) -> str:
    """JSONL text of ``{name, arguments, result}`` lines, deduplicated and sorted by key (the same
    input always gives the same bytes)."""
    unique = {arguments_key(f["name"], f["arguments"]): f for f in fixtures}
    return "".join(
        json.dumps({"name": f["name"], "arguments": f["arguments"], "result": f["result"]},
                   ensure_ascii=False) + "\n"
        for _, f in sorted(unique.items())
    )


def write_fixtures(path: str | os.PathLike, fixtures: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, fixtures_text(fixtures))
