"""Symmetric linear weight quantization with the arithmetic of ``ct.optimize.coreml``, in float32.

``linear_quantize_weights`` (mode ``linear_symmetric``) computes, per block of a float16 weight:
``scale = fp16((max|w| - -max|w|) / (2·qmax))``, ``q = clip(round(fp16(w / scale)), -qmax, qmax)``
(``coremltools.optimize._utils.quantize_weight_by_dtype``), every step in numpy float16. numpy
evaluates float16 arithmetic one element at a time through float32; here the same operations run
as float32 array operations with explicit float16 roundings in between, which gives the same bits:
a float32 quotient of two float16 values rounded to float16 is the correctly rounded float16
quotient (24 >= 2·11 + 2 bits, so the double rounding is harmless), and ``rint`` of a float16 value
is exact. ``tests/test_quantize.py`` checks bit equality against ``linear_quantize_weights`` itself.

Why not run that pass (``compression::linear_quantize_weights``) over the built program:
measured on the 2-core VM for the 0.5B config (496M parameters), int8 per channel, the pass took
73.5 s on the two-function program (it quantizes each function's copy of every weight, 36-39 s
each, and the two results no longer share blob entries) after a 9.8 s fp16 build, peak RSS
2.07 GiB; quantizing each tensor here as it is read took 10.3 s inside a 17.1 s build, peak
0.75 GiB, and the only full copy is the int8 data itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT_RANGE = {8: 127, 4: 7}  # symmetric: -qmax..qmax, as ct.optimize (the -2^(n-1) code unused)
# Rows per step: ~256K elements, so the float32 temporaries (1 MB each) stay in cache; on this VM
# whole-tensor passes run at memory bandwidth and took 2-3x longer.
_CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class Quantized:
    """``data`` (int8 array holding ``nbits``-bit values) × ``scale`` (fp16, one per block of
    ``block`` input channels of a row; ``block`` = the row width for per-output-channel)."""

    data: np.ndarray
    scale: np.ndarray
    nbits: int
    block: int

    def dequantize(self) -> np.ndarray:
        rows, cols = self.data.shape
        blocks = self.data.reshape(rows, cols // self.block, self.block).astype(np.float32)
        return (blocks * self.scale.astype(np.float32)[:, :, None]).reshape(rows, cols)


def quantize_symmetric(weight: np.ndarray, nbits: int, block: int | None = None) -> Quantized:
    """Quantize a 2-D (out, in) weight as ct.optimize quantizes its float16 form: a float32
    ``weight`` is rounded to float16 first (the weight an fp16 package would hold; ValueError if
    it exceeds the float16 range). One scale per output row (``block`` None) or per ``block``
    consecutive input channels of a row (``block`` must divide the width)."""
    if weight.dtype not in (np.float16, np.float32) or weight.ndim != 2:
        raise ValueError(f"expected a 2-D float16/float32 weight, got {weight.dtype} "
                         f"{weight.shape}")
    if nbits not in INT_RANGE:
        raise ValueError(f"nbits: expected one of {sorted(INT_RANGE)}, got {nbits}")
    rows, cols = weight.shape
    block = cols if block is None else block
    if block < 1 or cols % block:
        raise ValueError(f"block {block} does not divide the row width {cols}")
    qmax = INT_RANGE[nbits]
    data = np.empty((rows, cols), np.int8)
    scale = np.empty((rows, cols // block), np.float16)
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        chunk = weight[start:stop]
        if chunk.dtype != np.float16:
            with np.errstate(over="ignore"):
                chunk = chunk.astype(np.float16)
            if np.any((chunk.view(np.uint16) & 0x7C00) == 0x7C00):  # inf or NaN
                raise ValueError(f"values are not finite or exceed the float16 range "
                                 f"(rows {start}..{stop - 1})")
        w = chunk.astype(np.float32).reshape(stop - start, cols // block, block)
        peak = np.abs(w).max(axis=2, keepdims=True)
        # (max - min) in fp16 (2·peak: exact, or inf past the fp16 range as in ct), / (2·qmax).
        with np.errstate(over="ignore"):
            s16 = (((peak + peak).astype(np.float16).astype(np.float32)) / np.float32(2 * qmax)
                   ).astype(np.float16)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = _round_to_fp16_precision(np.divide(w, s16.astype(np.float32), out=w))
        np.rint(q, out=q)
        np.clip(q, -qmax, qmax, out=q)
        # An all-zero block has scale 0: 0/0 is NaN, which numpy casts to 0 on x86 (what ct
        # stores); 0 is written explicitly here so the data does not depend on that cast.
        q[np.isnan(q)] = 0
        data[start:stop] = q.reshape(stop - start, cols)
        scale[start:stop] = s16.reshape(stop - start, cols // block)
    return Quantized(data, scale, nbits, block)


def _round_to_fp16_precision(x: np.ndarray) -> np.ndarray:
    """``x`` (float32) rounded to float16's 11 significant bits, ties to even, kept in float32:
    the bits of ``x.astype(float16).astype(float32)`` for |x| in float16's normal range, at a
    third of the cost. Outside it the two differ only where it cannot change the quantized value:
    below 2**-14 both round to 0 and past 65504 both clip to qmax; NaN stays NaN."""
    bits = x.view(np.uint32)
    bits += np.uint32(0x0FFF) + ((bits >> np.uint32(13)) & np.uint32(1))
    bits &= np.uint32(0xFFFFE000)
    return x
