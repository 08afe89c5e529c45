"""The torch-free Core ML exporter, verified through the numpy MIL interpreter against MLX:
every enumerated prefill shape, a prefill + greedy decode loop through the KV cache state, both
layouts, fp16 / int8 / int4, vocabularies above int16, an mlx-lm checkpoint, the contract and the
static ANE checks."""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from helpers import random_model, tiny_config

from converters import ane_checks
from converters.export import ExportError, checks_path, contract_path, export_coreml
from converters.interpreter import load_mlpackage
from mlx_distill import cli
from mlx_distill.checkpoint import save_checkpoint
from mlx_distill.config import RopeScaling, load_size_config
from mlx_distill.model import Model
from mlx_distill.train import lm_batches, make_train_step

TOY_SHAPES = (64, 128, 256)
# Reference logits whose top two are closer than this are ties at fp16 precision (the logits'
# fp16 error is ~0.01, at most ~0.1 here): either answer is right, so they are not counted.
TIE_MARGIN = 0.1


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def margins(logits) -> np.ndarray:
    top = np.sort(np.asarray(logits, np.float32), axis=-1)
    return top[..., -1] - top[..., -2]


def top1(got, want) -> float:
    """Top-1 agreement with the reference ``want`` over positions it does not call a tie."""
    decisive = margins(want) >= TIE_MARGIN
    agree = np.asarray(got).argmax(-1) == np.asarray(want).argmax(-1)
    return float(agree[decisive].mean())


def mlx_logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array(np.asarray(ids)[None])).astype(mx.float32))[0]


