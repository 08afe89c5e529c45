"""The exporter's packages through real Core ML (``coremltools.models.MLModel.predict`` with
``make_state``): every enumerated prefill length against MLX, a 32-step greedy decode loop
through the KV cache state, ``verify-coreml --backend coreml``, the probe and the measured ANE
residency. macOS only: elsewhere Core ML cannot execute a model, and these tests are skipped."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import random_model

pytestmark = pytest.mark.skipif(sys.platform != "darwin",
                                reason="Core ML execution needs macOS")

SHAPES = (16, 32, 64)
STEPS = 32


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from mlx_distill.checkpoint import save_checkpoint
    from mlx_distill.config import load_size_config

    model = random_model(load_size_config("toy").model, seed=0)
    return save_checkpoint(model, tmp_path_factory.mktemp("macos") / "ckpt"), model


@pytest.fixture(scope="module")
def packages(toy, tmp_path_factory):
    from converters.export import export_coreml

    out_dir, made = tmp_path_factory.mktemp("macos-pkgs"), {}

    def get(layout: str, precision: str) -> Path:
        if (layout, precision) not in made:
            made[layout, precision] = export_coreml(
                toy[0], out_dir / f"toy-{layout}-{precision}.mlpackage", precision=precision,
                layout=layout, shapes=SHAPES, max_context=128)
        return made[layout, precision]

    return get


def mlmodel(pkg: Path, function: str):
    import coremltools as ct

    return ct.models.MLModel(str(pkg), function_name=function,
                             compute_units=ct.ComputeUnit.ALL)


@pytest.mark.parametrize("layout", ["linear", "ane"])
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_prefill_matches_mlx_for_every_enumerated_shape(toy, packages, layout, precision):
    from converters import verify

    model = toy[1]
    gate = verify.GATES[precision]
    prefill = mlmodel(packages(layout, precision), "prefill")
    rng = np.random.default_rng(1)
    for length in SHAPES:
        ids = rng.integers(0, model.config.vocab_size, length)
        out = prefill.predict({"input_ids": ids[None].astype(np.int32)},
                              state=prefill.make_state())
        got = np.asarray(out["logits"][0], np.float32)
        want = verify.mlx_logits(model, ids)
        assert verify.cosine(got, want) >= gate.cosine, length
        if gate.top1 is not None:
            agreement, decisive = verify.top1(got, want, verify.TIE_MARGIN)
            assert decisive > 0 and agreement >= gate.top1, length


@pytest.mark.parametrize("layout", ["linear", "ane"])
def test_fp16_decode_loop_through_the_state_equals_mlx_greedy(toy, packages, layout):
    from converters import verify

    model = toy[1]
    pkg = packages(layout, "fp16")
    prefill, decode = mlmodel(pkg, "prefill"), mlmodel(pkg, "decode")
    prompt = np.random.default_rng(2).integers(0, model.config.vocab_size, 12)
    ids = np.zeros((1, SHAPES[0]), np.int32)
    ids[0, :prompt.size] = prompt
    state = prefill.make_state()
    logits = prefill.predict({"input_ids": ids}, state=state)["logits"][0, prompt.size - 1]
    decode_state = decode.make_state()  # the cache written by prefill, handed to decode
    for name in ("k_cache", "v_cache"):
        decode_state.write_state(name, state.read_state(name))
    want, want_logits = verify.mlx_greedy(model, prompt, STEPS)
    for step, pos in enumerate(range(prompt.size, prompt.size + STEPS)):
        token = int(np.argmax(logits))
        if token != want[step]:
            assert verify.margins(want_logits[step]) < verify.TIE_MARGIN, step
            break  # a near-tie: both continuations are right, the rest is not comparable
        assert verify.cosine(logits, want_logits[step]) >= 0.999, step
        out = decode.predict({"input_ids": np.array([[token]], np.int32),
                              "pos": np.array([pos], np.int32)}, state=decode_state)
        logits = np.asarray(out["logits"][0, 0], np.float32)


def test_verify_cli_on_core_ml(toy, packages, capsys):
    from mlx_distill import cli

    for layout, precision in (("linear", "fp16"), ("ane", "int8")):
        code = cli.main(["verify-coreml", str(packages(layout, precision)), "--against",
                         str(toy[0]), "--backend", "coreml", "--probe"])
        text = capsys.readouterr().out
        assert code == 0, text
        assert "runtime: Core ML (MLModel.predict" in text and "first divergence: none" in text


def test_probe_through_core_ml_names_the_corrupted_layer(toy, packages, tmp_path):
    from test_verify import corrupt_weight

    from converters import verify

    bad = tmp_path / "bad.mlpackage"
    corrupt_weight(packages("linear", "fp16"), bad, "model_layers_1_mlp_down_proj_weight")
    report = verify.verify_package(bad, toy[0], probe=True, backend="coreml", steps=4)
    assert not report["passed"]
    assert report["probe"]["first_divergence"] == "layer 1"


def test_measured_ane_residency_per_function(packages, capsys):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "ane_residency.py"
    spec = importlib.util.spec_from_file_location("ane_residency", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    measured = bench.measured_residency(packages("ane", "fp16"), "ALL")
    assert sorted(measured["functions"]) == ["decode", "prefill"]
    for function in measured["functions"].values():
        share = function["ane_cost_share"]
        assert share is None or 0.0 <= share <= 1.0
        assert sum(function["ops_by_device"].values()) > 0
