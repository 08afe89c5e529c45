"""Peer suite: Apple's own MIL op tests (shipped in the coremltools wheel), executed by our numpy
interpreter instead of Core ML.

It is slow, so it runs only when asked for: name it on the command line (``pytest tests/peer``,
``pytest tests/peer/test_peer_ios17.py -k TestSoftmax``) or set ``PEER_TESTS=1``. A plain
``pytest tests`` skips it. ``-m peer_quick`` picks the representative subset CI runs.

Environment:
    PEER_TESTS=1            run the suite even when tests/peer is not named.
    PEER_SUMMARY=class      the closing table per Apple test class instead of per file.
    PEER_PRECISIONS=fp32    backends to run: fp32 (default), fp16, or fp32,fp16 (what
                            `make peer-tests` runs). On fp32 backends the interpreter keeps
                            fp16-typed values in float32 (op semantics at atol 1e-4); on fp16
                            backends it stores fp16 like a device, and Apple loosens the
                            tolerances to atol 0.5 / rtol 0.05.
"""

from __future__ import annotations

import gc
import os
import sys
from collections import Counter, defaultdict
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

PEER_DIR = Path(__file__).resolve().parent

# The CI subset (`-m peer_quick`): the smoke cases of each op family an exported student uses.
_SMOKE = "test_builder_to_backend_smoke"
QUICK = (
    "iOS14/test_activation.py::TestSoftmax",
    "iOS14/test_activation.py::TestSiLU",
    "iOS14/test_activation.py::TestSigmoid",
    f"iOS14/test_activation.py::TestGeLU::{_SMOKE}",
    f"iOS14/test_elementwise_binary.py::TestElementwiseBinary::{_SMOKE}",
    f"iOS14/test_elementwise_binary.py::TestLess::{_SMOKE}",
    f"iOS14/test_elementwise_unary.py::TestElementwiseUnary::{_SMOKE}",
    "iOS15/test_elementwise_unary.py::TestCast",
    f"iOS14/test_control_flow.py::TestConst::{_SMOKE}",
    f"iOS14/test_control_flow.py::TestSelect::{_SMOKE}",
    f"iOS14/test_linear.py::TestMatMul::{_SMOKE}",
    "iOS17/test_linear.py::TestLinear::test_linear_ios17_mixed_precision",
    f"iOS14/test_reduction.py::TestReduction::{_SMOKE}",
    f"iOS17/test_scatter_gather.py::TestGather::{_SMOKE}",
    f"iOS14/test_tensor_transformation.py::TestReshape::{_SMOKE}",
    f"iOS14/test_tensor_transformation.py::TestTranspose::{_SMOKE}",
    f"iOS14/test_tensor_transformation.py::TestExpandDims::{_SMOKE}",
    f"iOS14/test_tensor_transformation.py::TestSqueeze::{_SMOKE}",
    f"iOS14/test_tensor_transformation.py::TestSliceByIndex::{_SMOKE}",
    f"iOS14/test_tensor_transformation.py::TestSliceBySize::{_SMOKE}",
    f"iOS14/test_tensor_transformation.py::TestSplit::{_SMOKE}",
    "iOS14/test_tensor_transformation.py::TestConcat::test_builder_to_backend_*",
    f"iOS18/test_tensor_transformation.py::TestSliceUpdate::{_SMOKE}",
    f"iOS14/test_tensor_operation.py::TestBandPart::{_SMOKE}",
    f"iOS14/test_tensor_operation.py::TestFill::{_SMOKE}",
    f"iOS14/test_tensor_operation.py::TestRange1d::{_SMOKE}",
    f"iOS14/test_tensor_operation.py::TestTile::{_SMOKE}",
    f"iOS14/test_normalization.py::TestNormalizationLayerNorm::{_SMOKE}",
    "iOS18/test_states.py",
    f"iOS16/test_constexpr_ops.py::TestConstexprAffineDequantize::{_SMOKE}",
    f"iOS16/test_constexpr_ops.py::TestConstexprLutToDense::{_SMOKE}",
    f"iOS18/test_compression.py::TestConstexprBlockwiseDequantize::{_SMOKE}",
    f"iOS18/test_compression.py::TestConstexprLut::{_SMOKE}",
    "iOS17/test_quantization.py::TestDequantize::test_smoke_*",
)


