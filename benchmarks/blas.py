"""sgemm throughput of MLX on CPU: stock (the wheel's bundled BLAS) vs mlx_distill's OpenBLAS shim.

The interposition happens once per process, before ``mlx.core`` is imported, so every
configuration is measured in its own subprocess of this script (``--worker``):

* stock: ``MLX_DISTILL_NO_FAST_BLAS=1`` (mlx-cpu's netlib reference BLAS);
* fast:  ``import mlx_distill`` first (OpenBLAS through ``mlx_distill/_blas_shim.c``).

Each size: warmup, then timed ``mx.eval(a @ b)`` calls; the figure is the median. The stock path is
slow (a few GFLOP/s), so it gets fewer repeats and a time budget per size.

    python benchmarks/blas.py                      # default sizes, default thread count
    python benchmarks/blas.py --threads 1,2        # also compare OPENBLAS_NUM_THREADS=1 vs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

OPT_OUT_ENV = "MLX_DISTILL_NO_FAST_BLAS"  # mirrors mlx_distill.fast_blas.OPT_OUT_ENV


# ---------------------------------------------------------------- worker (runs in a subprocess)

def _worker(spec: dict) -> dict:
    import mlx_distill  # noqa: F401  (must precede mlx.core: interposes the BLAS)
    from mlx_distill import fast_blas

    # isort: split
    import mlx.core as mx
    import numpy as np

    status = fast_blas.status()
    mx.random.seed(0)
    results = []
    warmed_up = False
    for n in spec["sizes"]:
        a = mx.random.normal((n, n), dtype=mx.float32)
        b = mx.random.normal((n, n), dtype=mx.float32)
        mx.eval(a, b)
        if spec["warmup_every_size"] or not warmed_up:
            for _ in range(spec["warmup"]):
                mx.eval(a @ b)
            warmed_up = True
        times: list[float] = []
        budget_start = time.perf_counter()
        while len(times) < spec["repeats"]:
            t0 = time.perf_counter()
            c = a @ b
            mx.eval(c)
            times.append(time.perf_counter() - t0)
            if time.perf_counter() - budget_start > spec["budget_s"]:
                break
        # Sanity: the product must be right, whichever BLAS computed it.
        rows = slice(0, min(n, 64))
        ref = np.asarray(a[rows], dtype=np.float64) @ np.asarray(b, dtype=np.float64)
        rel_err = float(np.abs(np.asarray(c[rows]) - ref).max() / np.abs(ref).max())
        median = statistics.median(times)
        results.append({
            "n": n,
            "repeats": len(times),
            "median_s": median,
            "gflops": 2 * n**3 / median / 1e9,
            "rel_err": rel_err,
        })
    return {
        "enabled": status.enabled,
        "reason": status.reason,
        "threads": status.threads,
        "env_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "results": results,
    }


# ---------------------------------------------------------------- driver

def run_config(name: str, sizes: list[int], repeats: int, warmup: int, budget_s: float,
               fast: bool, threads: int | None, warmup_every_size: bool) -> dict:
    env = dict(os.environ)
    if fast:
        env.pop(OPT_OUT_ENV, None)
    else:
        env[OPT_OUT_ENV] = "1"
    if threads is not None:
        env["OPENBLAS_NUM_THREADS"] = str(threads)
    spec = {"sizes": sizes, "repeats": repeats, "warmup": warmup, "budget_s": budget_s,
            "warmup_every_size": warmup_every_size}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
        env=env, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        sys.exit(f"{name} worker failed (exit {proc.returncode}):\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    if fast and not out["enabled"]:
        sys.exit(f"fast BLAS was not enabled in the {name} worker: {out['reason']}")
    if not fast and out["enabled"]:
        sys.exit(f"{OPT_OUT_ENV}=1 did not disable fast BLAS in the {name} worker")
    bad = [r for r in out["results"] if r["rel_err"] > 1e-4]
    if bad:
        sys.exit(f"{name}: wrong matmul results: {bad}")
    return out


def combine_rounds(runs: list[dict]) -> dict:
    """Per size, the median over rounds of each round's median time."""
    combined = dict(runs[0])
    combined["results"] = []
    for rows in zip(*(r["results"] for r in runs), strict=True):
        median = statistics.median(row["median_s"] for row in rows)
        n = rows[0]["n"]
        combined["results"].append({
            "n": n, "repeats": sum(row["repeats"] for row in rows), "median_s": median,
            "gflops": 2 * n**3 / median / 1e9, "rel_err": max(row["rel_err"] for row in rows),
        })
    return combined


