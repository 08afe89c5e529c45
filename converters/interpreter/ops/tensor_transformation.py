"""Shape and layout ops: reshape, transpose, squeeze/expand, slicing, reversal, space/depth moves.

Semantics follow coremltools ``mil/ops/defs`` iOS15 ``tensor_transformation.py`` plus the iOS16
(``reshape_like``, ``pixel_unshuffle``), iOS17 (right-aligned ``0`` in ``reshape``) and iOS18
(``slice_update``) additions.
"""

from __future__ import annotations

import numpy as np

from converters.interpreter.registry import op


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


@op("reshape")
def reshape(ctx):
    x = np.asarray(ctx["x"])
    target = ctx.ints("shape")
    if target.count(-1) > 1:
        raise ctx.error(f"shape {target} has more than one -1")
    # A 0 copies the matching dimension of x, counted from the right (iOS17 rule; iOS15 required
    # len(shape) == rank, where left and right alignment agree). Out of range it means 1.
    shape = list(target)
    for offset in range(1, len(shape) + 1):
        if shape[-offset] == 0:
            shape[-offset] = x.shape[-offset] if offset <= x.ndim else 1
    if -1 in shape:
        known = int(np.prod([d for d in shape if d != -1]))
        if known == 0 or x.size % known:
            raise ctx.error(f"cannot reshape {x.shape} to {target}")
        shape[shape.index(-1)] = x.size // known
    if int(np.prod(shape)) != x.size:
        raise ctx.error(f"cannot reshape {x.shape} to {target}")
    return x.reshape(shape)


@op("reshape_like")
def reshape_like(ctx):
    x = np.asarray(ctx["x"])
    refs, begins, ends, end_masks = (ctx[n] for n in ("ref_tensors", "begins", "ends", "end_masks"))
    shape: list[int] = []
    for ref, begin, end, end_mask in zip(refs, begins, ends, end_masks, strict=True):
        dims = np.shape(ref)
        shape.extend(dims[int(begin):] if bool(end_mask) else dims[int(begin):int(end)])
    if int(np.prod(shape)) != x.size:
        raise ctx.error(f"cannot reshape {x.shape} to {tuple(shape)}")
    return x.reshape(shape)


@op("transpose")
def transpose(ctx):
    return np.transpose(ctx["x"], [_axis(p, np.ndim(ctx["x"])) for p in ctx.ints("perm")])


@op("expand_dims")
def expand_dims(ctx):
    x = np.asarray(ctx["x"])
    axes = ctx.ints("axes")
    out_rank = x.ndim + len(axes)
    shape = list(x.shape)
    for axis in sorted(_axis(a, out_rank) for a in axes):
        shape.insert(axis, 1)
    return x.reshape(shape)


@op("squeeze")
def squeeze(ctx):
    x = np.asarray(ctx["x"])
    if not ctx.has("axes"):
        return x.reshape([d for d in x.shape if d != 1])
    # Like PyTorch: a listed axis whose size is not 1 is kept, not an error.
    drop = {_axis(a, x.ndim) for a in ctx.ints("axes")}
    return x.reshape([d for i, d in enumerate(x.shape) if not (i in drop and d == 1)])


@op("reverse")
def reverse(ctx):
    x = np.asarray(ctx["x"])
    axes = ctx.ints("axes") if ctx.has("axes") else list(range(x.ndim))
    return np.flip(x, axis=tuple(_axis(a, x.ndim) for a in axes)) if axes else x


