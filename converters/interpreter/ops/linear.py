"""linear, matmul and einsum (coremltools ``mil/ops/defs`` iOS15/iOS17 ``linear.py``).

Float products run in float32 (fp16 inputs are widened by the runtime); integer products stay in
integers. The iOS17 variants only relax dtype rules (weights/const operand may differ in dtype),
which the runtime's widening already covers.
"""

from __future__ import annotations

import numpy as np

from converters.interpreter.registry import op


def _common_dtype(*arrays):
    return np.result_type(*arrays) if all(a.dtype.kind in "iu" for a in arrays) else np.float32


@op("linear")
def linear(ctx):
    x, weight = np.asarray(ctx["x"]), np.asarray(ctx["weight"])
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ctx.error(f"x {x.shape} does not match weight {weight.shape} (D_out, D_in)")
    dtype = _common_dtype(x, weight)
    out = np.matmul(x.astype(dtype, copy=False), weight.astype(dtype, copy=False).T)
    if ctx.has("bias"):
        out = out + np.asarray(ctx["bias"]).astype(dtype, copy=False)
    return out


@op("matmul")
def matmul(ctx):
    x, y = np.asarray(ctx["x"]), np.asarray(ctx["y"])
    if ctx.scalar("transpose_x", False):
        if x.ndim == 1:
            raise ctx.error("transpose_x is not allowed for a rank-1 x")
        x = np.swapaxes(x, -1, -2)
    if ctx.scalar("transpose_y", False) and y.ndim > 1:  # no effect on a rank-1 y
        y = np.swapaxes(y, -1, -2)
    if x.shape[-1] != y.shape[-2 if y.ndim > 1 else 0]:
        raise ctx.error(f"inner dimensions differ: x {x.shape}, y {y.shape}")
    dtype = _common_dtype(x, y)
    # np.matmul already implements the MIL rules: rank-1 promotion/removal, batch broadcasting.
    return np.matmul(x.astype(dtype, copy=False), y.astype(dtype, copy=False))


@op("einsum")
def einsum(ctx):
    equation = str(ctx.scalar("equation")).replace(" ", "")
    operands = [np.asarray(v, dtype=np.float32) for v in ctx["values"]]
    if "->" not in equation or "." in equation:
        raise ctx.error(f"unsupported einsum equation {equation!r} (needs explicit '->')")
    inputs, output = equation.split("->")
    terms = inputs.split(",")
    pairs = list(zip(terms, operands, strict=False))  # lengths compared just below
    if len(terms) != len(operands) or any(len(t) != v.ndim for t, v in pairs):
        shapes = [v.shape for v in operands]
        raise ctx.error(f"equation {equation!r} does not match shapes {shapes}")
    # MIL broadcasts a label of size 1 in one operand against the other (batch and H dims).
    sizes: dict[str, int] = {}
    for term, value in pairs:
        for label, dim in zip(term, value.shape, strict=True):
            if sizes.get(label, 1) not in (1, dim) and dim != 1:
                raise ctx.error(f"label {label!r} has sizes {sizes[label]} and {dim}")
            sizes[label] = max(sizes.get(label, 1), dim)
    operands = [np.broadcast_to(v, [sizes[c] for c in t]) for t, v in pairs]
    return np.einsum(f"{','.join(terms)}->{output}", *operands, optimize=True)
