"""Builders for the trainer tests: a tokenizer, KD records and batches in the documented format."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import yaml

from mlx_distill.data import TokenVocab, render_turn
from mlx_distill.teacher.records import build_record
from mlx_distill.teacher.types import ChatRequest, Completion, TokenLogprob
from mlx_distill.tokenizer import load_tokenizer, train_tokenizer

CORPUS = Path(__file__).parent.parent / "mlx_distill" / "data" / "tiny_corpus.txt"
SENTENCES = [s.strip() for s in CORPUS.read_text().replace("\n", " ").split(".") if s.strip()]


def make_tokenizer(root: Path, vocab_size: int = 400) -> Path:
    return train_tokenizer([CORPUS], vocab_size, root / "tokenizer")


def kd_records(tokenizer_dir: Path, n: int, seed: int = 0, k: int = 4) -> list[dict]:
    """``n`` KD records: a question about a corpus sentence answered with the next sentence.

    The teacher "sampled" the student tokenizer's canonical tokens, each with logprob -0.3 and
    ``k - 1`` seeded alternatives, so alignment is exact and every completion token has top-k.
    """
    tok = load_tokenizer(tokenizer_dir)
    vocab = TokenVocab(tok)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        j = int(rng.integers(0, len(SENTENCES) - 1))
        messages = [{"role": "user", "content": f"Continue: {SENTENCES[j][:60]}"}]
        text = SENTENCES[j + 1][:80] + "."
        _, completion = render_turn(tok, vocab, messages, None,
                                    {"role": "assistant", "content": text})
        tokens = []
        for token_id in completion:
            data = vocab.bytes_of(int(token_id))
            alts = rng.choice(len(vocab.table), size=k - 1, replace=False)
            top = [(data.decode("utf-8", "replace"), -0.3)]
            for m, alt in enumerate(alts):
                alt_bytes = vocab.bytes_of(int(alt))
                if alt_bytes and alt_bytes != data:
                    top.append((alt_bytes.decode("utf-8", "replace"), -2.0 - m))
            tokens.append(TokenLogprob(data.decode("utf-8", "replace"), -0.3, top,
                                       bytes=list(data)))
        done = Completion(text=text, finish_reason="stop", tokens=tokens)
        records.append(build_record(f"r{i}", ChatRequest(messages=messages), done.to_dict(),
                                    model="teacher", base_host="localhost", cost_usd=0.0,
                                    created=1.0))
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def toy_config(root: Path, tokenizer_dir: Path, data: Path, **sections) -> dict:
    """A small fp32 config dict (toy size) for CLI runs; ``sections`` override per section."""
    config = {
        "out": str(root / "run"),
        "student": {"size": "toy", "tokenizer": str(tokenizer_dir)},
        "data": {"train": [str(data)], "batch_size": 4, "shapes": [48, 96], "val_fraction": 0.1},
        "teacher": {"mode": "offline"},
        "loss": {"kind": "forward_kl", "alpha": 0.5},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "grad_clip": 1.0},
        "train": {"steps": 10, "checkpoint_every": 4, "keep_last": 2, "seed": 0,
                  "progress": False, "plot": False},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def random_batch(rng: np.random.Generator, rows: int, length: int, vocab: int, k: int = 4,
                 prompt: int = 5) -> dict[str, mx.array]:
    """A batch in the data module's dict format: prompt positions masked, sparse top-k teacher
    (distinct ids, -inf padding on some rows), a tool span, uneven completion lengths."""
    inputs = rng.integers(0, vocab, (rows, length)).astype(np.int32)
    targets = np.concatenate([inputs[:, 1:], rng.integers(0, vocab, (rows, 1))], 1).astype(
        np.int32)
    loss_mask = np.zeros((rows, length), np.float32)
    for r in range(rows):
        end = int(rng.integers(prompt + 1, length + 1))
        loss_mask[r, prompt - 1:end] = 1.0
    kd_mask = loss_mask * (rng.random((rows, length)) > 0.2)
    tool_mask = np.zeros((rows, length), np.float32)
    tool_mask[:, prompt + 1:prompt + 4] = 1.0
    top_ids = np.stack([[rng.choice(vocab, k, replace=False) for _ in range(length)]
                        for _ in range(rows)]).astype(np.int32)
    logits = rng.normal(size=(rows, length, k)) * 2
    top_lp = (logits - np.log(np.exp(logits).sum(-1, keepdims=True) * 1.25)).astype(np.float32)
    top_lp[:, :, -1][rng.random((rows, length)) > 0.5] = -np.inf
    return {k_: mx.array(v) for k_, v in {
        "inputs": inputs, "targets": targets, "loss_mask": loss_mask, "kd_mask": kd_mask,
        "tool_mask": tool_mask, "top_ids": top_ids, "top_logprobs": top_lp}.items()}


def concat_batches(batches: list[dict[str, mx.array]]) -> dict[str, mx.array]:
    return {k: mx.concatenate([b[k] for b in batches], axis=0) for k in batches[0]}


class ListSource:
    """A fixed list of batches with a resumable position, as the trainer expects."""

    def __init__(self, batches: list[dict]):
        self.batches, self.position = batches, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
