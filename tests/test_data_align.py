"""Teacher top-k → student positions: by id (same tokenizer) and by text (different tokenizers).

The reference for "which student positions get a teacher distribution" is computed here
independently: when both token streams spell the same bytes, position i aligns exactly when its
byte span is also a teacher token's span.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_distill.data import (
    BY_ID,
    BY_TEXT,
    TokenVocab,
    align_teacher,
    carry,
    load_dataset,
    render_turn,
)
from mlx_distill.data.align import sampled_bytes
from mlx_distill.data.textdiff import matching_blocks
from mlx_distill.tokenizer import IM_END, load_tokenizer, train_tokenizer

CORPUS = Path(__file__).parent.parent / "mlx_distill" / "data" / "tiny_corpus.txt"
FIXTURE_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
CALL = {"id": "c1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
ANSWER = {"role": "assistant", "content": "Beautiful is better than ugly; let me check.",
          "reasoning_content": "The user wants the weather.", "tool_calls": [CALL]}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    text = CORPUS.read_text()
    (root / "student.txt").write_text(text + '{"city": "Paris"} get_weather\n' * 10)
    # The teacher learns from other text and has a smaller vocabulary: different merges.
    (root / "teacher.txt").write_text("\n".join(line[::-1] for line in text.splitlines()) * 2)
    student = load_tokenizer(train_tokenizer([root / "student.txt"], 500, root / "s"))
    teacher = load_tokenizer(train_tokenizer([root / "teacher.txt"], 320, root / "t"))
    return student, teacher


@pytest.fixture(scope="module")
def vocab(tokenizers):
    return TokenVocab(tokenizers[0])


@pytest.fixture(scope="module")
def teacher_vocab(tokenizers):
    return TokenVocab(tokenizers[1])


def token_dicts(pieces: list[bytes], rng: np.random.Generator, pool: list[str], k: int = 4):
    """Teacher tokens spelling ``pieces``: each with a random top-k drawn from ``pool`` (the
    sampled token listed or not), probabilities summing to at most 1."""
    out = []
    for data in pieces:
        text = data.decode("utf-8", errors="replace")
        alternatives = [a for a in dict.fromkeys(rng.choice(pool, size=k).tolist()) if a != text]
        probs = rng.dirichlet(np.ones(len(alternatives) + 2))[: len(alternatives) + 1]
        logprobs = np.log(np.maximum(probs, 1e-12)).tolist()
        sampled_lp = logprobs[0]
        top = [[a, lp] for a, lp in zip(alternatives, logprobs[1:], strict=True)]
        if rng.random() < 0.7:
            top.append([text, sampled_lp])
        top.sort(key=lambda pair: -pair[1])
        out.append({"token": text, "logprob": sampled_lp, "top": top, "bytes": list(data)})
    return out


def reference_alignment(teacher_pieces: list[bytes], student_ids, vocab: TokenVocab) -> set[int]:
    spans, pos = set(), 0
    for data in teacher_pieces:
        if data:
            spans.add((pos, pos + len(data)))
        pos += len(data)
    return {i for i, span in enumerate(vocab.spans(student_ids)) if span in spans}


def check_carried(tokens, student_ids, targets, vocab, expected_aligned):
    """Every carried entry is one student token spelling a teacher alternative (or the sampled
    token) with the teacher's probability; nothing else is carried; the tail is not negative."""
    student_spans = vocab.spans(student_ids)
    teacher_at = {}
    pos = 0
    for token in tokens:
        data = bytes(token["bytes"])
        teacher_at[(pos, pos + len(data))] = token
        pos += len(data)
    assert set(np.flatnonzero(targets.kd_mask).tolist()) == expected_aligned
    for i in range(len(student_ids)):
        ids, lps = targets.top_ids[i], targets.top_logprobs[i]
        if i not in expected_aligned:
            assert np.all(lps == -np.inf)
            continue
        token = teacher_at[student_spans[i]]
        expected = {}
        for text, lp in token["top"]:
            data = bytes(token["bytes"]) if text == token["token"] else text.encode()
            if "\ufffd" in text and text != token["token"]:
                continue
            if vocab.id_of(data) is not None:
                expected[data] = lp
        expected.setdefault(bytes(token["bytes"]), token["logprob"])
        valid = lps > -np.inf
        carried = {vocab.bytes_of(int(t)): float(lp) for t, lp in zip(ids[valid], lps[valid],
                                                                      strict=True)}
        assert carried.keys() == expected.keys()
        for data, lp in expected.items():
            assert carried[data] == pytest.approx(lp, abs=1e-5)
        assert vocab.bytes_of(int(student_ids[i])) == bytes(token["bytes"])
        assert sum(math.exp(lp) for lp in carried.values()) <= 1 + 1e-5  # tail = 1 - sum >= 0


