"""Tensor construction and rearrangement ops: concat/split/stack, fill, pad, tile, sorting,
cumsum, one_hot, band_part, non_zero, non_maximum_suppression, select, crop.

Semantics follow coremltools ``mil/ops/defs`` iOS15 ``tensor_operation.py`` with the iOS16
(``fill_like``, ``topk`` sort/return_indices) and iOS17 (``topk`` output_indices_dtype,
channel-last-free ``non_maximum_suppression``) variants.
"""

from __future__ import annotations

import numpy as np

from converters.interpreter.registry import op


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


@op("concat")
def concat(ctx):
    values = [np.asarray(v) for v in ctx["values"]]
    if values[0].ndim == 0:  # scalars concatenate into a vector
        values = [v.reshape(1) for v in values]
    axis = _axis(int(ctx.scalar("axis")), values[0].ndim)
    if not ctx.scalar("interleave", False):
        return np.concatenate(values, axis=axis)
    # interleave: out[i * n + k] = values[k][i] along axis; all inputs share one shape.
    if any(v.shape != values[0].shape for v in values):
        raise ctx.error(f"interleave needs equal shapes, got {[v.shape for v in values]}")
    shape = list(values[0].shape)
    shape[axis] *= len(values)
    return np.stack(values, axis=axis + 1).reshape(shape)


@op("split")
def split(ctx):
    x = np.asarray(ctx["x"])
    axis = _axis(int(ctx.scalar("axis")), x.ndim)
    if ctx.has("split_sizes"):
        sizes = ctx.ints("split_sizes")
    elif ctx.has("num_splits"):
        count = int(ctx.scalar("num_splits"))
        if x.shape[axis] % count:
            raise ctx.error(f"num_splits {count} does not divide dimension {x.shape[axis]}")
        sizes = [x.shape[axis] // count] * count
    else:
        raise ctx.error("needs num_splits or split_sizes")
    if sum(sizes) != x.shape[axis]:
        raise ctx.error(f"split_sizes {sizes} do not sum to dimension {x.shape[axis]}")
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


@op("stack")
def stack(ctx):
    values = [np.asarray(v) for v in ctx["values"]]
    return np.stack(values, axis=_axis(int(ctx.scalar("axis")), values[0].ndim + 1))


@op("identity")
def identity(ctx):
    return ctx["x"]


@op("shape")
def shape(ctx):
    return np.array(np.shape(ctx["x"]), dtype=np.int32)


@op("fill")
def fill(ctx):
    return np.full(ctx.ints("shape"), ctx.scalar("value", 0.0), dtype=ctx.out_dtype())


@op("fill_like")
def fill_like(ctx):
    return np.full(np.shape(ctx["ref_tensor"]), ctx.scalar("value", 0.0), dtype=ctx.out_dtype())


@op("range_1d")
def range_1d(ctx):
    start, end, step = (ctx.scalar(n) for n in ("start", "end", "step"))
    if step == 0:
        raise ctx.error("step is 0")
    return np.arange(start, end, step).astype(ctx.out_dtype())


@op("tile")
def tile(ctx):
    x = np.asarray(ctx["x"])
    reps = ctx.ints("reps")
    if len(reps) != x.ndim or min(reps, default=1) <= 0:
        raise ctx.error(f"reps {reps} must be {x.ndim} positive integers")
    return np.tile(x, reps)


@op("flatten2d")
def flatten2d(ctx):
    x = np.asarray(ctx["x"])
    axis = _axis(int(ctx.scalar("axis", 1)), x.ndim)
    return x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))


@op("band_part")
def band_part(ctx):
    x = np.asarray(ctx["x"])
    lower, upper = int(ctx.scalar("lower", -1)), int(ctx.scalar("upper", -1))
    rows, cols = x.shape[-2:]
    diff = np.arange(rows)[:, None] - np.arange(cols)[None, :]  # m - n
    keep = ((lower < 0) | (diff <= lower)) & ((upper < 0) | (-diff <= upper))
    return np.where(keep, x, np.zeros((), dtype=x.dtype))


