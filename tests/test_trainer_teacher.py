"""Teachers during training: a local checkpoint (dense / top-k on the fly) and on-policy samples
scored locally or by the teacher server over loopback HTTP."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from helpers import random_model, tiny_config
from trainer_helpers import (
    ListSource,
    kd_records,
    make_tokenizer,
    random_batch,
    toy_config,
    write_jsonl,
)

from mlx_distill.checkpoint import save_checkpoint
from mlx_distill.data import TokenVocab, load_dataset
from mlx_distill.teachers_local import LocalTeacher, OnPolicy, RemoteScorer, TeacherError
from mlx_distill.tokenizer import load_tokenizer, train_tokenizer
from mlx_distill.train_config import config_from_dict
from mlx_distill.train_run import TrackingLoader, read_conversations, run_training
from mlx_distill.trainer import Trainer


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    tokenizer_dir = make_tokenizer(root)
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab = len(tokenizer.get_vocab())
    teacher = random_model(tiny_config(vocab_size=vocab, d_model=96, n_layers=3), seed=11)
    save_checkpoint(teacher, root / "teacher", tokenizer_dir=tokenizer_dir)
    return root, tokenizer_dir, tokenizer, vocab, teacher


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def dense_kl(teacher, student, batch):
    """Mean KL(teacher || student) over supervised positions, in float64 numpy."""
    lp, lq = (log_softmax(np.array(m(batch["inputs"]))) for m in (teacher, student))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    mask = np.array(batch["loss_mask"])
    return float((kl * mask).sum() / mask.sum())


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_local_teacher_dense_kd_pulls_the_student_to_the_teacher(env, tmp_path, kind):
    root, _, tokenizer, vocab, teacher = env
    config = config_from_dict({
        "out": str(tmp_path / "run"), "student": {"size": "toy", "tokenizer": "unused"},
        "data": {"train": ["unused"]},
        "teacher": {"mode": "local", "model": str(root / "teacher")},
        "loss": {"kind": kind, "alpha": 0.0, "beta": 0.5},
        "optim": {"lr": 1e-2, "grad_clip": 1.0},
        "train": {"steps": 30, "progress": False, "plot": False, "compile": False},
    })
    local = LocalTeacher(root / "teacher", tokenizer, vocab)
    student = random_model(tiny_config(vocab_size=vocab), seed=12)
    rng = np.random.default_rng(0)
    train = [random_batch(rng, 4, 20, vocab) for _ in range(2)]
    before = [dense_kl(teacher, student, b) for b in train]
    trainer = Trainer(config, student, ListSource(train),
                      prepare=lambda batch, step, micro: local.annotate(batch))
    records = [trainer.step() for _ in range(30)]
    after = [dense_kl(teacher, student, b) for b in train]
    assert max(a / b for a, b in zip(after, before, strict=True)) < 0.5, (before, after)
    assert records[-1]["kd"] < records[0]["kd"]
    assert records[0]["n_kd_tokens"] == records[0]["n_tokens"]  # teacher everywhere supervised


def test_local_teacher_top_k_on_the_fly_and_vocab_padding(env, tmp_path):
    root, tokenizer_dir, tokenizer, vocab, teacher = env
    padded = random_model(tiny_config(vocab_size=vocab + 5), seed=13)
    save_checkpoint(padded, tmp_path / "padded", tokenizer_dir=tokenizer_dir)
    batch = random_batch(np.random.default_rng(1), 2, 10, vocab)
    local = LocalTeacher(tmp_path / "padded", tokenizer, vocab, top_k=6)
    out = local.annotate(batch)
    expected = log_softmax(np.array(padded(batch["inputs"]))[..., :vocab])
    want_ids = np.argsort(-expected, axis=-1)[..., :6]
    got_ids, got_lp = np.array(out["top_ids"]), np.array(out["top_logprobs"])
    order = np.argsort(-got_lp, axis=-1)
    np.testing.assert_array_equal(np.take_along_axis(got_ids, order, -1), want_ids)
    np.testing.assert_allclose(np.take_along_axis(got_lp, order, -1),
                               np.take_along_axis(expected, want_ids, -1), atol=1e-5)
    np.testing.assert_array_equal(np.array(out["kd_mask"]), np.array(batch["loss_mask"]))

    dense = LocalTeacher(tmp_path / "padded", tokenizer, vocab).annotate(batch)
    assert "top_ids" not in dense and dense["teacher_logits"].shape == (2, 10, vocab)


def test_local_teacher_with_another_tokenizer_is_refused_in_one_line(env, tmp_path):
    root, _, tokenizer, vocab, _ = env
    other_dir = train_tokenizer([root / "tokenizer" / "tokenizer.json"], 300, tmp_path / "tok")
    other = random_model(tiny_config(vocab_size=len(load_tokenizer(other_dir).get_vocab())))
    save_checkpoint(other, tmp_path / "other", tokenizer_dir=other_dir)
    with pytest.raises(TeacherError) as err:
        LocalTeacher(tmp_path / "other", tokenizer, vocab)
    assert "\n" not in str(err.value) and str(err.value).startswith("teacher.model:")
    assert "different tokenizer" in str(err.value)


def greedy(model, prompt, n, eos):
    """Reference decode: a full forward over the growing sequence, argmax each time."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(np.array(model(mx.array([ids]))[0, -1]))))
        if ids[-1] in eos:
            break
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def records_batch(env):
    root, _, tokenizer, _, _ = env
    data = write_jsonl(root / "kd.jsonl", kd_records(root / "tokenizer", 12))
    dataset = load_dataset([data], tokenizer)
    loader = TrackingLoader(dataset.examples, shapes=[96], batch_size=3, seed=0)
    return data, next(loader), loader.last_rows


