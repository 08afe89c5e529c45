"""Elementwise unary ops (MIL ``elementwise_unary``), ``clip``/``threshold`` and ``cast``.

Float inputs arrive as float32 and are computed in float32 (numpy keeps float32 through these
ufuncs); ops whose domain includes int32 (abs, sign, square, exp2, threshold) keep ints integer.
``epsilon`` inputs (inverse, log, rsqrt) may have another float dtype than ``x`` from iOS17 on;
they arrive widened like every float input, so the arithmetic is the same.
"""

from __future__ import annotations

import math

import numpy as np

from converters.interpreter.ops.elementwise_binary import ieee_quiet, int_from_float
from converters.interpreter.registry import op

_FLOAT_UFUNCS = {
    "acos": np.arccos,
    "asin": np.arcsin,
    "atan": np.arctan,
    "atanh": np.arctanh,
    "ceil": np.ceil,
    "cos": np.cos,
    "cosh": np.cosh,
    "exp": np.exp,
    "floor": np.floor,
    # Ties go to the even neighbour: the MIL doc's "0.5 is rounded to 0", and what the torch and
    # TF frontends (both half-to-even rounds) lower to this op.
    "round": np.round,
    "sin": np.sin,
    "sinh": np.sinh,
    "sqrt": np.sqrt,
    "tan": np.tan,
    "tanh": np.tanh,
}


@op(*_FLOAT_UFUNCS)
@ieee_quiet
def float_unary(ctx):
    return _FLOAT_UFUNCS[ctx.type](np.asarray(ctx["x"]))


_INT_PRESERVING_UFUNCS = {
    "abs": np.abs,
    "sign": np.sign,
    "square": np.square,
}


@op(*_INT_PRESERVING_UFUNCS)
def int_preserving_unary(ctx):
    return _INT_PRESERVING_UFUNCS[ctx.type](np.asarray(ctx["x"]))


@op("exp2")
@ieee_quiet
def exp2(ctx):
    x = np.asarray(ctx["x"])
    if np.issubdtype(x.dtype, np.integer):
        # 2 ** negative int is a fraction; the int32 result truncates it (to 0).
        return int_from_float(np.trunc(np.exp2(x.astype(np.float64))), ctx.out_dtype())
    return np.exp2(x)


_erf_scalar = np.frompyfunc(math.erf, 1, 1)


def erf(values: np.ndarray) -> np.ndarray:
    """Gauss error function, correctly rounded to float32 (computed in float64 by math.erf)."""
    values = np.asarray(values, dtype=np.float32)
    return np.asarray(_erf_scalar(values.astype(np.float64)), dtype=np.float64).astype(np.float32)


@op("erf")
def erf_op(ctx):
    return erf(ctx["x"])


@op("inverse")
@ieee_quiet
def inverse(ctx):
    x = np.asarray(ctx["x"])
    return np.reciprocal(x + np.float32(ctx.scalar("epsilon", 1e-4)))


@op("log")
@ieee_quiet
def log(ctx):
    x = np.asarray(ctx["x"])
    return np.log(x + np.float32(ctx.scalar("epsilon", 1e-45)))


@op("rsqrt")
@ieee_quiet
def rsqrt(ctx):
    x = np.asarray(ctx["x"])
    return np.float32(1.0) / np.sqrt(x + np.float32(ctx.scalar("epsilon", 1e-12)))


@op("logical_not")
def logical_not(ctx):
    return np.logical_not(np.asarray(ctx["x"]).astype(bool))


@op("clip")
def clip(ctx):
    x = np.asarray(ctx["x"])
    return np.minimum(np.maximum(x, ctx["alpha"]), ctx["beta"]).astype(x.dtype)


@op("threshold")
def threshold(ctx):
    x = np.asarray(ctx["x"])
    return np.maximum(x, ctx["alpha"]).astype(x.dtype)


@op("cast")
@ieee_quiet
def cast(ctx):
    """Convert to ``dtype`` (bool, (u)int8, (u)int16, int32, fp16, fp32).

    Float to int truncates towards zero (the MIL test casts -3.6 to -3) and saturates at the
    target range with nan going to 0, as the Arm float-to-int conversion does; int to a narrower
    int keeps the low bits (wraps); anything to bool is ``x != 0``.
    """
    x = np.asarray(ctx["x"])
    target = ctx.out_dtype()
    if target is None:
        raise ctx.error(f"unsupported cast dtype {ctx.scalar('dtype')!r}")
    if target == np.bool_:
        return x != 0
    if np.issubdtype(target, np.integer) and np.issubdtype(x.dtype, np.floating):
        return int_from_float(np.trunc(x), target)
    return x.astype(target)
