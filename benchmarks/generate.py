"""Decode speed: ``mlx_distill.generate`` vs ``mlx_lm.stream_generate`` on the same checkpoint.

Builds a checkpoint in a temporary directory (random weights, a byte-level BPE tokenizer trained
on generated text), loads it twice — with ``mlx_distill`` (our model + our loop) and with
``mlx_lm.load`` (mlx-lm's Llama + mlx-lm's loop) — and times greedy decoding of the same prompt
ids for the same number of tokens. EOS is disabled for both, and every run is checked to produce
exactly ``--tokens`` tokens. After a warmup of each, runs alternate (order reversed every
repeat). A run's rate is (tokens - 1) / (time from first token to last), as mlx-lm reports its
generation tok/s; the table shows medians, and the ratio is the median over repeats of
ours / mlx-lm for the two runs of the same repeat. A third row runs our loop on mlx-lm's model,
which separates the generation loop from the model implementation.

    .venv/bin/python benchmarks/generate.py [--tokens 64] [--repeats 7] [--no-cross]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx_distill  # noqa: F401  (must precede mlx.core: interposes OpenBLAS on Linux)

# isort: split
import mlx.core as mx

from mlx_distill.checkpoint import load_checkpoint, save_checkpoint
from mlx_distill.config import ModelConfig
from mlx_distill.generate import generate
from mlx_distill.model import Model, num_parameters
from mlx_distill.tokenizer import load_tokenizer, train_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare decode tok/s of mlx_distill.generate and mlx_lm.stream_generate "
        "on one randomly initialised checkpoint (greedy, EOS ignored, same prompt and length).",
    )
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=1408)
    parser.add_argument("--vocab", type=int, default=8192, help="tokenizer target vocabulary")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in tokens")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per run")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per implementation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-cross", action="store_true", help="skip the row running our loop on mlx-lm's model"
    )
    return parser.parse_args(argv)


def write_corpus(path: Path, seed: int, n_lines: int = 20_000) -> None:
    """Pseudo-words from random syllables: enough distinct merges for an 8k vocabulary."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["é", "ß", "日本", "😀"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(6000)]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_lines):
            f.write(" ".join(rng.choices(words, k=rng.randint(5, 15))) + ".\n")


def build_checkpoint(args: argparse.Namespace, root: Path) -> tuple[Path, ModelConfig]:
    corpus = root / "corpus.txt"
    write_corpus(corpus, args.seed)
    tok_dir = train_tokenizer([corpus], args.vocab, root / "tokenizer")
    vocab_size = len(load_tokenizer(tok_dir))
    config = ModelConfig(
        d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
        n_kv_heads=args.kv_heads, d_ff=args.d_ff, vocab_size=vocab_size,
        max_seq_len=max(2048, args.prompt_tokens + args.tokens + 1),
    )
    mx.random.seed(args.seed)
    model = Model(config)
    mx.eval(model.parameters())
    return save_checkpoint(model, root / "ckpt", tokenizer_dir=tok_dir), config


def time_run(stream, expected: int) -> float:
    """Decode tok/s of one run of a token stream (objects with ``.token``)."""
    count, first = 0, None
    for _ in stream:
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    if count != expected:
        raise RuntimeError(f"generated {count} tokens, expected {expected}: EOS not disabled?")
    return (count - 1) / (end - first)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tokens < 2:
        print("--tokens must be at least 2", file=sys.stderr)
        return 2
    import mlx_lm

    with tempfile.TemporaryDirectory(prefix="mlx-distill-bench-") as tmp:
        t0 = time.perf_counter()
        ckpt, config = build_checkpoint(args, Path(tmp))
        ours_model, ours_tok = load_checkpoint(ckpt), load_tokenizer(ckpt)
        lm_model, lm_tok = mlx_lm.load(str(ckpt))
        # Random weights emit EOS at random: disable it on both so every run has equal length.
        ours_tok.eos_token_ids = set()
        lm_tok.eos_token_ids = set()
        rng = random.Random(args.seed)
        prompt = [rng.randrange(20, config.vocab_size) for _ in range(args.prompt_tokens)]
        n = args.tokens

        runs = {
            "mlx_distill.generate": lambda: generate(ours_model, ours_tok, prompt, max_tokens=n),
            "mlx_lm.stream_generate": lambda: mlx_lm.stream_generate(
                lm_model, lm_tok, prompt, max_tokens=n
            ),
        }
        if not args.no_cross:
            runs["mlx_distill.generate on mlx-lm model"] = lambda: generate(
                lm_model, lm_tok, prompt, max_tokens=n
            )
        # The first run of each doubles as its warmup (graph caches, allocator, page faults).
        ours = [t.token for t in generate(ours_model, ours_tok, prompt, max_tokens=n)]
        theirs = [r.token for r in mlx_lm.stream_generate(lm_model, lm_tok, prompt, max_tokens=n)]
        same = "identical" if ours == theirs else "DIFFERENT"
        if not args.no_cross:
            time_run(runs["mlx_distill.generate on mlx-lm model"](), n)
        rates: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for repeat in range(args.repeats):
            # Alternate the order every repeat so slow drifts of the machine hit both sides.
            for name in names if repeat % 2 == 0 else names[::-1]:
                rates[name].append(time_run(runs[name](), n))
        total_s = time.perf_counter() - t0

    print(
        f"model: d_model {config.d_model}, {config.n_layers} layers, {config.n_heads} heads "
        f"({config.n_kv_heads} kv), d_ff {config.d_ff}, vocab {config.vocab_size}, "
        f"{num_parameters(ours_model) / 1e6:.1f}M params, fp32, device {mx.default_device()}"
    )
    print(f"prompt {len(prompt)} tokens, {n} generated (greedy), {args.repeats} repeats; "
          f"greedy tokens ours vs mlx-lm: {same}")
    print(f"{'implementation':40s} {'median tok/s':>12s} {'min':>8s} {'max':>8s}")
    for name, values in rates.items():
        print(f"{name:40s} {statistics.median(values):12.1f} {min(values):8.1f} {max(values):8.1f}")
    # Ratio of each ours/mlx-lm pair (adjacent in time, so they share the machine's state).
    paired = [a / b for a, b in zip(rates["mlx_distill.generate"],
                                    rates["mlx_lm.stream_generate"], strict=True)]
    print(f"ratio ours/mlx-lm (decode tok/s, median of {len(paired)} paired runs): "
          f"{statistics.median(paired):.3f} (goal >= 1.0)  [{total_s:.0f} s total]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
