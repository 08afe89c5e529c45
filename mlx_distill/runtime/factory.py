"""``open_backend(spec)``: a backend from one string, as command lines and eval configs name it."""

from __future__ import annotations

import os
from typing import Any

from mlx_distill.runtime.base import Backend
from mlx_distill.runtime.types import BackendError

SPEC_FORMS = ("mlx:CKPT_DIR", "coreml:PKG.mlpackage[#TOKENIZER_DIR]",
              "openai:http(s)://HOST/v1[#MODEL]",
              "openai:TEACHER (a name in configs/teachers.yaml)")


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """``(kind, target, fragment)`` of a backend spec; see :data:`SPEC_FORMS`."""
    kind, sep, rest = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or kind not in ("mlx", "coreml", "openai") or not rest:
        raise BackendError(f"backend {spec!r}: expected one of {', '.join(SPEC_FORMS)}")
    target, hashed, fragment = rest.partition("#")
    if kind == "mlx" and hashed:
        target, fragment = rest, ""  # a directory name may contain '#'
    if not target or (hashed and not fragment and kind != "mlx"):
        raise BackendError(f"backend {spec!r}: empty path, URL or name around '#'")
    return kind, target, fragment or None


def open_backend(spec: str, *, tokenizer: str | os.PathLike | None = None,
                 runtime: str = "auto", teachers: str | os.PathLike | None = None,
                 tier: str | None = None, **client_options: Any) -> Backend:
    """Open the backend ``spec`` names (:data:`SPEC_FORMS`).

    ``coreml``: ``tokenizer`` (or ``#TOKENIZER_DIR``) overrides the contract's source checkpoint;
    ``runtime`` is "auto", "coreml" (macOS) or "interpreter". ``openai``: ``teachers`` is the
    teachers.yaml to look names up in, ``tier`` its rate-limit tier; ``client_options`` go to
    ``TeacherClient`` (e.g. a budget). Errors are one-line :class:`BackendError` /
    ``UserError`` s naming the file or field.
    """
    kind, target, fragment = parse_spec(spec)
    if kind == "mlx":
        from mlx_distill.runtime.mlx_backend import MLXBackend

        if not os.path.isdir(target):
            raise BackendError(f"{target}: checkpoint directory not found")
        return MLXBackend.from_dir(target)
    if kind == "coreml":
        from mlx_distill.runtime.coreml_backend import CoreMLBackend

        if fragment is not None and tokenizer is not None:
            raise BackendError(f"backend {spec!r}: tokenizer given twice (#{fragment} and "
                               f"tokenizer={tokenizer})")
        return CoreMLBackend(target, tokenizer=tokenizer or fragment, runtime=runtime)
    from mlx_distill.config import ConfigError
    from mlx_distill.runtime.openai_backend import OpenAIBackend
    from mlx_distill.teacher.config import load_teacher

    try:
        teacher = load_teacher(target, model=fragment, tier=tier, path=teachers)
    except ConfigError as exc:
        raise BackendError(str(exc)) from None
    return OpenAIBackend(teacher, **client_options)
