"""Health probe of a backend's raw forward pass: does every enumerated prefill shape run, and are
the logits finite and not all zero?

- Core ML package (:class:`~mlx_distill.runtime.CoreMLBackend`): ``prefill`` at each enumerated
  length of its contract, with the probe prompt tiled to fill it, then one ``decode`` step from
  the state it wrote. ``shapes_ok``: every call ran; ``logits_ok``: every logits tensor finite and
  not all zero.
- MLX checkpoint: the model over the probe prompt; it has no enumerated shapes (``shapes_ok``
  None, not applicable).
- Anything else (an endpoint): nothing to probe, both None.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def logits_sane(logits: Any) -> bool:
    """Finite everywhere and not all zero."""
    values = np.asarray(logits, np.float32)
    return bool(values.size) and bool(np.isfinite(values).all()) and bool(np.any(values != 0))


def _tiled(prompt_ids: Sequence[int], length: int) -> np.ndarray:
    return np.resize(np.asarray(prompt_ids, np.int64), length)


def _probe_coreml(backend: Any, prompt_ids: Sequence[int]) -> dict[str, Any]:
    runner, names = backend.runner, backend.names
    checks = []
    for length in backend.shapes:
        check: dict[str, Any] = {"length": length, "ran": False, "logits_ok": False}
        try:
            ids = _tiled(prompt_ids, length)
            state = runner.new_state()
            out = runner.prefill(ids, state)
            prefill_ok = logits_sane(out[names["logits"]])
            decode_ok = True
            if length < backend.max_context:
                state = runner.handoff(state)
                decode_ok = logits_sane(runner.decode(int(ids[-1]), length, state))
            check.update(ran=True, logits_ok=prefill_ok and decode_ok)
        except Exception as exc:  # a shape that fails is the finding, not a crash of the eval
            check["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}" \
                if str(exc).strip() else type(exc).__name__
        checks.append(check)
    return {"lengths": list(backend.shapes), "checks": checks,
            "shapes_ok": all(c["ran"] for c in checks),
            "logits_ok": all(c["logits_ok"] for c in checks)}


def _probe_mlx(backend: Any, prompt_ids: Sequence[int]) -> dict[str, Any]:
    import mlx.core as mx

    logits = backend.model(mx.array(list(prompt_ids))[None])
    mx.eval(logits)
    ok = logits_sane(np.array(logits.astype(mx.float32)))
    return {"lengths": [len(prompt_ids)],
            "checks": [{"length": len(prompt_ids), "ran": True, "logits_ok": ok}],
            "shapes_ok": None, "logits_ok": ok}


def probe(backend: Any, prompt_ids: Sequence[int] | None) -> dict[str, Any] | None:
    """The health of ``backend`` on ``prompt_ids`` (a templated eval prompt); None when the
    backend exposes no forward pass."""
    if prompt_ids is None or not len(prompt_ids):
        return None
    if hasattr(backend, "runner") and hasattr(backend, "shapes"):
        return _probe_coreml(backend, prompt_ids)
    if hasattr(backend, "model"):
        return _probe_mlx(backend, prompt_ids)
    return None
