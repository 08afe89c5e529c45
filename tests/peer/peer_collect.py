"""Expose the test classes of Apple's installed op-test modules to pytest (nothing is copied).

Each ``test_peer_<opset>.py`` calls :func:`import_apple_tests`, which imports every ``test_*``
module of ``coremltools.converters.mil.mil.ops.tests.<opset>`` and binds its ``Test*`` classes into
the caller's namespace, so pytest collects them under our conftest (which routes predictions
through the interpreter)."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from collections import Counter

APPLE_TESTS = "coremltools.converters.mil.mil.ops.tests"

# Apple modules that could not be imported here, with the reason (shown in the terminal summary).
SKIPPED_MODULES: dict[str, str] = {}


def apple_origin(cls) -> str:
    """``iOS17/test_activation.py::TestSoftmax`` for an Apple test class."""
    module = cls.__module__
    if not module.startswith(APPLE_TESTS + "."):
        return f"{module}::{cls.__name__}"
    opset, stem = module[len(APPLE_TESTS) + 1 :].split(".")
    return f"{opset}/{stem}.py::{cls.__name__}"


def _apple_modules(opset: str):
    package = importlib.import_module(f"{APPLE_TESTS}.{opset}")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not info.name.startswith("test_"):
            continue
        name = f"{APPLE_TESTS}.{opset}.{info.name}"
        try:
            yield importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != "torch":
                raise
            # torch is the reference of those tests; this environment (by design) has none.
            SKIPPED_MODULES[f"{opset}/{info.name}.py"] = "imports torch, which is not installed"
        except NameError as exc:
            if exc.name != "torch":
                raise
            yield _import_with_torch_absent(name)


class _TorchAbsent:
    """Stands in for ``torch`` in an Apple module that touches it at import time although its
    ``import torch`` is guarded (``torch.manual_seed(...)``, ``-> torch.Tensor`` annotations).
    Seeding is a no-op; anything else yields a stand-in that raises when called, so a test that
    really needs torch fails loudly (and is listed in deselected.py)."""

    def __init__(self, path: str = "torch"):
        self._path = path

    def manual_seed(self, seed):
        return None

    def __getattr__(self, name: str):
        return _TorchAbsent(f"{self._path}.{name}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._path}: this test needs torch, which is not installed")


def _import_with_torch_absent(name: str):
    spec = importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(spec)
    module.torch = _TorchAbsent()
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _test_classes(module):
    for attr, value in vars(module).items():
        own_class = isinstance(value, type) and value.__module__ == module.__name__
        if attr.startswith("Test") and own_class:
            yield value


def import_apple_tests(opset: str, namespace: dict) -> None:
    """Bind the test classes of every Apple module of ``opset`` into ``namespace``.

    A class name used by two Apple modules of the same opset gets the module's name appended
    (``TestConcat_tensor_operation``), so every class is collected."""
    classes = [cls for module in _apple_modules(opset) for cls in _test_classes(module)]
    counts = Counter(cls.__name__ for cls in classes)
    for cls in classes:
        name = cls.__name__
        if counts[name] > 1:
            name = f"{name}_{cls.__module__.rsplit('.', 1)[1].removeprefix('test_')}"
        namespace[name] = cls


def _readable(value) -> str:
    """A parameter value as the deselection keys spell it (pytest's own ids for Apple's
    parametrizations are mostly ``backend3``-style indices, which shift when backends change)."""
    import numpy as np

    precision = getattr(value, "precision", None)
    opset = getattr(value, "opset_version", None)
    if precision is not None and opset is not None:  # a BackendConfig
        return f"{value.backend}-{precision}-{opset.name}"
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_readable(v) for v in value) + ")"
    if isinstance(value, np.ndarray):
        return f"array{list(value.shape)}"
    if value is None or isinstance(value, (bool, int, float, str, np.generic)):
        return str(value)
    name = getattr(value, "name", None)  # enums (ComputeUnit, target)
    return name if isinstance(name, str) else type(value).__name__


def test_key(item) -> str:
    """``iOS17/test_activation.py::TestSoftmax::test_x[CPU_ONLY-mlprogram-fp32-iOS17-...]``:
    Apple's file, class and test, with the parameter values spelled out."""
    key = f"{apple_origin(item.cls)}::{item.originalname}"
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        key += "[" + "-".join(_readable(v) for v in callspec.params.values()) + "]"
    return key
