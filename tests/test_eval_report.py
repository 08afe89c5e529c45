"""``mlx-distill eval`` end to end through the real runtime (tiny MLX checkpoints, a Core ML package
run by the MIL interpreter): exit codes of passed and failed gates, baseline regressions, the
report's tables, figures and fingerprints (against hashlib over the files); plus the gates file and
the baseline comparison on their own."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from helpers import random_model, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_distill import cli
from mlx_distill.checkpoint import save_checkpoint
from mlx_distill.config import ConfigError
from mlx_distill.eval import baseline, gates
from mlx_distill.eval.runner import EvalError, parse_backend
from mlx_distill.tasks.eightball import write_eightball
from mlx_distill.tasks.toolcall import write_toolcall
from mlx_distill.tasks.toolcall_tools import TOOLS
from mlx_distill.teacher.types import canonical_json
from mlx_distill.tokenizer import load_tokenizer, train_tokenizer

N_TEST = 4
LENIENT = """\
profiles:
  lenient:
    toolcall:
      latency_p99_ms: {max: 1000000000}
      logits_ok: {equals: true}
    baseline: {quality_tolerance: 0.02, perf_tolerance: 1000.0, fail: true}
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checkpoint(root: Path, data: Path, vocab_size: int, seed: int, name: str) -> Path:
    tok_dir = root / "tokenizer"
    if not tok_dir.exists():
        train_tokenizer([data / "train.sft.jsonl"], vocab_size, tok_dir)
    vocab = len(load_tokenizer(tok_dir))
    model = random_model(tiny_config(vocab_size=vocab, max_seq_len=1024), seed=seed)
    return save_checkpoint(model, root / name, tokenizer_dir=tok_dir)


@pytest.fixture(scope="module")
def toolcall_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_toolcall")
    data = write_toolcall(root / "data", 30, 4, N_TEST, seed=0)
    teacher = checkpoint(root, data, 700, seed=1, name="teacher")
    student = checkpoint(root, data, 700, seed=2, name="student")
    gates_file = root / "gates.yaml"
    gates_file.write_text(LENIENT)
    return root, data, teacher, student, gates_file