@op("reverse_sequence")
def reverse_sequence(ctx):
    x = np.asarray(ctx["x"])
    lengths = ctx.ints("lengths")
    seq_axis = _axis(ctx.scalar("seq_axis", 0), x.ndim)
    batch_axis = _axis(ctx.scalar("batch_axis", 0), x.ndim)
    if len(lengths) != x.shape[batch_axis]:
        raise ctx.error(f"{len(lengths)} lengths for batch dimension {x.shape[batch_axis]}")
    out = x.copy()
    for b, length in enumerate(lengths):
        if not 0 <= length <= x.shape[seq_axis]:
            raise ctx.error(f"length {length} outside [0, {x.shape[seq_axis]}]")
        index = [slice(None)] * x.ndim
        index[batch_axis] = b
        index[seq_axis] = slice(0, length)
        # After indexing the batch axis away, the sequence axis may have shifted left by one.
        flip_axis = seq_axis - (1 if batch_axis < seq_axis else 0)
        out[tuple(index)] = np.flip(x[tuple(index)], axis=flip_axis)
    return out


def slice_spec(ctx, shape) -> tuple[tuple, list[int]]:
    """The index tuple of slice_by_index / slice_update, and the axes squeeze_mask removes.

    Negative begin/end count from the end and are clamped at 0 (as coremltools' shape solver
    does), begin_mask/end_mask select from the start/up to the end in the stride's direction.
    """
    rank = len(shape)
    begin, end = ctx.ints("begin"), ctx.ints("end")
    stride = ctx.ints("stride") if ctx.has("stride") else [1] * rank
    masks = {
        name: np.asarray(ctx[name]).reshape(-1).astype(bool).tolist()
        if ctx.has(name)
        else [False] * rank
        for name in ("begin_mask", "end_mask", "squeeze_mask")
    }
    if not len(begin) == len(end) == len(stride) == rank:
        raise ctx.error(f"begin/end/stride must have {rank} entries, got {begin}/{end}/{stride}")
    index, squeezed = [], []
    for i, dim in enumerate(shape):
        b, e, s = begin[i], end[i], stride[i]
        if masks["squeeze_mask"][i]:
            b = b + dim if b < 0 else b
            if not 0 <= b < dim:
                raise ctx.error(f"index {begin[i]} out of range for dimension {i} of size {dim}")
            index.append(slice(b, b + 1))
            squeezed.append(i)
            continue
        if s == 0:
            raise ctx.error(f"stride of dimension {i} is 0")
        b = max(0, b + dim) if b < 0 else b
        e = max(0, e + dim) if e < 0 else e
        if s > 0:
            start = 0 if masks["begin_mask"][i] else min(b, dim)
            stop = dim if masks["end_mask"][i] else min(e, dim)
            index.append(slice(start, stop, s))
        else:
            start = dim - 1 if masks["begin_mask"][i] else min(b, dim - 1)
            stop = None if masks["end_mask"][i] else e  # None: run through index 0
            index.append(slice(start, stop, s))
    return tuple(index), squeezed


@op("slice_by_index")
def slice_by_index(ctx):
    x = np.asarray(ctx["x"])
    index, squeezed = slice_spec(ctx, x.shape)
    return np.squeeze(x[index], axis=tuple(squeezed)) if squeezed else x[index]


@op("slice_update")
def slice_update(ctx):
    x = np.array(ctx["x"], copy=True)
    index, _ = slice_spec(ctx, x.shape)
    update = np.asarray(ctx["update"])
    target_shape = x[index].shape
    if update.size != int(np.prod(target_shape)):
        raise ctx.error(f"update of shape {update.shape} does not fit slice {target_shape}")
    x[index] = update.reshape(target_shape)
    return x


@op("slice_by_size")
def slice_by_size(ctx):
    x = np.asarray(ctx["x"])
    begin, size = ctx.ints("begin"), ctx.ints("size")
    index = []
    for i, dim in enumerate(x.shape):
        b = begin[i] + dim if begin[i] < 0 else begin[i]
        stop = dim if size[i] == -1 else b + size[i]
        if not 0 <= b <= stop <= dim:
            raise ctx.error(f"slice [{begin[i]}, size {size[i]}] outside dimension {i} ({dim})")
        index.append(slice(b, stop))
    return x[tuple(index)]


