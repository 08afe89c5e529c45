"""The MLX backend: a checkpoint's model with its KV cache, sampled as ``mlx_distill.generate``
samples (mlx-lm's sampler, MLX's global generator seeded per request), so unconstrained output
equals ``mlx-distill generate`` token for token for the same seed.

Unconstrained, the graph for token n+1 is built and evaluated asynchronously before token n is
read back, as ``generate`` does. With a tool-call mask that is impossible (the mask for token
n+1 depends on token n), so each step is evaluated before the next is built.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import mlx.core as mx

from mlx_distill.generate import CLEAR_CACHE_EVERY, DEFAULT_PREFILL_STEP_SIZE, _stream
from mlx_distill.runtime.base import LocalBackend
from mlx_distill.runtime.types import Sampling

MLX_LABEL = "mlx"


class MLXBackend(LocalBackend):
    """``model`` (ours or an mlx-lm model) and its tokenizer (``load_tokenizer``)."""

    def __init__(self, model: Any, tokenizer: Any, label: str = MLX_LABEL,
                 prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE):
        # Ours keeps it in .config, mlx-lm's models in .args; a padded vocabulary exceeds the
        # tokenizer's, and the mask must cover every logit.
        settings = getattr(model, "config", None) or getattr(model, "args", None)
        vocab = getattr(settings, "vocab_size", None) or len(tokenizer)
        super().__init__(tokenizer, vocab, label)
        self.model = model
        self.prefill_step_size = prefill_step_size

    @classmethod
    def from_dir(cls, ckpt_dir: str | os.PathLike, **kwargs: Any) -> MLXBackend:
        """A checkpoint directory with tokenizer files (CheckpointError / TokenizerError, one
        line each, for a bad one)."""
        from mlx_distill.checkpoint import load_checkpoint
        from mlx_distill.tokenizer import load_tokenizer

        model = load_checkpoint(ckpt_dir)
        return cls(model, load_tokenizer(ckpt_dir), label=f"{MLX_LABEL} ({ckpt_dir})", **kwargs)

    def _tokens(self, ids: list[int], sampling: Sampling, mask: Any,
                limit: int) -> Iterator[tuple[int, float]]:
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.sample_utils import make_sampler

        if sampling.seed is not None:
            mx.random.seed(sampling.seed)  # before any graph draws from the global generator
        sampler = make_sampler(temp=sampling.temperature, top_p=sampling.top_p,
                               top_k=sampling.top_k)
        cache = make_prompt_cache(self.model)

        def step(tokens: mx.array) -> tuple[mx.array, mx.array]:
            logits = self.model(tokens[None], cache)[:, -1, :]
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            scores = logprobs
            if mask is not None:
                scores = mx.where(mx.array(mask.allowed()), logprobs, -mx.inf)
            token = sampler(scores)
            return token, mx.take_along_axis(logprobs, token[:, None], axis=-1)

        stream = _stream()
        prompt = mx.array(ids)
        # As generate: the stream is entered only while building graphs, never across a yield.
        with mx.stream(stream):
            while prompt.size > 1:  # prefill all but the last token; only the cache is evaluated
                chunk = prompt[: min(self.prefill_step_size, prompt.size - 1)]
                self.model(chunk[None], cache)
                mx.eval([c.state for c in cache])
                prompt = prompt[chunk.size:]
                mx.clear_cache()
        if mask is None:
            yield from _pipelined(step, prompt, limit, stream)
            return
        for _ in range(limit):
            with mx.stream(stream):
                token, logprob = step(prompt)
                mx.eval(token, logprob)
            value = token.item()
            mask.advance(value)
            yield value, logprob.item()
            prompt = token


def _pipelined(step, prompt: mx.array, limit: int, stream: Any) -> Iterator[tuple[int, float]]:
    """Token n+1's graph is built and handed to ``async_eval`` before token n is read back."""
    with mx.stream(stream):
        token, logprob = step(prompt)
        mx.async_eval(token, logprob)
    for n in range(1, limit + 1):
        if n < limit:  # never compute a token past the limit
            with mx.stream(stream):
                next_token, next_logprob = step(token)
                mx.async_eval(next_token, next_logprob)
        yield token.item(), logprob.item()
        if n == limit:
            return
        if n % CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()
        token, logprob = next_token, next_logprob
