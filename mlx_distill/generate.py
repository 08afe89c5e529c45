"""Streaming text generation with the KV cache, and the ``mlx-distill generate`` command.

The decode loop follows ``mlx_lm.generate.generate_step``: the prompt is prefilled in chunks, and
the graph for token n+1 is built and handed to ``mx.async_eval`` before token n is read back, so
the device never waits for Python (detokenizing, stop-string checks, the consumer's own work).
Sampling is mlx-lm's (``make_sampler``); with the same seed both give the same tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# Importing this module runs mlx_distill/__init__ first, which enables fast BLAS before mlx.core.
import mlx.core as mx

from mlx_distill.cli import UserError

DEFAULT_PREFILL_STEP_SIZE = 2048
# Free MLX's buffer cache this often while decoding, as mlx-lm does, so memory stays flat.
CLEAR_CACHE_EVERY = 256


@dataclass(frozen=True)
class GeneratedToken:
    """One generated token.

    ``text`` is the new printable text (may be empty while a multi-byte character or a possible
    stop-string prefix is held back). ``logprob`` is the token's log-probability under the model
    (before temperature/top-p/top-k). ``finish_reason`` is set on the last token only: "stop" (an
    eos token, yielded with the remaining text but never decoded, or a stop string, which is cut
    off) or "length" (``max_tokens`` reached).
    """

    token: int
    text: str
    logprob: float
    finish_reason: str | None = None


_generation_stream: Any = None


def _stream() -> Any:
    # A dedicated stream (per thread, as mlx-lm's) keeps generation off the default stream.
    global _generation_stream
    if _generation_stream is None:
        _generation_stream = mx.new_thread_local_stream(mx.default_device())
    return _generation_stream


def _token_ids(model: Any, tokenizer: Any, prompt: str | Sequence[int] | mx.array) -> list[int]:
    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        # As mlx-lm: let the tokenizer add its special tokens unless the text already has them.
        ids = tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
    elif isinstance(prompt, mx.array):
        ids = prompt.reshape(-1).tolist()
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("prompt is empty: nothing to condition the generation on")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and not all(0 <= t < vocab for t in ids):
        bad = next(t for t in ids if not 0 <= t < vocab)
        raise ValueError(f"prompt token id {bad} is outside the model vocabulary (0..{vocab - 1})")
    return ids


def _check_options(max_tokens, temperature, top_p, top_k, stop, prefill_step_size) -> list[str]:
    for name, value in (("max_tokens", max_tokens), ("prefill_step_size", prefill_step_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected 0 < top_p <= 1, got {top_p!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k: expected an integer >= 0 (0: off), got {top_k!r}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop: expected non-empty strings, got {stops!r}")
    return stops


def _decode_tokens(
    model: Any,
    prompt: mx.array,
    sampler: Any,
    max_tokens: int,
    prefill_step_size: int,
) -> Iterator[tuple[int, float]]:
    """Yield (token id, log-probability) pairs, computing one token ahead of the consumer."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)  # model.make_cache() when the model has one (ours does)

    def step(tokens: mx.array) -> tuple[mx.array, mx.array]:
        logits = model(tokens[None], cache)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logprobs)
        return token, mx.take_along_axis(logprobs, token[:, None], axis=-1)

    stream = _stream()
    # The stream is entered only while building graphs, never across a yield: the consumer's own
    # MLX work between tokens stays on its default stream.
    with mx.stream(stream):
        # Prefill all but the last prompt token in chunks: only the cache is evaluated, so the
        # chunk's logits (and the vocabulary projection) are never computed.
        while prompt.size > 1:
            chunk = prompt[: min(prefill_step_size, prompt.size - 1)]
            model(chunk[None], cache)
            mx.eval([c.state for c in cache])
            prompt = prompt[chunk.size:]
            mx.clear_cache()  # free the chunk's activations before the next one (as mlx-lm)
        token, logprob = step(prompt)
        mx.async_eval(token, logprob)
    for n in range(1, max_tokens + 1):
        if n < max_tokens:  # unlike mlx-lm, never compute a token past max_tokens
            with mx.stream(stream):
                next_token, next_logprob = step(token)
                mx.async_eval(next_token, next_logprob)
        yield token.item(), logprob.item()
        if n == max_tokens:
            return
        if n % CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()
        token, logprob = next_token, next_logprob


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop string."""
    for size in range(min(len(text), max(map(len, stops)) - 1), 0, -1):
        tail = text[-size:]
        if any(s.startswith(tail) for s in stops):
            return size
    return 0


def _find_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int] | mx.array,
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
) -> Iterator[GeneratedToken]:
    """Stream tokens for ``prompt`` (text, or token ids) from ``model`` using its KV cache.

    ``temperature == 0`` is greedy; otherwise tokens are sampled (``top_p < 1`` and ``top_k > 0``
    restrict the candidates). ``seed`` seeds MLX's global generator, which makes sampling
    reproducible as long as nothing else draws from it while iterating. Generation ends at one of
    the tokenizer's ``eos_token_ids``, when the text contains a ``stop`` string (the text before
    it is yielded; the stop string itself is not), or after ``max_tokens`` tokens.
    ``tokenizer`` is what :func:`mlx_distill.tokenizer.load_tokenizer` or ``mlx_lm.load`` return.
    """
    from mlx_lm.sample_utils import make_sampler

    from mlx_distill.tokenizer import streaming_detokenizer

    # Checked here, not at the first next(): bad arguments fail where generate() is called.
    stops = _check_options(max_tokens, temperature, top_p, top_k, stop, prefill_step_size)
    ids = _token_ids(model, tokenizer, prompt)
    sampler = make_sampler(temp=temperature, top_p=top_p, top_k=top_k)
    eos_ids = getattr(tokenizer, "eos_token_ids", None)
    if eos_ids is None:  # a plain transformers tokenizer rather than mlx-lm's wrapper
        eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos_ids = set(eos_ids)
    tokens = _decode_tokens(model, mx.array(ids), sampler, max_tokens, prefill_step_size)
    return _with_text(tokens, streaming_detokenizer(tokenizer), eos_ids, stops, max_tokens, seed)


def _with_text(
    tokens: Iterator[tuple[int, float]],
    detokenizer: Any,
    eos_ids: set[int],
    stops: list[str],
    max_tokens: int,
    seed: int | None,
) -> Iterator[GeneratedToken]:
    if seed is not None:
        # mlx-lm's samplers draw from MLX's global generator; seeding it (as `mlx_lm.generate
        # --seed` does) makes the tokens reproducible, and equal to mlx-lm's for the same seed.
        mx.random.seed(seed)
    pending = ""  # decoded text not yet yielded: a possible stop-string prefix
    for n, (token, logprob) in enumerate(tokens, start=1):
        is_eos = token in eos_ids
        if not is_eos:  # eos ends the text; it is never decoded (as mlx-lm)
            detokenizer.add_token(token)
        last = is_eos or n == max_tokens
        if last:
            detokenizer.finalize()
        pending += detokenizer.last_segment
        cut = _find_stop(pending, stops) if stops else -1
        if cut >= 0:
            yield GeneratedToken(token, pending[:cut], logprob, "stop")
            return
        if last:
            yield GeneratedToken(token, pending, logprob, "stop" if is_eos else "length")
            return
        keep = _held_back(pending, stops) if stops else 0
        text, pending = pending[: len(pending) - keep], pending[len(pending) - keep:]
        yield GeneratedToken(token, text, logprob)


def generate_text(model: Any, tokenizer: Any, prompt: str | Sequence[int], **kwargs: Any) -> str:
    """The whole generated text; keyword arguments as :func:`generate`."""
    return "".join(t.text for t in generate(model, tokenizer, prompt, **kwargs))


# ---- command line ----

def _cmd_generate(args: argparse.Namespace) -> int:
    from mlx_distill.checkpoint import load_checkpoint
    from mlx_distill.tokenizer import load_tokenizer

    model = load_checkpoint(args.ckpt_dir)
    tokenizer = load_tokenizer(args.ckpt_dir)
    if args.chat:
        if not getattr(tokenizer, "has_chat_template", False):
            raise UserError(f"{args.ckpt_dir}: --chat needs a tokenizer with a chat template")
        messages = [{"role": "user", "content": args.prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    else:
        ids = tokenizer.encode(args.prompt)
    start = time.perf_counter()
    first = None
    count, finish = 0, None
    try:
        for item in generate(
            model, tokenizer, ids, max_tokens=args.max_tokens, temperature=args.temperature,
            top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
        ):
            if first is None:
                first = time.perf_counter()
            count, finish = count + 1, item.finish_reason
            sys.stdout.write(item.text)
            sys.stdout.flush()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    end = time.perf_counter()
    sys.stdout.write("\n")
    # Decode rate as mlx-lm reports it: tokens after the first over the time after the first.
    decode_tps = (count - 1) / (end - first) if count > 1 and end > first else 0.0
    print(
        f"prompt: {len(ids)} tokens, {len(ids) / (first - start):.1f} tok/s | "
        f"generated: {count} tokens, {decode_tps:.1f} tok/s | finish: {finish}",
        file=sys.stderr,
    )
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from a checkpoint",
        description=(
            "Generate text from a checkpoint directory (ours or any mlx-lm/HF Llama-family "
            "float checkpoint with tokenizer files), streaming it to stdout; a one-line summary "
            "(prompt tokens, generated tokens, tok/s) goes to stderr. Greedy by default."
        ),
        epilog='example: mlx-distill generate runs/student --chat --prompt "Hi!"',
    )
    parser.add_argument("ckpt_dir", metavar="CKPT_DIR", help="checkpoint directory")
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="prompt text")
    parser.add_argument(
        "--chat", action="store_true",
        help="wrap the prompt as a user message with the chat template and start the reply",
    )
    parser.add_argument(
        "--max-tokens", type=_positive_int, default=256, metavar="N",
        help="most tokens to generate (default %(default)s)",
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, metavar="T",
        help="sampling temperature; 0 is greedy (default %(default)s)",
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, metavar="P",
        help="nucleus sampling: keep the smallest set of tokens with this total probability "
        "(default %(default)s: off)",
    )
    parser.add_argument(
        "--top-k", type=int, default=0, metavar="K",
        help="sample only among the K most likely tokens (default %(default)s: off)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, metavar="S", help="random seed for reproducible sampling"
    )
    parser.add_argument(
        "--stop", nargs="+", default=None, metavar="STR",
        help="stop when the text contains any of these strings (not printed)",
    )
    parser.set_defaults(func=_cmd_generate)