def _by_size(run: dict) -> dict[int, dict]:
    return {r["n"]: r for r in run["results"]}


def print_table(stock: dict, fast: dict, sizes: list[int]) -> None:
    s, f = _by_size(stock), _by_size(fast)
    print(f"{'n':>6} {'stock GFLOP/s':>14} {'(reps)':>7} {'fast GFLOP/s':>13} {'(reps)':>7}"
          f" {'ratio':>7}")
    for n in sizes:
        print(f"{n:>6} {s[n]['gflops']:>14.2f} {s[n]['repeats']:>7} {f[n]['gflops']:>13.1f}"
              f" {f[n]['repeats']:>7} {f[n]['gflops'] / s[n]['gflops']:>6.1f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="MLX CPU sgemm GFLOP/s: stock BLAS vs mlx_distill's OpenBLAS interposition "
                    "(each in its own subprocess).")
    parser.add_argument("--sizes", default="256,512,1024,2048",
                        help="comma-separated square sizes n (n x n @ n x n, fp32)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="timed repeats per size, fast BLAS (median is reported)")
    parser.add_argument("--stock-repeats", type=int, default=3,
                        help="timed repeats per size, stock BLAS (slow: keep small)")
    parser.add_argument("--stock-budget", type=float, default=5.0,
                        help="stop timing a stock size after this many seconds (>= 1 repeat)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--threads", default=None,
                        help="comma-separated OPENBLAS_NUM_THREADS values to compare for the "
                             "fast path, e.g. 1,2 (default: the library default / your env)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="fast-path rounds (one subprocess per thread count each round, "
                             "alternating); per size the median over rounds is reported")
    parser.add_argument("--skip-stock", action="store_true", help="only measure the fast path")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0

    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    thread_counts: list[int | None] = (
        [int(x) for x in args.threads.split(",")] if args.threads else [None]
    )
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"OPENBLAS_NUM_THREADS in env: {os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")

    stock = None
    if not args.skip_stock:
        # Stock: warm up once on the smallest size only; a 2048 call takes seconds.
        stock = run_config("stock", sizes, args.stock_repeats, 1, args.stock_budget,
                           fast=False, threads=None, warmup_every_size=False)
        print(f"stock: {stock['reason']} ({stock['wall_s']:.1f} s)")

    # Thread counts alternate round by round, so slow drift of a shared machine hits each alike.
    per_round: dict[int | None, list[dict]] = {t: [] for t in thread_counts}
    for _ in range(args.rounds):
        for threads in thread_counts:
            run = run_config(f"fast[{threads}]", sizes, args.repeats, args.warmup, 30.0,
                             fast=True, threads=threads, warmup_every_size=True)
            per_round[threads].append(run)
            print(f"fast: {run['reason']}, OPENBLAS_NUM_THREADS={run['threads']} "
                  f"({run['wall_s']:.1f} s)")
    fast_runs = {runs[0]["threads"]: combine_rounds(runs) for runs in per_round.values()}

    largest = max(sizes)
    if stock is not None:
        for threads, run in fast_runs.items():
            print(f"\n== stock vs fast (OPENBLAS_NUM_THREADS={threads}) ==")
            print_table(stock, run, sizes)

    if len(fast_runs) > 1 or stock is None:
        print("\n== fast path, GFLOP/s by OPENBLAS_NUM_THREADS ==")
        print(f"{'n':>6} " + " ".join(f"{f'threads={t}':>11}" for t in fast_runs))
        for n in sizes:
            print(f"{n:>6} " + " ".join(f"{_by_size(r)[n]['gflops']:>11.1f}"
                                        for r in fast_runs.values()))

    if stock is not None:
        first = next(iter(fast_runs.values()))
        ratio = _by_size(first)[largest]["gflops"] / _by_size(stock)[largest]["gflops"]
        verdict = "meets" if ratio >= 10 else "BELOW"
        print(f"\nratio at n={largest}: {ratio:.1f}x fast/stock "
              f"(OPENBLAS_NUM_THREADS={first['threads']}; goal >= 10x: {verdict})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
