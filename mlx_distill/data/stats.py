"""``mlx-distill data stats``: what a training run would read, use, refuse and align."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from mlx_distill.data.batches import OVERFLOW_MODES, BucketReport, assign_buckets
from mlx_distill.data.dataset import (
    ALIGN_MODES,
    DEFAULT_MAX_BAD_FRACTION,
    Dataset,
    load_dataset,
)
from mlx_distill.data.errors import check_bad_fraction

# Lowest-coverage records listed in the report.
WORST_RECORDS = 5


def format_stats(
    dataset: Dataset, buckets: BucketReport | None = None, batch_size: int = 8
) -> list[str]:
    """Report lines: counts, bad-record reasons, alignment coverage, tokens per bucket."""
    r = dataset.report
    lines = [
        f"records: {r.records}  used: {r.used} (kd {r.kd}, sft {r.sft})  bad: {r.bad.total}",
    ]
    if r.bad.total:
        lines.append("bad records by reason:")
        lines.extend(r.bad.lines())
    if r.no_teacher_tokens:
        lines.append(f"kd records without teacher logprobs (CE only): {r.no_teacher_tokens}")
    if r.stopped_at_length:
        lines.append(f"kd records cut at max_tokens (no end-of-turn label): {r.stopped_at_length}")
    if r.completion_tokens:
        lines.append(
            f"alignment coverage: {r.coverage:.2%} ({r.aligned_tokens} of {r.completion_tokens} "
            f"completion tokens; records by id {r.by_id}, by text {r.by_text})"
        )
        below = sorted((c, i) for i, c in r.coverage_by_record.items() if c < 1.0)
        if below:
            worst = ", ".join(f"{i} {c:.0%}" for c, i in below[:WORST_RECORDS])
            lines.append(f"records below 100% coverage: {len(below)} (lowest: {worst})")
    if buckets is not None:
        b = buckets
        lines.append(f"buckets (batch size {batch_size}, K {dataset.k}):")
        batches = 0
        for shape in sorted(b.examples):
            n = b.examples[shape]
            batches += -(-n // batch_size)
            lines.append(
                f"  {shape:>6}: {n} examples, {b.tokens[shape]} tokens "
                f"({b.loss_tokens[shape]} with loss), padding {b.padding_fraction(shape):.1%}"
            )
        if b.truncated:
            lines.append(f"truncated: {b.truncated} examples ({b.truncated_tokens} tokens cut)")
        if b.rejected:
            lines.append(f"rejected as too long: {len(b.rejected)} "
                         f"(e.g. {', '.join(b.rejected[:3])})")
        lines.append(f"batches per epoch: {batches}")
    return lines


def dataset_stats(
    paths: Sequence[str | os.PathLike],
    tokenizer: Any,
    *,
    teacher_tokenizer: Any = None,
    align: str = "auto",
    tool_arguments: str = "text",
    shapes: Sequence[int] = (64, 128, 256),
    batch_size: int = 8,
    overflow: str = "truncate",
) -> tuple[list[str], Dataset]:
    """Load without stopping on bad records and report; the caller applies its
    ``max_bad_fraction`` (``check_bad_fraction``) after showing the lines."""
    dataset = load_dataset(paths, tokenizer, teacher_tokenizer=teacher_tokenizer, align=align,
                           tool_arguments=tool_arguments, max_bad_fraction=1.0)
    _, buckets = assign_buckets(dataset.examples, shapes, overflow)
    return format_stats(dataset, buckets, batch_size), dataset


def _shapes(text: str) -> list[int]:
    try:
        shapes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not shapes:
        raise argparse.ArgumentTypeError("expected at least one shape")
    return shapes


def _cmd_stats(args: argparse.Namespace) -> int:
    from mlx_distill.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    teacher = load_tokenizer(args.teacher_tokenizer) if args.teacher_tokenizer else None
    lines, dataset = dataset_stats(
        args.files, tokenizer, teacher_tokenizer=teacher, align=args.align,
        tool_arguments=args.tool_arguments, shapes=args.shapes, batch_size=args.batch_size,
        overflow=args.overflow,
    )
    print("\n".join(lines))
    report = dataset.report
    check_bad_fraction(report.bad, report.records, args.max_bad_fraction,
                       ", ".join(map(str, args.files)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data", help="inspect training data (KD records, SFT conversations)",
        description="Training data tools. `mlx-distill data stats --help` for details.",
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    stats = actions.add_parser(
        "stats", help="counts, bad records, alignment coverage and buckets of JSONL data",
        description=(
            "Encode KD records (kd.jsonl) and SFT conversations with the student tokenizer, as "
            "training would, and print: records used and refused (by reason), how much of the "
            "completions got a teacher distribution (alignment coverage), and tokens per "
            "length bucket. Exits 2 when more than --max-bad-fraction of the records are bad."
        ),
        epilog="example: mlx-distill data stats kd.jsonl --tokenizer runs/student/tokenizer",
    )
    stats.add_argument("files", nargs="+", metavar="FILE", help="JSONL data file(s)")
    stats.add_argument("--tokenizer", required=True, metavar="DIR",
                       help="the student's tokenizer (or checkpoint) directory")
    stats.add_argument("--teacher-tokenizer", metavar="DIR",
                       help="the teacher's tokenizer: --align auto aligns by id when it equals "
                       "the student's")
    stats.add_argument("--align", choices=ALIGN_MODES, default="auto",
                       help="teacher alignment: by token id, by text, or auto (default)")
    stats.add_argument("--tool-arguments", choices=("text", "object"), default="text",
                       help="tool-call arguments given to the chat template as the teacher's "
                       "JSON text (default) or parsed objects")
    stats.add_argument("--shapes", type=_shapes, default=[64, 128, 256], metavar="N,N,...",
                       help="sequence-length buckets (default 64,128,256)")
    stats.add_argument("--batch-size", type=int, default=8, metavar="N",
                       help="rows per batch (default %(default)s)")
    stats.add_argument("--overflow", choices=OVERFLOW_MODES, default="truncate",
                       help="examples longer than the largest shape (default truncate)")
    stats.add_argument("--max-bad-fraction", type=float, default=DEFAULT_MAX_BAD_FRACTION,
                       metavar="F", help="exit 2 when more than this share of records is bad "
                       "(default %(default)s)")
    stats.set_defaults(func=_cmd_stats)

    def show_help(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=show_help)