def canonical(tok, vocab):
    return render_turn(tok, vocab, MESSAGES, None, ANSWER)[1]


def test_matching_blocks_on_insertions_and_identity():
    assert matching_blocks(b"abc", b"abc") == [(0, 0, 3)]
    assert matching_blocks(b"", b"x") == []
    blocks = matching_blocks(b"hello world\nbye\n", b"hello big world\nbye\n")
    assert sum(n for _, _, n in blocks) == len(b"hello world\nbye\n")


@settings(max_examples=150, deadline=None)
@given(a=st.binary(max_size=120), edits=st.lists(
    st.tuples(st.integers(0, 200), st.binary(max_size=8)), max_size=4))
def test_matching_blocks_are_equal_monotone_regions(a, edits):
    b = bytearray(a)
    for at, insert in edits:
        at = min(at, len(b))
        b[at:at] = insert
    b = bytes(b)
    blocks = matching_blocks(a, b)
    prev_a = prev_b = 0
    for i, j, n in blocks:
        assert n > 0 and a[i:i + n] == b[j:j + n]
        assert i >= prev_a and j >= prev_b
        prev_a, prev_b = i + n, j + n
    # Only insertions: every byte of a is matched.
    assert sum(n for _, _, n in blocks) == len(a)


def test_identical_tokenizer_aligns_every_token_by_id(tokenizers, vocab):
    student, _ = tokenizers
    ids = canonical(student, vocab)
    rng = np.random.default_rng(0)
    pool = [vocab.bytes_of(i).decode("utf-8", "replace") for i in range(10, 400)]
    tokens = token_dicts([vocab.bytes_of(i) for i in ids], rng, pool)
    new_ids, targets = align_teacher(tokens, ids, vocab, by_id=True)
    assert targets.method == BY_ID and new_ids == ids
    assert targets.aligned == len(ids)  # 100% coverage
    check_carried(tokens, new_ids, targets, vocab, set(range(len(ids))))
    # The sampled token is the target at every position.
    for i, token_id in enumerate(ids):
        assert token_id in targets.top_ids[i][targets.top_logprobs[i] > -np.inf]


def test_by_id_trains_on_the_teachers_own_split(tokenizers, vocab):
    student, _ = tokenizers
    ids = canonical(student, vocab)
    eot = student.convert_tokens_to_ids(IM_END)
    # The teacher sampled the same text one byte-level token at a time (specials kept whole).
    pieces = []
    for token_id in ids:
        data = vocab.bytes_of(token_id)
        pieces.extend([data] if vocab.id_of(data) in {eot, 4, 5, 8, 9} else
                      [bytes([b]) for b in data])
    tokens = token_dicts(pieces, np.random.default_rng(1), ["is", " the"])
    new_ids, by_id = align_teacher(tokens, ids, vocab, by_id=True)
    assert by_id.method == BY_ID and len(new_ids) == len(pieces) > len(ids)
    assert vocab.text_bytes(new_ids) == vocab.text_bytes(ids)
    assert by_id.aligned == len(new_ids)
    # By text keeps the canonical split and loses every multi-byte token.
    _, by_text = align_teacher(tokens, ids, vocab, by_id=False)
    expected = reference_alignment(pieces, ids, vocab)
    assert by_text.method == BY_TEXT and by_text.aligned == len(expected) < len(ids)


