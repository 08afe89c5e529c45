"""Generation: greedy against a cache-free reference and mlx-lm, sampling, stop strings, CLI."""

from __future__ import annotations

import random

import mlx.core as mx
import pytest
from helpers import random_model, tiny_config

from mlx_distill.checkpoint import load_checkpoint, save_checkpoint
from mlx_distill.cli import main
from mlx_distill.generate import _held_back, generate, generate_text
from mlx_distill.tokenizer import load_tokenizer, train_tokenizer

PROMPT = "the weather in Zürich is"
N_TOKENS = 24


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    rng = random.Random(0)
    words = ["the", "weather", "in", "Zürich", "is", "sunny", "rain", "😀", "{", "}", "42"]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(words, k=10)) for _ in range(300)))
    tok_dir = train_tokenizer([corpus], 400, root / "tokenizer")
    vocab_size = len(load_tokenizer(tok_dir))
    return save_checkpoint(random_model(tiny_config(vocab_size=vocab_size)), root / "ckpt",
                           tokenizer_dir=tok_dir)


@pytest.fixture(scope="module")
def model(ckpt):
    return load_checkpoint(ckpt)


@pytest.fixture(scope="module")
def tok(ckpt):
    return load_tokenizer(ckpt)


@pytest.fixture(scope="module")
def tok_no_eos(ckpt):
    """EOS disabled, so a random model always runs to max_tokens."""
    tokenizer = load_tokenizer(ckpt)
    tokenizer.eos_token_ids = set()
    return tokenizer


@pytest.fixture(scope="module")
def mlx_lm_loaded(ckpt):
    import mlx_lm

    return mlx_lm.load(str(ckpt))


def reference_greedy(model, prompt_ids, max_tokens, eos_ids):
    """Argmax over a full forward pass of the whole sequence per token: no KV cache at all."""
    ids, out, logprobs = list(prompt_ids), [], []
    for _ in range(max_tokens):
        logits = model(mx.array(ids)[None])[0, -1]
        token = int(mx.argmax(logits).item())
        out.append(token)
        logprobs.append((logits[token] - mx.logsumexp(logits)).item())
        if token in eos_ids:
            break
        ids.append(token)
    return out, logprobs


def test_greedy_matches_cache_free_reference(model, tok):
    prompt_ids = tok.encode(PROMPT)
    expected, expected_logprobs = reference_greedy(model, prompt_ids, N_TOKENS, tok.eos_token_ids)
    got = list(generate(model, tok, PROMPT, max_tokens=N_TOKENS))
    assert [g.token for g in got] == expected
    assert [g.logprob for g in got] == pytest.approx(expected_logprobs, abs=1e-4)
    assert all(g.finish_reason is None for g in got[:-1])
    assert got[-1].finish_reason == ("stop" if expected[-1] in tok.eos_token_ids else "length")


def test_greedy_matches_mlx_lm(model, tok, mlx_lm_loaded):
    import mlx_lm

    lm_model, lm_tok = mlx_lm_loaded
    stream = mlx_lm.stream_generate(lm_model, lm_tok, PROMPT, max_tokens=N_TOKENS)
    theirs = [r.token for r in stream]
    assert [g.token for g in generate(model, tok, PROMPT, max_tokens=N_TOKENS)] == theirs
    # Our loop drives mlx-lm's model (and tokenizer) as well.
    assert [g.token for g in generate(lm_model, lm_tok, PROMPT, max_tokens=N_TOKENS)] == theirs


def test_chunked_prefill_and_token_id_prompts_agree(model, tok_no_eos):
    ids = tok_no_eos.encode(PROMPT * 3)
    expected = [g.token for g in generate(model, tok_no_eos, ids, max_tokens=8)]
    chunked = generate(model, tok_no_eos, mx.array(ids), max_tokens=8, prefill_step_size=3)
    assert [g.token for g in chunked] == expected


def test_seeded_sampling_is_reproducible_and_seeds_differ(model, tok_no_eos, mlx_lm_loaded):
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    def sample(seed):
        run = generate(model, tok_no_eos, PROMPT, max_tokens=N_TOKENS, temperature=1.0, seed=seed)
        return [g.token for g in run]

    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first
    # Same sampler as mlx-lm: with the same seed, the same tokens.
    lm_model, lm_tok = mlx_lm_loaded
    mx.random.seed(1)
    theirs = mlx_lm.stream_generate(lm_model, lm_tok, PROMPT, max_tokens=N_TOKENS,
                                    sampler=make_sampler(temp=1.0))
    tokens = [r.token for r in theirs]
    assert tokens == first[: len(tokens)]


