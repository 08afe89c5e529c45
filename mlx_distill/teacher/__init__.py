"""Teacher side of distillation: OpenAI-compatible client, KD data generation, local server.

Names are resolved on first use (PEP 562), so importing a light submodule such as
``mlx_distill.teacher.records`` doesn't pull in httpx, and nothing here imports the server.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "budget": ("Budget", "Reservation"),
    "client": ("AsyncTeacherClient", "TeacherClient"),
    "config": ("Pricing", "TeacherSpec", "Tier", "api_key", "load_teacher", "load_teachers",
               "token_bounds"),
    "errors": ("BudgetExceeded", "InvalidRequest", "MissingAPIKey", "RequestFailed",
               "TeacherError", "WireError"),
    "limits": ("RateLimits",),
    "records": ("RecordError", "parse_record_line", "validate_record"),
    "types": ("KD_RECORD_FIELDS", "KD_SCHEMA", "ChatRequest", "Completion", "TokenLogprob",
              "ToolCall", "Usage"),
    "wire": ("CompletionRequest", "StreamAccumulator", "parse_chat", "parse_completions"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