def test_end_token_missing_from_teacher_stream_is_ce_only(tokenizers, vocab):
    ids = canonical(tokenizers[0], vocab)
    tokens = token_dicts([vocab.bytes_of(i) for i in ids[:-1]], np.random.default_rng(2), ["a"])
    new_ids, targets = align_teacher(tokens, ids, vocab, by_id=True)
    assert targets.method == BY_ID and new_ids == ids
    assert targets.kd_mask.tolist() == [1.0] * (len(ids) - 1) + [0.0]


def test_by_id_falls_back_to_text_when_the_teacher_wrote_other_text(tokenizers, vocab):
    student, _ = tokenizers
    ids = canonical(student, vocab)
    text = vocab.text_bytes(ids)
    # The teacher spelled the tool call without spaces; the template re-renders it with them.
    teacher_text = text.replace(b'{"city": "Paris", "days": 3}', b'{"city":"Paris","days":3}')
    teacher_ids = student.encode(teacher_text.decode(), add_special_tokens=False)
    pieces = [vocab.bytes_of(i) for i in teacher_ids]
    tokens = token_dicts(pieces, np.random.default_rng(3), ["x"])
    new_ids, targets = align_teacher(tokens, ids, vocab, by_id=True)
    assert targets.method == BY_TEXT and new_ids == ids
    spans = vocab.spans(ids)
    start = text.index(b'{"city"')
    end = start + len(b'{"city": "Paris", "days": 3}')
    inside = [i for i, (s, e) in enumerate(spans) if start < e and s < end]
    before = [i for i, (_, e) in enumerate(spans) if e <= start]
    assert all(targets.kd_mask[i] == 1 for i in before)  # the equal prefix aligns fully
    assert 0 < targets.aligned < len(ids)
    # Inside the re-rendered region a token aligns only where a teacher token has its bytes
    # (then the sampled token, this target, is carried).
    assert 0 < sum(targets.kd_mask[i] for i in inside) < len(inside)
    for i in inside:
        if targets.kd_mask[i]:
            valid = targets.top_logprobs[i] > -np.inf
            assert ids[i] in targets.top_ids[i][valid]
            assert vocab.bytes_of(ids[i]) in pieces


def test_different_tokenizers_align_by_text(tokenizers, vocab, teacher_vocab):
    student, teacher = tokenizers
    ids = canonical(student, vocab)
    text = vocab.text_bytes(ids).decode()
    teacher_ids = teacher.encode(text, add_special_tokens=False)
    pieces = [teacher_vocab.bytes_of(i) for i in teacher_ids]
    assert b"".join(pieces) == text.encode()
    pool = [teacher_vocab.bytes_of(i).decode("utf-8", "replace") for i in range(10, 320)]
    tokens = token_dicts(pieces, np.random.default_rng(4), pool, k=8)
    new_ids, targets = align_teacher(tokens, ids, vocab, by_id=False)
    expected = reference_alignment(pieces, ids, vocab)
    assert targets.method == BY_TEXT and new_ids == ids
    assert 0 < len(expected) < len(ids)  # coverage below 100%
    check_carried(tokens, ids, targets, vocab, expected)
    # A vocabulary fingerprint tells the two tokenizers apart.
    assert vocab.fingerprint() != teacher_vocab.fingerprint()
    assert vocab.fingerprint() == TokenVocab(student).fingerprint()


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(text=st.text(min_size=1, max_size=60), data=st.data())
def test_arbitrary_teacher_splits_and_top_k(tokenizers, vocab, text, data):
    student, _ = tokenizers
    raw = text.encode()
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(raw) - 1)), max_size=len(raw))))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True) if a < b]
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    pool = [vocab.bytes_of(i).decode("utf-8", "replace") for i in rng.integers(10, 500, 12)]
    pool += data.draw(st.lists(st.text(max_size=3), min_size=1, max_size=4))
    tokens = token_dicts(pieces, rng, pool, k=5)
    # Teachers spell part-of-a-character tokens either lossily or as OpenAI's "bytes:\x..".
    for token in tokens:
        data_bytes = bytes(token["bytes"])
        if "\ufffd" in token["token"] and rng.random() < 0.5:
            spelled = "bytes:" + "".join(f"\\x{b:02x}" for b in data_bytes)
            token["top"] = [[spelled if t == token["token"] else t, lp] for t, lp in token["top"]]
            token["token"] = spelled
    ids = student.encode(text, add_special_tokens=False) + [student.convert_tokens_to_ids(IM_END)]
    new_ids, targets = align_teacher(tokens, ids, vocab, by_id=False)
    assert new_ids == ids and targets.top_ids.shape == targets.top_logprobs.shape
    check_carried(tokens, ids, targets, vocab, reference_alignment(pieces, ids, vocab))