def test_top_k_1_and_tiny_top_p_are_greedy(model, tok_no_eos):
    greedy = [g.token for g in generate(model, tok_no_eos, PROMPT, max_tokens=12)]
    for options in ({"top_k": 1}, {"top_p": 1e-6}):
        run = generate(model, tok_no_eos, PROMPT, max_tokens=12, temperature=1.5, seed=3, **options)
        assert [g.token for g in run] == greedy


def test_max_tokens_gives_length_finish(model, tok_no_eos):
    got = list(generate(model, tok_no_eos, PROMPT, max_tokens=5))
    assert len(got) == 5
    assert [g.finish_reason for g in got] == [None, None, None, None, "length"]
    text = "".join(g.text for g in got)
    assert text == tok_no_eos.decode([g.token for g in got])
    assert generate_text(model, tok_no_eos, PROMPT, max_tokens=5) == text


def test_eos_stops_and_is_not_decoded(model, ckpt, tok_no_eos):
    tokens = [g.token for g in generate(model, tok_no_eos, PROMPT, max_tokens=6)]
    tokenizer = load_tokenizer(ckpt)
    tokenizer.eos_token_ids = {tokens[3]}
    got = list(generate(model, tokenizer, PROMPT, max_tokens=6))
    cut = tokens.index(tokens[3])  # the first occurrence ends generation
    assert [g.token for g in got] == tokens[: cut + 1]
    assert got[-1].finish_reason == "stop"
    assert "".join(g.text for g in got) == tokenizer.decode(tokens[:cut])


def _stop_candidates(text):
    """Substrings of ``text`` (2-3 printable characters) that first occur after a few chars."""
    found = []
    for start in range(3, len(text) - 3):
        for size in (2, 3):
            stop = text[start:start + size]
            if stop.isprintable() and "\ufffd" not in stop and text.find(stop) >= 3:
                found.append(stop)
    return found


def test_stop_strings_cut_output_exactly(model, tok_no_eos):
    full = generate_text(model, tok_no_eos, PROMPT, max_tokens=40)
    candidates = _stop_candidates(full)
    assert candidates, f"no usable stop string in {full!r}"
    for stop in candidates[:: max(1, len(candidates) // 6)]:
        got = list(generate(model, tok_no_eos, PROMPT, max_tokens=40, stop=stop))
        text = "".join(g.text for g in got)
        assert text == full[: full.find(stop)], stop
        assert stop not in text
        assert got[-1].finish_reason == "stop"
    # Several stop strings: the earliest in the text wins; one that never occurs changes nothing.
    a, b = candidates[0], candidates[-1]
    first = min(full.find(a), full.find(b))
    assert generate_text(model, tok_no_eos, PROMPT, max_tokens=40, stop=[b, a]) == full[:first]
    never = "\x07never\x07"
    got = list(generate(model, tok_no_eos, PROMPT, max_tokens=40, stop=[never]))
    assert "".join(g.text for g in got) == full and got[-1].finish_reason == "length"


def test_held_back_suffix():
    assert _held_back("hello <|im", ["<|im_end|>"]) == 4
    assert _held_back("hello", ["lo!", "xyz"]) == 2
    assert _held_back("hello", ["abc"]) == 0
    assert _held_back("ab", ["abc", "b"]) == 2  # "ab" could still become "abc"


@pytest.mark.parametrize("bad", [
    {"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -1}, {"stop": [""]},
    {"prefill_step_size": 0},
])
def test_invalid_options(model, tok, bad):
    with pytest.raises(ValueError):
        generate(model, tok, PROMPT, **bad)  # raised at the call, before iterating


def test_invalid_prompts(model, tok):
    with pytest.raises(ValueError, match="empty"):
        generate(model, tok, [])
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        generate(model, tok, [model.config.vocab_size])


def test_cli_generate(ckpt, capsys):
    assert main(["generate", str(ckpt), "--prompt", PROMPT, "--max-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "generated:" in captured.err
    assert "prompt:" in captured.err and "tok/s" in captured.err
    model, tok = load_checkpoint(ckpt), load_tokenizer(ckpt)
    assert captured.out == generate_text(model, tok, PROMPT, max_tokens=6) + "\n"

    args = ["generate", str(ckpt), "--prompt", "hi", "--chat", "--max-tokens", "4",
            "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20", "--seed", "5",
            "--stop", "zz", "yy"]
    assert main(args) == 0
    assert "generated:" in capsys.readouterr().err


def test_cli_generate_errors(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["generate", str(tmp_path), "--prompt", "x", "--max-tokens", "0"])
