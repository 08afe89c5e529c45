"""Length-bucketed batches: layout, causal consistency with the model, order, resume, curriculum,
data-parallel shards, and the ``data stats`` command."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import random_model, tiny_config

from mlx_distill import cli
from mlx_distill.data import (
    BATCH_KEYS,
    SUPERVISED_KEYS,
    BatchLoader,
    DataError,
    TokenVocab,
    encode_kd_record,
    encode_sft_example,
    linear_curriculum,
    split_validation,
)
from mlx_distill.data.batches import assign_buckets
from mlx_distill.teacher.records import build_record, dump_record
from mlx_distill.teacher.types import ChatRequest, Completion, TokenLogprob
from mlx_distill.tokenizer import load_tokenizer, train_tokenizer

CORPUS = Path(__file__).parent.parent / "mlx_distill" / "data" / "tiny_corpus.txt"
SHAPES = (48, 96, 160)
LINES = [line for line in CORPUS.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return train_tokenizer([CORPUS], 400, root / "tokenizer")


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def vocab(tok):
    return TokenVocab(tok)


def record(i: int, n_lines: int, vocab: TokenVocab, tok) -> dict:
    """A KD record whose teacher sampled the canonical tokens of a ``n_lines``-line answer."""
    text = " ".join(LINES[i % len(LINES): i % len(LINES) + n_lines])
    ids = tok.encode(text + "<|im_end|>", add_special_tokens=False)
    tokens = [TokenLogprob(vocab.bytes_of(t).decode("utf-8", "replace"), -0.5,
                           [(vocab.bytes_of(t).decode("utf-8", "replace"), -0.5), ("is", -2.0)],
                           bytes=list(vocab.bytes_of(t))) for t in ids]
    completion = Completion(text=text, tokens=tokens, finish_reason="stop")
    return build_record(f"r{i}", ChatRequest(messages=[{"role": "user", "content": f"Zen {i}?"}]),
                        completion.to_dict(), model="t", base_host="h", cost_usd=0.0, created=1.0)


@pytest.fixture(scope="module")
def examples(tok, vocab):
    out = [encode_kd_record(record(i, 1 + i % 7, vocab, tok), tok, vocab) for i in range(22)]
    out.append(encode_sft_example({"messages": [{"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "Hello."}]},
                                  tok, vocab, example_id="sft-0"))
    return out


def as_numpy(batch):
    return {k: np.array(v) for k, v in batch.items()}


def test_each_example_goes_to_the_smallest_shape_that_holds_it(examples):
    buckets, report = assign_buckets(examples, SHAPES, "truncate")
    lengths = [e.length for e in examples]
    assert len({s for s in SHAPES if buckets[s]}) >= 2  # the fixture spans several buckets
    for shape in SHAPES:
        for index in buckets[shape]:
            fits = [s for s in SHAPES if s >= lengths[index]]
            assert shape == (fits[0] if fits else SHAPES[-1])
    assert sum(report.examples.values()) + len(report.rejected) == len(examples)
    # A smaller largest shape truncates or rejects the long ones, counted.
    _, small = assign_buckets(examples, (40,), "truncate")
    long = [e for e in examples if e.length > 40]
    assert small.truncated + len(small.rejected) == len(long) > 0
    assert small.truncated_tokens == sum(e.length - 40 for e in long
                                         if e.id not in small.rejected)
    _, rejected = assign_buckets(examples, (40,), "reject")
    assert sorted(rejected.rejected) == sorted(e.id for e in long)


def test_batches_hold_example_rows_with_next_token_targets(examples):
    loader = BatchLoader(examples, shapes=SHAPES, batch_size=4, seed=3)
    plan = loader.epoch_plan(0)
    for shape, members in plan:
        batch = as_numpy(next(loader))
        assert set(batch) == set(BATCH_KEYS) | set(SUPERVISED_KEYS)
        assert batch["inputs"].shape == (4, shape) and batch["inputs"].dtype == np.int32
        assert batch["top_ids"].shape == (4, shape, loader.k)
        assert batch["top_logprobs"].dtype == np.float32 and batch["loss_mask"].dtype == np.float32
        for row, index in enumerate(members):
            expected = examples[index].arrays(shape, loader.k, loader.pad_id)
            for key in BATCH_KEYS:
                assert np.array_equal(batch[key][row], expected[key]), key
            # At every loss position followed by a real input, the target is that input.
            at = np.flatnonzero(batch["loss_mask"][row])
            at = at[at + 1 < min(examples[index].length, shape)]
            assert len(at) > 0
            assert np.array_equal(batch["targets"][row][at], batch["inputs"][row][at + 1])
        for row in range(len(members), 4):  # filler rows carry no loss
            for key in ("loss_mask", "kd_mask", "tool_mask"):
                assert batch[key][row].sum() == 0
    assert loader.epoch == 1 and loader.cursor == 0


def test_later_tokens_never_change_earlier_logits(examples, tok):
    loader = BatchLoader(examples, shapes=SHAPES, batch_size=3, shuffle=False)
    batch = next(loader)
    model = random_model(tiny_config(vocab_size=len(tok)))
    inputs = np.array(batch["inputs"])
    logits = np.array(model(mx.array(inputs)))
    j = inputs.shape[1] // 2
    changed = inputs.copy()
    changed[:, j:] = (changed[:, j:] + 7) % len(tok)
    new_logits = np.array(model(mx.array(changed)))
    np.testing.assert_allclose(new_logits[:, :j], logits[:, :j], rtol=0, atol=1e-5)
    assert not np.allclose(new_logits[:, j], logits[:, j], atol=1e-3)


def test_each_epoch_covers_every_example_once_in_a_seeded_order(examples):
    def order(seed, epoch):
        loader = BatchLoader(examples, shapes=SHAPES, batch_size=4, seed=seed)
        return [int(i) for _, members in loader.epoch_plan(epoch) for i in members]

    assert sorted(order(0, 0)) == list(range(len(examples)))
    assert order(0, 0) == order(0, 0) and order(0, 1) != order(0, 0)
    assert order(1, 0) != order(0, 0)
    unshuffled = BatchLoader(examples, shapes=SHAPES, batch_size=4, shuffle=False)
    eval_rows = sum(int(b["loss_mask"].sum(axis=1).astype(mx.bool_).sum())
                    for b in unshuffled.iterate_once())
    assert eval_rows == len(examples) and unshuffled.step == 0


def test_restoring_the_position_replays_the_same_batches(examples):
    options = dict(shapes=SHAPES, batch_size=4, seed=7, curriculum=[(0, 48), (5, 1000)])
    first = BatchLoader(examples, **options)
    for _ in range(3):
        next(first)
    saved = json.loads(json.dumps(first.state_dict()))
    expected = [as_numpy(next(first)) for _ in range(first.batches_per_epoch + 6)]
    resumed = BatchLoader(examples, **options)
    resumed.load_state_dict(saved)
    for batch in expected:  # through the curriculum's end and an epoch boundary
        got = as_numpy(next(resumed))
        for key in BATCH_KEYS:
            assert np.array_equal(got[key], batch[key]), key
    other = BatchLoader(examples, **{**options, "seed": 8})
    with pytest.raises(DataError, match="other data or batching"):
        other.load_state_dict(saved)
    with pytest.raises(DataError, match="data position: expected"):
        other.load_state_dict({"step": 1})


def test_curriculum_widens_from_the_smallest_bucket(examples):
    schedule = linear_curriculum(SHAPES, 30)
    assert schedule == [(0, 48), (10, 96), (20, 160)]
    loader = BatchLoader(examples, shapes=SHAPES, batch_size=2, curriculum=schedule)
    widths = [next(loader)["inputs"].shape[1] for _ in range(20)]
    assert set(widths[:10]) == {48}
    assert set(widths[10:]) <= {48, 96} and 96 in widths[10:]
    # Curriculum batches are drawn, not consumed: the first epoch starts at step 20, whole.
    assert (loader.step, loader.epoch, loader.cursor) == (20, 0, 0)
    epoch = [next(loader)["inputs"].shape[1] for _ in range(loader.batches_per_epoch)]
    assert epoch == [shape for shape, _ in loader.epoch_plan(0)]
    assert set(epoch) == {s for s in SHAPES if loader.buckets[s]} and loader.epoch == 1


def test_data_parallel_ranks_split_the_global_batch(examples):
    whole = BatchLoader(examples, shapes=SHAPES, batch_size=4, seed=2)
    ranks = [BatchLoader(examples, shapes=SHAPES, batch_size=4, seed=2, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(3):
        full = as_numpy(next(whole))
        parts = [as_numpy(next(r)) for r in ranks]
        for key in BATCH_KEYS:
            assert np.array_equal(np.concatenate([p[key] for p in parts]), full[key])
    with pytest.raises(DataError, match="split evenly"):
        BatchLoader(examples, shapes=SHAPES, batch_size=3, world_size=2)


def test_validation_split_is_stable(examples):
    train, val = split_validation(examples, 0.2, seed=0)
    assert len(train) + len(val) == len(examples) and val
    again_train, again_val = split_validation(list(reversed(examples)), 0.2, seed=0)
    assert {e.id for e in again_val} == {e.id for e in val}


def test_data_stats_command(tok, vocab, tok_dir, tmp_path, capsys, monkeypatch):
    if "mlx_distill.data.stats" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES,
                                                     "mlx_distill.data.stats"])
    good = [dump_record(record(i, 1 + i % 7, vocab, tok)) for i in range(8)]
    path = tmp_path / "kd.jsonl"
    path.write_text("".join(good) + "{broken\n")
    args = ["data", "stats", str(path), "--tokenizer", str(tok_dir), "--shapes", "48,96,160",
            "--max-bad-fraction", "0.2"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "records: 9  used: 8 (kd 8, sft 0)  bad: 1" in out
    assert "invalid JSON: 1" in out and "kd.jsonl:9" in out
    assert "alignment coverage: 100.00%" in out
    assert "batches per epoch:" in out and "    48:" in out
    assert cli.main(args[:-1] + ["0.1"]) == 2
    captured = capsys.readouterr()
    assert "records:" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "1 of 9 records are bad" in err[0]
