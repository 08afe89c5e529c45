"""A checkpoint's weights for the exporter, read one tensor at a time straight from its
safetensors file(s).

``mlx_distill.checkpoint.load_checkpoint`` materializes the whole float32 model in MLX (2 GB at
0.5B parameters), and the exporter used to hold that next to the fp16 weights it builds. Reading
each tensor only when the graph builder asks for it, and keeping nothing, leaves the builder's own
fp16 (or int8) copies as the only full set in memory. The names, shapes and the tied/bias rules
are those of ``load_checkpoint`` (the model's own parameter tree is the reference), so the same
directories load: ours, and mlx-lm/HF Llama-family ones in float32, float16 or bfloat16.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_distill.checkpoint import CheckpointError, load_config
from mlx_distill.config import ModelConfig

# safetensors dtype -> (numpy dtype of the stored bits, bytes per element)
_STORED = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
           "F64": np.dtype("<f8")}
_HEADER_LIMIT = 100 << 20  # the format caps the JSON header at 100 MB


@dataclass(frozen=True)
class _Tensor:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file


def read_header(path: Path) -> dict[str, _Tensor]:
    """Name -> where and how a tensor is stored; checks that every range lies in the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        length = int.from_bytes(head, "little")
        if length > min(_HEADER_LIMIT, size - 8):
            raise CheckpointError(f"{path}: header length {length} exceeds the file")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name}: malformed header entry") from None
        if dtype not in _STORED:
            raise CheckpointError(f"{path}: tensor {name}: dtype {dtype} is not a float type "
                                  f"the exporter reads ({', '.join(_STORED)})")
        count = int(np.prod(shape, dtype=np.int64))
        if end - start != count * _STORED[dtype].itemsize or start < 0 \
                or 8 + length + end > size:
            raise CheckpointError(f"{path}: tensor {name}: data range {start}..{end} does not "
                                  f"match shape {list(shape)} {dtype} or lies past the end")
        tensors[name] = _Tensor(path, dtype, shape, 8 + length + start)
    return tensors


def _read(t: _Tensor) -> np.ndarray:
    stored = _STORED[t.dtype]
    count = int(np.prod(t.shape, dtype=np.int64))
    data = np.fromfile(t.path, dtype=stored, count=count, offset=t.offset)
    if data.size != count:
        raise CheckpointError(f"{t.path}: truncated tensor data")
    if t.dtype == "BF16":  # the upper half of a float32
        data = (data.astype(np.uint32) << 16).view(np.float32)
    return data.reshape(t.shape).astype(np.float32, copy=False)


class CheckpointWeights(Mapping):
    """HF Llama names -> float32 numpy arrays, each read from disk when asked for (nothing is
    cached: the graph builder reads each tensor once)."""

    def __init__(self, ckpt_dir: str | os.PathLike, config: ModelConfig):
        from mlx.utils import tree_flatten

        from mlx_distill.model import Model

        ckpt_dir = Path(ckpt_dir)
        files = sorted(ckpt_dir.glob("model*.safetensors"))
        if not files:
            raise CheckpointError(f"{ckpt_dir / 'model.safetensors'}: file not found")
        found: dict[str, _Tensor] = {}
        for path in files:
            for name, tensor in read_header(path).items():
                if name in found:
                    raise CheckpointError(f"{path}: tensor {name} is also in {found[name].path}")
                found[name] = tensor
        # The rules of mlx_distill.checkpoint._sanitize.
        found = {k: v for k, v in found.items() if "rotary_emb.inv_freq" not in k}
        if config.tie_embeddings:
            found.pop("lm_head.weight", None)
        if not config.attention_out_bias:
            for i in range(config.n_layers):
                key = f"model.layers.{i}.self_attn.o_proj.bias"
                if key in found and np.any(_read(found.pop(key)) != 0):
                    raise CheckpointError(f"{key}: non-zero o_proj bias but the config has "
                                          "attention_out_bias false")
        # Model(config) only describes the parameters here: MLX evaluates nothing of it.
        expected = {k: tuple(v.shape) for k, v in tree_flatten(Model(config).parameters())}
        where = files[0] if len(files) == 1 else ckpt_dir
        for name, shape in expected.items():
            if name not in found:
                raise CheckpointError(f"{where}: missing tensor {name}")
            if found[name].shape != shape:
                raise CheckpointError(f"{where}: tensor {name} has shape "
                                      f"{found[name].shape}, expected {shape}")
        unexpected = sorted(set(found) - set(expected))
        if unexpected:
            raise CheckpointError(f"{where}: unexpected tensor {unexpected[0]}")
        self._tensors = found
        self.shapes = expected

    def __getitem__(self, key: str) -> np.ndarray:
        return _read(self._tensors[key])

    def __contains__(self, key) -> bool:
        return key in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def load_numpy_weights(ckpt_dir: str | os.PathLike) -> tuple[ModelConfig, CheckpointWeights]:
    """(ModelConfig, CheckpointWeights) of an mlx-distill or mlx-lm checkpoint directory."""
    config = load_config(ckpt_dir)
    return config, CheckpointWeights(ckpt_dir, config)