def prefill_logits(pkg, ids) -> np.ndarray:
    fn = load_mlpackage(pkg, function_name="prefill")
    out = fn.predict({"input_ids": np.asarray(ids, np.int32)[None]}, fn.make_state())
    return out["logits"][0].astype(np.float32)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy config trained briefly on a periodic token stream: confident next-token
    predictions, so top-1 comparisons are not decided by near-ties as with random weights."""
    config = load_size_config("toy").model
    mx.random.seed(0)
    model = Model(config)
    rng = np.random.default_rng(0)
    corpus = np.tile(rng.permutation(config.vocab_size)[:101], 40)
    optimizer = optim.AdamW(learning_rate=3e-3)
    step = make_train_step(model, optimizer)
    batches = lm_batches(corpus, 8, 64, seed=0)
    for _ in range(40):
        loss = step(*next(batches))
        mx.eval(loss, model.state, optimizer.state)
    assert loss.item() < 0.1
    ckpt = save_checkpoint(model, tmp_path_factory.mktemp("toy") / "ckpt")
    return ckpt, model, corpus


@pytest.fixture(scope="module")
def packages(toy, tmp_path_factory):
    """(layout, precision) -> exported package, each exported once per module."""
    out_dir, made = tmp_path_factory.mktemp("pkgs"), {}

    def get(layout: str, precision: str):
        if (layout, precision) not in made:
            made[layout, precision] = export_coreml(
                toy[0], out_dir / f"toy-{layout}-{precision}.mlpackage", precision=precision,
                layout=layout, shapes=TOY_SHAPES)
        return made[layout, precision]

    return get


def test_fp16_prefill_matches_mlx_for_every_enumerated_shape(toy, packages):
    _, model, corpus = toy
    pkg = packages("linear", "fp16")
    rng = np.random.default_rng(1)
    for length in TOY_SHAPES:
        start = int(rng.integers(0, corpus.size - length))
        ids = corpus[start:start + length]
        got, want = prefill_logits(pkg, ids), mlx_logits(model, ids)
        assert (margins(want) >= TIE_MARGIN).mean() >= 0.95  # the top-1 check is not vacuous
        assert cosine(got, want) >= 0.999, length
        assert top1(got, want) >= 0.99, length


def greedy_mlx(model, prompt, steps: int) -> list[int]:
    """MLX greedy decoding; asserts no step is a tie, so an fp16 model must make the same
    choices (the trained toy's steps have margins > 2)."""
    cache = model.make_cache()
    logits = model(mx.array(prompt)[None], cache)
    tokens = []
    for _ in range(steps):
        last = np.array(logits[0, -1])
        assert margins(last) >= TIE_MARGIN, "reference tie: pick another prompt"
        tokens.append(int(last.argmax()))
        logits = model(mx.array([[tokens[-1]]]), cache)
    return tokens


def greedy_coreml(pkg, prompt, steps: int, shape: int) -> tuple[list[int], list[np.ndarray]]:
    """Prefill the prompt padded to ``shape`` (padding lies past the prompt, where the causal mask
    and later decode writes make it harmless), then decode token by token through the state."""
    prefill = load_mlpackage(pkg, function_name="prefill")
    decode = prefill.with_function("decode")
    state = prefill.make_state()
    ids = np.zeros((1, shape), np.int32)
    ids[0, :len(prompt)] = prompt
    logits = prefill.predict({"input_ids": ids}, state)["logits"][0, len(prompt) - 1]
    tokens, step_logits = [], []
    for pos in range(len(prompt), len(prompt) + steps):
        tokens.append(int(np.argmax(logits)))
        out = decode.predict({"input_ids": np.array([[tokens[-1]]], np.int32),
                              "pos": np.array([pos], np.int32)}, state)
        logits = out["logits"][0, 0].astype(np.float32)
        step_logits.append(logits)
    return tokens, step_logits


def test_fp16_prefill_then_32_decode_steps_equal_mlx_greedy(toy, packages):
    _, model, corpus = toy
    prompt = corpus[7:7 + 20].tolist()
    want = greedy_mlx(model, prompt, 32)
    got, step_logits = greedy_coreml(packages("linear", "fp16"), prompt, 32, shape=64)
    assert got == want
    # The logits of every decode step, not only their argmax, follow MLX through the cache.
    cache = model.make_cache()
    model(mx.array(prompt)[None], cache)
    for token, logits in zip(want, step_logits, strict=True):
        ref = np.array(model(mx.array([[token]]), cache)[0, -1])
        assert cosine(logits, ref) >= 0.999


def test_package_spec_contract_and_checks(toy, packages):
    from coremltools.models.utils import load_spec

    pkg = packages("linear", "fp16")
    spec = load_spec(str(pkg))
    functions = {f.name: f for f in spec.description.functions}
    assert sorted(functions) == ["decode", "prefill"]
    ids_type = functions["prefill"].input[0].type.multiArrayType
    assert [list(s.shape) for s in ids_type.enumeratedShapes.shapes] == [[1, s] for s in
                                                                         TOY_SHAPES]
    contract = json.loads(contract_path(pkg).read_text())
    config = toy[1].config
    assert contract["functions"]["prefill"]["inputs"][0]["enumerated_shapes"] == [
        [1, s] for s in TOY_SHAPES]
    assert [i["name"] for i in contract["functions"]["decode"]["inputs"]] == ["input_ids", "pos"]
    assert contract["functions"]["decode"]["outputs"] == [
        {"name": "logits", "dtype": "float16", "shape": [1, 1, config.vocab_size]}]
    assert [s["name"] for s in contract["functions"]["decode"]["states"]] == ["k_cache",
                                                                              "v_cache"]
    assert contract["cache"]["shape"] == [config.n_layers, config.n_kv_heads, 256, config.d_head]
    assert contract["max_context"] == 256 and contract["prefill_shapes"] == list(TOY_SHAPES)
    assert contract["model_config"] == config.to_dict()
    meta = json.loads((toy[0] / "mlx_distill.json").read_text())
    assert contract["source"]["weights_sha256"] == {"model.safetensors": meta["weights_sha256"]}
    # One copy of the weights for two functions, close to the fp16 floor.
    sizes = contract["sizes"]
    assert sizes["weight_blob_bytes"] <= 1.05 * max(sizes["single_function_blob_bytes"].values())
    assert sizes["blob_over_floor"] <= 1.05
    report = json.loads(checks_path(pkg).read_text())
    assert report["passed"] and contract["static_checks"]["passed"]
    assert set(report["functions"]["decode"]["ops"]) <= set(ane_checks.ANE_ELIGIBLE_OPS)
    assert "torch" not in sys.modules


def test_int8_weights_follow_fp16_closely(toy, packages):
    _, model, corpus = toy
    pkg = packages("linear", "int8")
    program = load_mlpackage(pkg, function_name="decode")
    assert program.op_histogram()["constexpr_blockwise_shift_scale"] == 7 * 3 + 1
    for length in TOY_SHAPES:
        ids = corpus[3:3 + length]
        assert cosine(prefill_logits(pkg, ids), mlx_logits(model, ids)) >= 0.995, length
    contract = json.loads(contract_path(pkg).read_text())
    fp16 = json.loads(contract_path(packages("linear", "fp16")).read_text())
    assert contract["sizes"]["weight_blob_bytes"] < 0.6 * fp16["sizes"]["weight_blob_bytes"]
    assert contract["sizes"]["blob_over_floor"] <= 1.05


def test_ane_layout_equals_linear_layout_and_decodes(toy, packages):
    _, model, corpus = toy
    ane, linear = packages("ane", "fp16"), packages("linear", "fp16")
    ops = load_mlpackage(ane, function_name="prefill").op_histogram()
    assert ops["conv"] == 7 * 3 + 1 and "linear" not in ops
    for length in (64, 128):
        ids = corpus[11:11 + length]
        got = prefill_logits(ane, ids)
        want = mlx_logits(model, ids)
        assert cosine(got, want) >= 0.999 and top1(got, want) >= 0.99
        if length == 64:
            assert cosine(got, prefill_logits(linear, ids)) >= 0.9999
    prompt = corpus[30:40].tolist()
    assert greedy_coreml(ane, prompt, 8, shape=64)[0] == greedy_mlx(model, prompt, 8)
    contract = json.loads(contract_path(ane).read_text())
    assert contract["cache"]["axes"] == ["layer", "kv_head", "d_head", "position"]


def test_int4_ane_package(toy, packages):
    _, model, corpus = toy
    pkg = packages("ane", "int4")
    ids = corpus[:64]
    assert cosine(prefill_logits(pkg, ids), mlx_logits(model, ids)) >= 0.98
    contract = json.loads(contract_path(pkg).read_text())
    sizes = contract["sizes"]  # at toy size the RoPE tables are 4% of an int4 package
    assert sizes["weight_blob_bytes"] <= 1.05 * (sizes["floor_bytes"] + sizes["rope_table_bytes"])
    assert "int4" in contract["quantization"]["projections"]


def ids_near_top(vocab: int) -> np.ndarray:
    """Eight ids: the top of the vocabulary and both sides of the int16 limit where they exist."""
    ids = [vocab - 1, vocab - 2, vocab - 3, 32767, 32768, 32769, 40000, 5]
    return np.array([i if i < vocab else vocab - 4 - n for n, i in enumerate(ids)], np.int32)


def test_vocab_above_int16_range(tmp_path):
    from converters.export import load_numpy_weights
    from converters.mil_llama import LlamaGraph

    model = random_model(tiny_config(vocab_size=50000, n_layers=1, d_model=32, d_ff=64,
                                     tie_embeddings=False, max_seq_len=64), seed=3)
    graph = LlamaGraph(*load_numpy_weights(save_checkpoint(model, tmp_path / "ckpt")),
                       max_context=16)
    ids = ids_near_top(50000)
    prefill = _single_function(graph, tmp_path, "prefill", length=8)
    got = prefill.predict({"input_ids": ids[None]}, prefill.make_state())["logits"][0]
    want = mlx_logits(model, ids)
    assert cosine(got, want) >= 0.999 and top1(got, want) == 1.0
    decode = _single_function(graph, tmp_path, "decode")
    out = decode.predict({"input_ids": np.array([[49999]], np.int32),
                          "pos": np.array([0], np.int32)}, decode.make_state())
    assert cosine(out["logits"][0, 0], mlx_logits(model, [49999])[0]) >= 0.999


def test_mlx_lm_llama_checkpoint_through_the_cli(tmp_path, capsys, monkeypatch):
    """A checkpoint written by mlx-lm's own llama model (vocab 32000, near the int16 limit), and
    the static checks: a violation stops the export naming the op unless --allow-non-ane."""
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=1,
                           intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                           rms_norm_eps=1e-5, vocab_size=32000, tie_word_embeddings=False,
                           max_position_embeddings=64)
    mx.random.seed(4)
    model = llama.Model(args)
    mx.eval(model.parameters())
    save_model(tmp_path / "lm", model)
    save_config(vars(args), tmp_path / "lm" / "config.json")
    pkg = tmp_path / "lm.mlpackage"
    argv = ["export-coreml", str(tmp_path / "lm"), "--out", str(pkg), "--shapes", "8",
            "--max-context", "16", "--layout", "ane"]
    monkeypatch.delitem(ane_checks.ANE_ELIGIBLE_OPS, "softmax")
    assert cli.main(argv) == 2
    assert "(softmax): op type is not in" in capsys.readouterr().err
    assert not pkg.exists()
    assert cli.main([*argv, "--allow-non-ane"]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "VIOLATIONS, allowed" in captured.out
    assert "[save]" in captured.err
    report = json.loads(checks_path(pkg).read_text())
    assert not report["passed"] and report["allow_non_ane"]
    assert {v["op_type"] for v in report["functions"]["prefill"]["violations"]} == {"softmax"}
    ids = ids_near_top(32000)
    got, want = prefill_logits(pkg, ids), mlx_logits(model, ids)
    assert cosine(got, want) >= 0.999 and top1(got, want) == 1.0
    assert "torch" not in sys.modules


def _single_function(graph, tmp_path, name: str, length: int = 16):
    """Convert and save one function as a single-function package (quicker)."""
    from converters.mil_convert import run_passes, save_program, set_prefill_shapes

    program = graph.program((name,))
    if name == "prefill":
        set_prefill_shapes(program.functions["prefill"], (length,))
    run_passes(program)
    return load_mlpackage(save_program(program, tmp_path / f"{name}.mlpackage"))


@pytest.mark.parametrize("variant", ["bias-untied-linear-rope-ane", "dynamic-ntk-mha-linear"])
def test_config_variants_match_mlx(variant, tmp_path):
    from converters.export import load_numpy_weights
    from converters.mil_llama import LlamaGraph

    if variant.startswith("bias"):
        config = tiny_config(attention_bias=True, attention_out_bias=True, tie_embeddings=False,
                             rope_scaling=RopeScaling("linear", 4.0), n_layers=1)
        layout, max_context = "ane", 32
    else:  # positions beyond the trained 8 use the per-position NTK base
        config = tiny_config(n_kv_heads=4, rope_scaling=RopeScaling("dynamic", 2.0, 8),
                             n_layers=1)
        layout, max_context = "linear", 32
    model = random_model(config, seed=5)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    graph = LlamaGraph(*load_numpy_weights(ckpt), layout=layout, max_context=max_context)
    prefill = _single_function(graph, tmp_path, "prefill")
    decode = _single_function(graph, tmp_path, "decode")
    ids = np.random.default_rng(6).integers(0, config.vocab_size, 24)
    want = mlx_logits(model, ids)
    state = prefill.make_state()
    got = prefill.predict({"input_ids": ids[None, :16].astype(np.int32)}, state)["logits"][0]
    assert cosine(got, want[:16]) >= 0.999
    decode_state = decode.make_state()
    decode_state.buffers.update(state.buffers)
    for pos in range(16, 24):
        out = decode.predict({"input_ids": ids[None, pos:pos + 1].astype(np.int32),
                              "pos": np.array([pos], np.int32)}, decode_state)
        assert cosine(out["logits"][0, 0], want[pos]) >= 0.999, pos


def test_checks_catch_fp32_int64_and_rank():
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec((2, 3), dtype=types.fp32),
                             mb.TensorSpec((2,), dtype=types.int64)],
                opset_version=ct.target.iOS18)
    def prog(x, ids):
        wide = mb.reshape(x=x, shape=[1, 1, 1, 1, 2, 3], name="rank6")
        values, _ = mb.topk(x=wide, k=1, name="topk", output_indices_dtype="int32")
        return values, ids

    report = ane_checks.check_programs({"main": prog.functions["main"]})
    reasons = [(v["op"], v["reason"]) for v in report["functions"]["main"]["violations"]]
    assert not report["passed"]
    assert ("x", "fp32 tensor 'x': not fp16 compute") in reasons
    assert ("ids", "int64 tensor 'ids': the ANE has no 64-bit integers") in reasons
    assert any(op == "rank6" and "rank 6 > 5" in r for op, r in reasons)
    assert any(op == "topk" and "not in" in r for op, r in reasons)


