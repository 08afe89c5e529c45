"""MIL builtin types <-> numpy dtypes, and the protobuf ArrayDataType names used in specs."""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil.mil import types

_BUILTIN_TO_NUMPY = {
    types.fp16: np.float16,
    types.fp32: np.float32,
    types.fp64: np.float64,
    types.int4: np.int8,
    types.int8: np.int8,
    types.int16: np.int16,
    types.int32: np.int32,
    types.int64: np.int64,
    types.uint1: np.uint8,
    types.uint2: np.uint8,
    types.uint3: np.uint8,
    types.uint4: np.uint8,
    types.uint6: np.uint8,
    types.uint8: np.uint8,
    types.uint16: np.uint16,
    types.uint32: np.uint32,
    types.uint64: np.uint64,
    types.bool: np.bool_,
}

# Model description (protobuf) array types.
SPEC_ARRAY_DTYPES = {
    "FLOAT16": np.float16,
    "FLOAT32": np.float32,
    "DOUBLE": np.float64,
    "INT32": np.int32,
    "INT8": np.int8,
}


def numpy_dtype(builtin) -> np.dtype | None:
    """numpy dtype of a MIL builtin scalar type; None for str and other non-numeric types."""
    dtype = _BUILTIN_TO_NUMPY.get(builtin)
    return np.dtype(dtype) if dtype is not None else None


def storage_dtype(builtin, fp32: bool) -> np.dtype | None:
    """How a value of this builtin type is kept between ops: fp16 stays fp16 (so each op's
    output is rounded as on device) unless the high-precision fp32 reference is asked for."""
    dtype = numpy_dtype(builtin)
    if fp32 and dtype == np.float16:
        return np.dtype(np.float32)
    return dtype


def compute_view(value):
    """Widen fp16 storage to float32 for arithmetic; everything else is returned as is."""
    if isinstance(value, np.ndarray) and value.dtype == np.float16:
        return value.astype(np.float32)
    if isinstance(value, np.float16):
        return np.float32(value)
    return value