@op("cumsum")
def cumsum(ctx):
    x = np.asarray(ctx["x"])
    axis = _axis(int(ctx.scalar("axis", 0)), x.ndim)
    exclusive, reverse = bool(ctx.scalar("exclusive", False)), bool(ctx.scalar("reverse", False))
    data = np.flip(x, axis) if reverse else x
    out = np.cumsum(data, axis=axis, dtype=np.float64 if x.dtype.kind == "f" else None)
    if exclusive:  # shift by one: out[i] = sum(data[:i])
        first = np.zeros_like(np.take(out, [0], axis))
        out = np.concatenate([first, np.delete(out, -1, axis)], axis)
    return np.flip(out, axis) if reverse else out


@op("one_hot")
def one_hot(ctx):
    indices = np.asarray(ctx["indices"]).astype(np.int64)
    depth = int(ctx.scalar("one_hot_vector_size"))
    axis = _axis(int(ctx.scalar("axis", -1)), indices.ndim + 1)
    on, off = ctx.scalar("on_value", 1), ctx.scalar("off_value", 0)
    # An index outside [0, depth) gives an all-off vector (TensorFlow semantics).
    hot = np.expand_dims(indices, -1) == np.arange(depth)
    out = np.where(hot, on, off).astype(ctx.out_dtype())
    return np.moveaxis(out, -1, axis)


@op("pad")
def pad(ctx):
    x = np.asarray(ctx["x"])
    amounts = ctx.ints("pad")
    mode = ctx.scalar("mode", "constant")
    if len(amounts) % 2 or len(amounts) // 2 > x.ndim or min(amounts, default=0) < 0:
        raise ctx.error(f"pad {amounts} must be non-negative (before, after) pairs, rank {x.ndim}")
    pairs = [(0, 0)] * (x.ndim - len(amounts) // 2) + [
        (amounts[i], amounts[i + 1]) for i in range(0, len(amounts), 2)
    ]
    if mode == "constant":
        return np.pad(x, pairs, mode="constant", constant_values=ctx.scalar("constant_val", 0.0))
    if mode == "reflect":
        if any(p >= d for (b, a), d in zip(pairs, x.shape, strict=True) for p in (b, a) if p):
            raise ctx.error(f"reflect pad {amounts} must be smaller than the dimensions {x.shape}")
        return np.pad(x, pairs, mode="reflect")
    if mode == "replicate":
        return np.pad(x, pairs, mode="edge")
    raise ctx.error(f"unsupported pad mode {mode!r}")


def _sort_order(x, axis: int, ascending: bool):
    """Indices sorting x along axis; ties keep their original order (stable)."""
    if ascending:
        return np.argsort(x, axis=axis, kind="stable")
    # Descending and stable: sort the reversed array ascending, then map back and reverse.
    n = x.shape[axis]
    order = np.argsort(np.flip(x, axis), axis=axis, kind="stable")
    return np.flip(n - 1 - order, axis)


@op("argsort")
def argsort(ctx):
    x = np.asarray(ctx["x"])
    axis = _axis(int(ctx.scalar("axis", -1)), x.ndim)
    return _sort_order(x, axis, bool(ctx.scalar("ascending", False))).astype(np.int32)


@op("topk")
def topk(ctx):
    x = np.asarray(ctx["x"])
    axis = _axis(int(ctx.scalar("axis", -1)), x.ndim)
    k = int(ctx.scalar("k", 1))
    if not 0 < k <= x.shape[axis]:
        raise ctx.error(f"k={k} outside [1, {x.shape[axis]}]")
    # sort=False leaves the order unspecified; returning it sorted is a valid choice.
    order = np.take(_sort_order(x, axis, bool(ctx.scalar("ascending", False))), range(k), axis)
    values = np.take_along_axis(x, order, axis)
    if len(ctx.outputs) == 1:  # return_indices=False
        return values
    return values, order.astype(ctx.out_dtype(1))


