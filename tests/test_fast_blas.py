"""mlx_distill.fast_blas: OpenBLAS interposed under MLX's CPU matmuls on Linux.

In-process tests check that MLX matmuls (fp32 -> sgemm, fp64 -> dgemm, complex64 -> cgemm; plain,
transposed, batched/broadcast, addmm with alpha/beta) agree with a numpy float64/complex128
reference. The interposition happens once per process, before ``mlx.core`` is imported, so
enabled / opted-out / wrong-import-order behaviour is checked in fresh subprocesses; there the
dynamic linker's own trace (``LD_DEBUG=bindings``) shows which library libmlx's ``cblas_*gemm``
calls are bound to.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

import mlx_distill  # noqa: F401  (first: interposes OpenBLAS before mlx.core loads)
from mlx_distill import fast_blas

# isort: split
import mlx.core as mx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the BLAS interposition is Linux-only"
)

GEMM_SYMBOLS = ("cblas_sgemm", "cblas_dgemm", "cblas_cgemm")
SHIM_NAME = "_blas_shim"
DTYPES = {  # name: (mlx dtype, numpy dtype, numpy reference dtype, unit roundoff)
    "float32": (mx.float32, np.float32, np.float64, np.finfo(np.float32).eps),
    "float64": (mx.float64, np.float64, np.float64, np.finfo(np.float64).eps),
    "complex64": (mx.complex64, np.complex64, np.complex128, np.finfo(np.float32).eps),
}


# ---------------------------------------------------------------- helpers

class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def library_defining(symbol: str) -> str:
    """Path of the library that the process-global lookup of ``symbol`` resolves to."""
    addr = ctypes.cast(getattr(ctypes.CDLL(None), symbol), ctypes.c_void_p)
    info = _DlInfo()
    try:
        dladdr = ctypes.CDLL(None).dladdr
    except AttributeError:  # glibc < 2.34 keeps dladdr in libdl
        dladdr = ctypes.CDLL("libdl.so.2").dladdr
    assert dladdr(addr, ctypes.byref(info)), f"dladdr failed for {symbol}"
    return info.dli_fname.decode()


def random_operands(seed: int, dtype: str, a_shape, b_shape):
    _, np_dtype, _, _ = DTYPES[dtype]
    rng = np.random.default_rng(seed)

    def draw(shape):
        x = rng.standard_normal(shape)
        if dtype.startswith("complex"):
            x = x + 1j * rng.standard_normal(shape)
        return x.astype(np_dtype)

    return draw(a_shape), draw(b_shape)


def assert_matches_reference(out, ref, abs_a, abs_b, k: int, eps: float):
    """Elementwise gemm error bound: |C - AB| <= c·k·u·(|A||B|) (+ a little for rounding C)."""
    scale = abs_a @ abs_b
    err = np.abs(np.asarray(out).astype(ref.dtype) - ref)
    bound = 4 * (k + 2) * eps * scale + np.finfo(np.float32).tiny
    worst = float((err / bound).max())
    assert worst <= 1.0, f"matmul error {worst:.3g}x over the fp bound (k={k})"


def run_python(code: str, extra_env: dict[str, str] | None = None,
               drop_env: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in drop_env}
    env.update(extra_env or {})
    proc = subprocess.run([sys.executable, "-c", code], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def libmlx_bindings(ld_debug_stderr: str) -> dict[str, str]:
    """From an ``LD_DEBUG=bindings`` trace: the library each of libmlx's gemm symbols binds to."""
    pattern = re.compile(
        r"binding file \S*libmlx\.so\S* \[\d+\] to (\S+) \[\d+\]: normal symbol `(cblas_\w+)'"
    )
    return {sym: lib for lib, sym in pattern.findall(ld_debug_stderr)}


# One script for every subprocess scenario: PRELUDE decides the import order.
SUBPROCESS_CHECK = """
    import json, os
    {prelude}
    import numpy as np
    import mlx.core as mx
    from mlx_distill import fast_blas

    s = fast_blas.status(); fast_blas.status()  # a second call must not log again
    rng = np.random.default_rng(0)
    errors = {{}}
    for name, dt, npdt in [("float32", mx.float32, np.float32),
                           ("float64", mx.float64, np.float64),
                           ("complex64", mx.complex64, np.complex64)]:
        a = rng.standard_normal((3, 29, 37)); b = rng.standard_normal((41, 37))
        if name == "complex64":
            a = a + 1j * rng.standard_normal(a.shape); b = b + 1j * rng.standard_normal(b.shape)
        a, b = a.astype(npdt), b.astype(npdt)
        out = np.asarray(mx.array(a, dtype=dt) @ mx.array(b, dtype=dt).T)  # transposed, batched
        ref = a.astype(np.complex128 if name == "complex64" else np.float64) @ b.T
        errors[name] = float(np.abs(out - ref).max() / (np.abs(a) @ np.abs(b).T).max())
    print(json.dumps({{"enabled": s.enabled, "reason": s.reason, "threads": s.threads,
                      "env_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                      "errors": errors}}))
"""