def _requested(config) -> bool:
    """Whether this run asked for the peer suite (env var, or tests/peer named on the command
    line)."""
    if os.environ.get("PEER_TESTS") == "1":
        return True
    base = Path(config.invocation_params.dir)
    for arg in config.args:
        path = (base / str(arg).split("::", 1)[0]).resolve()
        if path == PEER_DIR or PEER_DIR in path.parents:
            return True
    return False


def _precisions() -> set[str]:
    wanted = {p.strip() for p in os.environ.get("PEER_PRECISIONS", "fp32").split(",") if p.strip()}
    unknown = wanted - {"fp32", "fp16"}
    if unknown:
        raise pytest.UsageError(f"PEER_PRECISIONS: unknown precision(s) {sorted(unknown)}")
    return wanted


def _configure_apple_backends() -> None:
    """Apple's testing_reqs reads these at import: ML Program backends only, fp32 ones included."""
    import importlib.util

    missing = [m for m in ("PIL", "scipy") if importlib.util.find_spec(m) is None]
    if missing:
        # Apple's testing utilities import PIL; several test modules use scipy as a reference.
        raise pytest.UsageError(
            f"the peer suite needs {' and '.join(missing)}: pip install pillow scipy"
        )
    if "coremltools.converters.mil.testing_reqs" in sys.modules and (
        os.environ.get("PYMIL_TEST_TARGETS") != "mlprogram"
        or os.environ.get("INCLUDE_MIL_FP32_UNIT_TESTS") != "1"
    ):
        raise pytest.UsageError(
            "coremltools' testing_reqs was imported before the peer conftest could configure it; "
            "set PYMIL_TEST_TARGETS=mlprogram INCLUDE_MIL_FP32_UNIT_TESTS=1"
        )
    os.environ["PYMIL_TEST_TARGETS"] = "mlprogram"
    os.environ["INCLUDE_MIL_FP32_UNIT_TESTS"] = "1"
    from coremltools.converters.mil import testing_reqs

    wanted = _precisions()
    # In place: the opset packages build their parametrizations from these lists when imported.
    testing_reqs.backends_internal[:] = [
        b for b in testing_reqs.backends_internal if b.precision in wanted
    ]
    testing_reqs.backends[:] = [b for b in testing_reqs.backends if b[1] in wanted]


def pytest_ignore_collect(collection_path, config):
    if collection_path.parent == PEER_DIR and collection_path.name.startswith("test_peer_"):
        return None if config.stash.get(_ENABLED, False) else True
    return None


_ENABLED = pytest.StashKey[bool]()
_ORIGINS = pytest.StashKey[dict]()
_DESELECTED = pytest.StashKey[Counter]()


def pytest_configure(config):
    enabled = _requested(config)
    config.stash[_ENABLED] = enabled
    config.addinivalue_line("markers", "peer_quick: the peer-suite subset CI runs")
    # Apple's parametrizations pass itertools.product iterators; pytest 9 warns once per test.
    config.addinivalue_line(
        "filterwarnings", "ignore:Passing a non-Collection iterable to parametrize"
    )
    if not enabled:
        return
    _configure_apple_backends()
    import peer_backend

    peer_backend.install()


def _test_key(item) -> str | None:
    from peer_collect import test_key

    if item.cls is None or Path(str(item.path)).parent != PEER_DIR:
        return None
    return test_key(item)


def _matches(key: str, pattern: str) -> bool:
    """``pattern`` names ``key`` exactly, or a file/class/test containing it; ``*`` and ``?`` are
    wildcards (brackets are literal: they delimit parameters)."""
    if key == pattern or key.startswith((pattern + "::", pattern + "[")):
        return True
    literal_brackets = "".join({"[": "[[]", "]": "[]]"}.get(c, c) for c in pattern)
    return fnmatchcase(key, literal_brackets) or fnmatchcase(key, literal_brackets + "[[]*")