def test_refusals_name_the_problem(tmp_path):
    model = random_model(tiny_config(n_layers=1, d_model=32, d_ff=32), seed=8)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    out = tmp_path / "x.mlpackage"
    with pytest.raises(ExportError, match="needs iOS18"):
        export_coreml(ckpt, out, target="ios16")
    with pytest.raises(ExportError, match="exceeds max_context 16"):
        export_coreml(ckpt, out, shapes=(8, 32), max_context=16)
    with pytest.raises(ExportError, match="precision"):
        export_coreml(ckpt, out, precision="int2")
    with pytest.raises(ExportError, match=".mlpackage"):
        export_coreml(ckpt, tmp_path / "x.bin")


def test_role_defaults_and_package_replacement(tmp_path):
    from converters.export import _replace_dir, _resolve_shapes

    config = load_size_config("toy").model
    assert _resolve_shapes(config, None, None, "judge") == ((128, 256, 512), 2048)
    assert _resolve_shapes(config, [32, 16], 64, "judge") == ((16, 32), 64)
    assert _resolve_shapes(config, None, 100, None) == ((64,), 100)
    with pytest.raises(ExportError, match="no role 'nobody'"):
        _resolve_shapes(config, None, None, "nobody")
    with pytest.raises(ExportError, match="duplicates"):
        _resolve_shapes(config, [8, 8], None, None)
    target = tmp_path / "m.mlpackage"
    for generation in ("old", "new"):  # a second export replaces the first as a whole
        src = tmp_path / f"{generation}.tmp"
        src.mkdir()
        (src / generation).write_text(generation)
        _replace_dir(src, target)
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mlpackage"]