def test_on_policy_rows_are_the_students_own_continuations(env, records_batch):
    root, _, tokenizer, vocab, _ = env
    _, batch, rows = records_batch
    student = random_model(tiny_config(vocab_size=vocab), seed=14)
    on_policy = OnPolicy(student, tokenizer, fraction=1.0, max_new_tokens=12, temperature=0.0,
                         seed=0, pad_id=1)
    out = on_policy.resample(batch, rows)
    eos = set(tokenizer.eos_token_ids)
    for r, example in enumerate(rows):
        p = example.prompt_len
        inputs, targets = np.array(out["inputs"][r]), np.array(out["targets"][r])
        mask = np.array(out["loss_mask"][r])
        n = int(mask.sum())
        assert list(inputs[:p]) == list(example.ids[:p])  # the record's prompt, untouched
        assert np.flatnonzero(mask).tolist() == list(range(p - 1, p - 1 + n))
        sample = targets[p - 1:p - 1 + n].tolist()
        assert sample == greedy(student, example.ids[:p].tolist(), 12, eos)
        assert list(inputs[p:p - 1 + n]) == sample[:-1]
    chosen = [OnPolicy(student, tokenizer, 0.3, 8, 1.0, 5, 1).chosen(s, m)
              for s in range(200) for m in range(2)]
    assert 0.2 < np.mean(chosen) < 0.4
    assert chosen == [OnPolicy(student, tokenizer, 0.3, 8, 1.0, 5, 1).chosen(s, m)
                      for s in range(200) for m in range(2)]


def test_remote_scoring_through_the_teacher_server_equals_local_scoring(env, records_batch):
    from mlx_distill.teacher.server import serve_in_thread

    root, _, tokenizer, vocab, _ = env
    data, batch, rows = records_batch
    url, stop = serve_in_thread(root / "teacher")
    try:
        conversations = read_conversations([str(data)])
        scorer = RemoteScorer(url, 5, 60, TokenVocab(tokenizer))
        student = random_model(tiny_config(vocab_size=vocab), seed=15)
        on_policy = OnPolicy(student, tokenizer, 1.0, 10, 0.0, 0, 1, remote=scorer,
                             conversation=conversations.__getitem__)
        remote = on_policy.resample(batch, rows)
        scorer.close()
    finally:
        stop()
    local = LocalTeacher(root / "teacher", tokenizer, vocab, top_k=5).annotate(
        {k: v for k, v in remote.items()})
    mask = np.array(remote["kd_mask"]) > 0
    assert mask.sum() > 0 and np.array_equal(mask, np.array(remote["loss_mask"]) > 0)
    got = np.sort(np.array(remote["top_logprobs"])[mask], axis=-1)
    want = np.sort(np.array(local["top_logprobs"])[mask], axis=-1)
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("scoring", ["local", "remote"])
def test_on_policy_training_runs_end_to_end(env, records_batch, tmp_path, scoring):
    from mlx_distill.teacher.server import serve_in_thread

    root, tokenizer_dir, _, _, _ = env
    data = records_batch[0]
    stop = None
    teacher = {"mode": "on-policy", "on_policy_fraction": 1.0, "max_new_tokens": 6}
    if scoring == "local":
        teacher["model"] = str(root / "teacher")
    else:
        teacher["remote_url"], stop = serve_in_thread(root / "teacher")
    config = toy_config(tmp_path, tokenizer_dir, data, teacher=teacher,
                        train={"steps": 3, "checkpoint_every": 0, "compile": False})
    try:
        result = run_training(config_from_dict(config), log=lambda _: None)
    finally:
        if stop is not None:
            stop()
    assert result.steps == 3 and result.last["n_kd_tokens"] > 0
    assert result.last["n_kd_tokens"] == result.last["n_tokens"]  # samples are all scored
