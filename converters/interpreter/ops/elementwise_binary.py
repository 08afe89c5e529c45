"""Elementwise binary ops (MIL ``elementwise_binary``): arithmetic, comparisons, logical ops.

Both operands broadcast with numpy rules. Float operands arrive as float32 and are computed in
float32; int32 operands stay int32 (add/sub/mul wrap around on overflow, two's complement).
Comparisons and logical ops return bool.

Division with negative operands (the MIL docs only say ``x / y`` and ``x % y``):

* ``floor_div`` rounds towards negative infinity for ints and floats (``-7 // 2 == -4``).
* ``real_div`` on int32 divides exactly and truncates towards zero (the spec's own int test
  expects ``int32(x / y)``).
* ``mod`` is the C remainder (``fmod``: the result takes the sign of the dividend), which is what
  the runtime has been observed to return (stablehlo-coreml PR #70). coremltools' const folding
  uses Python's ``%`` instead, and its own torch/TF frontends avoid ``mod`` for floored modulo
  (they emit ``x - floor_div(x, y) * y``).
"""

from __future__ import annotations

import numpy as np

from converters.interpreter.registry import op


def ieee_quiet(fn):
    """Run an op with numpy's floating-point warnings off: inf/nan results (log(0), x/0, exp
    overflow) are the IEEE answers the device also produces, not errors."""

    def run(ctx):
        with np.errstate(all="ignore"):
            return fn(ctx)

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _operands(ctx):
    return np.asarray(ctx["x"]), np.asarray(ctx["y"])


def _is_int(*values) -> bool:
    return all(np.issubdtype(v.dtype, np.integer) for v in values)


@op("add")
def add(ctx):
    x, y = _operands(ctx)
    return np.add(x, y)


@op("sub")
def sub(ctx):
    x, y = _operands(ctx)
    return np.subtract(x, y)


@op("mul")
def mul(ctx):
    x, y = _operands(ctx)
    return np.multiply(x, y)


@op("real_div")
@ieee_quiet
def real_div(ctx):
    x, y = _operands(ctx)
    if _is_int(x, y):
        quotient = np.true_divide(x.astype(np.float64), y.astype(np.float64))
        return int_from_float(np.trunc(quotient), ctx.out_dtype())
    return np.true_divide(x, y)


@op("floor_div")
@ieee_quiet
def floor_div(ctx):
    x, y = _operands(ctx)
    if _is_int(x, y):
        return np.floor_divide(x, y)  # numpy floors for ints; x // 0 gives 0
    # floor(x / y) rather than numpy's fmod-based float floor_divide, which differs when x / y
    # rounds up to an integer (1 // 0.1 is 9 in numpy, floor(1 / 0.1) is 10).
    return np.floor(np.true_divide(x, y))


@op("mod")
@ieee_quiet
def mod(ctx):
    x, y = _operands(ctx)
    return np.fmod(x, y)


@op("pow")
@ieee_quiet
def pow_(ctx):
    x, y = _operands(ctx)
    if _is_int(x, y):
        # numpy refuses negative integer exponents; the exact power truncated to int instead.
        power = np.power(x.astype(np.float64), y.astype(np.float64))
        return int_from_float(np.trunc(power), ctx.out_dtype())
    return np.power(x, y)


@op("maximum")
def maximum(ctx):
    x, y = _operands(ctx)
    return np.maximum(x, y)


@op("minimum")
def minimum(ctx):
    x, y = _operands(ctx)
    return np.minimum(x, y)


_COMPARISONS = {
    "equal": np.equal,
    "not_equal": np.not_equal,
    "less": np.less,
    "less_equal": np.less_equal,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
}


@op(*_COMPARISONS)
def compare(ctx):
    x, y = _operands(ctx)
    return _COMPARISONS[ctx.type](x, y)


_LOGICAL = {
    "logical_and": np.logical_and,
    "logical_or": np.logical_or,
    "logical_xor": np.logical_xor,
}


@op(*_LOGICAL)
def logical(ctx):
    x, y = _operands(ctx)
    return _LOGICAL[ctx.type](x.astype(bool), y.astype(bool))


def int_from_float(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Convert integral float results to an int dtype, saturating at its range (inf, out of
    range) and mapping nan (0 / 0) to 0 instead of numpy's undefined conversion."""
    info = np.iinfo(dtype)
    values = np.nan_to_num(values, nan=0.0, posinf=info.max, neginf=info.min)
    return np.clip(values, info.min, info.max).astype(dtype)