def pytest_collection_finish(session):
    if session.config.stash.get(_ENABLED, False):
        # ct.convert ends with a full gc.collect(); with thousands of collected items in the heap
        # that takes ~0.17 s per conversion. Freezing what exists now keeps each one cheap.
        gc.collect()
        gc.freeze()


def pytest_collection_modifyitems(config, items):
    if not config.stash.get(_ENABLED, False):
        return
    import importlib.util

    from deselected import DESELECTED, DESELECTED_WITHOUT_TORCH

    deselect = dict(DESELECTED)
    if importlib.util.find_spec("torch") is None:
        deselect.update(DESELECTED_WITHOUT_TORCH)
    origins, kept, dropped = {}, [], []
    reasons: Counter = Counter()
    for item in items:
        key = _test_key(item)
        if key is None:
            kept.append(item)
            continue
        origins[item.nodeid] = key
        reason = next((why for pat, why in deselect.items() if _matches(key, pat)), None)
        if reason is not None:
            reasons[(_summary_row(key), reason)] += 1
            dropped.append(item)
            continue
        if any(_matches(key, pattern) for pattern in QUICK):
            item.add_marker(pytest.mark.peer_quick)
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    config.stash[_ORIGINS] = origins
    config.stash[_DESELECTED] = reasons


def _summary_row(key: str) -> str:
    """The closing table's row of a test key: its Apple file, or file::class."""
    parts = key.split("::")
    return "::".join(parts[:2]) if os.environ.get("PEER_SUMMARY") == "class" else parts[0]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not config.stash.get(_ENABLED, False) or _ORIGINS not in config.stash:
        return
    from peer_collect import SKIPPED_MODULES

    write = terminalreporter.write_line
    terminalreporter.section("peer suite (Apple's op tests through the interpreter)")
    origins = config.stash[_ORIGINS]
    outcomes: dict[str, Counter] = defaultdict(Counter)
    failures: dict[str, list[str]] = defaultdict(list)
    for category in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"):
        for report in terminalreporter.stats.get(category, []):
            key = origins.get(getattr(report, "nodeid", None))
            if key is None:
                continue
            outcome = "failed" if category == "error" else category
            outcomes[_summary_row(key)][outcome] += 1
            if outcome == "failed":
                failures[key.rsplit("::", 1)[0]].append(key.rsplit("::", 1)[1])
    deselected = config.stash[_DESELECTED]
    deselected_by_row: Counter = Counter()
    for (row_name, _reason), count in deselected.items():
        deselected_by_row[row_name] += count
    columns = ("passed", "failed", "skipped", "xfailed", "xpassed")
    width = max([48, *map(len, outcomes), *map(len, deselected_by_row)])
    header = "class" if os.environ.get("PEER_SUMMARY") == "class" else "file"
    write(f"{header:{width}s} " + " ".join(f"{c:>8s}" for c in columns) + f" {'deselected':>10s}")
    for name in sorted(set(outcomes) | set(deselected_by_row)):
        counts = outcomes.get(name, Counter())
        row = " ".join(f"{counts.get(c, 0):8d}" for c in columns)
        write(f"{name:{width}s} {row} {deselected_by_row.get(name, 0):10d}")
    total = Counter()
    for counts in outcomes.values():
        total.update({c: counts.get(c, 0) for c in columns})
    row = " ".join(f"{total.get(c, 0):8d}" for c in columns)
    write(f"{'total':{width}s} {row} {sum(deselected.values()):10d}")
    if deselected:
        write(f"deselected {sum(deselected.values())} cases (tests/peer/deselected.py):")
        by_reason: Counter = Counter()
        for (_file, reason), count in deselected.items():
            by_reason[reason] += count
        for reason, count in by_reason.most_common():
            write(f"  {count:5d}  {reason}")
    if failures:
        write("failures by test class:")
        for cls, names in sorted(failures.items()):
            write(f"  {len(names):5d}  {cls}")
    for module, reason in sorted(SKIPPED_MODULES.items()):
        write(f"not collected: {module} ({reason})")
