"""``mlx-distill verify-coreml``: toy fp16 and int8 exports pass every gate; a package with one
corrupted layer fails, and the probe names that layer."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import sys

import numpy as np
import pytest
from helpers import random_model

from converters import verify
from converters.export import checks_path, contract_path, export_coreml
from converters.interpreter.package import locate_model_files, read_spec
from converters.probe import ProbeError, build_probe_package
from mlx_distill import cli
from mlx_distill.checkpoint import save_checkpoint
from mlx_distill.config import load_size_config
from mlx_distill.tokenizer import train_tokenizer

SHAPES = (16, 32, 64)
CORRUPTED_LAYER = 1


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The toy config with random weights and a small trained tokenizer (so verify also runs the
    'real ids' rows)."""
    root = tmp_path_factory.mktemp("verify")
    corpus = root / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "once", "upon", "a",
             "time", "girl", "found", "ball", "sand", "home", "mother", "smiled", "day"]
    corpus.write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(300)) + "\n")
    tokenizer = train_tokenizer([corpus], 400, root / "tokenizer")
    model = random_model(load_size_config("toy").model, seed=0)
    return save_checkpoint(model, root / "ckpt", tokenizer_dir=tokenizer)


@pytest.fixture(scope="module")
def packages(ckpt, tmp_path_factory):
    out_dir, made = tmp_path_factory.mktemp("verify-pkgs"), {}

    def get(layout: str, precision: str):
        if (layout, precision) not in made:
            made[layout, precision] = export_coreml(
                ckpt, out_dir / f"toy-{layout}-{precision}.mlpackage", precision=precision,
                layout=layout, shapes=SHAPES, max_context=128)
        return made[layout, precision]

    return get


