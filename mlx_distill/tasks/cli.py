"""``mlx-distill tasks``: write the toy tasks' splits as JSONL."""

from __future__ import annotations

import argparse
import json

from mlx_distill.tasks.common import SPLITS

DEFAULT_COUNTS = {"train": 800, "val": 100, "test": 200}


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _run(args: argparse.Namespace) -> int:
    if args.task == "toolcall":
        from mlx_distill.tasks.toolcall import write_toolcall as write
    else:
        from mlx_distill.tasks.eightball import write_eightball as write
    out = write(args.out, args.n_train, args.n_val, args.n_test, seed=args.seed)
    info = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    for split in SPLITS:
        categories = ", ".join(f"{k} {v}" for k, v in info["categories"][split].items())
        print(f"{split}: {info['counts'][split]} samples ({categories or 'none'})")
    if (out / "fixtures.jsonl").exists():
        lines = (out / "fixtures.jsonl").read_text(encoding="utf-8").count("\n")
        print(f"fixtures: {lines} recorded tool results")
    print(f"wrote {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tasks", help="generate the toy tasks (tool calling, Magic 8-Ball)",
        description="Toy tasks with ground truth. `mlx-distill tasks toolcall --help` for details.",
    )
    actions = parser.add_subparsers(dest="task", metavar="TASK")
    descriptions = {
        "toolcall": (
            "toy tool-calling task",
            "Tool-calling samples over five tools (get_weather, add, multiply, list_events,\n"
            "convert_units): single, parallel and multi-turn calls plus no-tool controls. The\n"
            "test split uses cities, dates, numbers and phrasings unseen in train/val.\n"
            "Writes {train,val,test}.jsonl (eval samples), *.prompts.jsonl ({id, messages,\n"
            "tools}, for `mlx-distill teacher generate`), *.sft.jsonl (gold conversations),\n"
            "fixtures.jsonl (tool results for the broker), tools.json and manifest.json.",
        ),
        "eightball": (
            "toy Magic 8-Ball task",
            "Yes/no questions answered with one of the 20 classic Magic 8-Ball answers; the\n"
            "answer is fixed by the topic word the question mentions. The test split uses\n"
            "owners, times and phrasings unseen in train/val. Writes {train,val,test}.jsonl,\n"
            "*.prompts.jsonl, *.sft.jsonl and manifest.json.",
        ),
    }
    for task, (summary, description) in descriptions.items():
        sub = actions.add_parser(
            task, help=summary, description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=f"example: mlx-distill tasks {task} --out data/{task} --n-train 800 --seed 0",
        )
        sub.add_argument("--out", required=True, metavar="DIR",
                         help="output directory (new, or one this command wrote; it is replaced)")
        for split in SPLITS:
            sub.add_argument(f"--n-{split}", type=_non_negative, default=DEFAULT_COUNTS[split],
                             metavar="N", help=f"{split} samples (default %(default)s)")
        sub.add_argument("--seed", type=_non_negative, default=0, metavar="S",
                         help="random seed (default %(default)s)")
        sub.set_defaults(func=_run)

    def show_help(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=show_help)
