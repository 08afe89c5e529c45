"""The op table: each MIL op type maps to a numpy implementation ``fn(ctx) -> value(s)``.

Implementations follow the MIL op definitions (coremltools ``mil/ops/defs``) and receive inputs
through :class:`OpContext`: float tensors arrive as float32 (fp16 storage is widened for the
arithmetic), the runtime rounds every output to its declared dtype afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

OPS: dict[str, Callable[[OpContext], Any]] = {}


def op(*names: str):
    """Register an implementation under one or more MIL op type names."""

    def register(fn):
        for name in names:
            if name in OPS:
                raise ValueError(f"MIL op {name!r} registered twice")
            OPS[name] = fn
        return fn

    return register


class MILExecutionError(RuntimeError):
    """An op could not be executed; the message names the function and the op."""


class OpContext:
    """What an op implementation sees: its evaluated inputs and declared outputs."""

    def __init__(self, op, function: str, read, states: dict[str, np.ndarray], fp32: bool):
        self.op = op
        self.function = function
        self._read = read
        self.states = states
        self.fp32 = fp32

    @property
    def type(self) -> str:
        return self.op.op_type

    def has(self, name: str) -> bool:
        return self.op.inputs.get(name) is not None

    def __getitem__(self, name: str) -> Any:
        if not self.has(name):
            raise self.error(f"required input {name!r} is missing")
        return self._read(self.op.inputs[name])

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if self.has(name) else default

    def scalar(self, name: str, default: Any = None) -> Any:
        """A scalar input as a Python value (bool/int/float/str)."""
        if not self.has(name):
            return default
        value = self[name]
        if isinstance(value, np.ndarray):
            value = value.item() if value.size == 1 else value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        return value

    def ints(self, name: str, default: Any = None) -> list[int] | None:
        if not self.has(name):
            return default
        return [int(v) for v in np.asarray(self[name]).reshape(-1)]

    def var(self, name: str):
        return self.op.inputs[name]

    @property
    def outputs(self):
        return self.op.outputs

    def out_dtype(self, index: int = 0) -> np.dtype:
        from converters.interpreter.dtypes import storage_dtype

        return storage_dtype(self.op.outputs[index].dtype, self.fp32)

    def error(self, message: str) -> MILExecutionError:
        return MILExecutionError(
            f"function {self.function!r}, op {self.op.name!r} ({self.op.op_type}): {message}"
        )
