"""KD vs CE-only on the toy tool-call task, end to end through the real pipeline.

1. Task: ``mlx_distill.tasks.toolcall.generate`` (train / val / test; test uses cities, numbers,
   dates and phrasings that train and val never use).
2. Tokenizer: byte-level BPE (``train_tokenizer``) on the train split's text.
3. Teacher: ``mlx-distill train`` (``run_training``, ``loss.kind: ce``) on the gold train
   conversations (SFT: prompt + gold first assistant turn).
4. Teacher records: the teacher served over HTTP (``serve_in_thread``, what ``mlx-distill teacher
   serve`` runs) and asked every train prompt by ``teacher generate`` (``Generator``): sampled
   completions with their top-20 log-probs, one KD record per prompt.
5. Two students, identical but for the loss (size, init seed, data order, steps, lr): ``KD`` =
   ``alpha * CE + (1 - alpha) * forward KL`` on the records' top-K with the tail bucket; ``CE`` =
   ``loss.kind: ce`` on the same records (the teacher's sampled tokens as hard labels).
6. Eval: greedy decoding (``mlx_distill.generate``) of held-out prompts, scored by
   ``mlx_distill.eval.scoring.score_dataset``: tool-call F1 strict (BFCL AST rules: name, required
   and allowed parameters, types, values) and lax (function name), on ``val`` (held-out samples of
   the training distribution) and ``test`` (held-out values and phrasings).

Prompts (``--prompt-tools``): the five tools are the same in every sample, so what the prompt says
about them carries no per-sample information; it only lengthens every row. ``bare`` (default) is
the user message alone (rows ~50 tokens), ``compact`` keeps the task's system prompt plus a
one-line tool summary (~120), ``full`` is the task's own prompt with the JSON schemas (~700).
Scoring always uses the task's full tool schemas.

Expect strict F1 near 0 at these sizes: a strict match needs the argument values copied from the
user message (and dates rewritten to ISO), which models this small do not learn in minutes of CPU
training (checked up to 3,000 steps and 1.8M parameters); lax F1 (tool choice) is where teacher
and students differ.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlx_distill  # noqa: F401  (must precede mlx.core: interposes OpenBLAS on Linux)

# isort: split
import mlx.core as mx
import yaml

from mlx_distill.checkpoint import load_checkpoint
from mlx_distill.cli import UserError
from mlx_distill.config import load_size_config
from mlx_distill.eval.scoring import score_dataset
from mlx_distill.generate import generate
from mlx_distill.model import Model, num_parameters
from mlx_distill.tasks.toolcall import generate as generate_task
from mlx_distill.tasks.toolcall import gold_messages
from mlx_distill.tasks.toolcall_tools import TOOLS
from mlx_distill.tokenizer import load_tokenizer, train_tokenizer
from mlx_distill.train_config import config_from_dict
from mlx_distill.train_run import run_training

# Presets: sized so that `full` finishes in about 10 minutes and `quick` in about 3 on a 2-core VM.
# dims = d_model, n_layers, n_heads, n_kv_heads, d_ff.
PRESETS = {
    "full": dict(n_train=600, n_val=100, n_test=100, teacher_steps=1200, student_steps=1200,
                 batch=8, teacher_dims="128,3,4,2,336", student_dims="64,2,2,1,176"),
    "quick": dict(n_train=200, n_val=30, n_test=30, teacher_steps=450, student_steps=300,
                  batch=8, teacher_dims="128,3,4,2,336", student_dims="64,2,2,1,176"),
}
MODELS = ("teacher", "KD student", "CE student")


# ---- task data ----

def tool_summary() -> str:
    """One line naming every tool and its parameters (optional ones with ``?``)."""
    parts = []
    for tool in TOOLS:
        fn = tool["function"]
        required = set(fn["parameters"].get("required", []))
        params = [p if p in required else f"{p}?" for p in fn["parameters"]["properties"]]
        parts.append(f"{fn['name']}({', '.join(params)})")
    return "Tools: " + "; ".join(parts) + "."


def prompt_of(sample: dict[str, Any], form: str) -> tuple[list[dict], list | None]:
    """The (messages, tools) the models see for ``sample``."""
    if form == "full":
        return sample["messages"], sample["tools"] or None
    system, *rest = sample["messages"]
    if form == "bare":
        return rest, None
    return [{"role": "system", "content": f"{system['content']} {tool_summary()}"}, *rest], None


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def write_task(work: Path, splits: dict[str, list[dict]], form: str) -> dict[str, Path]:
    """The gold SFT conversations and the prompts file of the train split, and a tokenizer
    corpus."""
    sft, prompts, corpus = [], [], []
    for sample in splits["train"]:
        messages, tools = prompt_of(sample, form)
        first_turn = gold_messages(sample)[len(sample["messages"])]
        sft.append({"id": sample["id"], "messages": [*messages, first_turn], "tools": tools})
        prompts.append({"id": sample["id"], "messages": messages, "tools": tools})
        corpus += [m["content"] for m in messages] + [sample["gold_answer"]]
        if tools:
            corpus.append(json.dumps(tools, ensure_ascii=False))
    (work / "corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    return {"sft": write_jsonl(work / "train.sft.jsonl", sft),
            "prompts": write_jsonl(work / "train.prompts.jsonl", prompts),
            "corpus": work / "corpus.txt"}


# ---- training ----

def size_file(work: Path, name: str, dims: str, vocab: int, max_len: int) -> Path:
    d_model, n_layers, n_heads, n_kv_heads, d_ff = (int(x) for x in dims.split(","))
    model = dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                 d_ff=d_ff, vocab_size=vocab, max_seq_len=max_len, tie_embeddings=True)
    path = work / f"{name}.size.yaml"
    path.write_text(yaml.safe_dump({"name": name, "nominal_params": 1, "model": model}),
                    encoding="utf-8")
    return path


def train(work: Path, name: str, size: Path, tokenizer_dir: Path, data: dict, loss: dict,
          steps: int, lr: float, seed: int, args) -> tuple[Path, float, dict]:
    """One ``mlx-distill train`` run; returns (final checkpoint, seconds, last metrics)."""
    config = config_from_dict({
        "out": str(work / name),
        "student": {"size": str(size), "tokenizer": str(tokenizer_dir)},
        "data": {"batch_size": args.batch, "shapes": args.shapes, **data},
        "loss": loss,
        "optim": {"lr": lr, "min_lr": lr / 10, "warmup_steps": min(20, steps // 10)},
        "train": {"steps": steps, "seed": seed, "progress": False, "plot": False},
    }, f"{name} config")
    lines: list[str] = []
    started = time.perf_counter()
    result = run_training(config, log=lines.append)
    seconds = time.perf_counter() - started
    shown = ("records:", "bad records", "  ", "kd records", "alignment coverage")
    for line in (line for text in lines for line in text.splitlines()):
        if line.startswith(shown):  # the data report's counts, bad records, coverage
            print(f"    {name}: {line.strip()}")
    return result.latest, seconds, result.last


def teacher_records(teacher_dir: Path, prompts: Path, out: Path, args) -> tuple[int, float]:
    """``teacher serve`` + ``teacher generate`` on loopback; returns (records, seconds)."""
    from mlx_distill.teacher.kdgen import Generator
    from mlx_distill.teacher.kdrun import GenerateConfig
    from mlx_distill.teacher.server import serve_in_thread

    url, stop = serve_in_thread(teacher_dir)
    started = time.perf_counter()
    try:
        cfg = GenerateConfig(prompts=prompts, out=out, teacher=url, concurrency=2,
                             max_tokens=args.max_new_tokens, temperature=args.temperature,
                             seed=args.seed, top_logprobs=args.top_k, progress=False)
        result = Generator(cfg).generate()
    finally:
        stop()
    if result.exit_code != 0:
        sys.exit(f"teacher generate failed (exit {result.exit_code}): {result.failures}")
    return result.records, time.perf_counter() - started


# ---- evaluation ----

def predict(model, tokenizer, samples: list[dict], form: str, max_tokens: int) -> list[str]:
    """Greedy completions of the samples' prompts."""
    out = []
    for sample in samples:
        messages, tools = prompt_of(sample, form)
        ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        out.append("".join(t.text for t in generate(model, tokenizer, ids,
                                                     max_tokens=max_tokens, temperature=0.0)))
    return out


