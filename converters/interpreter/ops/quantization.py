"""Activation quantization (iOS17): ``quantize`` and ``dequantize`` of tensors at run time.

Weights use the compile-time ``constexpr_*`` ops (constexpr.py); these two act on values."""

from __future__ import annotations

import numpy as np

from converters.interpreter.registry import op

_INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255)}


def _scale_and_zero_point(ctx, rank: int):
    """scale and zero_point (0 when absent) shaped to broadcast against a rank-``rank`` input:
    scalars stay scalars, a vector lies along ``axis``."""
    scale = np.asarray(ctx["scale"], dtype=np.float32)
    zero_point = np.asarray(ctx.get("zero_point", 0)).astype(np.float32)
    if scale.ndim == 0:
        if zero_point.ndim != 0:
            raise ctx.error("zero_point must be a scalar when scale is a scalar")
        return scale, zero_point
    if scale.ndim != 1 or not ctx.has("axis"):
        raise ctx.error("a non-scalar scale must be a vector with an axis")
    axis = int(ctx.scalar("axis"))
    if not -rank <= axis < rank:
        raise ctx.error(f"axis {axis} out of range for rank {rank}")
    shape = [1] * rank
    shape[axis % rank] = scale.size
    if zero_point.ndim:
        zero_point = zero_point.reshape(shape)
    return scale.reshape(shape), zero_point


@op("quantize")
def quantize(ctx):
    """``clip(round(input / scale) + zero_point)`` to int8/uint8 (round half to even)."""
    x = np.asarray(ctx["input"], dtype=np.float32)
    dtype = ctx.scalar("output_dtype")
    if dtype not in _INT_RANGES:
        raise ctx.error(f"output_dtype {dtype!r} is unsupported (int8 or uint8)")
    scale, zero_point = _scale_and_zero_point(ctx, x.ndim)
    low, high = _INT_RANGES[dtype]
    with np.errstate(divide="ignore", invalid="ignore"):
        quantized = np.rint(x / scale) + zero_point
    return np.clip(quantized, low, high).astype(np.dtype(dtype))


@op("dequantize")
def dequantize(ctx):
    """``scale * (input - zero_point)``."""
    x = np.asarray(ctx["input"]).astype(np.float32)
    scale, zero_point = _scale_and_zero_point(ctx, x.ndim)
    return (x - zero_point) * scale