def check_in_subprocess(prelude: str, env: dict[str, str] | None = None,
                        drop_env: tuple[str, ...] = ()) -> tuple[dict, str]:
    proc = run_python(textwrap.dedent(SUBPROCESS_CHECK).format(prelude=prelude), env, drop_env)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, rel_err in result["errors"].items():
        limit = 1e-12 if name == "float64" else 1e-5
        assert rel_err < limit, f"{name}: relative error {rel_err:.3g} in the subprocess"
    return result, proc.stderr


# ---------------------------------------------------------------- this process

@pytest.mark.skipif(os.environ.get(fast_blas.OPT_OUT_ENV, "") not in ("", "0"),
                    reason=f"{fast_blas.OPT_OUT_ENV} is set for this test run")
def test_enabled_in_this_process():
    status = fast_blas.status()
    assert status.enabled, (
        f"fast BLAS is off in the test process: {status.reason}. If mlx.core was imported "
        "before mlx_distill (another test module or conftest), import mlx_distill first."
    )
    assert status.library and os.path.exists(status.library)
    assert status.threads == fast_blas._requested_threads()
    for symbol in GEMM_SYMBOLS:
        assert SHIM_NAME in os.path.basename(library_defining(symbol)), symbol


@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from(sorted(DTYPES)),
    m=st.integers(1, 70), n=st.integers(1, 70), k=st.integers(1, 70),
    batch=st.sampled_from([(), (1,), (3,), (2, 3)]),
    broadcast_b=st.booleans(),
    transpose_a=st.booleans(), transpose_b=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_matmul_matches_numpy(dtype, m, n, k, batch, broadcast_b, transpose_a, transpose_b,
                              seed):
    mx_dtype, _, ref_dtype, eps = DTYPES[dtype]
    b_batch = () if broadcast_b else batch
    # Stored transposed, then viewed back with swapaxes: MLX hands BLAS a Trans flag (no copy).
    a_np, b_np = random_operands(
        seed, dtype,
        (*batch, k, m) if transpose_a else (*batch, m, k),
        (*b_batch, n, k) if transpose_b else (*b_batch, k, n),
    )
    a = mx.array(a_np, dtype=mx_dtype)
    b = mx.array(b_np, dtype=mx_dtype)
    if transpose_a:
        a, a_np = a.swapaxes(-1, -2), a_np.swapaxes(-1, -2)
    if transpose_b:
        b, b_np = b.swapaxes(-1, -2), b_np.swapaxes(-1, -2)
    out = a @ b
    assert out.shape == (*batch, m, n) and out.dtype == mx_dtype
    ref = a_np.astype(ref_dtype) @ b_np.astype(ref_dtype)
    assert_matches_reference(out, ref, np.abs(a_np).astype(np.float64),
                             np.abs(b_np).astype(np.float64), k, eps)


@settings(max_examples=80, deadline=None)
@given(
    dtype=st.sampled_from(sorted(DTYPES)),
    m=st.integers(1, 48), n=st.integers(1, 48), k=st.integers(1, 48),
    alpha=st.sampled_from([1.0, -0.5, 2.0]), beta=st.sampled_from([0.0, 1.0, 0.25]),
    seed=st.integers(0, 2**32 - 1),
)
def test_addmm_alpha_beta_match_numpy(dtype, m, n, k, alpha, beta, seed):
    """``addmm`` passes alpha/beta through to gemm: C = alpha·A·B + beta·C."""
    mx_dtype, _, ref_dtype, eps = DTYPES[dtype]
    a_np, b_np = random_operands(seed, dtype, (m, k), (k, n))
    c_np, _ = random_operands(seed + 1, dtype, (m, n), (1, 1))
    out = mx.addmm(mx.array(c_np, dtype=mx_dtype), mx.array(a_np, dtype=mx_dtype),
                   mx.array(b_np, dtype=mx_dtype), alpha=alpha, beta=beta)
    ref = alpha * (a_np.astype(ref_dtype) @ b_np.astype(ref_dtype)) + beta * c_np.astype(ref_dtype)
    abs_a = np.hstack([abs(alpha) * np.abs(a_np), abs(beta) * np.abs(c_np)]).astype(np.float64)
    abs_b = np.vstack([np.abs(b_np), np.eye(n)]).astype(np.float64)
    assert_matches_reference(out, ref, abs_a, abs_b, k + 1, eps)


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_single_row_sgemm_via_gemv_matches_numpy(transpose_a, transpose_b, strided, batch):
    """The shim sends m == 1 products (decode steps) to sgemv: every layout must still agree."""
    rng = np.random.default_rng(7)
    k, n = 67, 45
    full_a = rng.standard_normal((*batch, k, 4) if transpose_a else (*batch, 4, k))
    full_a = full_a.astype(np.float32)
    a_np = full_a[..., :, 2:3] if transpose_a else full_a[..., 1:2, :]
    b_full = rng.standard_normal((n, k + 3) if transpose_b else (k, n + 3)).astype(np.float32)
    b_np = b_full[:, :k] if transpose_b else b_full[:, :n]
    if not strided:
        a_np, b_np = np.ascontiguousarray(a_np), np.ascontiguousarray(b_np)
    a, b = mx.array(full_a), mx.array(b_full)
    a = (a[..., :, 2:3] if transpose_a else a[..., 1:2, :]) if strided else mx.array(a_np)
    b = (b[:, :k] if transpose_b else b[:, :n]) if strided else mx.array(b_np)
    if transpose_a:
        a, a_np = a.swapaxes(-1, -2), a_np.swapaxes(-1, -2)
    if transpose_b:
        b, b_np = b.T, b_np.T
    out = a @ b
    ref = a_np.astype(np.float64) @ b_np.astype(np.float64)
    assert out.shape == (*batch, 1, n)
    assert_matches_reference(out, ref, np.abs(a_np).astype(np.float64),
                             np.abs(b_np).astype(np.float64), k, np.finfo(np.float32).eps)