def evaluate(model_dir: Path, splits: dict[str, list[dict]], form: str, max_tokens: int) -> dict:
    """Tool-call metrics of the checkpoint on the val and test splits."""
    model, tokenizer = load_checkpoint(model_dir), load_tokenizer(model_dir)
    model.eval()
    scores = {}
    for split in ("val", "test"):
        predictions = predict(model, tokenizer, splits[split], form, max_tokens)
        metrics = score_dataset(splits[split], predictions)
        scores[split] = {"strict_f1": metrics["strict"]["f1"], "lax_f1": metrics["lax"]["f1"],
                         "exact": metrics["exact_accuracy"],
                         "json_valid": metrics["json_validity"]["rate"]}
    return scores


# ---- the run ----

def choose_shapes(tokenizer, splits: dict[str, list[dict]], form: str, max_new: int) -> list:
    """Two buckets: the median gold row and the longest prompt plus ``max_new`` tokens."""
    lengths, prompts = [], []
    for sample in splits["train"]:
        messages, tools = prompt_of(sample, form)
        first_turn = gold_messages(sample)[len(sample["messages"])]
        lengths.append(len(tokenizer.apply_chat_template([*messages, first_turn], tools=tools)))
        prompts.append(len(tokenizer.apply_chat_template(messages, tools=tools,
                                                         add_generation_prompt=True)))
    def round_up(n: int) -> int:
        return -(-n // 32) * 32

    return sorted({round_up(int(statistics.median(lengths))), round_up(max(prompts) + max_new + 1)})


CONFIG_KEYS = ("preset", "seed", "student_seeds", "n_train", "n_val", "n_test", "prompt_tools",
               "batch", "teacher_steps", "student_steps", "teacher_lr", "student_lr",
               "teacher_dims", "student_dims", "temperature", "top_k", "alpha", "max_new_tokens")


def print_config(args, params: dict[str, int], shapes: list[int], vocab: int) -> None:
    print("config: " + ", ".join(f"{key} {getattr(args, key)}" for key in CONFIG_KEYS))
    print(f"  shapes: {shapes}; vocab {vocab}; params: teacher {params['teacher']:,}, student "
          f"{params['student']:,} ({params['teacher'] / params['student']:.1f}x smaller)",
          flush=True)


def count_params(size: Path) -> int:
    return num_parameters(Model(load_size_config(size).model))


def run(args, work: Path) -> dict:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    splits = generate_task(args.n_train, args.n_val, args.n_test, seed=args.seed)
    files = write_task(work, splits, args.prompt_tools)
    tok_dir = train_tokenizer([files["corpus"]], args.vocab, work / "tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    vocab = len(tokenizer.get_vocab())
    args.shapes = choose_shapes(tokenizer, splits, args.prompt_tools, args.max_new_tokens)
    sizes = {name: size_file(work, name, dims, vocab, max(args.shapes))
             for name, dims in (("teacher", args.teacher_dims), ("student", args.student_dims))}
    params = {name: count_params(path) for name, path in sizes.items()}
    timings["task + tokenizer"] = time.perf_counter() - t0
    print_config(args, params, args.shapes, vocab)

    teacher, timings["teacher SFT"], last = train(
        work, "teacher", sizes["teacher"], tok_dir, {"sft": [str(files["sft"])]},
        {"kind": "ce"}, args.teacher_steps, args.teacher_lr, args.seed, args)
    print(f"teacher: {args.teacher_steps} steps in {timings['teacher SFT']:.1f} s, last loss "
          f"{last['loss']:.4f}", flush=True)
    kd_file = work / "kd.jsonl"
    records, timings["teacher generate"] = teacher_records(teacher, files["prompts"], kd_file,
                                                           args)
    print(f"teacher records: {records} in {timings['teacher generate']:.1f} s "
          f"({records / timings['teacher generate']:.1f} records/s)", flush=True)

    t_eval = time.perf_counter()
    scores = {"teacher": [evaluate(teacher, splits, args.prompt_tools, args.max_new_tokens)]}
    eval_seconds = time.perf_counter() - t_eval
    student_data = {"train": [str(kd_file)], "teacher_tokenizer": str(tok_dir), "align": "auto"}
    losses = {"KD student": {"kind": "forward_kl", "alpha": args.alpha, "temperature": 1.0},
              "CE student": {"kind": "ce"}}
    for seed in range(args.seed, args.seed + args.student_seeds):
        for name, loss in losses.items():
            run_name = f"{name.split()[0].lower()}-student-seed{seed}"
            checkpoint, seconds, last = train(work, run_name, sizes["student"], tok_dir,
                                              student_data, loss, args.student_steps,
                                              args.student_lr, seed, args)
            timings[f"{name} train"] = timings.get(f"{name} train", 0.0) + seconds
            print(f"{name} (seed {seed}): {args.student_steps} steps in {seconds:.1f} s, last "
                  f"loss {last['loss']:.4f} (CE {last['ce']:.4f}, KD {last['kd']:.4f})",
                  flush=True)
            t_eval = time.perf_counter()
            scores.setdefault(name, []).append(
                evaluate(checkpoint, splits, args.prompt_tools, args.max_new_tokens))
            eval_seconds += time.perf_counter() - t_eval
    timings["eval (greedy, val + test)"] = eval_seconds
    timings["total"] = time.perf_counter() - t0
    return {"config": {k: v for k, v in vars(args).items() if k != "work"}, "params": params,
            "vocab": vocab, "records": records, "scores": scores, "timings": timings}


METRICS = (("val", "strict_f1"), ("val", "lax_f1"), ("test", "strict_f1"), ("test", "lax_f1"),
           ("test", "exact"))


def summarize(runs: list[dict]) -> str:
    """Cells for one model: the value, or with several seeds ``mean (min-max)``."""
    cells = []
    for split, key in METRICS:
        values = [r[split][key] for r in runs]
        cell = f"{statistics.mean(values):.3f}"
        if len(values) > 1:
            cell += f" ({min(values):.3f}-{max(values):.3f})"
        cells.append(cell)
    return " | ".join(cells)


def report(result: dict) -> None:
    a = result["config"]
    steps = {"teacher": a["teacher_steps"], "KD student": a["student_steps"],
             "CE student": a["student_steps"]}
    params = {"teacher": result["params"]["teacher"], "KD student": result["params"]["student"],
              "CE student": result["params"]["student"]}
    data = {"teacher": "gold conversations (SFT)",
            "KD student": f"teacher records: top-{a['top_k']} KL + CE (alpha {a['alpha']})",
            "CE student": "teacher records: CE on the sampled tokens"}
    if a["student_seeds"] > 1:
        print(f"\nstudents: mean (min-max) over {a['student_seeds']} seeds (init and data order)")
    print("\n| model | params | steps | trained on | val strict F1 | val lax F1 | test strict F1 "
          "| test lax F1 | test exact |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in MODELS:
        print(f"| {name} | {params[name]:,} | {steps[name]} | {data[name]} | "
              f"{summarize(result['scores'][name])} |")
    print("\n| stage | seconds |\n| --- | ---: |")
    for stage, seconds in result["timings"].items():
        print(f"| {stage} | {seconds:.1f} |")


def check_args(args) -> str | None:
    """The first bad option, as one line; None when all are usable."""
    for key in ("n_train", "n_val", "n_test", "teacher_steps", "student_steps", "batch",
                "student_seeds", "max_new_tokens"):
        if getattr(args, key) < 1:
            return f"--{key.replace('_', '-')}: expected an integer >= 1, got {getattr(args, key)}"
    for key in ("teacher_dims", "student_dims"):
        parts = getattr(args, key).split(",")
        if len(parts) != 5 or not all(x.strip().isdigit() and int(x) > 0 for x in parts):
            return (f"--{key.replace('_', '-')}: expected five positive integers d_model,n_layers,"
                    f"n_heads,n_kv_heads,d_ff, got {getattr(args, key)!r}")
    if not 1 <= args.top_k <= 20:
        return f"--top-k: expected 1..20 (the teacher server's maximum), got {args.top_k}"
    if not 0 <= args.alpha <= 1:
        return f"--alpha: expected a number in [0, 1], got {args.alpha}"
    if not 0 <= args.temperature <= 2:
        return f"--temperature: expected a number in [0, 2], got {args.temperature}"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Toy tool-call task: SFT a teacher, distill a smaller student with KD "
                    "(top-k KL + CE) and train the same student CE-only on the same teacher "
                    "records; print held-out tool-call F1 of all three.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full",
                   help="sizes and steps (full ~10 min, quick ~3 min on 2 cores); the options "
                        "below override single values")
    for key, kind in (("n_train", int), ("n_val", int), ("n_test", int), ("teacher_steps", int),
                      ("student_steps", int), ("batch", int), ("teacher_dims", str),
                      ("student_dims", str)):
        p.add_argument(f"--{key.replace('_', '-')}", type=kind, default=None,
                       help="d_model,n_layers,n_heads,n_kv_heads,d_ff" if "dims" in key else None)
    p.add_argument("--quick", dest="preset", action="store_const", const="quick",
                   help="same as --preset quick")
    p.add_argument("--prompt-tools", choices=("bare", "compact", "full"), default="bare",
                   help="what the prompt says about the tools: nothing (bare: the user message "
                        "only; default), a one-line summary after the task's system prompt "
                        "(compact: ~2x longer rows), or the task's JSON schemas (full: ~14x)")
    p.add_argument("--vocab", type=int, default=1024, help="tokenizer vocabulary (default 1024)")
    p.add_argument("--teacher-lr", type=float, default=3e-3)
    p.add_argument("--student-lr", type=float, default=3e-3)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="teacher sampling temperature for the records (default 1.0)")
    p.add_argument("--top-k", type=int, default=20, help="teacher top-k log-probs (default 20)")
    p.add_argument("--alpha", type=float, default=0.5, help="CE weight of the KD loss")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="completion cap for the teacher's records and for eval (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--student-seeds", type=int, default=1,
                   help="train and score both students with seeds seed, seed+1, ... (init and "
                        "data order) and report mean and range (default 1)")
    p.add_argument("--work", type=Path, help="keep every file here (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    problem = check_args(args)
    if problem:
        p.error(problem)

    mx.random.seed(args.seed)
    if args.work is not None and args.work.exists() and any(args.work.iterdir()):
        p.error(f"--work {args.work}: directory exists and is not empty")
    work = args.work or Path(tempfile.mkdtemp(prefix="kd-vs-sft-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, work)
    except UserError as exc:  # a bad size, config or data: one line, as the CLI does
        p.exit(2, f"{p.prog}: error: {exc}\n")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report(result)
    if args.json:
        from mlx_distill.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
