"""gather / gather_along_axis / gather_nd and scatter / scatter_along_axis / scatter_nd.

Index rules (coremltools ``mil/ops/defs`` iOS15/16/17 ``scatter_gather.py``):

* iOS15/16 ops (no ``validate_indices`` input) accept negative indices, counted from the end.
* iOS17+ ops have ``validate_indices``; there negative indices are out of bounds. With
  ``validate_indices=True`` an out-of-bounds index is a runtime error. Without it the result is
  "undefined but memory safe": a gather then raises here (no value would be meaningful), a
  scatter drops the out-of-bounds updates (what Apple's iOS17 tests observe on device: the
  output differs from the wrapped-index result).
"""

from __future__ import annotations

import numpy as np

from converters.interpreter.registry import op

_ACCUMULATE = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "max": np.maximum,
    "min": np.minimum,
}


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _check_indices(ctx, indices: np.ndarray, size) -> tuple[np.ndarray, np.ndarray]:
    """(indices with negatives resolved, mask of in-bounds entries) for a dimension of ``size``
    (an int, or an array broadcastable to ``indices`` for per-coordinate sizes)."""
    indices = np.asarray(indices).astype(np.int64)
    strict_bounds = ctx.has("validate_indices")  # an iOS17+ op: negative means out of bounds
    low = 0 if strict_bounds else -np.asarray(size)
    valid = (indices >= low) & (indices < size)
    if not strict_bounds:
        indices = np.where(indices < 0, indices + size, indices)
    if ctx.scalar("validate_indices", False) and not valid.all():
        bad = indices[~valid].reshape(-1)[:5].tolist()
        raise ctx.error(f"indices {bad} out of bounds [0, {size}) (validate_indices=True)")
    return indices, valid


def _gather_indices(ctx, indices, size) -> np.ndarray:
    indices, valid = _check_indices(ctx, indices, size)
    if not valid.all():
        bad = np.asarray(ctx["indices"])[~valid].reshape(-1)[:5].tolist()
        raise ctx.error(f"indices {bad} out of bounds for size {size}; the result is undefined")
    return indices


@op("gather")
def gather(ctx):
    x = np.asarray(ctx["x"])
    axis = _axis(int(ctx.scalar("axis", 0)), x.ndim)
    indices = _gather_indices(ctx, ctx["indices"], x.shape[axis])
    batch_dims = int(ctx.scalar("batch_dims", 0))
    batch_dims = batch_dims + indices.ndim if batch_dims < 0 else batch_dims
    if batch_dims == 0:
        return np.take(x, indices, axis=axis)
    if batch_dims > axis or x.shape[:batch_dims] != indices.shape[:batch_dims]:
        raise ctx.error(f"batch_dims {batch_dims} must lead both x {x.shape} and indices")
    # Flatten the batch dims, gather per batch with one advanced index, then restore the layout
    # x.shape[:axis] + indices.shape[batch_dims:] + x.shape[axis + 1:].
    batch = int(np.prod(x.shape[:batch_dims]))
    xs = np.moveaxis(x.reshape((batch,) + x.shape[batch_dims:]), axis - batch_dims + 1, 1)
    ids = indices.reshape((batch,) + indices.shape[batch_dims:])
    rows = np.arange(batch).reshape((batch,) + (1,) * (ids.ndim - 1))
    picked = xs[rows, ids]  # (batch, *ids, *x[batch_dims:axis], *x[axis+1:])
    n_ids, n_pre = ids.ndim - 1, axis - batch_dims
    id_axes = list(range(1, 1 + n_ids))
    picked = np.moveaxis(picked, id_axes, [a + n_pre for a in id_axes])
    return picked.reshape(x.shape[:batch_dims] + picked.shape[1:])


@op("gather_along_axis")
def gather_along_axis(ctx):
    x = np.asarray(ctx["x"])
    axis = _axis(int(ctx.scalar("axis", 0)), x.ndim)
    indices = _gather_indices(ctx, ctx["indices"], x.shape[axis])
    return np.take_along_axis(x, indices, axis=axis)


