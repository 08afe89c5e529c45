"""conv and conv_transpose, 1-D to 3-D (coremltools ``mil/ops/defs`` iOS15/iOS17 ``conv.py``).

A convolution is one BLAS contraction over a strided window view of the padded input (im2col
without Python loops over pixels): ``view[n, c, *out, *k] = x_padded[n, c, out*s + k*d]``.
The padding helpers are shared with the pooling ops.
"""

from __future__ import annotations

import math
import string

import numpy as np

from converters.interpreter.registry import op


def spatial_padding(ctx, in_sizes, kernel_sizes, strides, dilations=None) -> list[tuple[int, int]]:
    """(before, after) padding of each spatial dim for ``pad_type`` valid/custom/same/same_lower.

    ``same`` pads so that out = ceil(in / stride), the odd extra element after (bottom/right),
    ``same_lower`` puts it before (top/left); the total follows coremltools' ``aggregated_pad``.
    """
    count = len(in_sizes)
    dilations = dilations or [1] * count
    pad_type = str(ctx.scalar("pad_type", "valid")).lower()
    if pad_type == "valid":
        return [(0, 0)] * count
    if pad_type == "custom":
        pad = ctx.ints("pad", [0] * 2 * count)
        if len(pad) != 2 * count:
            raise ctx.error(f"pad {pad} must have {2 * count} entries")
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(count)]
    if pad_type in ("same", "same_lower"):
        pairs = []
        for size, k, s, d in zip(in_sizes, kernel_sizes, strides, dilations, strict=True):
            effective = (k - 1) * d + 1
            total = max(0, (math.ceil(size / s) - 1) * s + effective - size)
            small, large = total // 2, total - total // 2
            pairs.append((small, large) if pad_type == "same" else (large, small))
        return pairs
    raise ctx.error(f"unsupported pad_type {pad_type!r}")


def window_view(x: np.ndarray, kernel_sizes, strides, dilations) -> np.ndarray:
    """Read-only view (N, C, *out, *kernel) of windows over the spatial dims of (N, C, *D)."""
    spatial = x.shape[2:]
    out = [
        (size - ((k - 1) * d + 1)) // s + 1
        for size, k, s, d in zip(spatial, kernel_sizes, strides, dilations, strict=True)
    ]
    if min(out, default=1) <= 0:
        raise ValueError(f"kernel {list(kernel_sizes)} does not fit the input {x.shape}")
    sp_strides = x.strides[2:]
    return np.lib.stride_tricks.as_strided(
        x,
        shape=x.shape[:2] + tuple(out) + tuple(kernel_sizes),
        strides=x.strides[:2]
        + tuple(st * s for st, s in zip(sp_strides, strides, strict=True))
        + tuple(st * d for st, d in zip(sp_strides, dilations, strict=True)),
        writeable=False,
    )


