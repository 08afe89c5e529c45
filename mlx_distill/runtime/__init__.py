"""One generation interface over three backends, with JSON-schema-constrained tool calls.

- :class:`MLXBackend` (``mlx:CKPT_DIR``): a checkpoint in MLX with its KV cache.
- :class:`CoreMLBackend` (``coreml:PKG.mlpackage``): an exported package, run by Core ML on
  macOS and by the MIL reference interpreter elsewhere (labelled as such in every result).
- :class:`OpenAIBackend` (``openai:URL`` or ``openai:TEACHER``): an OpenAI-compatible endpoint.

``backend.generate(messages, tools, ...)`` streams :class:`TokenEvent` s and ends with
:class:`Finished`; ``backend.run(...)`` returns the :class:`GenerationResult`. Where the backend
holds the logits, tool calls are constrained by a token mask (:mod:`.constrain`, llguidance).
"""

from mlx_distill.runtime.base import Backend, LocalBackend
from mlx_distill.runtime.constrain import ConstraintError, ToolGrammar, tool_call_grammar
from mlx_distill.runtime.coreml_backend import CoreMLBackend
from mlx_distill.runtime.factory import SPEC_FORMS, open_backend, parse_spec
from mlx_distill.runtime.mlx_backend import MLXBackend
from mlx_distill.runtime.openai_backend import OpenAIBackend
from mlx_distill.runtime.types import (
    BackendError,
    Event,
    Finished,
    GenerationResult,
    Sampling,
    TokenEvent,
)

__all__ = [
    "Backend", "BackendError", "ConstraintError", "CoreMLBackend", "Event", "Finished",
    "GenerationResult", "LocalBackend", "MLXBackend", "OpenAIBackend", "SPEC_FORMS", "Sampling",
    "TokenEvent", "ToolGrammar", "open_backend", "parse_spec", "tool_call_grammar",
]
