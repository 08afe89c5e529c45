"""Activation ops (MIL ``activation``), computed in float32.

From iOS17 on, ``alpha``/``beta`` may have another float dtype than ``x``; they arrive widened
like every float input, so one implementation serves every opset. Per-channel parameters
(prelu, softplus_parametric) apply along axis 1, as the MIL definitions specify.
"""

from __future__ import annotations

import numpy as np

from converters.interpreter.ops.elementwise_binary import ieee_quiet
from converters.interpreter.ops.elementwise_unary import erf
from converters.interpreter.ops.normalization import along_axis
from converters.interpreter.registry import op


def _x(ctx) -> np.ndarray:
    return np.asarray(ctx["x"], dtype=np.float32)


def _param(ctx, name: str) -> np.float32:
    return np.float32(ctx.scalar(name))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-x) without overflow, keeping relative precision for very negative x."""
    decay = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + decay), decay / (1 + decay)).astype(x.dtype)


@op("relu")
def relu(ctx):
    return np.maximum(_x(ctx), np.float32(0))


@op("relu6")
def relu6(ctx):
    return np.clip(_x(ctx), np.float32(0), np.float32(6))


@op("leaky_relu")
def leaky_relu(ctx):
    x = _x(ctx)
    return np.where(x >= 0, x, _param(ctx, "alpha") * x)


@op("elu")
@ieee_quiet
def elu(ctx):
    x = _x(ctx)
    return np.where(x > 0, x, _param(ctx, "alpha") * np.expm1(x))


@op("prelu")
def prelu(ctx):
    x = _x(ctx)
    alpha = along_axis(np.asarray(ctx["alpha"], np.float32), x.ndim, axis=1)
    return np.where(x > 0, x, alpha * x)


_GELU_TANH_SCALE = np.float32(np.sqrt(2 / np.pi))


@op("gelu")
@ieee_quiet
def gelu(ctx):
    x = _x(ctx)
    mode = ctx.scalar("mode", "EXACT")
    if mode == "EXACT":
        return np.float32(0.5) * x * (1 + erf(x / np.float32(np.sqrt(2))))
    if mode == "TANH_APPROXIMATION":
        inner = _GELU_TANH_SCALE * (x + np.float32(0.044715) * x**3)
        return np.float32(0.5) * x * (1 + np.tanh(inner))
    if mode == "SIGMOID_APPROXIMATION":
        return x * sigmoid(np.float32(1.702) * x)
    raise ctx.error(f"unsupported gelu mode {mode!r}")


@op("sigmoid")
@ieee_quiet
def sigmoid_op(ctx):
    return sigmoid(_x(ctx))


@op("silu")
@ieee_quiet
def silu(ctx):
    x = _x(ctx)
    return x * sigmoid(x)


@op("sigmoid_hard")
def sigmoid_hard(ctx):
    x = _x(ctx)
    return np.clip(_param(ctx, "alpha") * x + _param(ctx, "beta"), np.float32(0), np.float32(1))


@op("scaled_tanh")
def scaled_tanh(ctx):
    return _param(ctx, "alpha") * np.tanh(_param(ctx, "beta") * _x(ctx))


@op("linear_activation")
def linear_activation(ctx):
    return _param(ctx, "alpha") * _x(ctx) + _param(ctx, "beta")


@op("clamped_relu")
def clamped_relu(ctx):
    x = _x(ctx)
    scaled = np.where(x >= 0, x, _param(ctx, "alpha") * x)
    return np.minimum(scaled, _param(ctx, "beta"))


@op("thresholded_relu")
def thresholded_relu(ctx):
    x = _x(ctx)
    return np.where(x >= _param(ctx, "alpha"), x, np.float32(0))


@op("softplus")
@ieee_quiet
def softplus(ctx):
    # log(1 + e^x) as logaddexp(0, x): no overflow for large x, no log(1) rounding for small x.
    return np.logaddexp(np.float32(0), _x(ctx))


@op("softplus_parametric")
@ieee_quiet
def softplus_parametric(ctx):
    x = _x(ctx)
    alpha = along_axis(np.asarray(ctx["alpha"], np.float32), x.ndim, axis=1)
    beta = along_axis(np.asarray(ctx["beta"], np.float32), x.ndim, axis=1)
    return alpha * np.logaddexp(np.float32(0), beta * x)


@op("softmax")
@ieee_quiet
def softmax(ctx):
    x = _x(ctx)
    axis = int(ctx.scalar("axis", -1))
    shifted = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return shifted / np.sum(shifted, axis=axis, keepdims=True)


@op("softsign")
def softsign(ctx):
    x = _x(ctx)
    return x / (1 + np.abs(x))
