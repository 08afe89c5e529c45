"""``mlx-distill teacher {generate, merge, serve}``."""

from __future__ import annotations

import argparse
from pathlib import Path

GENERATE_EPILOG = """\
prompts file: one JSON object per line: {"id": "q1", "messages": [{"role": "user", "content":
"..."}]}, optionally "tools", "tool_choice" and per-prompt "max_tokens", "temperature", "top_p",
"seed", "stop", "top_logprobs". Every line is validated before anything is sent.

files written next to --out: OUT (KD records, completion order), OUT.manifest.json (run config,
prompts sha256), OUT.state.json (checkpoint: records, byte length and sha256 of OUT, USD spent,
failed prompts), OUT.failed.jsonl (failed prompts with reasons).

exit status: 0 every prompt of the shard has a record; 2 bad input (one line on stderr); 3 stopped
at the budget cap; 4 finished with failed prompts; 5 stopped at --failure-limit; 130 interrupted.
After 3, 4, 5, 130 or a crash (even kill -9), rerun with --resume: nothing is lost, duplicated or
paid for twice.

example: mlx-distill teacher generate --prompts p.jsonl --out kd.jsonl --teacher kimi \\
    --budget-usd 20 --concurrency 32 --shard 0/4
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def _usd(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of USD") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number >= 0")
    return value


def _shard(text: str):
    from mlx_distill.cli import UserError
    from mlx_distill.teacher.prompts import Shard

    try:
        return Shard.parse(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--prompts", required=True, type=Path, metavar="P.jsonl", help="prompts file (see below)")
    a("--out", required=True, type=Path, metavar="KD.jsonl",
      help="KD records output; never overwritten (use --resume to continue it)")
    a("--teacher", required=True, metavar="NAME|URL",
      help="a teacher from teachers.yaml (e.g. kimi, local) or an http(s):// OpenAI-compatible "
      "base URL (free, no key)")
    a("--teachers-config", type=Path, default=None, metavar="YAML",
      help="teachers file (default: configs/teachers.yaml)")
    a("--model", default=None, help="override the teacher's model id")
    a("--tier", default=None, help="rate-limit tier from teachers.yaml (default: the teacher's)")
    a("--cache", type=Path, default=None, metavar="DIR",
      help="answer cache directory, shareable between runs and shards (default: OUT.cache)")
    a("--checkpoint-interval", type=_positive_int, default=50, metavar="N",
      help="fsync OUT and write the checkpoint state every N settled prompts (default 50)")
    a("--concurrency", type=_positive_int, default=16, metavar="N",
      help="most requests in flight; the tier's concurrency also caps it (default 16)")
    a("--budget-usd", type=_usd, default=None, metavar="X",
      help="USD cap for this run (all invocations of it together); a request is only sent if its "
      "worst-case cost fits (default: no cap)")
    a("--shard", type=_shard, default="0/1", metavar="i/n",
      help="only the prompts with int(sha256(id)) mod n == i (default 0/1: all)")
    a("--resume", action="store_true",
      help="continue the run recorded next to --out (same prompts, teacher and sampling)")
    a("--max-tokens", type=_positive_int, default=None, metavar="N",
      help="completion length cap (default: the teacher's max_tokens)")
    a("--temperature", type=float, default=1.0, metavar="T",
      help="sampling temperature (default 1.0)")
    a("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (default 1.0)")
    a("--seed", type=int, default=None, help="sampling seed sent to the teacher")
    a("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    logprobs = parser.add_mutually_exclusive_group()
    logprobs.add_argument("--top-logprobs", type=int, default=-1, metavar="K",
                          help="top-k alternatives per token (default: the teacher's maximum)")
    logprobs.add_argument("--no-logprobs", dest="top_logprobs", action="store_const",
                          const=None, help="do not request logprobs")
    a("--stream", action="store_true", help="use streamed (SSE) responses")
    a("--max-attempts", type=_positive_int, default=6, metavar="N",
      help="tries per request before it is recorded as failed (default 6)")
    a("--timeout", type=float, default=120.0, metavar="S",
      help="read timeout per request in seconds (default 120)")
    a("--failure-limit", default="10%", metavar="N|P%",
      help="stop once more than this many (or this percentage of the prompts attempted) failed "
      "(default 10%%)")
    a("--no-progress", dest="progress", action="store_const", const=False, default=None,
      help="no progress bar (default: shown on a terminal)")


def config_from_args(args: argparse.Namespace):
    from mlx_distill.teacher.kdgen import GenerateConfig

    return GenerateConfig(
        prompts=args.prompts, out=args.out, teacher=args.teacher, cache=args.cache,
        checkpoint_interval=args.checkpoint_interval, concurrency=args.concurrency,
        budget_usd=args.budget_usd, shard=args.shard, resume=args.resume, model=args.model,
        tier=args.tier, teachers_config=args.teachers_config, max_tokens=args.max_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        stop=tuple(args.stop) if args.stop else None, top_logprobs=args.top_logprobs,
        stream=args.stream, max_attempts=args.max_attempts, timeout_s=args.timeout,
        failure_limit=args.failure_limit, progress=args.progress,
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    from mlx_distill.teacher.kdgen import run_generate

    return run_generate(config_from_args(args))


def _cmd_merge(args: argparse.Namespace) -> int:
    from mlx_distill.teacher.merge import run_merge

    return run_merge(args.shards, args.out)


def register(subparsers: argparse._SubParsersAction) -> None:
    teacher = subparsers.add_parser(
        "teacher", help="query a teacher for KD data, merge shards, or serve a local teacher",
        description="Teacher side of distillation: generate KD records from an OpenAI-compatible "
        "teacher (crash-safe, cached, budgeted), merge shard files, serve a local MLX teacher.",
    )
    sub = teacher.add_subparsers(dest="teacher_command", metavar="SUBCOMMAND", required=True)
    generate = sub.add_parser(
        "generate", help="ask a teacher every prompt; write KD records (resumable, cached)",
        description="Ask the teacher every prompt of the shard and append one KD record per "
        "answer (text, reasoning, tool calls, per-token logprobs with top-k, usage, cost). "
        "Answers are cached in SQLite and never requested or billed twice; a USD budget is "
        "enforced with worst-case reservations; kill -9 at any moment loses nothing.",
        epilog=GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_generate_arguments(generate)
    generate.set_defaults(func=_cmd_generate)
    merge = sub.add_parser(
        "merge", help="combine KD shard files: validate, de-duplicate by id, sort by id",
        description="Validate every line of the shard files (file:line on error), drop duplicate "
        "ids (copies differing only in 'created' keep the earliest; other differences are an "
        "error), sort by id and write --out atomically. Deterministic: same records, same bytes.",
        epilog="example: mlx-distill teacher merge kd-*.jsonl --out kd.jsonl",
    )
    merge.add_argument("shards", nargs="+", metavar="SHARD.jsonl", help="KD files to combine")
    merge.add_argument("--out", required=True, metavar="MERGED.jsonl", help="output file")
    merge.set_defaults(func=_cmd_merge)
    from mlx_distill.teacher.server import add_serve_parser

    add_serve_parser(sub)


def generate_main(argv: list[str] | None = None) -> int:
    """``python -m mlx_distill.teacher.kdgen ARGS`` = ``mlx-distill teacher generate ARGS``,
    starting in ~1 s instead of ~3 s (``teacher`` also registers ``serve``, which loads mlx-lm)."""
    import sys

    from mlx_distill.cli import UserError

    parser = argparse.ArgumentParser(prog="mlx-distill teacher generate", epilog=GENERATE_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generate_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return _cmd_generate(args)
    except UserError as exc:  # config, cache, budget and file errors all derive from it
        print(f"mlx-distill teacher: error: {exc}", file=sys.stderr)
        return 2
