"""Reduction ops (MIL ``reduction``): ``reduce_*`` over ``axes`` and ``reduce_argmax/argmin``.

``axes`` absent means every axis; ``keep_dims`` keeps reduced axes with length 1. Float inputs
are reduced in float32; int32 inputs stay int32 for sum/prod/max/min/l1 and sum_square, while the
ops whose value is fractional (mean, l2 norm, logs) are computed in float64 and truncated to the
declared int32 output.
"""

from __future__ import annotations

import numpy as np

from converters.interpreter.ops.elementwise_binary import ieee_quiet, int_from_float
from converters.interpreter.registry import op


def _log_sum_exp(x: np.ndarray, axis, keepdims: bool) -> np.ndarray:
    peak = np.max(x, axis=axis, keepdims=True)
    # An all -inf (or inf) slice would give inf - inf = nan; shift by 0 there instead.
    peak = np.where(np.isfinite(peak), peak, 0).astype(x.dtype)
    total = np.sum(np.exp(x - peak), axis=axis, keepdims=True)
    result = np.log(total) + peak
    return result if keepdims else np.squeeze(result, axis=axis)


_REDUCERS = {
    "reduce_sum": np.sum,
    "reduce_prod": np.prod,
    "reduce_max": np.max,
    "reduce_min": np.min,
    "reduce_mean": np.mean,
    "reduce_l1_norm": lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(
        np.sum(np.square(x), axis=axis, keepdims=keepdims)
    ),
    "reduce_sum_square": lambda x, axis, keepdims: np.sum(
        np.square(x), axis=axis, keepdims=keepdims
    ),
    "reduce_log_sum": lambda x, axis, keepdims: np.log(np.sum(x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum_exp": _log_sum_exp,
}

# Reductions whose result is not an integer for integer input.
_FRACTIONAL = {"reduce_mean", "reduce_l2_norm", "reduce_log_sum", "reduce_log_sum_exp"}


def _axes(ctx, rank: int) -> tuple[int, ...]:
    axes = ctx.ints("axes")
    if axes is None:
        return tuple(range(rank))
    normalized = tuple(sorted({a + rank if a < 0 else a for a in axes}))
    if any(not 0 <= a < rank for a in normalized):
        raise ctx.error(f"axes {axes} out of range for rank {rank}")
    return normalized


@op(*_REDUCERS)
@ieee_quiet
def reduce(ctx):
    x = np.asarray(ctx["x"])
    axes = _axes(ctx, x.ndim)
    keep_dims = bool(ctx.scalar("keep_dims", False))
    reducer = _REDUCERS[ctx.type]
    is_int = np.issubdtype(x.dtype, np.integer)
    if is_int and ctx.type in _FRACTIONAL:
        result = reducer(x.astype(np.float64), axis=axes, keepdims=keep_dims)
        return int_from_float(np.trunc(result), ctx.out_dtype())
    result = reducer(x, axis=axes, keepdims=keep_dims)
    return np.asarray(result).astype(x.dtype, copy=False)


_ARG_REDUCERS = {"reduce_argmax": np.argmax, "reduce_argmin": np.argmin}


@op(*_ARG_REDUCERS)
def reduce_arg(ctx):
    """Index of the max/min along ``axis`` (ties: the first index). The output dtype is int32,
    or uint16 when iOS17's ``output_dtype`` asks for it."""
    x = np.asarray(ctx["x"])
    axis = int(ctx.scalar("axis", -1))
    if not -x.ndim <= axis < x.ndim:
        raise ctx.error(f"axis {axis} out of range for rank {x.ndim}")
    keep_dims = bool(ctx.scalar("keep_dims", False))
    indices = _ARG_REDUCERS[ctx.type](x, axis=axis, keepdims=keep_dims)
    return np.asarray(indices).astype(ctx.out_dtype())