def test_large_sgemm_matches_numpy():
    """Sizes above OpenBLAS's small-matrix path, with a non-square, odd-sized block."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((515, 300)).astype(np.float32)
    b = rng.standard_normal((300, 257)).astype(np.float32)
    out = mx.array(a) @ mx.array(b)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    assert_matches_reference(out, ref, np.abs(a).astype(np.float64),
                             np.abs(b).astype(np.float64), 300, np.finfo(np.float32).eps)


def test_default_num_threads():
    assert [fast_blas.default_num_threads(c) for c in (1, 2, 3, 4)] == [1, 1, 1, 1]
    assert fast_blas.default_num_threads(8) == 4
    assert fast_blas.default_num_threads(64) == 32
    assert 1 <= fast_blas.default_num_threads() <= max(1, (os.cpu_count() or 1) // 2)


# ---------------------------------------------------------------- fresh processes

def test_fresh_process_binds_libmlx_gemm_to_the_shim():
    result, stderr = check_in_subprocess(
        "import mlx_distill", {"LD_DEBUG": "bindings"},
        drop_env=("OPENBLAS_NUM_THREADS", fast_blas.OPT_OUT_ENV),
    )
    assert result["enabled"], result["reason"]
    expected = fast_blas.default_num_threads()
    # Applied through openblas_set_num_threads: the environment (numpy, children) is untouched.
    assert result["threads"] == expected and result["env_threads"] is None
    bound = libmlx_bindings(stderr)
    assert set(bound) >= set(GEMM_SYMBOLS), bound
    for symbol in GEMM_SYMBOLS:
        assert SHIM_NAME in os.path.basename(bound[symbol]), (symbol, bound[symbol])


def test_openblas_num_threads_env_is_honoured():
    result, _ = check_in_subprocess("import mlx_distill", {"OPENBLAS_NUM_THREADS": "2"},
                                    drop_env=(fast_blas.OPT_OUT_ENV,))
    assert result["enabled"] and result["threads"] == 2


def test_invalid_openblas_num_threads_warns_and_uses_default():
    result, stderr = check_in_subprocess("import mlx_distill", {"OPENBLAS_NUM_THREADS": "many"},
                                         drop_env=(fast_blas.OPT_OUT_ENV,))
    assert result["enabled"] and result["threads"] == fast_blas.default_num_threads()
    assert "ignoring OPENBLAS_NUM_THREADS='many'" in stderr


def test_opt_out_env_disables_quietly():
    result, stderr = check_in_subprocess(
        "import mlx_distill", {fast_blas.OPT_OUT_ENV: "1", "LD_DEBUG": "bindings"}
    )
    assert not result["enabled"]
    assert fast_blas.OPT_OUT_ENV in result["reason"]
    assert "fast BLAS not enabled" not in stderr  # an explicit opt-out is not warned about
    bound = libmlx_bindings(stderr)
    for symbol in GEMM_SYMBOLS:  # the wheel's bundled reference BLAS
        assert SHIM_NAME not in bound[symbol] and "libblas" in os.path.basename(bound[symbol])


def test_mlx_imported_first_disables_with_one_warning_line():
    result, stderr = check_in_subprocess(
        "import mlx.core\nimport mlx_distill", drop_env=(fast_blas.OPT_OUT_ENV,)
    )
    assert not result["enabled"]
    assert "import" in result["reason"] and "mlx.core" in result["reason"]
    assert "mlx_distill first" in result["reason"]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "fast BLAS not enabled" in lines[0] and "mlx.core was imported before" in lines[0]
