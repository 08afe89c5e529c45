"""``mlx-distill eval``: score backends on an eval JSONL, check the gates, write the report.

Exit status: 0 every gate passed; 1 a gate failed (or a baseline regression / an enforced role
target, when the gates profile says they fail the run); 2 bad arguments or input (one line on
stderr, nothing written).
"""

from __future__ import annotations

import argparse

from mlx_distill.eval.dataset import TASKS
from mlx_distill.eval.harness import CONSTRAIN_MODES, HarnessOptions

EXIT_PASSED = 0
EXIT_GATE_FAILED = 1


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _cmd_eval(args: argparse.Namespace) -> int:
    from mlx_distill.eval.runner import EvalConfig, run_eval

    config = EvalConfig(
        data=args.data, backends=args.backend, fixtures=args.fixtures, gates_file=args.gates,
        profile=args.profile, role=args.role, roles_file=args.roles, baseline=args.baseline,
        out=args.out, limit=args.limit, task=args.task,
        options=HarnessOptions(max_tokens=args.max_tokens, max_turns=args.max_turns,
                               constrain=args.constrain),
        progress=not args.quiet,
        arguments={k: v for k, v in vars(args).items() if k not in ("func", "command")},
    )
    result, path = run_eval(config)
    for backend in result["backends"]:
        failed = [v["gate"] for v in backend["gates"] if v["status"] == "fail"]
        status = "passed" if backend["passed"] else "FAILED" + (
            f" ({'; '.join(failed)})" if failed else "")
        print(f"{backend['label']}: {status}")
    if result.get("baseline") and result["baseline"]["regressions"]:
        for r in result["baseline"]["regressions"]:
            print(f"regression: {r['backend']} {r['metric']} {r['baseline']:.4g} -> "
                  f"{r['current']:.4g} (allowed {r['allowed']})")
    print(f"report: {path}")
    return EXIT_PASSED if result["passed"] else EXIT_GATE_FAILED


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate backends on an eval JSONL: quality, performance, gates, report",
        description="Run each backend over the eval samples (multi-turn samples through the tool "
        "broker's recorded results), score tool calls (strict/lax F1, exact, JSON validity, "
        "spurious calls on controls, privacy) or 8-ball answers (exact match), measure TTFT, "
        "latency percentiles and decode speed, check the gates and write report.json, report.md "
        "and PNG figures. Exit 0: all gates passed; 1: a gate failed; 2: bad arguments or input.",
    )
    p.add_argument("--data", required=True, help="eval JSONL (e.g. tasks' test.jsonl)")
    p.add_argument("--backend", action="append", required=True, metavar="[LABEL=]KIND:LOC",
                   help="mlx:CHECKPOINT_DIR, coreml:PACKAGE.mlpackage[#TOKENIZER_DIR], "
                   "openai:URL[#MODEL] or openai:TEACHER (configs/teachers.yaml); repeat to "
                   "compare backends side by side (LABEL= names the row)")
    p.add_argument("--fixtures", action="append", metavar="FILE",
                   help="tool-result fixtures JSONL for the broker (repeatable; default: "
                   "fixtures.jsonl beside --data, if present)")
    p.add_argument("--gates", metavar="FILE", help="gates file (default configs/gates.yaml)")
    p.add_argument("--profile", default="default", help="gates profile (default, toy, ...)")
    p.add_argument("--role", help="check performance against this role's targets "
                   "(configs/roles.yaml: worker, judge, drafter)")
    p.add_argument("--roles", metavar="FILE", help="roles file (default configs/roles.yaml)")
    p.add_argument("--baseline", metavar="REPORT_JSON",
                   help="an earlier report.json; flags regressions beyond the profile's tolerances")
    p.add_argument("--out", metavar="DIR", help="report directory (default runs/eval-<time>)")
    p.add_argument("--limit", type=_positive_int, help="evaluate the first N samples only")
    p.add_argument("--max-tokens", type=_positive_int, default=256,
                   help="token limit per generation (default 256)")
    p.add_argument("--max-turns", type=_positive_int, default=4,
                   help="generations per multi-turn sample (default 4)")
    p.add_argument("--constrain", choices=CONSTRAIN_MODES, default="auto",
                   help="JSON-schema-constrained tool calls: auto (when tools are offered and "
                   "the backend supports it), on, off")
    p.add_argument("--task", choices=("auto", *TASKS), default="auto",
                   help="scoring (default: detected from the samples)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)
