"""Builds the Linux-only BLAS shim (see mlx_distill/fast_blas.py); the rest is in pyproject."""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    # optional=True: without a C compiler the install still succeeds and mlx_distill logs
    # one line at import saying the fast BLAS path is unavailable.
    ext_modules.append(
        Extension("mlx_distill._blas_shim", sources=["mlx_distill/_blas_shim.c"], optional=True)
    )

setup(ext_modules=ext_modules)