def _correlate(ctx, x, weight, strides, dilations, groups: int) -> np.ndarray:
    """Cross-correlation of padded (N, C_in, *D) with (C_out, C_in/groups, *K)."""
    n, c_in = x.shape[:2]
    c_out, c_per_group = weight.shape[:2]
    kernel = weight.shape[2:]
    if c_in % groups or c_in // groups != c_per_group or c_out % groups:
        raise ctx.error(
            f"x channels {c_in}, weight {weight.shape} and groups {groups} are inconsistent"
        )
    try:
        view = window_view(np.ascontiguousarray(x), kernel, strides, dilations)
    except ValueError as exc:
        raise ctx.error(str(exc)) from None
    rank = len(kernel)
    if groups == 1:
        spatial_axes = list(range(2 + rank, 2 + 2 * rank))
        out = np.tensordot(view, weight, axes=([1] + spatial_axes, [1] + list(range(2, 2 + rank))))
        return np.moveaxis(out, -1, 1)
    out_dims, kernel_dims = string.ascii_uppercase[:rank], string.ascii_lowercase[:rank]
    grouped = view.reshape((n, groups, c_per_group) + view.shape[2:])
    weights = weight.reshape((groups, c_out // groups, c_per_group) + kernel)
    out = np.einsum(
        f"ngc{out_dims}{kernel_dims},goc{kernel_dims}->ngo{out_dims}", grouped, weights,
        optimize=True,
    )
    return out.reshape((n, c_out) + out.shape[3:])


def _conv_params(ctx, rank: int):
    strides = ctx.ints("strides", [1] * rank)
    dilations = ctx.ints("dilations", [1] * rank)
    groups = int(ctx.scalar("groups", 1))
    if len(strides) != rank or len(dilations) != rank or min(strides + dilations) < 1:
        raise ctx.error(f"strides {strides} / dilations {dilations} need {rank} positive values")
    return strides, dilations, groups


def _add_bias(ctx, out):
    if not ctx.has("bias"):
        return out
    bias = np.asarray(ctx["bias"], dtype=np.float32).reshape(-1)
    return out + bias.reshape((1, -1) + (1,) * (out.ndim - 2))


@op("conv")
def conv(ctx):
    x = np.asarray(ctx["x"], dtype=np.float32)
    weight = np.asarray(ctx["weight"], dtype=np.float32)
    rank = x.ndim - 2
    if not 1 <= rank <= 3 or weight.ndim != x.ndim:
        raise ctx.error(f"x {x.shape} and weight {weight.shape} must both be rank 3 to 5")
    strides, dilations, groups = _conv_params(ctx, rank)
    pads = spatial_padding(ctx, x.shape[2:], weight.shape[2:], strides, dilations)
    if any(b or a for b, a in pads):
        x = np.pad(x, [(0, 0), (0, 0)] + pads)
    return _add_bias(ctx, _correlate(ctx, x, weight, strides, dilations, groups))


@op("conv_transpose")
def conv_transpose(ctx):
    """The adjoint of conv: scatter each input pixel through the kernel. Computed as a stride-1
    correlation of the stride-dilated input with the flipped, channel-swapped kernel (the "full"
    output), then cropped by the padding or to ``output_shape``."""
    x = np.asarray(ctx["x"], dtype=np.float32)
    weight = np.asarray(ctx["weight"], dtype=np.float32)  # (C_in, C_out / groups, *K)
    rank = x.ndim - 2
    if not 1 <= rank <= 3 or weight.ndim != x.ndim:
        raise ctx.error(f"x {x.shape} and weight {weight.shape} must both be rank 3 to 5")
    strides, dilations, groups = _conv_params(ctx, rank)
    c_in, c_out_per_group = weight.shape[:2]
    if x.shape[1] != c_in or c_in % groups:
        raise ctx.error(
            f"x channels {x.shape[1]} do not match weight {weight.shape}, groups {groups}"
        )
    kernel = weight.shape[2:]
    effective = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    # weight -> conv layout (C_out, C_in / groups, *K), spatially flipped.
    per_group = weight.reshape((groups, c_in // groups, c_out_per_group) + kernel)
    flipped = np.flip(per_group.swapaxes(1, 2), axis=tuple(range(3, 3 + rank)))
    conv_weight = flipped.reshape((groups * c_out_per_group, c_in // groups) + kernel)

    dilated_sizes = tuple((d - 1) * s + 1 for d, s in zip(x.shape[2:], strides, strict=True))
    dilated = np.zeros(x.shape[:2] + dilated_sizes, np.float32)
    dilated[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)] = x
    dilated = np.pad(dilated, [(0, 0), (0, 0)] + [(e - 1, e - 1) for e in effective])
    full = _correlate(ctx, dilated, conv_weight, [1] * rank, dilations, groups)

    pad_type = str(ctx.scalar("pad_type", "valid")).lower()
    pad = ctx.ints("pad", [0] * 2 * rank)
    requested = ctx.ints("output_shape") if ctx.has("output_shape") else None
    index = [slice(None), slice(None)]
    for i, full_size in enumerate(full.shape[2:]):
        if pad_type == "custom":
            before, size = pad[2 * i], full_size - pad[2 * i] - pad[2 * i + 1]
        elif pad_type in ("same", "same_lower"):
            size = x.shape[2 + i] * strides[i]
            total = max(0, full_size - (requested[2 + i] if requested else size))
            before = total // 2 if pad_type == "same" else total - total // 2
        elif pad_type == "valid":
            before, size = 0, full_size
        else:
            raise ctx.error(f"unsupported pad_type {pad_type!r}")
        size = requested[2 + i] if requested else size
        index.append(slice(before, before + size))
    out = full[tuple(index)]
    if requested and out.shape[2:] != tuple(requested[2:]):
        # output_shape may reach past the full output (e.g. output_padding): those are zeros.
        missing = [r - o for r, o in zip(requested[2:], out.shape[2:], strict=True)]
        extra = [(0, 0), (0, 0)] + [(0, m) for m in missing]
        out = np.pad(out, extra)
    return _add_bias(ctx, out)
