"""``mlx-distill`` command line. Each stage module registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys

import mlx_distill  # noqa: F401  (enables fast BLAS before any module imports mlx.core)

# Command -> (module exposing ``register(subparsers)``, one-line summary). Only the module of the
# command being run is imported, so `mlx-distill tasks ...` doesn't pay for mlx-lm or coremltools.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("mlx_distill.demo", "run the whole pipeline end to end on a toy task, offline"),
    "tokenizer": ("mlx_distill.tokenizer", "train a byte-level BPE tokenizer"),
    "model-info": ("mlx_distill.model_info", "parameters, weight/KV bytes and budget check"),
    "inspect": ("mlx_distill.checkpoint", "check a checkpoint directory"),
    "generate": ("mlx_distill.generate", "generate text from a checkpoint"),
    "tasks": ("mlx_distill.tasks.cli", "write the toy tool-call / 8-ball task datasets"),
    "teacher": ("mlx_distill.teacher.cli", "KD data from a teacher API; local teacher server"),
    "data": ("mlx_distill.data.stats", "KD dataset statistics and alignment coverage"),
    "train": ("mlx_distill.train_run", "distill a student from a training config"),
    "eval": ("mlx_distill.eval.cli", "evaluate backends: quality, performance, gates, report"),
    "export-coreml": ("converters.export", "export a checkpoint to a Core ML package"),
    "verify-coreml": ("converters.verify", "check a Core ML package against its checkpoint"),
    "inspect-coreml": ("converters.inspect_coreml", "describe a Core ML package"),
}
COMMAND_MODULES = sorted({module for module, _ in COMMANDS.values()})


class UserError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser for ``command`` (its module imported); the others get a summary only."""
    parser = argparse.ArgumentParser(
        prog="mlx-distill",
        description="Distill a teacher into a small GQA student with MLX and export it to Core ML.",
    )
    parser.add_argument("--version", action="version", version=mlx_distill.__version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).register(sub)
    for name, (_, summary) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=summary)
    return parser


def _command_name(argv: list[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_name(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"mlx-distill {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
