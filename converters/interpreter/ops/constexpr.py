"""Compressed constants (iOS16 ``constexpr_*`` and their iOS18 forms): dequantization, palettization
(look-up tables), sparsity and casts.

Every input of these ops is a constant, so an op's value never changes: it is computed on the first
``predict`` and kept (per op object) afterwards, the way Core ML decompresses weights once at load.

Sub-byte types (int4, uint1..uint6) arrive from the milproto loader already unpacked, one element
per int8/uint8 array entry; only the iOS16 forms carry bit-packed bytes (``indices``, ``mask``).
"""

from __future__ import annotations

import weakref

import numpy as np

from converters.interpreter.registry import op

_VALUES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _read_only(value):
    value = np.asarray(value)
    value.flags.writeable = False  # shared by every later predict: nothing may modify it
    return value


def _computed_once(fn):
    """Keep each op's result on its first run (all inputs are constants)."""

    def run(ctx):
        try:
            return _VALUES[ctx.op]
        except KeyError:
            value = fn(ctx)
            value = tuple(map(_read_only, value)) if isinstance(value, tuple) else _read_only(value)
            _VALUES[ctx.op] = value
            return value

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """``count`` unsigned ``nbits``-bit fields, packed from each byte's least significant bit up
    (a field may straddle two bytes), as uint8."""
    bits = np.unpackbits(np.asarray(packed).astype(np.uint8).reshape(-1), bitorder="little")
    if bits.size < nbits * count:
        raise ValueError(f"{packed.size} bytes hold fewer than {count} {nbits}-bit fields")
    fields = bits[: nbits * count].reshape(count, nbits).astype(np.uint16)
    weights = (1 << np.arange(nbits, dtype=np.uint16))[None, :]
    return (fields * weights).sum(axis=1).astype(np.uint8)


