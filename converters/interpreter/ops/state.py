"""Stateful ops (iOS18): a state input evaluates to its name; buffers live in ``MILState``."""

from __future__ import annotations

import numpy as np

from converters.interpreter.registry import op


@op("read_state")
def read_state(ctx):
    name = ctx["input"]
    if name not in ctx.states:
        raise ctx.error(f"state {name!r} has no buffer: pass state=model.make_state()")
    return ctx.states[name].copy()


@op("coreml_update_state", "write_state")
def coreml_update_state(ctx):
    name, value = ctx["state"], np.asarray(ctx["value"])
    if name not in ctx.states:
        raise ctx.error(f"state {name!r} has no buffer: pass state=model.make_state()")
    buffer = ctx.states[name]
    if value.shape != buffer.shape:
        raise ctx.error(f"value shape {value.shape} does not match state shape {buffer.shape}")
    ctx.states[name] = value.astype(buffer.dtype)
    # coreml_update_state returns the value it wrote (rounded to the state's dtype).
    return ctx.states[name] if ctx.type == "coreml_update_state" else None
