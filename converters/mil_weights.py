"""The exporter's weights as MIL constants: precision per tensor, conversion, and sharing.

What is quantized: every projection matrix (q/k/v/o, gate/up/down) at the requested precision;
the embedding table / LM head (one tensor when tied) at int8 per-channel for int8 and int4 (a 4-bit
LM head costs disproportionate quality); norms, biases and RoPE tables stay fp16. Quantized
weights become ``constexpr_blockwise_shift_scale`` (iOS18) over int8/int4 data and fp16 scales,
computed by ``converters.quantize`` as each tensor is read.

Each weight is prepared once and every function of the program gets its own const op over the
same array, with ``weight_id`` set to the weight's name: the serializer writes one blob entry per
``weight_id``, so prefill and decode share every weight in the package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from converters.quantize import Quantized, quantize_symmetric
from mlx_distill.config import ModelConfig

INT4_BLOCK = 32
EMBEDDING_KEYS = ("model.embed_tokens.weight", "lm_head.weight")
FP16_MAX = float(np.finfo(np.float16).max)


class QuantizationError(ValueError):
    """The weights cannot be quantized as asked; the message says which and why."""


class WeightRangeError(ValueError):
    """A weight does not fit float16; the message names it."""


def int4_block(width: int) -> int:
    """INT4_BLOCK input channels per scale, or the largest divisor of ``width`` below it when
    ``width`` is not a multiple (blocks must tile the row; the toy's d_ff 336 takes 28)."""
    for block in range(INT4_BLOCK, 7, -1):
        if width % block == 0:
            return block
    raise QuantizationError(f"int4: input width {width} has no divisor between 8 and "
                            f"{INT4_BLOCK} to use as a block size; use --precision int8")


def weight_format(key: str, shape: tuple[int, ...], precision: str) -> tuple[int, int] | None:
    """(bits, block) of a weight's quantized form, or None when it stays fp16."""
    if precision == "fp16" or len(shape) != 2:
        return None
    if precision == "int8" or key in EMBEDDING_KEYS:
        return 8, shape[1]
    return 4, int4_block(shape[1])


def check_quantizable(shapes: dict[str, tuple[int, ...]], precision: str) -> None:
    """Raise QuantizationError before any work when a weight cannot take ``precision``."""
    for key, shape in shapes.items():
        weight_format(key, shape, precision)


def weight_floor_bytes(shapes: dict[str, tuple[int, ...]], precision: str) -> int:
    """params × bytes per weight + fp16 scales: the smallest package these weights allow."""
    total = 0
    for key, shape in shapes.items():
        size = int(np.prod(shape))
        fmt = weight_format(key, shape, precision)
        if fmt is None:
            total += size * 2
            continue
        bits, block = fmt
        total += (size * bits + 7) // 8 + (size // block) * 2
    return total


def quantization_summary(precision: str) -> dict[str, Any]:
    if precision == "fp16":
        return {"weights": "fp16", "activations": "fp16"}
    projections = ("int8 per output channel, symmetric" if precision == "int8"
                   else f"int4 per block of {INT4_BLOCK} input channels (or the largest divisor "
                   "of the input width below it), symmetric")
    return {
        "activations": "fp16",
        "projections": projections + " (constexpr_blockwise_shift_scale)",
        "embedding_and_lm_head": "int8 per row (vocabulary entry), symmetric",
        "fp16": "norm weights, biases, RoPE tables",
    }


def to_fp16(name: str, value: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        value = np.asarray(value).astype(np.float16, copy=False)
    # inf/NaN have all exponent bits set (a fifth of the cost of np.isfinite on float16).
    if np.any((value.view(np.uint16) & 0x7C00) == 0x7C00):
        raise WeightRangeError(f"tensor {name}: values are not finite or exceed the fp16 range "
                               f"(|x| <= {FP16_MAX:g})")
    return value


def rope_tables(config: ModelConfig, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of every position's rotation angles, (max_context, d_head / 2), float64.

    Matches ``mlx_distill.model.RoPE`` (half-split layout): linear scaling divides positions by
    the factor; dynamic NTK uses, for position p, the base of a sequence of length p + 1.
    """
    dims = config.d_head
    positions = np.arange(max_context, dtype=np.float64)
    exponents = np.arange(0, dims, 2, dtype=np.float64) / dims
    base = np.full(max_context, float(config.rope_theta))
    rs = config.rope_scaling
    if rs is not None and rs.type == "linear":
        positions = positions / rs.factor
    elif rs is not None and rs.type == "dynamic":
        seq_len = np.maximum(np.arange(max_context) + 1.0, rs.original_max_position)
        base = base * ((rs.factor * seq_len / rs.original_max_position) - (rs.factor - 1)) ** (
            dims / (dims - 2)
        )
    angles = positions[:, None] * base[:, None] ** -exponents[None, :]
    return np.cos(angles), np.sin(angles)


def const_name(key: str) -> str:
    """MIL-safe const name for a weight."""
    return key.replace(".", "_").replace("#", "_")


class WeightConsts:
    """Prepared weights (fp16 arrays or ``Quantized``) and the const ops of the function being
    built. ``precision`` applies to 2-D weights (see the module docstring)."""

    def __init__(self, precision: str = "fp16"):
        self.precision = precision
        self._prepared: dict[str, np.ndarray | Quantized] = {}
        self._vars: dict[str, Any] = {}

    def begin_function(self) -> None:
        self._vars = {}

    def get(self, key: str, value_fn: Callable[[], np.ndarray], conv: bool = False,
            model_weight: bool = True):
        """The Var of ``key`` in the current function. ``value_fn`` gives its float values
        (called once per export); ``conv``: a 2-D weight is used as a 1×1 conv kernel
        (out, in, 1, 1); ``model_weight`` False: a table of our own (RoPE), always fp16."""
        if key not in self._vars:
            if key not in self._prepared:
                self._prepared[key] = self._prepare(key, value_fn(), model_weight)
            self._vars[key] = self._emit(key, self._prepared[key], conv)
        return self._vars[key]

    def _prepare(self, key: str, value: np.ndarray, model_weight: bool) -> np.ndarray | Quantized:
        fmt = weight_format(key, np.shape(value), self.precision if model_weight else "fp16")
        if fmt is None:
            return to_fp16(key, value)
        bits, block = fmt
        if value.dtype not in (np.float16, np.float32):
            value = value.astype(np.float32)
        try:  # straight from float32, in chunks: no full-size float16 copy
            return quantize_symmetric(value, bits, block)
        except ValueError as exc:
            raise WeightRangeError(f"tensor {key}: {exc}") from None

    @staticmethod
    def _emit(key: str, payload: np.ndarray | Quantized, conv: bool):
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.mil.types.type_mapping import np_int4_dtype

        name = const_name(key)
        kernel = (slice(None), slice(None), None, None) if conv else ...
        if isinstance(payload, np.ndarray):
            var = mb.const(val=payload[kernel] if payload.ndim == 2 else payload, name=name)
            var.op.weight_id = key
            return var
        data = payload.data if payload.nbits == 8 else payload.data.view(np_int4_dtype)
        data = mb.const(val=data[kernel], name=f"{name}_data")
        scale = mb.const(val=payload.scale[kernel], name=f"{name}_scale")
        data.op.weight_id, scale.op.weight_id = f"{key}#data", f"{key}#scale"
        return mb.constexpr_blockwise_shift_scale(data=data, scale=scale,
                                                  name=f"{name}_quantized")
