"""Size, role and memory-budget configs, and ``mlx-distill model-info``."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_distill import cli
from mlx_distill.config import ConfigError, ModelConfig, list_size_configs, load_size_config
from mlx_distill.model_info import (
    check_budgets,
    count_parameters,
    load_budgets,
    weight_bytes,
)
from mlx_distill.roles import load_roles

SIZE_NAMES = ["toy", "small", "0.5b", "1b", "3b", "4b", "7b", "8b", "9b"]


def hand_count(c: ModelConfig) -> int:
    """Parameter count from the architecture, written out independently of the model code."""
    d, dh = c.d_model, c.d_head
    attn = d * dh * (2 * c.n_heads + 2 * c.n_kv_heads)  # q and o, k and v
    if c.attention_bias:
        attn += dh * (c.n_heads + 2 * c.n_kv_heads)
    if c.attention_out_bias:
        attn += d
    layer = attn + 3 * d * c.d_ff + 2 * d  # SwiGLU MLP, two RMSNorms
    embeddings = c.vocab_size * d * (1 if c.tie_embeddings else 2)
    return c.n_layers * layer + embeddings + d  # + final norm


def small_config(**overrides) -> ModelConfig:
    fields = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=100)
    return ModelConfig(**(fields | overrides))


# ---- size configs ----

def test_every_expected_size_exists():
    assert sorted(p.stem for p in list_size_configs()) == sorted(SIZE_NAMES)


@pytest.mark.parametrize("name", SIZE_NAMES)
def test_size_config_matches_nominal(name):
    size = load_size_config(name)
    assert size.name == name
    with open(size.path) as f:
        assert type(yaml.safe_load(f)["nominal_params"]) is int  # "7.0e9" would be a string
    count = count_parameters(size.model)
    assert count == hand_count(size.model)
    assert abs(count / size.nominal_params - 1) <= 0.05, (name, count, size.nominal_params)


def test_large_sizes_share_vocab_and_use_gqa():
    vocab = {load_size_config(n).model.vocab_size for n in SIZE_NAMES[2:]}
    assert vocab == {128256}
    for name in SIZE_NAMES:
        cfg = load_size_config(name).model
        assert cfg.n_kv_heads < cfg.n_heads, name
    llama3 = load_size_config("8b").model
    assert (llama3.d_model, llama3.n_layers, llama3.n_heads, llama3.n_kv_heads, llama3.d_ff) == (
        4096, 32, 32, 8, 14336)
    assert count_parameters(llama3) == 8_030_261_248  # Llama-3-8B's published count


def test_counting_9b_is_lazy():
    import mlx.core as mx  # after mlx_distill (imported above), which sets up fast BLAS

    mx.reset_peak_memory()
    assert count_parameters(load_size_config("9b").model) > 8e9
    assert mx.get_peak_memory() < 2**20  # nothing near 9e9 parameters' worth was allocated


@settings(max_examples=25, deadline=None)
@given(d_head=st.sampled_from([8, 16]), n_kv=st.integers(1, 3), group=st.integers(1, 3),
       n_layers=st.integers(1, 3), d_ff=st.integers(1, 64), vocab=st.integers(1, 300),
       tie=st.booleans(), bias=st.booleans(), out_bias=st.booleans())
def test_count_matches_hand_formula(d_head, n_kv, group, n_layers, d_ff, vocab, tie, bias,
                                    out_bias):
    cfg = ModelConfig(d_model=48, n_layers=n_layers, n_heads=n_kv * group, n_kv_heads=n_kv,
                      d_head=d_head, d_ff=d_ff, vocab_size=vocab, tie_embeddings=tie,
                      attention_bias=bias, attention_out_bias=out_bias)
    assert count_parameters(cfg) == hand_count(cfg)


def test_weight_bytes_by_hand():
    cfg = ModelConfig(d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=16, vocab_size=10,
                      tie_embeddings=False, attention_bias=True)
    # [out, in] of every matrix: embedding, q, k, v, o, gate, up, down, lm_head
    matrices = [(10, 8), (8, 8), (4, 8), (4, 8), (8, 8), (16, 8), (16, 8), (8, 16), (10, 8)]
    vectors = 8 + 4 + 4 + 3 * 8  # q/k/v biases, two layer norms and the final norm
    params = sum(r * c for r, c in matrices) + vectors
    assert count_parameters(cfg) == params == 776
    int8 = sum(r * c + 2 * r for r, c in matrices) + 2 * vectors
    int4 = sum(math.ceil(r * c / 2) + 2 * r * math.ceil(c / 32) for r, c in matrices) + 2 * vectors
    assert weight_bytes(cfg) == {"fp16": 2 * params, "int8": int8, "int4": int4}
    assert (int8, int4) == (984, 616)


def test_tied_embedding_quantised_once():
    tied, untied = small_config(tie_embeddings=True), small_config(tie_embeddings=False)
    extra = weight_bytes(untied)["int8"] - weight_bytes(tied)["int8"]
    assert extra == 100 * 64 + 2 * 100


def test_unknown_size_key_names_field(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "nominal_params": 1000,
                                    "model": dataclasses.asdict(small_config()) | {"n_expert": 4}}))
    with pytest.raises(ConfigError, match=r"x\.yaml: model: n_expert: unknown field"):
        load_size_config(path)


GOOD = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=100)
SIZE_FIELDS = ["d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size",
               "max_seq_len"]


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(SIZE_FIELDS),
       bad=st.one_of(st.integers(max_value=0), st.floats(allow_nan=False), st.booleans(),
                     st.text(max_size=3), st.none()))
def test_non_positive_sizes_rejected(name, bad):
    with pytest.raises(ConfigError, match=name):
        ModelConfig(**(GOOD | {name: bad}))


@settings(max_examples=40, deadline=None)
@given(n_kv=st.integers(2, 16), n_heads=st.integers(1, 64))
def test_heads_must_group_evenly(n_kv, n_heads):
    fields = GOOD | {"n_heads": n_heads, "n_kv_heads": n_kv, "d_head": 16}
    if n_heads % n_kv:
        with pytest.raises(ConfigError, match="n_kv_heads"):
            ModelConfig(**fields)
    else:
        assert ModelConfig(**fields).n_heads == n_heads


@settings(max_examples=25, deadline=None)
@given(key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_unknown_model_keys_rejected(key):
    if key in {f.name for f in dataclasses.fields(ModelConfig)}:
        return
    with pytest.raises(ConfigError, match=f"{key}: unknown field"):
        ModelConfig.from_dict(GOOD | {key: 1}, source="x.yaml")


# ---- roles ----

def test_roles_validate():
    roles = load_roles()
    assert {n: r.size.name for n, r in roles.items()} == {
        "worker": "9b", "judge": "4b", "drafter": "4b"}
    assert roles["worker"].contexts == (4096, 8192, 16384)
    assert roles["judge"].targets.latency_p95_ms == 50
    assert roles["drafter"].targets.decode_tps == 500
    for role in roles.values():
        assert max(role.coreml.prefill_shapes) <= role.coreml.max_context
        assert max(role.contexts) <= role.coreml.max_context <= role.size.model.max_seq_len


def _role(**overrides):
    role = {"size": "4b", "contexts": [1024], "coreml": {"prefill_shapes": [256],
            "max_context": 1024}, "targets": {"latency_p50_ms": 1, "latency_p95_ms": 2,
                                              "decode_tps": 3}}
    return role | overrides


@pytest.mark.parametrize("role, match", [
    (_role(colour="red"), r"roles\.r\.colour: unknown key"),
    ({k: v for k, v in _role().items() if k != "targets"}, r"roles\.r\.targets: required"),
    (_role(size="13b"), r"roles\.r\.size: no size config named '13b'"),
    (_role(coreml={"prefill_shapes": [2048], "max_context": 1024}),
     r"prefill_shapes\[0\]: 2048 exceeds"),
    (_role(contexts=[16384], coreml={"prefill_shapes": [512], "max_context": 16384}),
     r"coreml\.max_context: 16384 exceeds size 4b's max_seq_len 8192"),
    (_role(contexts=[0]), r"contexts\[0\]: expected a positive integer"),
    (_role(targets={"latency_p50_ms": 9, "latency_p95_ms": 2, "decode_tps": 3}),
     r"latency_p50_ms: 9 is above"),
])
def test_bad_roles_name_the_field(tmp_path, role, match):
    path = tmp_path / "roles.yaml"
    path.write_text(yaml.safe_dump({"roles": {"r": role}}))
    with pytest.raises(ConfigError, match=match):
        load_roles(path)


def test_drafter_must_share_the_worker_vocab(tmp_path):
    path = tmp_path / "roles.yaml"
    path.write_text(yaml.safe_dump({"roles": {"worker": _role(size="4b"),
                                              "drafter": _role(size="small")}}))
    with pytest.raises(ConfigError, match="drafter.size: vocab_size 8192"):
        load_roles(path)


# ---- memory budgets ----

def test_budgets_consistent_and_fit():
    budgets = load_budgets()
    assert {"m1-max-64gb", "m2-max-64gb", "m3-max-64gb"} <= set(budgets)
    for check in check_budgets(budgets, load_roles()):
        assert check.errors == [], check.hardware.name
        assert check.fits, (check.hardware.name, check.total_bytes, check.hardware.usable_bytes)
        for m in check.models:
            cfg = load_size_config(m.deployed.size).model
            kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.d_head * 2
            assert m.deployed.kv_bytes_per_token == kv
            stated = m.deployed.weights_mb_int8 * 2**20
            assert abs(stated / weight_bytes(cfg)["int8"] - 1) <= 0.01


def _budget_file(tmp_path, sessions=2, usable_fraction=0.75, **overrides):
    model = {"role": "worker", "size": "9b", "precision": "int8", "weights_mb_int8": 8494,
             "kv_bytes_per_token": 147456, "max_context": 16384,
             "max_concurrent_sessions": sessions, "eviction": "lru"} | overrides
    path = tmp_path / "budgets.yaml"
    path.write_text(yaml.safe_dump({"hardware": {"tiny-mac": {
        "unified_memory_gb": 64, "usable_fraction": usable_fraction, "models": [model]}}}))
    return path


@pytest.mark.parametrize("overrides, match", [
    ({"eviction": "random"}, r"models\[0\]\.eviction: expected one of"),
    ({"precision": "fp16"}, r"models\[0\]\.precision: only int8"),
    ({"max_context": -1}, r"models\[0\]\.max_context: expected a positive integer"),
    ({"extra": 1}, r"models\[0\]\.extra: unknown key"),
    ({"usable_fraction": 1.5}, r"tiny-mac\.usable_fraction: expected at most 1"),
])
def test_bad_budget_entries_name_the_field(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_budgets(_budget_file(tmp_path, **overrides))


@pytest.mark.parametrize("overrides, errors", [
    ({}, []),
    ({"role": "ghost"}, ["role: no role 'ghost'"]),
    ({"role": "judge"}, ["size: role judge is served by size 4b, not 9b",
                         "max_context: 16384 exceeds role judge's largest context 2048"]),
    ({"max_context": 32768}, ["max_context: 32768 exceeds size 9b's max_seq_len 16384",
                              "max_context: 32768 exceeds role worker's largest context"]),
])
def test_budget_cross_checks_with_roles(tmp_path, overrides, errors):
    (check,) = check_budgets(load_budgets(_budget_file(tmp_path, **overrides)), load_roles())
    assert len(check.errors) == len(errors)
    for got, want in zip(check.errors, errors, strict=True):
        assert want in got and "tiny-mac.models[0]." in got


# ---- mlx-distill model-info ----

@pytest.fixture
def main(monkeypatch):
    # Only this command's module: the test must not depend on the other stages' parsers.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["mlx_distill.model_info"])
    return cli.main


def test_model_info_prints_count(main, capsys):
    assert main(["model-info", "9b"]) == 0
    out = capsys.readouterr().out
    assert "8,902,709,248" in out and "9,000,000,000" in out and "(-1.08%)" in out
    assert "m1-max-64gb" in out and "OK" in out and "147,456 B" in out


def test_model_info_json(main, capsys):
    assert main(["model-info", "4b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 3_961_838_080
    assert set(info["roles"]) == {"judge", "drafter"}
    assert info["budgets"] and all(b["fits"] and b["consistent"] for b in info["budgets"])


def test_model_info_budget_that_cannot_fit(main, capsys, tmp_path):
    assert main(["model-info", "9b", "--budgets", str(_budget_file(tmp_path, sessions=40))]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out
    assert "tiny-mac: needs 98.29 GiB but only 48.00 GiB is usable" in captured.err


def test_model_info_inconsistent_stated_numbers(main, capsys, tmp_path):
    path = _budget_file(tmp_path, weights_mb_int8=7000, kv_bytes_per_token=131072)
    assert main(["model-info", "9b", "--budgets", str(path)]) == 1
    err = capsys.readouterr().err
    assert "weights_mb_int8: stated 7000 MiB but size 9b needs 8494.0 MiB" in err
    assert "kv_bytes_per_token: stated 131072 but size 9b has 147456" in err


def test_model_info_config_file_stands_in_for_its_size(main, capsys, tmp_path):
    # A deeper "9b" no longer matches the stated budget numbers of the real 9b.
    data = yaml.safe_load(open(load_size_config("9b").path))
    data["model"]["n_layers"] = 40
    path = tmp_path / "deeper.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["model-info", str(path)]) == 1
    assert "kv_bytes_per_token: stated 147456 but size 9b has 163840" in capsys.readouterr().err


def test_model_info_toy_has_no_budget(main, capsys):
    assert main(["model-info", "toy"]) == 0
    assert "no memory budget deploys size toy" in capsys.readouterr().out


def test_model_info_unknown_size_is_a_user_error(main, capsys):
    assert main(["model-info", "13b"]) == 2
    assert "13b: no such config file or size name" in capsys.readouterr().err


# ---- config.json (HF / mlx-lm) mapping ----

def test_hf_round_trip_with_dynamic_rope_and_qwen2_bias():
    from mlx_distill.config import RopeScaling

    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, vocab_size=97,
                      rope_scaling=RopeScaling("dynamic", 2.0, 128), max_seq_len=512)
    hf = cfg.to_hf_dict()
    assert hf["max_position_embeddings"] == 128  # HF convention for dynamic NTK
    back = ModelConfig.from_hf_dict(hf)
    assert back.rope_scaling == cfg.rope_scaling
    qwen = dict(hf, model_type="qwen2", rope_scaling=None)
    q = ModelConfig.from_hf_dict(qwen)
    assert q.attention_bias and not q.attention_out_bias


@pytest.mark.parametrize(
    "patch,match",
    [
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling.type"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"num_key_value_heads": 3}, "n_kv_heads"),
        ({"model_type": "gpt_neox"}, "model_type"),
    ],
)
def test_hf_config_errors_name_the_field(patch, match):
    hf = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "intermediate_size": 96, "vocab_size": 97}
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_dict({**hf, **patch}, source="x/config.json")