def _axis_vector_to_rank(param: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """A scalar or a vector along ``axis``, reshaped to broadcast against a rank-``rank`` tensor."""
    param = np.asarray(param, dtype=np.float32)
    if param.ndim == 0:
        return param.reshape((1,) * rank)
    shape = [1] * rank
    shape[axis] = param.size
    return param.reshape(shape)


def _block_expand(param: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat each entry of a per-block parameter over its block: ``param.shape[i]`` blocks of
    ``shape[i] // param.shape[i]`` along every axis i."""
    for axis, (full, blocks) in enumerate(zip(shape, param.shape, strict=True)):
        if full % blocks:
            raise ValueError(f"axis {axis}: size {full} is not a multiple of {blocks} blocks")
        if full != blocks:
            param = np.repeat(param, full // blocks, axis=axis)
    return param


# ---- affine / blockwise dequantization ----
@op("constexpr_affine_dequantize")
@_computed_once
def constexpr_affine_dequantize(ctx):
    """iOS16: ``scale * (quantized_data - zero_point)``, scale and zero_point scalar or per-axis."""
    data = np.asarray(ctx["quantized_data"]).astype(np.float32)
    axis = int(ctx.scalar("axis"))
    if not -data.ndim <= axis < data.ndim:
        raise ctx.error(f"axis {axis} out of range for rank {data.ndim}")
    axis %= data.ndim
    zero_point = _axis_vector_to_rank(ctx["zero_point"], data.ndim, axis)
    scale = _axis_vector_to_rank(ctx["scale"], data.ndim, axis)
    return (data - zero_point) * scale


def _shift_scale(ctx, data: np.ndarray, scale: np.ndarray, offset) -> np.ndarray:
    data = np.asarray(data).astype(np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    if scale.ndim != data.ndim:
        raise ctx.error(f"scale has rank {scale.ndim}, data has rank {data.ndim}")
    try:
        if offset is not None:
            offset = np.asarray(offset).astype(np.float32)
            if offset.shape != scale.shape:
                raise ctx.error(f"offset shape {offset.shape} differs from scale's {scale.shape}")
            data = data - _block_expand(offset, data.shape)
        return data * _block_expand(scale, data.shape)
    except ValueError as exc:
        raise ctx.error(f"data {data.shape} vs scale {scale.shape}: {exc}") from None


@op("constexpr_blockwise_shift_scale")
@_computed_once
def constexpr_blockwise_shift_scale(ctx):
    """iOS18: ``scale * (data - offset)`` where each scale/offset entry covers a block of
    ``data.shape[i] // scale.shape[i]`` along every axis (int4/uint4/int8/uint8/float data)."""
    return _shift_scale(ctx, ctx["data"], ctx["scale"], ctx.get("offset"))


@op("constexpr_cast")
@_computed_once
def constexpr_cast(ctx):
    dtype = ctx.scalar("output_dtype")
    if dtype != "fp32":
        raise ctx.error(f"output_dtype {dtype!r} is unsupported (only fp32 is defined)")
    return np.asarray(ctx["source_val"], dtype=np.float32)


# ---- look-up tables (palettization) ----
def lut_to_dense(indices: np.ndarray, lut: np.ndarray, vector_axis: int | None) -> np.ndarray:
    """iOS18 palettization: ``lut`` has shape ``[*blocks, NUM_PALETTES, VECTOR_SIZE]`` with one
    table per block of ``indices``; a vector entry (VECTOR_SIZE > 1) fills VECTOR_SIZE consecutive
    elements along ``vector_axis``."""
    indices = np.asarray(indices)
    rank = indices.ndim
    if lut.ndim != rank + 2:
        raise ValueError(f"lut rank {lut.ndim} must be indices rank {rank} + 2")
    block_index = []
    for axis, (size, blocks) in enumerate(zip(indices.shape, lut.shape[:rank], strict=True)):
        if size % blocks:
            raise ValueError(f"axis {axis}: size {size} is not a multiple of {blocks} tables")
        shape = [1] * rank
        shape[axis] = size
        block_index.append((np.arange(size) // (size // blocks)).reshape(shape))
    if indices.size and int(indices.max()) >= lut.shape[-2]:
        raise ValueError(f"index {int(indices.max())} outside a {lut.shape[-2]}-entry table")
    values = lut[(*block_index, indices.astype(np.intp))]  # indices.shape + (VECTOR_SIZE,)
    vector_size = lut.shape[-1]
    if vector_size == 1:
        return values[..., 0]
    if vector_axis is None:
        raise ValueError(f"VECTOR_SIZE is {vector_size}: vector_axis is required")
    if not -rank <= vector_axis < rank:
        raise ValueError(f"vector_axis {vector_axis} out of range for rank {rank}")
    axis = vector_axis % rank
    values = np.moveaxis(values, -1, axis + 1)  # each vector right after its index's position
    out_shape = list(indices.shape)
    out_shape[axis] *= vector_size
    return values.reshape(out_shape)


@op("constexpr_lut_to_dense")
@_computed_once
def constexpr_lut_to_dense(ctx):
    lut = np.asarray(ctx["lut"])
    try:
        if ctx.has("shape"):
            # iOS16: a flat table of 2**nbits entries, indices bit-packed into bytes.
            shape = ctx.ints("shape")
            nbits = int(np.log2(lut.size))
            if lut.ndim != 1 or 2**nbits != lut.size:
                raise ValueError(f"lut of shape {lut.shape} is not a 2**nbits vector")
            count = int(np.prod(shape))
            return lut[unpack_bits(ctx["indices"], nbits, count)].reshape(shape)
        vector_axis = ctx.scalar("vector_axis")
        return lut_to_dense(ctx["indices"], lut, None if vector_axis is None else int(vector_axis))
    except ValueError as exc:
        raise ctx.error(str(exc)) from None


# ---- sparsity ----
def _scatter_nonzero(ctx, nonzero_data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    nonzero_data = np.asarray(nonzero_data).reshape(-1)
    where = np.asarray(mask) != 0
    if int(where.sum()) != nonzero_data.size:
        raise ctx.error(f"mask has {int(where.sum())} set bits for {nonzero_data.size} values")
    dense = np.zeros(where.shape, dtype=nonzero_data.dtype)
    dense[where] = nonzero_data
    return dense


@op("constexpr_sparse_to_dense")
@_computed_once
def constexpr_sparse_to_dense(ctx):
    if ctx.has("shape"):
        # iOS16: the mask is bit-packed into bytes, the output shape given separately.
        shape = ctx.ints("shape")
        mask = unpack_bits(ctx["mask"], 1, int(np.prod(shape))).reshape(shape)
    else:
        mask = ctx["mask"]  # iOS18: a uint1 tensor of the output's shape
    return _scatter_nonzero(ctx, ctx["nonzero_data"], mask)


@op("constexpr_lut_to_sparse")
@_computed_once
def constexpr_lut_to_sparse(ctx):
    """Palettization of sparse data: returns (mask, de-palettized nonzero values); a vector
    table widens the mask along vector_axis."""
    mask = np.asarray(ctx["indices_mask"])
    indices = _scatter_nonzero(ctx, ctx["indices_nonzero_data"], mask)
    lut = np.asarray(ctx["lut"])
    vector_axis = ctx.scalar("vector_axis")
    try:
        dense = lut_to_dense(indices, lut, None if vector_axis is None else int(vector_axis))
    except ValueError as exc:
        raise ctx.error(str(exc)) from None
    if lut.shape[-1] > 1:
        mask = np.repeat(mask, lut.shape[-1], axis=int(vector_axis))
    return mask, dense[mask != 0]


@op("constexpr_sparse_blockwise_shift_scale")
@_computed_once
def constexpr_sparse_blockwise_shift_scale(ctx):
    """Blockwise dequantization of sparse data: returns (mask, dequantized nonzero values)."""
    mask = np.asarray(ctx["data_mask"])
    dense = _scatter_nonzero(ctx, ctx["nonzero_data"], mask)
    dequantized = _shift_scale(ctx, dense, ctx["scale"], ctx.get("offset"))
    return mask, dequantized[mask != 0]