def test_carry_rules(vocab):
    a, b = vocab.id_of(b"a"), vocab.id_of(b"b")
    # The sampled token is carried with its own logprob when the top list lacks it.
    carried = carry({"token": "a", "logprob": -1.0, "top": [["b", -0.5]]}, a, vocab)
    assert carried == [(b, -0.5), (a, -1.0)]
    # Two spellings of one student token add up; lossy and impossible entries carry nothing.
    token = {"token": "a", "logprob": -1.0,
             "top": [["a", -1.0], ["bytes:\\x62", -2.0], ["b", -2.0], ["\ufffd", -3.0],
                     ["zzz-not-a-token", -3.0], ["q", -math.inf]]}
    carried = dict(carry(token, a, vocab))
    assert carried.keys() == {a, b}
    assert carried[b] == pytest.approx(math.log(2 * math.exp(-2.0)))
    # Rounded logprobs summing above 1 are scaled to 1: the tail is 0, not negative.
    over = carry({"token": "a", "logprob": -0.5, "top": [["a", -0.5], ["b", -0.6]]}, a, vocab)
    assert sum(math.exp(lp) for _, lp in over) == pytest.approx(1.0)
    assert over[0][1] - over[1][1] == pytest.approx(0.1)
    # A part-of-a-character token: exact bytes from the field, or from OpenAI's spelling.
    assert sampled_bytes({"token": "\ufffd", "bytes": [0xE2, 0x80]}) == b"\xe2\x80"
    assert sampled_bytes({"token": "bytes:\\xe2\\x80"}) == b"\xe2\x80"


def test_dataset_reports_coverage_and_picks_by_id_for_the_same_tokenizer(tokenizers, vocab,
                                                                          teacher_vocab, tmp_path):
    from mlx_distill.teacher.records import build_record, dump_record
    from mlx_distill.teacher.types import ChatRequest, Completion

    student, teacher = tokenizers
    ids = canonical(student, vocab)
    text = vocab.text_bytes(ids).decode()
    rng = np.random.default_rng(5)
    same = token_dicts([vocab.bytes_of(i) for i in ids], rng, ["is"])
    other = token_dicts([teacher_vocab.bytes_of(i)
                         for i in teacher.encode(text, add_special_tokens=False)], rng, ["is"])
    lines = []
    for record_id, tokens in (("same", same), ("other", other), ("none", None)):
        completion = {"text": ANSWER["content"], "reasoning": ANSWER["reasoning_content"],
                      "tool_calls": [CALL], "tokens": tokens, "finish_reason": "tool_calls"}
        lines.append(dump_record(build_record(
            record_id, ChatRequest(messages=MESSAGES), Completion.from_dict(completion).to_dict(),
            model="t", base_host="h", cost_usd=0.0, created=1.0)))
    path = tmp_path / "kd.jsonl"
    path.write_text("".join(lines))
    data = load_dataset(path, student, teacher_tokenizer=student)  # auto: same fingerprint
    report = data.report
    # "other" has tokens the student vocabulary lacks: it falls back to by text.
    assert any(vocab.id_of(bytes(t["bytes"])) is None for t in other)
    assert (report.by_id, report.by_text, report.no_teacher_tokens) == (1, 1, 1)
    aligned_other = len(reference_alignment(
        [bytes(t["bytes"]) for t in other], ids, vocab))
    assert report.coverage_by_record == {"same": 1.0, "other": aligned_other / len(ids)}
    assert report.coverage == pytest.approx((len(ids) + aligned_other) / (2 * len(ids)))
    by_text = load_dataset(path, student, teacher_tokenizer=teacher).report
    assert (by_text.by_id, by_text.by_text) == (0, 2)
    assert by_text.coverage_by_record == report.coverage_by_record
