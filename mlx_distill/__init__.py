"""mlx-distill: distill a large teacher into a small GQA student (MLX) and export it to Core ML."""

# Must run before anything imports mlx.core: it interposes OpenBLAS under MLX on Linux.
from mlx_distill import fast_blas as _fast_blas

_fast_blas.enable()

__version__ = "0.1.0"
