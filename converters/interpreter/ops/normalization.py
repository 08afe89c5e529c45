"""Normalization ops (MIL ``normalization``): batch_norm, instance_norm, layer_norm, l2_norm,
local_response_norm. Computed in float32; variances are biased (mean of squared deviations).

From iOS17 on, the parameters (mean, variance, gamma, beta, epsilon, alpha, k) may have another
float dtype than ``x``; they arrive widened like every float input.
"""

from __future__ import annotations

import numpy as np

from converters.interpreter.ops.elementwise_binary import ieee_quiet
from converters.interpreter.registry import op


def along_axis(param: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """Reshape a 1-D per-channel parameter so it broadcasts along ``axis`` of a rank-``rank``
    tensor."""
    shape = [1] * rank
    shape[axis] = -1
    return np.reshape(param, shape)


def _x(ctx) -> np.ndarray:
    return np.asarray(ctx["x"], dtype=np.float32)


def _channel_param(ctx, name: str, rank: int) -> np.ndarray | None:
    value = ctx.get(name)
    return None if value is None else along_axis(np.asarray(value, np.float32), rank, axis=1)


def _scale_and_shift(normalized: np.ndarray, gamma, beta) -> np.ndarray:
    if gamma is not None:
        normalized = normalized * gamma
    if beta is not None:
        normalized = normalized + beta
    return normalized


@op("batch_norm")
@ieee_quiet
def batch_norm(ctx):
    """y = gamma_c * (x - mean_c) / sqrt(variance_c + epsilon) + beta_c over channel axis 1."""
    x = _x(ctx)
    if x.ndim < 2:
        raise ctx.error(f"x must have a channel axis (rank >= 2), got rank {x.ndim}")
    mean = along_axis(np.asarray(ctx["mean"], np.float32), x.ndim, axis=1)
    variance = along_axis(np.asarray(ctx["variance"], np.float32), x.ndim, axis=1)
    epsilon = np.float32(ctx.scalar("epsilon", 1e-5))
    normalized = (x - mean) / np.sqrt(variance + epsilon)
    return _scale_and_shift(
        normalized, _channel_param(ctx, "gamma", x.ndim), _channel_param(ctx, "beta", x.ndim)
    )


@op("instance_norm")
@ieee_quiet
def instance_norm(ctx):
    """Normalize each (batch, channel) slice over its spatial axes 2.., then gamma_c, beta_c."""
    x = _x(ctx)
    if x.ndim < 3:
        raise ctx.error(f"x must be [n, C, *D] with rank >= 3, got rank {x.ndim}")
    spatial = tuple(range(2, x.ndim))
    epsilon = np.float32(ctx.scalar("epsilon", 1e-5))
    centered = x - np.mean(x, axis=spatial, keepdims=True)
    variance = np.mean(np.square(centered), axis=spatial, keepdims=True)
    normalized = centered / np.sqrt(variance + epsilon)
    return _scale_and_shift(
        normalized, _channel_param(ctx, "gamma", x.ndim), _channel_param(ctx, "beta", x.ndim)
    )


@op("layer_norm")
@ieee_quiet
def layer_norm(ctx):
    """Normalize over ``axes`` (default: all); gamma/beta have the shape of those axes of x
    (in increasing axis order)."""
    x = _x(ctx)
    rank = x.ndim
    raw_axes = ctx.ints("axes")
    axes = tuple(range(rank)) if raw_axes is None else tuple(
        sorted({a + rank if a < 0 else a for a in raw_axes})
    )
    if any(not 0 <= a < rank for a in axes):
        raise ctx.error(f"axes {raw_axes} out of range for rank {rank}")
    epsilon = np.float32(ctx.scalar("epsilon", 1e-5))
    centered = x - np.mean(x, axis=axes, keepdims=True)
    variance = np.mean(np.square(centered), axis=axes, keepdims=True)
    normalized = centered / np.sqrt(variance + epsilon)
    param_shape = [x.shape[i] if i in axes else 1 for i in range(rank)]

    def param(name):
        value = ctx.get(name)
        return None if value is None else np.reshape(np.asarray(value, np.float32), param_shape)

    return _scale_and_shift(normalized, param("gamma"), param("beta"))


@op("l2_norm")
@ieee_quiet
def l2_norm(ctx):
    """x / sqrt(sum(x^2) + epsilon), the sum over the last three axes (leading axes are batch)."""
    x = _x(ctx)
    if x.ndim < 3:
        raise ctx.error(f"x must have rank >= 3, got rank {x.ndim}")
    epsilon = np.float32(ctx.scalar("epsilon", 1e-6))
    square_sum = np.sum(np.square(x), axis=(-3, -2, -1), keepdims=True)
    return x / np.sqrt(square_sum + epsilon)


@op("local_response_norm")
@ieee_quiet
def local_response_norm(ctx):
    """x_c / (k + alpha / size * sum of x_j^2 over the channel window)^beta.

    The channel axis is -3, as in Core ML's LRN layer ("leading dimensions, from 0 to -4, are
    batch"): that is axis 1 for [n, C, H, W], but axis 0 for a rank-3 input, which is what the
    runtime computes (the MIL smoke test's expected values for a (1, 3, 2) input normalize each
    element by itself only). The window is channels c - size // 2 .. c + (size - 1) // 2, zero
    outside, as in torch.nn.LocalResponseNorm.
    """
    x = _x(ctx)
    if x.ndim < 3:
        raise ctx.error(f"x must have rank >= 3, got rank {x.ndim}")
    size = int(ctx.scalar("size"))
    if size < 1:
        raise ctx.error(f"size must be positive, got {size}")
    alpha = np.float32(ctx.scalar("alpha", 1e-4))
    beta = np.float32(ctx.scalar("beta", 0.75))
    k = np.float32(ctx.scalar("k", 1.0))
    channels = np.moveaxis(np.square(x), -3, 0)
    before, after = size // 2, (size - 1) // 2
    padded = np.pad(channels, [(before, after)] + [(0, 0)] * (channels.ndim - 1))
    count = channels.shape[0]
    window_sum = sum(padded[offset : offset + count] for offset in range(size))
    scale = np.moveaxis(k + alpha / np.float32(size) * window_sum, 0, -3)
    return x / np.power(scale, beta)
