"""``mlx-distill`` command line. Each stage module registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys

import mlx_distill  # noqa: F401  (enables fast BLAS before any module imports mlx.core)

# Modules exposing ``register(subparsers)``; each sets ``func`` on its parsers.
COMMAND_MODULES = [
    "mlx_distill.checkpoint",
    "mlx_distill.model_info",
    "mlx_distill.tokenizer",
    "mlx_distill.generate",
    "mlx_distill.demo",
    "converters.inspect_coreml",
    "converters.export",
    "converters.verify",
]


class UserError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-distill",
        description="Distill a teacher into a small GQA student with MLX and export it to Core ML.",
    )
    parser.add_argument("--version", action="version", version=mlx_distill.__version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mlx_distill.checkpoint import CheckpointError
    from mlx_distill.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, ConfigError, CheckpointError) as exc:
        print(f"mlx-distill {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