@op("gather_nd")
def gather_nd(ctx):
    x = np.asarray(ctx["x"])
    indices = np.asarray(ctx["indices"])
    batch_dims = int(ctx.scalar("batch_dims", 0))
    depth = indices.shape[-1]
    if depth + batch_dims > x.ndim or x.shape[:batch_dims] != indices.shape[:batch_dims]:
        raise ctx.error(
            f"indices {indices.shape} with batch_dims {batch_dims} do not fit x {x.shape}"
        )
    sizes = np.array(x.shape[batch_dims : batch_dims + depth])
    indices = _gather_indices(ctx, indices, sizes)
    batch = int(np.prod(x.shape[:batch_dims]))
    xs = x.reshape((batch,) + x.shape[batch_dims:])
    ids = indices.reshape((batch,) + indices.shape[batch_dims:])
    rows = np.arange(batch).reshape((batch,) + (1,) * (ids.ndim - 2))
    picked = xs[(rows,) + tuple(ids[..., j] for j in range(depth))]
    return picked.reshape(indices.shape[:-1] + x.shape[batch_dims + depth :])


def _scatter(ctx, data, index: tuple, valid: np.ndarray, updates):
    """Apply ``mode`` at data[index] (index arrays broadcast to ``valid.shape``, updates shaped
    ``valid.shape + rest``); entries outside ``valid`` are dropped."""
    mode = ctx.scalar("mode", "add")
    if not valid.all():
        index = tuple(np.broadcast_to(i, valid.shape)[valid] for i in index)
        updates = updates[valid]
    out_dtype = data.dtype
    if mode == "update":
        data[index] = updates  # repeated indices: the last update wins, as in np.put_along_axis
        return data
    if mode not in _ACCUMULATE:
        raise ctx.error(f"unsupported scatter mode {mode!r}")
    if mode == "div" and data.dtype.kind in "iu":
        data = data.astype(np.float64)  # integer division truncates after the true quotient
    _ACCUMULATE[mode].at(data, index, updates)
    return np.trunc(data).astype(out_dtype) if data.dtype != out_dtype else data


@op("scatter")
def scatter(ctx):
    data = np.array(ctx["data"], copy=True)
    axis = _axis(int(ctx.scalar("axis", 0)), data.ndim)
    indices, valid = _check_indices(ctx, ctx["indices"], data.shape[axis])
    updates = np.asarray(ctx["updates"])
    expected = data.shape[:axis] + indices.shape + data.shape[axis + 1 :]
    if updates.shape != expected:
        raise ctx.error(f"updates shape {updates.shape}, expected {expected}")
    # Bring the scattered axis to the front so one advanced index addresses it.
    moved = np.moveaxis(data, axis, 0)
    n = indices.ndim
    updates = np.moveaxis(updates, list(range(axis, axis + n)), list(range(n)))
    return np.moveaxis(_scatter(ctx, moved, (indices,), valid, updates), 0, axis)


@op("scatter_along_axis")
def scatter_along_axis(ctx):
    data = np.array(ctx["data"], copy=True)
    axis = _axis(int(ctx.scalar("axis", 0)), data.ndim)
    indices, valid = _check_indices(ctx, ctx["indices"], data.shape[axis])
    updates = np.asarray(ctx["updates"])
    if updates.shape != indices.shape or indices.ndim != data.ndim:
        raise ctx.error(f"indices {indices.shape} and updates {updates.shape} must match in shape")
    index = list(np.indices(indices.shape, sparse=True))
    index[axis] = indices
    return _scatter(ctx, data, tuple(index), valid, updates)


@op("scatter_nd")
def scatter_nd(ctx):
    data = np.array(ctx["data"], copy=True)
    indices = np.asarray(ctx["indices"])
    depth = indices.shape[-1]
    if depth > data.ndim:
        raise ctx.error(f"indices depth {depth} exceeds data rank {data.ndim}")
    indices, valid = _check_indices(ctx, indices, np.array(data.shape[:depth]))
    valid = valid.all(axis=-1)
    updates = np.asarray(ctx["updates"])
    expected = indices.shape[:-1] + data.shape[depth:]
    if updates.shape != expected:
        raise ctx.error(f"updates shape {updates.shape}, expected {expected}")
    return _scatter(ctx, data, tuple(indices[..., j] for j in range(depth)), valid, updates)
