"""avg_pool, max_pool, l2_pool over 1-3 spatial dims (coremltools ``mil/ops/defs`` iOS15
``pool.py``), vectorised over a strided window view like conv.

ceil_mode (PyTorch's) can add a last window that runs past the padded input; that overhang never
counts: it is -inf for max, and outside the divisor of avg even when padding is counted.
"""

from __future__ import annotations

import math

import numpy as np

from converters.interpreter.ops.conv import spatial_padding, window_view
from converters.interpreter.registry import op


def _pooling_layout(ctx, x):
    """(kernel, strides, explicit pads, ceil-mode overhang per dim)."""
    rank = x.ndim - 2
    if not 1 <= rank <= 3:
        raise ctx.error(f"x {x.shape} must have 1 to 3 spatial dims")
    kernel = ctx.ints("kernel_sizes")
    strides = ctx.ints("strides", [1] * rank)
    if len(kernel) != rank or len(strides) != rank:
        raise ctx.error(f"kernel_sizes {kernel} / strides {strides} need {rank} values")
    pads = spatial_padding(ctx, x.shape[2:], kernel, strides)
    overhang = [0] * rank
    if ctx.scalar("ceil_mode", False):
        for i, (size, k, s) in enumerate(zip(x.shape[2:], kernel, strides, strict=True)):
            total = sum(pads[i])
            out = math.floor((size + total - k + s - 1) / s + 1)
            # coremltools' rule: drop a last window that would start inside the right padding.
            if (out - 1) * s >= size + total / 2 and total > 0:
                out -= 1
            overhang[i] = max(0, (out - 1) * s + k - (size + total))
    return kernel, strides, pads, overhang


def _windows(x, kernel, strides, pads, overhang, fill):
    padded = np.pad(
        x,
        [(0, 0), (0, 0)] + [(b, a + o) for (b, a), o in zip(pads, overhang, strict=True)],
        constant_values=fill,
    )
    return window_view(padded, kernel, strides, [1] * len(kernel))


def _window_axes(kernel):
    return tuple(range(-len(kernel), 0))


@op("max_pool")
def max_pool(ctx):
    x = np.asarray(ctx["x"], dtype=np.float32)
    kernel, strides, pads, overhang = _pooling_layout(ctx, x)
    view = _windows(x, kernel, strides, pads, overhang, -np.inf)
    return view.max(axis=_window_axes(kernel))


@op("l2_pool")
def l2_pool(ctx):
    x = np.asarray(ctx["x"], dtype=np.float32)
    kernel, strides, pads, overhang = _pooling_layout(ctx, x)
    view = _windows(x * x, kernel, strides, pads, overhang, 0.0)
    return np.sqrt(view.sum(axis=_window_axes(kernel)))


@op("avg_pool")
def avg_pool(ctx):
    x = np.asarray(ctx["x"], dtype=np.float32)
    kernel, strides, pads, overhang = _pooling_layout(ctx, x)
    axes = _window_axes(kernel)
    sums = _windows(x, kernel, strides, pads, overhang, 0.0).sum(axis=axes)
    # The divisor per output position: real elements only, or real plus explicit padding.
    counted = np.ones((1, 1) + x.shape[2:], np.float32)
    if ctx.scalar("exclude_padding_from_average", False):
        counts = _windows(counted, kernel, strides, pads, overhang, 0.0).sum(axis=axes)
    else:
        counted = np.pad(counted, [(0, 0), (0, 0)] + list(pads), constant_values=1.0)
        no_pads = [(0, 0)] * len(kernel)
        counts = _windows(counted, kernel, strides, no_pads, overhang, 0.0).sum(axis=axes)
    return sums / np.maximum(counts, 1.0)
