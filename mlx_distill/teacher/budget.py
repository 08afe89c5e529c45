"""A USD spending cap: reserve a request's worst case before sending, settle to its real cost after.

Invariant: ``spent + reserved <= cap`` after every operation, as long as no commit exceeds its
reservation (the client reserves an upper bound, so it does not). Safe from threads and from
coroutines (no awaits inside; one lock).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from dataclasses import dataclass

from mlx_distill.teacher.errors import BudgetExceeded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reservation:
    id: int
    amount: float


class Budget:
    def __init__(self, cap_usd: float | None, spent_usd: float = 0.0):
        if cap_usd is not None and not (math.isfinite(cap_usd) and cap_usd >= 0):
            raise ValueError(f"budget cap must be a non-negative number of USD, got {cap_usd!r}")
        if not (math.isfinite(spent_usd) and spent_usd >= 0):
            raise ValueError(f"spent must be a non-negative number of USD, got {spent_usd!r}")
        self.cap = cap_usd
        self._spent = [float(spent_usd)]  # summed with fsum: no drift over many small commits
        self._open: dict[int, float] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    @property
    def spent(self) -> float:
        with self._lock:
            return math.fsum(self._spent)

    @property
    def reserved(self) -> float:
        with self._lock:
            return math.fsum(self._open.values())

    @property
    def remaining(self) -> float:
        """USD that may still be reserved (infinite without a cap)."""
        if self.cap is None:
            return math.inf
        with self._lock:
            return max(0.0, self.cap - math.fsum(self._spent) - math.fsum(self._open.values()))

    def reserve(self, amount: float) -> Reservation:
        if not (math.isfinite(amount) and amount >= 0):
            raise ValueError(f"reservation must be a non-negative number of USD, got {amount!r}")
        with self._lock:
            if self.cap is not None:
                spent, reserved = math.fsum(self._spent), math.fsum(self._open.values())
                if math.fsum([spent, reserved, amount]) > self.cap:
                    raise BudgetExceeded(amount, spent, reserved, self.cap)
            reservation = Reservation(next(self._ids), float(amount))
            self._open[reservation.id] = reservation.amount
            return reservation

    def commit(self, reservation: Reservation, actual_usd: float) -> None:
        """Turn a reservation into money spent (``actual_usd``, normally <= the reservation)."""
        if not (math.isfinite(actual_usd) and actual_usd >= 0):
            raise ValueError(f"actual cost must be a non-negative USD amount, got {actual_usd!r}")
        with self._lock:
            if self._open.pop(reservation.id, None) is None:
                raise ValueError(f"reservation {reservation.id} was already committed or released")
            self._spent.append(float(actual_usd))
            if len(self._spent) > 4096:
                self._spent = [math.fsum(self._spent)]
        if actual_usd > reservation.amount * (1 + 1e-9):
            # Money really spent is recorded as spent; the worst-case bound was wrong.
            log.warning("a request cost $%.6f, more than the $%.6f reserved for it",
                        actual_usd, reservation.amount)

    def release(self, reservation: Reservation) -> None:
        """Give a reservation back unspent (nothing was billed). No-op if already settled."""
        with self._lock:
            self._open.pop(reservation.id, None)

    def snapshot(self) -> dict[str, float | None]:
        with self._lock:
            spent, reserved = math.fsum(self._spent), math.fsum(self._open.values())
        return {"cap_usd": self.cap, "spent_usd": spent, "reserved_usd": reserved}

    def __repr__(self) -> str:
        snap = self.snapshot()
        return (f"Budget(cap_usd={snap['cap_usd']!r}, spent_usd={snap['spent_usd']:.6f}, "
                f"reserved_usd={snap['reserved_usd']:.6f})")
