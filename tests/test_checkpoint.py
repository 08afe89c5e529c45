"""Checkpoints: round trip, interchange with mlx-lm in both directions, clear errors."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import random_model, tiny_config
from mlx.utils import tree_flatten
from mlx_lm.models import llama as mlx_lm_llama
from mlx_lm.utils import load_model, save_config, save_model

from mlx_distill import cli
from mlx_distill.checkpoint import (
    META_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from mlx_distill.config import RopeScaling


def _tokens(n=21, vocab=97, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, vocab, (2, n)), dtype=mx.int32)


CONFIGS = [
    {},
    {"tie_embeddings": False},
    {"attention_bias": True},
    {"attention_bias": True, "attention_out_bias": True, "d_head": 32},
    {"rope_scaling": RopeScaling("linear", 2.0), "n_kv_heads": 1},
]


@pytest.mark.parametrize("overrides", CONFIGS)
def test_round_trip_and_mlx_lm_loads_ours(tmp_path, overrides):
    cfg = tiny_config(**overrides)
    model = random_model(cfg, seed=1)
    save_checkpoint(model, tmp_path / "ckpt")
    tokens = _tokens()
    expected = np.array(model(tokens))
    ours = load_checkpoint(tmp_path / "ckpt")
    assert ours.config == cfg
    np.testing.assert_array_equal(np.array(ours(tokens)), expected)
    peer, peer_config = load_model(tmp_path / "ckpt")
    assert peer_config["model_type"] == "llama"
    np.testing.assert_allclose(np.array(peer(tokens)), expected, atol=1e-4)
    meta = json.loads((tmp_path / "ckpt" / META_FILE).read_text())
    assert len(meta["weights_sha256"]) == 64 and meta["model_config"]["d_model"] == 64


@pytest.mark.parametrize("bias,tie", [(False, True), (True, False)])
def test_we_load_a_checkpoint_written_by_mlx_lm(tmp_path, bias, tie):
    args = mlx_lm_llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=97,
        attention_bias=bias, tie_word_embeddings=tie, rope_theta=10000.0,
    )
    peer = mlx_lm_llama.Model(args)
    rng = np.random.default_rng(3)
    peer.update(
        __import__("mlx.utils", fromlist=["tree_unflatten"]).tree_unflatten(
            [(k, mx.array(0.1 * rng.standard_normal(v.shape).astype(np.float32)))
             for k, v in tree_flatten(peer.parameters())]
        )
    )
    save_model(tmp_path / "peer", peer)
    save_config({k: v for k, v in vars(args).items() if k != "layer_types"},
                tmp_path / "peer" / "config.json")
    ours = load_checkpoint(tmp_path / "peer")
    assert ours.config.attention_out_bias == bias
    tokens = _tokens()
    np.testing.assert_allclose(np.array(ours(tokens)), np.array(peer(tokens)), atol=1e-4)


@pytest.fixture
def saved(tmp_path):
    model = random_model(tiny_config(), seed=5)
    return save_checkpoint(model, tmp_path / "ckpt")


def _cli_error(capsys, path):
    assert cli.main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_inspect_prints_summary(saved, capsys):
    assert cli.main(["inspect", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "parameters" in out


def test_truncated_weights_give_one_line_error(saved, capsys):
    weights = saved / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    (saved / META_FILE).unlink()  # skip the sha check: the reader itself must complain
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable or truncated"):
        load_checkpoint(saved)
    assert "model.safetensors" in _cli_error(capsys, saved)


def test_sha_mismatch_is_detected(saved, capsys):
    weights = saved / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # still a valid file, different numbers
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_checkpoint(saved)
    assert "sha256" in _cli_error(capsys, saved)


def test_missing_tensor_is_named(saved, capsys):
    weights = mx.load(str(saved / WEIGHTS_FILE))
    del weights["model.layers.1.mlp.up_proj.weight"]
    mx.save_safetensors(str(saved / WEIGHTS_FILE), weights)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(saved)
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj"):
        load_checkpoint(saved, verify=False)


def test_wrong_shape_and_unexpected_tensor(saved):
    (saved / META_FILE).unlink()
    weights = mx.load(str(saved / WEIGHTS_FILE))
    weights["model.norm.weight"] = mx.ones((3,))
    mx.save_safetensors(str(saved / WEIGHTS_FILE), weights)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape \(3,\)"):
        load_checkpoint(saved)
    weights["model.norm.weight"] = mx.ones((64,))
    weights["extra.weight"] = mx.ones((2,))
    mx.save_safetensors(str(saved / WEIGHTS_FILE), weights)
    with pytest.raises(CheckpointError, match=r"unexpected tensor extra\.weight"):
        load_checkpoint(saved)


def test_bad_config_files(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nope")
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    assert "config.json: invalid JSON" in _cli_error(capsys, d)
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert "model_type" in _cli_error(capsys, d)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    assert "num_attention_heads: required field is missing" in _cli_error(capsys, d)


def test_failed_save_keeps_previous_checkpoint(saved, monkeypatch):
    before = (saved / WEIGHTS_FILE).read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mx, "save_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(random_model(tiny_config(), seed=9), saved)
    assert (saved / WEIGHTS_FILE).read_bytes() == before
    assert sorted(p.name for p in Path(saved).parent.iterdir()) == ["ckpt"]


def test_overwrite_replaces_whole_directory(saved):
    (saved / "stale.txt").write_text("old run")
    model = random_model(tiny_config(), seed=11)
    save_checkpoint(model, saved)
    assert not (saved / "stale.txt").exists()
    tokens = _tokens()
    np.testing.assert_array_equal(np.array(load_checkpoint(saved)(tokens)), np.array(model(tokens)))