def run_cli(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setitem(cli.COMMANDS, "eval", ("mlx_distill.eval.cli", "evaluate backends"))
    code = cli.main(["eval", "--quiet", "--max-tokens", "6", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def eval_args(run, out: Path, *extra: str) -> list[str]:
    _, data, teacher, student, _ = run
    return ["--data", str(data / "test.jsonl"), "--backend", f"teacher=mlx:{teacher}",
            "--backend", f"student=mlx:{student}", "--out", str(out), *extra]


def test_passing_gates_exit_0_with_tables_figures_and_fingerprints(toolcall_run, monkeypatch,
                                                                   capsys):
    root, data, teacher, student, gates_file = toolcall_run
    out = root / "pass"
    code, stdout, err = run_cli(monkeypatch, capsys, *eval_args(
        toolcall_run, out, "--gates", str(gates_file), "--profile", "lenient", "--role", "judge"))
    assert code == 0, err
    assert stdout.splitlines()[-1] == f"report: {out / 'report.md'}"
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["task"] == "toolcall" and report["samples"] == N_TEST
    fp = report["fingerprints"]
    assert fp["dataset_sha256"] == sha256(data / "test.jsonl")
    assert fp["fixtures_sha256"] == {str(data / "fixtures.jsonl"): sha256(data / "fixtures.jsonl")}
    assert fp["tool_registry_sha256"] == hashlib.sha256(
        canonical_json(TOOLS).encode()).hexdigest()
    assert report["environment"]["packages"]["mlx"]
    for backend, ckpt in zip(report["backends"], (teacher, student), strict=True):
        assert backend["fingerprints"]["weights_sha256"] == {
            "model.safetensors": sha256(ckpt / "model.safetensors")}
        assert backend["fingerprints"]["weight_bytes"] == (ckpt / "model.safetensors").stat(
            ).st_size
        assert backend["fingerprints"]["tokenizer_sha256"] == sha256(ckpt / "tokenizer.json")
        assert backend["performance"]["requests"] >= N_TEST
        assert [c["metric"] for c in backend["targets"]["checks"]] == [
            "latency_p50_ms", "latency_p95_ms", "decode_tps"]
        assert backend["health"]["logits_ok"] is True
        lines = (out / backend["predictions"]).read_text().splitlines()
        samples = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
        assert [json.loads(line)["id"] for line in lines] == [s["id"] for s in samples]
    md = (out / "report.md").read_text()
    assert md.startswith("# Eval report: PASS")
    for heading in ("## Backends", "## Per category", "## Performance", "## Gates",
                    "## Fingerprints"):
        assert f"\n{heading}\n" in md
    assert "| backend | kind | size | strict F1 | lax F1 |" in md
    assert "\n| teacher | mlx |" in md and "\n| student | mlx |" in md
    assert "Targets of role `judge` (reported, not enforced)" in md
    assert sha256(student / "model.safetensors") in md
    for png in ("latency.png", "categories.png"):
        assert f"]({png})" in md
        image = matplotlib.image.imread(out / png)
        assert image.ndim == 3 and image.shape[0] > 100 and np.ptp(image) > 0


def test_failed_gate_exits_1_and_names_it(toolcall_run, monkeypatch, capsys):
    root = toolcall_run[0]
    code, stdout, _ = run_cli(monkeypatch, capsys, *eval_args(toolcall_run, root / "fail"))
    assert code == 1
    assert "student: FAILED (lax_f1 >= 0.9" in stdout
    report = json.loads((root / "fail" / "report.json").read_text())
    verdicts = {v["metric"]: v["status"] for v in report["backends"][1]["gates"]}
    assert set(verdicts) == {"lax_f1", "privacy_ok_rate", "controls_with_call",
                             "fixture_hit_rate"}
    assert verdicts["lax_f1"] == "fail"  # random weights are far from F1 0.9
    assert (root / "fail" / "report.md").read_text().startswith("# Eval report: FAIL")


def test_baseline_regressions_are_flagged_and_fail_the_run(toolcall_run, monkeypatch, capsys):
    root, data, _, student, gates_file = toolcall_run

    def run(out: str, *extra: str) -> tuple[int, str]:
        code, stdout, _ = run_cli(monkeypatch, capsys, "--data", str(data / "test.jsonl"),
                                  "--limit", "3", "--backend", f"student=mlx:{student}",
                                  "--gates", str(gates_file), "--profile", "lenient",
                                  "--out", str(root / out), *extra)
        return code, stdout

    run("base")
    prior = json.loads((root / "base" / "report.json").read_text())
    # The same run as baseline: quality is identical and timings are within the (huge) tolerance.
    code, _ = run("same", "--baseline", str(root / "base" / "report.json"))
    again = json.loads((root / "same" / "report.json").read_text())["baseline"]
    assert code == 0 and again["comparisons"] and not again["regressions"]
    assert not again["dataset_differs"]
    # A baseline whose student was better: exact accuracy dropped by more than 0.02.
    better = json.loads(json.dumps(prior))
    student_metrics = better["backends"][0]["metrics"]
    student_metrics["exact_accuracy"] += 0.5
    (root / "better.json").write_text(json.dumps(better))
    code, stdout = run("worse", "--baseline", str(root / "better.json"))
    assert code == 1
    assert f"regression: student exact_accuracy {student_metrics['exact_accuracy']:.4g}" in stdout
    md = (root / "worse" / "report.md").read_text()
    assert "## Baseline" in md and "| student | exact_accuracy |" in md and "REGRESSED" in md


def test_bad_input_exits_2_with_one_line_and_writes_nothing(toolcall_run, monkeypatch, capsys):
    root, data, _, student, _ = toolcall_run
    bad_fixtures = root / "bad_fixtures.jsonl"
    bad_fixtures.write_text('{"name": "add", "arguments": {}}\n')
    cases = [
        (["--data", str(root / "missing.jsonl")], "missing.jsonl: eval file not found"),
        (["--data", str(data / "test.jsonl"), "--fixtures", str(bad_fixtures)],
         "bad_fixtures.jsonl:1: result: missing"),
        (["--data", str(data / "test.jsonl"), "--profile", "nope"], "profiles.nope: no such"),
        (["--data", str(data / "test.jsonl"), "--role", "pilot"], "--role pilot: no such role"),
    ]
    for argv, message in cases:
        out = root / "never"
        code, stdout, err = run_cli(monkeypatch, capsys, *argv, "--backend", f"mlx:{student}",
                                    "--out", str(out))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
        assert not out.exists() and "report:" not in stdout
    code, _, err = run_cli(monkeypatch, capsys, "--data", str(data / "test.jsonl"),
                           "--backend", "tpu:model", "--out", str(root / "never"))
    assert code == 2 and "--backend" in err


def test_an_openai_endpoint_serving_a_checkpoint_answers_as_that_checkpoint(
        toolcall_run, monkeypatch, capsys):
    from mlx_distill.teacher.server import serve_in_thread

    root, data, teacher, _, _ = toolcall_run
    url, stop = serve_in_thread(teacher, model_id="tiny-teacher")
    try:
        code, _, err = run_cli(monkeypatch, capsys, "--data", str(data / "test.jsonl"),
                               "--limit", "2", "--constrain", "off",
                               "--backend", f"served=openai:{url}#tiny-teacher",
                               "--backend", f"local=mlx:{teacher}", "--out", str(root / "api"))
    finally:
        stop()
    assert code in (0, 1), err
    report = json.loads((root / "api" / "report.json").read_text())
    served, local = report["backends"]
    texts = [[[t["text"] for t in json.loads(line)["turns"]]
              for line in (root / "api" / b["predictions"]).read_text().splitlines()]
             for b in (served, local)]
    assert texts[0] == texts[1] and len(texts[0]) == 2
    assert served["metrics"]["lax_f1"] == local["metrics"]["lax_f1"]
    # Whole completions: the time to first token (first streamed chunk with output), but no
    # decode speed and no weights on this side.
    assert served["performance"]["ttft_ms"]["p50"] > 0
    assert served["metrics"]["decode_tps"] is None
    assert served["fingerprints"]["weights_sha256"] is None
    assert local["metrics"]["decode_tps"] > 0
    assert "| served | openai | – |" in (root / "api" / "report.md").read_text()


@pytest.fixture(scope="module")
def eightball_run(tmp_path_factory):
    from converters.export import export_coreml

    root = tmp_path_factory.mktemp("eval_eightball")
    data = write_eightball(root / "data", 60, 4, N_TEST, seed=0)
    ckpt = checkpoint(root, data, 400, seed=3, name="student")
    package = export_coreml(ckpt, root / "student.mlpackage", shapes=[32, 64], max_context=128)
    return root, data, ckpt, package


def test_eightball_side_by_side_with_the_core_ml_reference(eightball_run, monkeypatch, capsys):
    root, data, ckpt, package = eightball_run
    out = root / "report"
    code, _, _ = run_cli(monkeypatch, capsys, "--data", str(data / "test.jsonl"), "--backend",
                         f"student=mlx:{ckpt}", "--backend", f"coreml=coreml:{package}",
                         "--profile", "toy", "--out", str(out))
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "eightball"
    mlx_run, coreml_run = report["backends"]
    assert not mlx_run["reference"] and coreml_run["reference"]
    assert "not Core ML" in coreml_run["runtime"]
    weights = "Data/com.apple.CoreML/weights/weight.bin"
    assert coreml_run["fingerprints"]["weights_sha256"] == {weights: sha256(package / weights)}
    assert coreml_run["fingerprints"]["tokenizer_sha256"] == sha256(ckpt / "tokenizer.json")
    # Every enumerated prefill shape of the package ran and gave sane logits; MLX has none.
    assert coreml_run["health"]["lengths"] == [32, 64] and coreml_run["health"]["shapes_ok"]
    assert mlx_run["health"]["shapes_ok"] is None and mlx_run["health"]["logits_ok"]
    statuses = {b["label"]: {v["metric"]: v["status"] for v in b["gates"]}
                for b in report["backends"]}
    assert statuses["coreml"]["shapes_ok"] == "pass" and statuses["student"]["shapes_ok"] == "n/a"
    accuracy = {b["label"]: b["metrics"]["accuracy"] for b in report["backends"]}
    assert code == (0 if min(accuracy.values()) >= 0.2 else 1)
    md = (out / "report.md").read_text()
    assert "| coreml | coreml (reference) |" in md and "not Core ML" in md
    assert "| category | samples | correct | accuracy |" in md


# ---- backend specs, the gates file and the baseline comparison on their own ----

@settings(max_examples=80)
@given(label=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,12}", fullmatch=True),
       junk=st.text(max_size=40))
def test_backend_specs_parse_or_fail_with_one_line(toolcall_run, label, junk):
    student = toolcall_run[3]
    spec = parse_backend(f"{label}=mlx:{student}")
    assert (spec.label, spec.kind, spec.location, spec.spec) == (
        label, "mlx", str(student), f"mlx:{student}")
    assert parse_backend(f"mlx:{student}").label == "mlx:student"
    assert parse_backend(f"{label}=openai:http://h:1/v1#m").location == "http://h:1/v1"
    try:
        parsed = parse_backend(junk)
    except EvalError as exc:
        assert "\n" not in str(exc)
    else:
        assert parsed.kind == "openai"  # only an endpoint spec needs nothing on disk



def test_shipped_profiles_hold_the_documented_thresholds():
    default = gates.load_profile(profile="default")
    assert {g.describe() for g in default.for_task("toolcall")} == {
        "lax_f1 >= 0.9", "privacy_ok_rate >= 1", "controls_with_call <= 0",
        "fixture_hit_rate >= 0.95"}
    assert default.baseline.perf_tolerance == 0.10 and not default.enforce_role_targets
    toy = gates.load_profile(profile="toy")
    assert {g.describe() for g in toy.for_task("toolcall")} == {
        "lax_f1 >= 0.2", "shapes_ok == true", "logits_ok == true"}
    assert toy.needs_health("eightball") and not default.needs_health("toolcall")


@pytest.mark.parametrize(("body", "field"), [
    ("profiles: {p: {toolcall: {f1: {min: 1}}}}", "profiles.p.toolcall.f1: unknown metric"),
    ("profiles: {p: {toolcall: {lax_f1: {at_least: 1}}}}", "profiles.p.toolcall.lax_f1"),
    ("profiles: {p: {toolcall: {lax_f1: {min: high}}}}", "profiles.p.toolcall.lax_f1.min"),
    ("profiles: {p: {eightball: {shapes_ok: {min: 1}}}}", "profiles.p.eightball.shapes_ok"),
    ("profiles: {p: {baseline: {perf_tolerance: -1}}}", "profiles.p.baseline.perf_tolerance"),
    ("profiles: {p: {role_targets: {enforce: 1}}}", "profiles.p.role_targets.enforce"),
    ("profiles: {p: {speed: {}}}", "profiles.p.speed: unknown key"),
    ("profiles: {q: {}}", "profiles.p: no such profile"),
    ("profiles: [", "invalid YAML"),
])
def test_bad_gates_files_name_the_field(tmp_path, body, field):
    path = tmp_path / "gates.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        gates.load_profile(path, "p")
    assert field in str(info.value) and str(info.value).startswith(str(path))


def test_gate_verdicts():
    profile = gates.GateProfile("t", "-", {"toolcall": (
        gates.Gate("lax_f1", "min", 0.5), gates.Gate("controls_with_call", "max", 0),
        gates.Gate("fixture_hit_rate", "min", 0.95), gates.Gate("shapes_ok", "equals", True))},
        gates.BaselinePolicy(), False)
    verdicts = gates.check_gates(profile.for_task("toolcall"), {
        "lax_f1": 0.5, "controls_with_call": 1, "fixture_hit_rate": None, "shapes_ok": 1})
    assert [v["status"] for v in verdicts] == ["pass", "fail", "n/a", "fail"]
    assert not gates.all_passed(verdicts)
    assert gates.all_passed(gates.check_gates(profile.for_task("toolcall")[2:3], {}))


def _section(label, **metrics):
    return {"label": label, "metrics": metrics}


def test_baseline_tolerances_and_pairing():
    policy = gates.BaselinePolicy(quality_tolerance=0.02, perf_tolerance=0.10)
    old = {"backends": [_section("s", lax_f1=0.90, latency_p50_ms=100.0, latency_p95_ms=200.0,
                                 decode_tps=50.0, ttft_p50_ms=None)]}
    new = [_section("s", lax_f1=0.885, latency_p50_ms=109.0, latency_p95_ms=221.0,
                    decode_tps=44.0, ttft_p50_ms=5.0)]
    result = baseline.compare(new, old, policy)
    flagged = {r["metric"]: r["regressed"] for r in result["comparisons"]}
    assert flagged == {"lax_f1": False, "latency_p50_ms": False, "latency_p95_ms": True,
                       "decode_tps": True}
    assert {r["metric"] for r in result["regressions"]} == {"latency_p95_ms", "decode_tps"}
    # One backend on each side pairs whatever the labels; otherwise labels must match.
    assert baseline.compare([_section("other", lax_f1=0.5)], old, policy)["regressions"]
    two = [_section("a", lax_f1=0.1), _section("b", lax_f1=0.1)]
    assert baseline.compare(two, old, policy)["unpaired"] == ["a", "b"]


def test_unreadable_baseline_is_a_one_line_error(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"backends": [{"label": "x"}]}))
    with pytest.raises(baseline.BaselineError, match="backends: expected a list"):
        baseline.load_baseline(path)
    with pytest.raises(baseline.BaselineError, match="not found"):
        baseline.load_baseline(tmp_path / "nope.json")