@op("non_zero")
def non_zero(ctx):
    return np.argwhere(np.asarray(ctx["x"]) != 0).astype(np.int32)


@op("select")
def select(ctx):
    return np.where(np.asarray(ctx["cond"]).astype(bool), ctx["a"], ctx["b"])


@op("crop")
def crop(ctx):
    x = np.asarray(ctx["x"])
    top, bottom = ctx.ints("crop_height")
    left, right = ctx.ints("crop_width")
    return x[..., top : x.shape[-2] - bottom, left : x.shape[-1] - right]


def _iou(box, boxes):
    """IoU of one (cx, cy, w, h) box with many."""
    def corners(b):
        return b[..., 0] - b[..., 2] / 2, b[..., 1] - b[..., 3] / 2, b[..., 0] + b[..., 2] / 2, \
            b[..., 1] + b[..., 3] / 2

    x1, y1, x2, y2 = corners(box)
    bx1, by1, bx2, by2 = corners(boxes)
    inter = np.maximum(0, np.minimum(x2, bx2) - np.maximum(x1, bx1)) * np.maximum(
        0, np.minimum(y2, by2) - np.maximum(y1, by1)
    )
    union = box[2] * box[3] + boxes[:, 2] * boxes[:, 3] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _greedy_nms(boxes, scores, candidates, iou_threshold, limit):
    """Highest score first; drop any box overlapping a kept one by IoU > iou_threshold."""
    kept: list[int] = []
    for i in sorted(candidates, key=lambda j: (-scores[j], j)):
        if len(kept) == limit:
            break
        if not kept or np.all(_iou(boxes[i], boxes[kept]) <= iou_threshold):
            kept.append(i)
    return kept


@op("non_maximum_suppression")
def non_maximum_suppression(ctx):
    boxes, scores = np.asarray(ctx["boxes"], np.float64), np.asarray(ctx["scores"], np.float64)
    channels_last = ctx.has("score_threshold")  # iOS15: (n, B, 4) / (n, B, K); iOS17: (n, 4, B)
    if not channels_last:
        boxes, scores = boxes.transpose(0, 2, 1), scores.transpose(0, 2, 1)
    iou_threshold = float(ctx.scalar("iou_threshold"))
    score_threshold = float(ctx.scalar("score_threshold", -np.inf))
    max_boxes = int(ctx.scalar("max_boxes"))
    per_class = bool(ctx.scalar("per_class_suppression", False))
    n, _, k = scores.shape
    out_boxes, out_scores = np.zeros((n, max_boxes, 4)), np.zeros((n, max_boxes, k))
    out_ids, counts = -np.ones((n, max_boxes), np.int32), np.zeros(n, np.int32)
    for b in range(n):
        best, label = scores[b].max(axis=-1), scores[b].argmax(axis=-1)
        candidates = [i for i in range(len(best)) if best[i] > score_threshold]
        if per_class:
            kept = [
                i
                for c in sorted(set(label[candidates].tolist()))
                for i in _greedy_nms(boxes[b], best, [j for j in candidates if label[j] == c],
                                     iou_threshold, max_boxes)
            ]
            kept = sorted(kept, key=lambda j: (-best[j], j))[:max_boxes]
        else:
            kept = _greedy_nms(boxes[b], best, candidates, iou_threshold, max_boxes)
        if not kept:  # Core ML always returns at least the best-scoring box
            kept = [int(np.argmax(best))]
        count = len(kept)
        out_boxes[b, :count], out_scores[b, :count] = boxes[b, kept], scores[b, kept]
        out_ids[b, :count], counts[b] = kept, count
    if channels_last:
        return out_boxes, out_scores, out_ids, counts
    return out_boxes.transpose(0, 2, 1), out_scores.transpose(0, 2, 1), out_ids