def run_verify(capsys, pkg, ckpt, *extra) -> tuple[int, str, str]:
    code = cli.main(["verify-coreml", str(pkg), "--against", str(ckpt), *map(str, extra)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_fp16_linear_passes_every_gate(packages, ckpt, capsys, tmp_path):
    out = tmp_path / "report.json"
    code, text, _ = run_verify(capsys, packages("linear", "fp16"), ckpt, "--json", out)
    assert code == 0, text
    assert "runtime: MIL reference interpreter (numpy), not Core ML" in text
    assert "gates: cosine >= 0.999, top-1 >= 99%, decode loop token for token" in text
    assert "result: PASS" in text
    report = json.loads(out.read_text())
    assert [(r["length"], r["ids"]) for r in report["prefill"]] == [
        (s, kind) for s in SHAPES for kind in ("random", "real")]
    for row in report["prefill"]:
        assert row["passed"] and row["cosine"] >= 0.999 and row["top1"] >= 0.99
        assert row["decisive"] >= 0.5 * row["positions"]  # the top-1 figure is not vacuous
    decode = report["decode"]
    assert decode["steps"] == 32 and decode["ids"] == "real"
    assert decode["package_tokens"] == decode["mlx_tokens"] and decode["first_mismatch"] is None
    assert report["passed"] and report["failures"] == [] and report["probe"] is None


def test_int8_ane_passes_and_probe_reports_every_layer(packages, ckpt, capsys, tmp_path):
    out = tmp_path / "report.json"
    code, text, _ = run_verify(capsys, packages("ane", "int8"), ckpt, "--probe", "--json", out)
    assert code == 0, text
    assert "gates: cosine >= 0.995, top-1 reported, decode loop reported" in text
    report = json.loads(out.read_text())
    assert report["precision"] == "int8" and report["layout"] == "ane"
    assert all(r["cosine"] >= 0.995 for r in report["prefill"])
    probe = report["probe"]
    points = [p["point"] for p in probe["points"]]
    assert points == ["embeddings", "layer 0", "layer 1", "layer 2", "final norm + lm head"]
    assert probe["first_divergence"] is None
    assert "first divergence: none" in text


def corrupt_weight(pkg, out_pkg, const_name: str) -> None:
    """Copy ``pkg`` (with its contract) and negate one fp16 weight inside the copy's blob."""
    shutil.copytree(pkg, out_pkg)
    shutil.copy(contract_path(pkg), contract_path(out_pkg))
    spec_file, weights_dir = locate_model_files(out_pkg)
    block = read_spec(spec_file).mlProgram.functions["prefill"].block_specializations["CoreML8"]
    const = next(op for op in block.operations
                 if op.outputs and op.outputs[0].name == const_name)
    ref = const.attributes["val"].blobFileValue
    with open(weights_dir / ref.fileName.split("/")[-1], "r+b") as f:
        f.seek(ref.offset)
        _, _, n_bytes, data_offset = struct.unpack("<IIQQ", f.read(24))
        f.seek(data_offset)
        data = np.frombuffer(f.read(n_bytes), np.float16)
        f.seek(data_offset)
        f.write((-data).tobytes())


def test_corrupted_layer_fails_and_the_probe_names_it(packages, ckpt, capsys, tmp_path):
    good = packages("linear", "fp16")
    bad = tmp_path / "bad.mlpackage"
    corrupt_weight(good, bad, f"model_layers_{CORRUPTED_LAYER}_mlp_down_proj_weight")
    out = tmp_path / "report.json"
    code, text, _ = run_verify(capsys, bad, ckpt, "--probe", "--json", out, "--steps", "4")
    assert code == 1
    assert "result: FAIL" in text and "FAIL" in text.split("result")[0]
    report = json.loads(out.read_text())
    assert not report["passed"] and not report["decode"]["passed"]
    probe = report["probe"]
    assert probe["first_divergence"] == f"layer {CORRUPTED_LAYER}"
    passed = {p["point"]: p["passed"] for p in probe["points"]}
    assert passed["embeddings"] and passed["layer 0"] and not passed["layer 1"]
    assert f"first divergence: layer {CORRUPTED_LAYER}" in text
    # The original is untouched (the probe copy links its weights, and it was built from `bad`).
    assert run_verify(capsys, good, ckpt, "--steps", "2")[0] == 0
    # Without --probe, the failure points at it.
    report["probe"] = None
    lines = []
    verify.print_report(report, lines.append)
    assert lines[-1] == "rerun with --probe to find the first layer that diverges"


def test_probe_needs_the_named_hidden_states(packages, tmp_path):
    pkg = packages("linear", "fp16")
    points = build_probe_package(pkg, tmp_path / "probe.mlpackage", n_layers=3)
    # vocab 512: coremltools renamed the embedding gather when it cast its indices to 16 bits
    assert points[0] == ("embeddings", "embeddings_cast_uint16")
    assert (tmp_path / "probe.mlpackage" / "Manifest.json").exists()
    with pytest.raises(ProbeError, match="no value named 'layer_3_output'"):
        build_probe_package(pkg, tmp_path / "probe.mlpackage", n_layers=4)


def test_user_errors_exit_2(packages, ckpt, capsys, tmp_path):
    pkg = packages("linear", "fp16")
    lonely = tmp_path / "lonely.mlpackage"
    shutil.copytree(pkg, lonely)
    code, _, err = run_verify(capsys, lonely, ckpt)
    assert code == 2 and "lonely.contract.json: missing" in err
    code, _, err = run_verify(capsys, tmp_path / "none.mlpackage", ckpt)
    assert code == 2 and "not a .mlpackage directory" in err
    config = dataclasses.replace(load_size_config("toy").model, n_layers=2)
    other = save_checkpoint(random_model(config), tmp_path / "other")
    code, _, err = run_verify(capsys, pkg, other)
    assert code == 2 and "model config differs from the package's (n_layers: 2 vs 3)" in err
    if sys.platform != "darwin":
        code, _, err = run_verify(capsys, pkg, ckpt, "--backend", "coreml")
        assert code == 2 and "Core ML execution needs macOS" in err
    assert checks_path(pkg).exists()


def test_source_notes_and_text_ids(ckpt):
    contract = {"model_config": load_size_config("toy").model.to_dict(),
                "source": {"weights_sha256": {"model.safetensors": "0" * 64}}}
    notes = verify.source_notes(contract, ckpt)
    assert len(notes) == 1 and "not the weights the package was exported from" in notes[0]
    ids, why = verify.real_ids(ckpt, vocab_size=512)
    assert ids is not None and ids.max() < 512 and "real ids" in why
    assert verify.real_ids(ckpt, vocab_size=10)[0] is None


def test_tie_rules():
    want = np.array([[5.0, 4.95, 0.0], [0.0, 3.0, 1.0]])
    got = np.array([[4.9, 5.0, 0.0], [0.0, 3.0, 1.0]])  # disagrees only at the tie
    assert verify.top1(got, want, 0.1) == (1.0, 1)
    assert verify.top1(got, want, 10.0) == (None, 0)


@pytest.mark.parametrize("at_tie", [True, False])
def test_decode_mismatch_at_a_tie_is_not_a_failure(monkeypatch, at_tie):
    """Step 1: MLX picks token 0 by a margin of 0.03 (a tie) or 0.5; the package picks 2."""
    mlx_steps = [np.array([0.0, 2.0, 0.0]), np.array([1.0, 0.0, 0.97 if at_tie else 0.5])]
    package_steps = [mlx_steps[0], np.array([0.98, 0.0, 0.99 if at_tie else 1.5])]
    monkeypatch.setattr(verify, "mlx_greedy", lambda *a: ([1, 0], mlx_steps))
    monkeypatch.setattr(verify, "package_greedy", lambda *a: ([1, 2], package_steps))
    result = verify.check_decode(None, None, np.array([1]), 16, 2, verify.GATES["fp16"], 0.1)
    assert result["first_mismatch"] == 1 and result["compared_steps"] == 2
    assert result["mismatch_at_tie"] is at_tie and result["passed"] is at_tie


def test_ane_residency_reports_static_eligibility_and_no_measured_figure(packages, capsys,
                                                                         tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "ane_residency.py"
    spec = importlib.util.spec_from_file_location("ane_residency", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "residency.json"
    assert bench.main([str(packages("ane", "int8")), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    static = report["static"]["functions"]
    assert sorted(static) == ["decode", "prefill"] and report["static"]["passed"]
    for function in static.values():
        assert function["eligible_op_count"] == function["op_count"] > 0
        assert function["ops"]["constexpr_blockwise_shift_scale"] == 22
    if sys.platform != "darwin":
        assert report["measured"] is None
        assert "measured ANE residency needs macOS" in text and "%" not in text
