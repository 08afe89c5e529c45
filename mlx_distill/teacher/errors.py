"""Errors raised by the teacher client. None of them ever carries an API key in its text."""

from __future__ import annotations

from mlx_distill.cli import UserError


class TeacherError(Exception):
    """Base class of everything the teacher client raises on purpose."""


class MissingAPIKey(TeacherError, UserError):
    """The environment variable that should hold the API key is unset or empty."""


class InvalidRequest(TeacherError, UserError, ValueError):
    """A request the teacher cannot serve as asked; refused before anything is sent."""


class BudgetExceeded(TeacherError):
    """Reserving a request's worst-case cost would take spent + reserved past the cap."""

    def __init__(self, requested_usd: float, spent_usd: float, reserved_usd: float, cap_usd: float):
        self.requested_usd = requested_usd
        self.spent_usd = spent_usd
        self.reserved_usd = reserved_usd
        self.cap_usd = cap_usd
        super().__init__(
            f"budget cap ${cap_usd:.4f} reached: a request may cost up to ${requested_usd:.6f} but "
            f"only ${cap_usd - spent_usd - reserved_usd:.6f} is left "
            f"(spent ${spent_usd:.6f}, reserved for requests in flight ${reserved_usd:.6f})")


class WireError(TeacherError):
    """A response that could not be parsed. ``reason`` is machine-readable; ``retryable`` says
    whether asking again may help (see mlx_distill.teacher.wire for the classification)."""

    def __init__(self, reason: str, message: str, *, retryable: bool):
        self.reason = reason
        self.retryable = retryable
        super().__init__(f"{reason}: {message}")


class RequestFailed(TeacherError):
    """A request that did not succeed: not retryable, or still failing after ``attempts`` tries.

    ``reason``: "http_<status>", "timeout", "connect_timeout", "connect_error",
    "connection_reset", "truncated_stream", "bad_json", "bad_response", "api_error", ...
    """

    def __init__(self, reason: str, message: str, *, attempts: int, status: int | None = None):
        self.reason = reason
        self.attempts = attempts
        self.status = status
        self.message = message
        status_text = f" (HTTP {status})" if status is not None else ""
        super().__init__(
            f"teacher request failed after {attempts} attempt{'s' if attempts != 1 else ''}: "
            f"{reason}{status_text}: {message}")

    def __repr__(self) -> str:
        return (f"RequestFailed(reason={self.reason!r}, attempts={self.attempts}, "
                f"status={self.status!r}, message={self.message!r})")


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` (and of its halves, which a server may echo
    in a partially masked form) replaced."""
    if not secret:
        return text
    text = text.replace(secret, "[REDACTED]")
    if len(secret) >= 16:
        for part in (secret[: len(secret) // 2], secret[len(secret) // 2:]):
            text = text.replace(part, "[REDACTED]")
    return text
