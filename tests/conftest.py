import os

# Tests never reach the network: mlx-lm / transformers must use local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import mlx_distill  # noqa: E402,F401  (first: enables fast BLAS before mlx.core loads)
