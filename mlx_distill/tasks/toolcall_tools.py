"""The toy tool registry: OpenAI tool definitions and their implementations.

Weather and calendar results are fake but deterministic (a hash of the normalised arguments);
arithmetic and unit conversion are computed for real. The broker fixtures for the toy task are
these implementations' answers to the gold calls.
"""

from __future__ import annotations

import math
from typing import Any

from mlx_distill.eval.scoring import standardize_string
from mlx_distill.tasks.common import stable_int

DATE_PATTERN = r"^\d{4}-\d{2}-\d{2}$"
TEMPERATURE_UNITS = ("celsius", "fahrenheit")
# Pairs convert_units supports, with the factor (or function) from the first unit to the second.
LINEAR_CONVERSIONS = {
    ("kilometers", "miles"): 1 / 1.609344,
    ("meters", "feet"): 1 / 0.3048,
    ("kilograms", "pounds"): 1 / 0.45359237,
    ("liters", "gallons"): 1 / 3.785411784,  # US liquid gallon
}
CONVERSION_UNITS = (
    "kilometers", "miles", "meters", "feet", "kilograms", "pounds", "liters", "gallons",
    "celsius", "fahrenheit",
)
RESULT_DECIMALS = 4
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "partly cloudy")
EVENT_TITLES = (
    "Team standup", "Dentist appointment", "Lunch with Sam", "Project review", "Gym session",
    "Call with the bank", "Book club", "Piano lesson", "Flight check-in", "Budget meeting",
)
MAX_EVENTS = 10


def _tool(name: str, description: str, properties: dict[str, Any],
          required: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


def _number(description: str) -> dict[str, Any]:
    return {"type": "number", "description": description}


TOOLS: list[dict[str, Any]] = [
    _tool("get_weather", "Get the current weather for a city.", {
        "city": {"type": "string", "description": "City name, e.g. Paris"},
        "unit": {"type": "string", "enum": list(TEMPERATURE_UNITS), "default": "celsius",
                 "description": "Temperature unit"},
    }, ["city"]),
    _tool("add", "Add two numbers.", {"a": _number("First addend"), "b": _number("Second addend")},
          ["a", "b"]),
    _tool("multiply", "Multiply two numbers.",
          {"a": _number("First factor"), "b": _number("Second factor")}, ["a", "b"]),
    _tool("list_events", "List the calendar events on a date.", {
        "date": {"type": "string", "pattern": DATE_PATTERN, "description": "Date as YYYY-MM-DD"},
        "limit": {"type": "integer", "minimum": 1, "maximum": MAX_EVENTS,
                  "description": "Return at most this many events"},
    }, ["date"]),
    _tool("convert_units", "Convert a value from one unit to another.", {
        "value": _number("The value to convert"),
        "from_unit": {"type": "string", "enum": list(CONVERSION_UNITS)},
        "to_unit": {"type": "string", "enum": list(CONVERSION_UNITS)},
    }, ["value", "from_unit", "to_unit"]),
]
TOOL_NAMES = tuple(t["function"]["name"] for t in TOOLS)


def tool_by_name(name: str) -> dict[str, Any]:
    return next(t for t in TOOLS if t["function"]["name"] == name)


def clean_number(x: float) -> int | float:
    """Round away float noise (0.1 + 0.2) and show integral values as integers."""
    x = round(x, RESULT_DECIMALS)
    return int(x) if x == int(x) and abs(x) < 2**53 else x


def fahrenheit(celsius: float) -> float:
    return celsius * 9 / 5 + 32


def convert(value: float, from_unit: str, to_unit: str) -> float | None:
    """``value`` in ``to_unit``, or None for units that do not convert into each other."""
    if from_unit == to_unit and from_unit in CONVERSION_UNITS:
        return value
    if (from_unit, to_unit) == ("celsius", "fahrenheit"):
        return fahrenheit(value)
    if (from_unit, to_unit) == ("fahrenheit", "celsius"):
        return (value - 32) * 5 / 9
    if (from_unit, to_unit) in LINEAR_CONVERSIONS:
        return value * LINEAR_CONVERSIONS[from_unit, to_unit]
    if (to_unit, from_unit) in LINEAR_CONVERSIONS:
        return value / LINEAR_CONVERSIONS[to_unit, from_unit]
    return None


def weather(city: str, unit: str = "celsius") -> dict[str, Any]:
    # Keyed by the standardised name so "Paris" and "paris " report the same weather.
    key = stable_int("weather", standardize_string(city))
    celsius = key % 41 - 5  # -5 .. 35 °C
    condition = CONDITIONS[(key >> 8) % len(CONDITIONS)]
    temperature = round(fahrenheit(celsius)) if unit == "fahrenheit" else celsius
    return {"city": city, "temperature": temperature, "unit": unit, "condition": condition}


def events(date: str, limit: int | None = None) -> dict[str, Any]:
    key = stable_int("events", date)
    count = key % 4  # 0 .. 3 events a day
    titles = [EVENT_TITLES[(key >> (8 * (i + 1))) % len(EVENT_TITLES)] for i in range(count)]
    hours = sorted({8 + (key >> (4 * i + 3)) % 10 for i in range(count)})
    listed = [{"time": f"{h:02d}:{30 * (i % 2):02d}", "title": t}
              for i, (h, t) in enumerate(zip(hours, titles, strict=False))]
    if limit is not None:
        listed = listed[:limit]
    return {"date": date, "events": listed}


def execute(name: str, arguments: dict[str, Any]) -> Any:
    """Run a toy tool on already-validated arguments and return its JSON result."""
    if name == "get_weather":
        return weather(arguments["city"], arguments.get("unit", "celsius"))
    if name in ("add", "multiply"):
        a, b = arguments["a"], arguments["b"]
        return {"result": clean_number(a + b if name == "add" else a * b)}
    if name == "list_events":
        return events(arguments["date"], arguments.get("limit"))
    if name == "convert_units":
        value, src, dst = arguments["value"], arguments["from_unit"], arguments["to_unit"]
        converted = convert(value, src, dst)
        if converted is None or not math.isfinite(converted):
            return {"error": f"cannot convert {src} to {dst}"}
        return {"value": clean_number(converted), "unit": dst}
    raise KeyError(f"unknown toy tool {name!r}")
