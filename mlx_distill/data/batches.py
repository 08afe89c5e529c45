"""Length-bucketed batches at the export shapes, with a length curriculum and a resumable position.

Each example is padded to the smallest shape that holds it; all rows of a batch share one shape,
so a compiled step sees only ``len(shapes)`` input shapes. Longer examples are truncated to the
largest shape or rejected (``overflow``), and counted either way.

Rows are never packed: ``mlx_distill.model`` attends with ``mask="causal"`` and one RoPE offset
per batch, so several examples in one row would attend to each other and continue each other's
positions. Packing needs a block-diagonal mask and per-row position resets in the model first.

Order: epoch ``e`` shuffles each bucket and then the batch order with ``default_rng([seed, e])``,
so a position is just ``(epoch, cursor)`` and restoring it replays the same batches. A curriculum
``[(start_step, max_len), ...]`` limits step ``s`` to buckets of shape ``<= max_len`` (the entry
with the largest ``start_step <= s``); while it excludes a bucket, batches are drawn (seeded by
step) from the allowed buckets instead of advancing the epoch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlx_distill.data.encode import Example
from mlx_distill.data.errors import DataError

OVERFLOW_MODES = ("truncate", "reject")
BATCH_KEYS = ("inputs", "targets", "loss_mask", "kd_mask", "tool_mask", "top_ids", "top_logprobs")
# Where each row's supervised positions are (see ``BatchLoader``): the objective computes logits
# only there. Per shape the width is fixed, so a compiled step still sees one shape per bucket.
SUPERVISED_KEYS = ("loss_positions", "loss_slots")
_SLOT_MULTIPLE = 8
_CURRICULUM_STREAM = 0xC011
STATE_VERSION = 1


@dataclass
class BucketReport:
    """Per shape: examples, real target positions, loss positions; what did not fit."""

    examples: dict[int, int] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    loss_tokens: dict[int, int] = field(default_factory=dict)
    truncated: int = 0
    truncated_tokens: int = 0
    rejected: list[str] = field(default_factory=list)  # example ids

    def padding_fraction(self, shape: int) -> float:
        slots = self.examples.get(shape, 0) * shape
        return 1.0 - self.tokens.get(shape, 0) / slots if slots else 0.0


def linear_curriculum(shapes: Sequence[int], steps: int) -> list[tuple[int, int]]:
    """Start with the smallest shape and allow one more shape every ``steps / len(shapes)`` steps;
    all shapes from step ``steps`` on."""
    shapes = sorted(shapes)
    return [(round(i * steps / len(shapes)), s) for i, s in enumerate(shapes)]


def assign_buckets(
    examples: Sequence[Example], shapes: Sequence[int], overflow: str = "truncate"
) -> tuple[dict[int, list[int]], BucketReport]:
    """Example indices per shape (the smallest shape that holds each), and the counts."""
    if not shapes or any(not isinstance(s, int) or isinstance(s, bool) or s < 2 for s in shapes):
        raise DataError(f"shapes: expected integers >= 2, got {list(shapes)}")
    if len(set(shapes)) != len(shapes):
        raise DataError(f"shapes: duplicates in {list(shapes)}")
    if overflow not in OVERFLOW_MODES:
        raise DataError(f"overflow: expected one of {OVERFLOW_MODES}, got {overflow!r}")
    shapes = sorted(shapes)
    largest, report = shapes[-1], BucketReport()
    buckets: dict[int, list[int]] = {s: [] for s in shapes}
    for index, example in enumerate(examples):
        length = example.length
        if length > largest:
            # A row needs at least one completion target inside the window.
            if overflow == "reject" or example.prompt_len > largest:
                report.rejected.append(example.id)
                continue
            report.truncated += 1
            report.truncated_tokens += length - largest
        shape = next((s for s in shapes if s >= length), largest)
        buckets[shape].append(index)
        kept = min(length, shape)
        report.examples[shape] = report.examples.get(shape, 0) + 1
        report.tokens[shape] = report.tokens.get(shape, 0) + kept
        report.loss_tokens[shape] = report.loss_tokens.get(shape, 0) + kept - example.prompt_len + 1
    return buckets, report


def _check_options(batch_size, world_size, rank, curriculum) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
        raise DataError(f"rank {rank} of world_size {world_size}: batch_size {batch_size} must "
                        "split evenly over the ranks")
    for i, entry in enumerate(curriculum):
        if len(entry) != 2 or entry[0] < 0 or entry[1] < 1:
            raise DataError(f"curriculum[{i}]: expected (start_step >= 0, max_len >= 1), "
                            f"got {entry!r}")


class BatchLoader:
    """Endless batches (``next(loader)``) of dicts of ``mx.array``: ``inputs``/``targets``
    ``(B, S)`` int32, ``loss_mask``/``kd_mask``/``tool_mask`` ``(B, S)`` float32, ``top_ids``
    ``(B, S, K)`` int32, ``top_logprobs`` ``(B, S, K)`` float32 (−inf padding).

    Also ``loss_positions`` ``(B, C)`` int32 and ``loss_slots`` ``(B, C)`` float32: each row's
    supervised positions (one contiguous run from the last prompt token), padded with position 0
    and slot 0. ``C`` is fixed per shape (``self.slots[shape]``: the longest run in that bucket,
    rounded up to a multiple of 8), so the objective can compute the LM head and the losses at
    ``C`` positions instead of ``S``: most of a KD row is prompt.

    ``batch_size`` is global; with ``world_size > 1`` each rank gets its ``batch_size /
    world_size`` rows of the same global batch. The last batch of a bucket in an epoch is filled
    with empty rows (all masks 0) so shapes stay fixed.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        shapes: Sequence[int] = (64, 128, 256),
        batch_size: int = 8,
        k: int | None = None,
        pad_id: int = 0,
        overflow: str = "truncate",
        seed: int = 0,
        shuffle: bool = True,
        curriculum: Sequence[tuple[int, int]] = (),
        rank: int = 0,
        world_size: int = 1,
    ):
        _check_options(batch_size, world_size, rank, curriculum)
        self.examples = list(examples)
        self.buckets, self.report = assign_buckets(self.examples, shapes, overflow)
        self.shapes = tuple(sorted(shapes))
        self.batch_size, self.pad_id, self.seed, self.shuffle = batch_size, pad_id, seed, shuffle
        self.k = k if k is not None else max(
            (e.teacher.k for e in self.examples if e.teacher is not None), default=1)
        self.curriculum = sorted((int(s), int(m)) for s, m in curriculum)
        self.rank, self.world_size = rank, world_size
        if not any(self.buckets.values()):
            raise DataError(f"no example fits the shapes {list(self.shapes)} "
                            f"({len(self.report.rejected)} rejected as too long)")
        self.slots = {shape: self._slot_count(shape) for shape in self.shapes}
        self.step, self.epoch, self.cursor = 0, 0, 0
        self._plan: tuple[int, list[tuple[int, np.ndarray]]] | None = None
        self.fingerprint = self._fingerprint()

    def _slot_count(self, shape: int) -> int:
        longest = max((self.examples[i].supervised_run(shape)[1] for i in self.buckets[shape]),
                      default=1)
        return slot_width(longest, shape)

    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        for example in self.examples:
            digest.update(f"{example.id}\0{example.length}\0".encode())
        digest.update(repr((self.shapes, self.batch_size, self.seed, self.shuffle)).encode())
        return digest.hexdigest()[:16]

    # ---- order ----

    def epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The batches of ``epoch``, in order: ``(shape, example indices)``."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        rng = np.random.default_rng([self.seed, epoch])
        plan = []
        for shape in self.shapes:
            members = np.array(self.buckets[shape], dtype=np.int64)
            if self.shuffle:
                members = rng.permutation(members)
            plan.extend((shape, members[i:i + self.batch_size])
                        for i in range(0, len(members), self.batch_size))
        if self.shuffle:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        self._plan = (epoch, plan)
        return plan

    @property
    def batches_per_epoch(self) -> int:
        return len(self.epoch_plan(self.epoch))

    def max_len_at(self, step: int) -> int | None:
        """The curriculum's length limit at ``step`` (None: every shape)."""
        limit = None
        for start, max_len in self.curriculum:
            if start <= step:
                limit = max_len
        return None if limit is None or limit >= self.shapes[-1] else limit

    def _curriculum_batch(self, step: int, limit: int) -> tuple[int, np.ndarray]:
        allowed = [s for s in self.shapes if s <= limit and self.buckets[s]]
        if not allowed:  # the limit is below every non-empty bucket: use the smallest
            allowed = [next(s for s in self.shapes if self.buckets[s])]
        rng = np.random.default_rng([self.seed, _CURRICULUM_STREAM, step])
        sizes = np.array([len(self.buckets[s]) for s in allowed], dtype=np.float64)
        shape = allowed[int(rng.choice(len(allowed), p=sizes / sizes.sum()))]
        members = self.buckets[shape]
        picks = rng.choice(len(members), size=self.batch_size,
                           replace=len(members) < self.batch_size)
        return shape, np.array([members[i] for i in picks], dtype=np.int64)

    # ---- batches ----

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        limit = self.max_len_at(self.step)
        if limit is not None:
            shape, members = self._curriculum_batch(self.step, limit)
        else:
            plan = self.epoch_plan(self.epoch)
            shape, members = plan[self.cursor]
            self.cursor += 1
            if self.cursor == len(plan):
                self.epoch, self.cursor = self.epoch + 1, 0
        self.step += 1
        return self.assemble(shape, members)

    def iterate_once(self) -> Iterator[dict[str, Any]]:
        """Every example once, in bucket order, unshuffled (evaluation); the position is kept."""
        for shape in self.shapes:
            members = self.buckets[shape]
            for i in range(0, len(members), self.batch_size):
                yield self.assemble(shape, np.array(members[i:i + self.batch_size]))

    def assemble(self, shape: int, members: Sequence[int]) -> dict[str, Any]:
        """This rank's rows of the global batch of ``members`` at ``shape`` (missing rows empty)."""
        import mlx.core as mx

        rows_per_rank = self.batch_size // self.world_size
        first = self.rank * rows_per_rank
        indices = [members[i] if i < len(members) else None
                   for i in range(first, first + rows_per_rank)]
        rows = [self._row(shape, index) for index in indices]
        batch = {key: mx.array(np.stack([row[key] for row in rows])) for key in BATCH_KEYS}
        slots = self.slots[shape]
        positions = np.zeros((rows_per_rank, slots), dtype=np.int32)
        valid = np.zeros((rows_per_rank, slots), dtype=np.float32)
        for r, index in enumerate(indices):
            if index is None:
                continue
            start, count = self.examples[int(index)].supervised_run(shape)
            positions[r, :count] = np.arange(start, start + count)
            valid[r, :count] = 1.0
        batch["loss_positions"], batch["loss_slots"] = mx.array(positions), mx.array(valid)
        return batch

    def _row(self, shape: int, index: int | None) -> dict[str, np.ndarray]:
        if index is None:
            return {
                "inputs": np.full(shape, self.pad_id, dtype=np.int32),
                "targets": np.full(shape, self.pad_id, dtype=np.int32),
                "loss_mask": np.zeros(shape, dtype=np.float32),
                "kd_mask": np.zeros(shape, dtype=np.float32),
                "tool_mask": np.zeros(shape, dtype=np.float32),
                "top_ids": np.zeros((shape, self.k), dtype=np.int32),
                "top_logprobs": np.full((shape, self.k), -np.inf, dtype=np.float32),
            }
        return self.examples[int(index)].arrays(shape, self.k, self.pad_id)

    # ---- position ----

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: restoring it continues with exactly the next batch."""
        return {"version": STATE_VERSION, "step": self.step, "epoch": self.epoch,
                "cursor": self.cursor, "seed": self.seed, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            version, step, epoch, cursor = (int(state[k]) for k in
                                            ("version", "step", "epoch", "cursor"))
            seed, fingerprint = state["seed"], state["fingerprint"]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"data position: expected {{version, step, epoch, cursor, seed, "
                            f"fingerprint}}, got {state!r}") from None
        if version != STATE_VERSION:
            raise DataError(f"data position: version {version}, this version reads "
                            f"{STATE_VERSION}")
        if seed != self.seed or fingerprint != self.fingerprint:
            raise DataError("data position was saved for other data or batching (seed, examples, "
                            "shapes or batch size differ); cannot resume it")
        if step < 0 or epoch < 0 or not 0 <= cursor < max(len(self.epoch_plan(epoch)), 1):
            raise DataError(f"data position: step {step}, epoch {epoch}, cursor {cursor} out of "
                            "range")
        self.step, self.epoch, self.cursor = step, epoch, cursor


def slot_width(longest_run: int, shape: int) -> int:
    """The ``loss_positions`` width of a bucket whose longest supervised run is ``longest_run``:
    rounded up to a multiple of 8 (fewer distinct widths), at most ``shape``."""
    return min(shape, -(-max(longest_run, 1) // _SLOT_MULTIPLE) * _SLOT_MULTIPLE)

