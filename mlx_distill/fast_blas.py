"""Route MLX's CPU matmuls through OpenBLAS on Linux.

The mlx-cpu wheel links the netlib reference BLAS (~6 GFLOP/s for sgemm on 2 cores). libmlx resolves
``cblas_sgemm``/``dgemm``/``cgemm`` dynamically, so a library exporting those symbols that is loaded
with RTLD_GLOBAL *before* ``mlx.core`` is imported takes precedence. We load scipy-openblas32 (its
symbols are prefixed ``scipy_``) globally, then a tiny compiled shim exporting the plain names.

Opt out with ``MLX_DISTILL_NO_FAST_BLAS=1``. On macOS MLX already uses Accelerate: no-op.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field

log = logging.getLogger("mlx_distill")

OPT_OUT_ENV = "MLX_DISTILL_NO_FAST_BLAS"


@dataclass
class FastBlasStatus:
    enabled: bool
    reason: str
    library: str | None = None
    threads: int | None = None
    _handles: list = field(default_factory=list, repr=False)


_status: FastBlasStatus | None = None


def default_num_threads(cores: int | None = None) -> int:
    """OpenBLAS threads for MLX's gemm calls.

    MLX runs its own CPU threads. Measured on 2 cores (benchmarks/README.md): 2 OpenBLAS threads
    gave ~20% more train-step throughput on average but some runs collapsed 4x when the threads
    fought MLX's; 1 thread was never slow. Up to 4 cores we take the predictable 1; above that,
    half the cores.
    """
    cores = cores or os.cpu_count() or 1
    return 1 if cores <= 4 else cores // 2


def _shim_path() -> str | None:
    spec = importlib.util.find_spec("mlx_distill._blas_shim")
    return spec.origin if spec and spec.origin else None


def _requested_threads() -> int:
    """OPENBLAS_NUM_THREADS when the user set a valid one, else our default. Applied through
    openblas_set_num_threads rather than the environment, so numpy's own OpenBLAS (and child
    processes) keep their thread counts."""
    raw = os.environ.get("OPENBLAS_NUM_THREADS", "").strip()
    if raw:
        if raw.isdigit() and int(raw) > 0:
            return int(raw)
        log.warning("mlx_distill: ignoring OPENBLAS_NUM_THREADS=%r (expected a positive integer)",
                    raw)
    return default_num_threads()


def _enable() -> FastBlasStatus:
    if not sys.platform.startswith("linux"):
        return FastBlasStatus(False, "not Linux: MLX uses its platform BLAS")
    if os.environ.get(OPT_OUT_ENV, "") not in ("", "0"):
        return FastBlasStatus(False, f"disabled by {OPT_OUT_ENV}")
    if "mlx.core" in sys.modules:
        return FastBlasStatus(
            False, "mlx.core was imported before mlx_distill; import mlx_distill first"
        )
    try:
        import scipy_openblas32
    except ImportError:
        return FastBlasStatus(False, "scipy-openblas32 is not installed")
    shim = _shim_path()
    if shim is None:
        return FastBlasStatus(
            False, "the BLAS shim was not compiled at install (no C compiler?); reinstall"
        )
    lib_dir = scipy_openblas32.get_lib_dir()
    lib_path = os.path.join(lib_dir, f"lib{scipy_openblas32.get_library()}.so")
    threads = _requested_threads()
    try:
        openblas = ctypes.CDLL(lib_path, mode=ctypes.RTLD_GLOBAL)
        shim_lib = ctypes.CDLL(shim, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        return FastBlasStatus(False, f"could not load OpenBLAS: {exc}")
    openblas.scipy_openblas_set_num_threads(threads)
    resolved = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
    ours = ctypes.cast(shim_lib.cblas_sgemm, ctypes.c_void_p).value
    if resolved != ours:
        return FastBlasStatus(False, "another cblas_sgemm was already loaded globally")
    return FastBlasStatus(True, "OpenBLAS via shim", lib_path, threads, [openblas, shim_lib])


def enable() -> FastBlasStatus:
    """Enable once per process; later calls return the first result."""
    global _status
    if _status is None:
        _status = _enable()
        if not _status.enabled and sys.platform.startswith("linux"):
            if not _status.reason.startswith("disabled by"):
                log.warning("mlx_distill: fast BLAS not enabled (%s); using stock MLX BLAS",
                            _status.reason)
    return _status


def status() -> FastBlasStatus:
    return enable()