def _depth_to_space(x, block: int, channels_first: bool):
    """DCR (depth_to_space) vs CRD (pixel_shuffle) channel order; both rank 4 NCHW."""
    n, c, h, w = x.shape
    if channels_first:  # pixel_shuffle: channel index = c_out * b^2 + i * b + j
        y = x.reshape(n, c // (block * block), block, block, h, w).transpose(0, 1, 4, 2, 5, 3)
    else:  # depth_to_space: channel index = (i * b + j) * c_out + c_out_index
        y = x.reshape(n, block, block, c // (block * block), h, w).transpose(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (block * block), h * block, w * block)


def _space_to_depth(x, block: int, channels_first: bool):
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // block, block, w // block, block)
    if channels_first:  # pixel_unshuffle
        y = y.transpose(0, 1, 3, 5, 2, 4)
    else:  # space_to_depth
        y = y.transpose(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * block * block, h // block, w // block)


@op("depth_to_space", "pixel_shuffle")
def depth_to_space(ctx):
    x = np.asarray(ctx["x"])
    shuffle = ctx.type == "pixel_shuffle"
    block = int(ctx.scalar("upscale_factor" if shuffle else "block_size"))
    if x.ndim != 4 or x.shape[1] % (block * block):
        raise ctx.error(f"x {x.shape} must be rank 4 with channels divisible by {block}^2")
    return _depth_to_space(x, block, channels_first=shuffle)


@op("space_to_depth", "pixel_unshuffle")
def space_to_depth(ctx):
    x = np.asarray(ctx["x"])
    unshuffle = ctx.type == "pixel_unshuffle"
    block = int(ctx.scalar("downscale_factor" if unshuffle else "block_size"))
    if x.ndim != 4 or x.shape[2] % block or x.shape[3] % block:
        raise ctx.error(f"x {x.shape} must be rank 4 with H, W divisible by {block}")
    return _space_to_depth(x, block, channels_first=unshuffle)


@op("space_to_batch")
def space_to_batch(ctx):
    x = np.asarray(ctx["x"])
    bh, bw = ctx.ints("block_shape")
    (pt, pb), (pl, pr) = np.asarray(ctx["paddings"]).reshape(2, 2).tolist()
    x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    n, c, h, w = x.shape
    if h % bh or w % bw:
        raise ctx.error(f"padded spatial shape {(h, w)} not divisible by block {(bh, bw)}")
    # TensorFlow order: the output batch index is (i * bw + j) * n + batch.
    y = x.reshape(n, c, h // bh, bh, w // bw, bw).transpose(3, 5, 0, 1, 2, 4)
    return y.reshape(bh * bw * n, c, h // bh, w // bw)


@op("batch_to_space")
def batch_to_space(ctx):
    x = np.asarray(ctx["x"])
    bh, bw = ctx.ints("block_shape")
    (ct, cb), (cl, cr) = np.asarray(ctx["crops"]).reshape(2, 2).tolist()
    nb, c, h, w = x.shape
    if nb % (bh * bw):
        raise ctx.error(f"batch {nb} not divisible by block {(bh, bw)}")
    n = nb // (bh * bw)
    y = x.reshape(bh, bw, n, c, h, w).transpose(2, 3, 4, 0, 5, 1).reshape(n, c, h * bh, w * bw)
    return y[:, :, ct : h * bh - cb, cl : w * bw - cr]


@op("sliding_windows")
def sliding_windows(ctx):
    x = np.asarray(ctx["x"])
    axis = _axis(int(ctx.scalar("axis")), x.ndim)
    size, stride = int(ctx.scalar("size")), int(ctx.scalar("stride", 1))
    count = (x.shape[axis] - size) // stride + 1
    if size <= 0 or stride <= 0 or count <= 0:
        raise ctx.error(f"no window of size {size}, stride {stride} fits dimension {x.shape[axis]}")
    windows = np.lib.stride_tricks.sliding_window_view(x, size, axis=axis)  # window dim last
    windows = np.take(windows, np.arange(count) * stride, axis=axis)
    return np.moveaxis(windows, -1, axis + 1)
