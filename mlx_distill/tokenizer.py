"""Byte-level BPE tokenizer: training (``tokenizers``), loading (mlx-lm / transformers) and the
``mlx-distill tokenizer`` command.

A trained tokenizer directory holds ``tokenizer.json``, ``tokenizer_config.json`` (with a ChatML
chat template that renders tools and tool calls the way Qwen2.5 does) and ``generation_config.json``
(the ids that end generation). ``save_checkpoint(..., tokenizer_dir=DIR)`` copies all three, and
mlx-lm, transformers and :func:`load_tokenizer` all read them.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import weakref
from pathlib import Path
from typing import Any

from mlx_distill.atomic import atomic_directory
from mlx_distill.cli import UserError

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
# Order fixes the ids: special tokens take ids 0.. in this order, before the byte alphabet.
SPECIAL_TOKENS = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    PAD,
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
DEFAULT_MODEL_MAX_LENGTH = 2048
# Files a tokenizer directory consists of; a directory holding only these may be replaced.
TOKENIZER_OUTPUT_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")

# ChatML, as Qwen2.5: tools go into the system prompt as one JSON object per line inside
# <tools></tools>; assistant tool calls are <tool_call>{"name": ..., "arguments": {...}}</tool_call>
# (mlx-lm recognises this template and parses such calls with its ``json_tools`` parser); tool
# results come back in a user turn as <tool_response> blocks. ``reasoning_content`` is rendered in
# <think></think>; ``enable_thinking=false`` pre-fills an empty think block, as Qwen3 does.
CHAT_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages and messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and '
    'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n'
    '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages and messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- if not loop.first %}
{{- '<|im_start|>system\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- elif message.role == 'user' %}
{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- if message.reasoning_content %}
{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}
{%- endif %}
{%- if message.content %}{{- message.content }}{%- endif %}
{%- for tool_call in message.tool_calls or [] %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{%- if (loop.first and message.content) or not loop.first %}{{- '\\n' }}{%- endif %}
{{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
{%- if tool_call.arguments is string %}{{- tool_call.arguments }}
{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
{{- '<|im_start|>user' }}
{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- else %}
{{- raise_exception('unknown message role: ' + message.role) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}
{{- '<think>\\n\\n</think>\\n\\n' }}
{%- endif %}
{%- endif %}
"""


class TokenizerError(UserError, ValueError):
    """Bad tokenizer input or directory; the message names the file and the problem."""


# ---- training ----

def _check_corpus(corpus_paths: list[str | os.PathLike]) -> list[str]:
    if not corpus_paths:
        raise TokenizerError("no corpus files given")
    checked = []
    for path in map(Path, corpus_paths):
        if not path.exists():
            raise TokenizerError(f"{path}: corpus file not found")
        if not path.is_file():
            raise TokenizerError(f"{path}: corpus path is not a regular file")
        if path.stat().st_size == 0:
            raise TokenizerError(f"{path}: corpus file is empty")
        checked.append(str(path))
    return checked


def _check_out_dir(out_dir: Path) -> None:
    # The directory is replaced as a whole (atomically), so refuse to wipe unrelated files.
    if out_dir.exists() and not out_dir.is_dir():
        raise TokenizerError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in TOKENIZER_OUTPUT_FILES)
        if foreign:
            raise TokenizerError(f"{out_dir}: directory holds other files ({foreign[0]}, …); "
                                 "choose a new or tokenizer-only directory")


def tokenizer_config(model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> dict[str, Any]:
    """The ``tokenizer_config.json`` content for a tokenizer from :func:`train_tokenizer`."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # Nothing is prepended or appended by encode(); <|endoftext|> marks document boundaries.
        "bos_token": ENDOFTEXT,
        "eos_token": IM_END,
        "pad_token": PAD,
        "unk_token": None,  # byte-level BPE encodes every byte: there is no unknown token
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        # transformers would otherwise rewrite " ." as "." on decode, breaking round trips.
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def train_tokenizer(
    corpus_paths: list[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    min_frequency: int = 2,
) -> Path:
    """Train a byte-level BPE on the corpus files and write a tokenizer directory atomically.

    The vocabulary may end up smaller than ``vocab_size`` when the corpus has too few distinct
    merges; ``len(load_tokenizer(out_dir))`` is the real size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= 0:
        raise TokenizerError(f"vocab_size: expected a positive integer, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab_size {vocab_size} is smaller than the {BYTE_ALPHABET_SIZE}-byte alphabet plus "
            f"{len(SPECIAL_TOKENS)} special tokens; use at least {MIN_VOCAB_SIZE}"
        )
    files = _check_corpus(corpus_paths)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)

    tokenizer = Tokenizer(models.BPE())
    # No normalizer and no prefix space: decode(encode(text)) == text for any string.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    try:
        tokenizer.train(files, trainer)
    except Exception as exc:  # tokenizers raises plain Exception, e.g. for invalid UTF-8
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenizerError(f"{', '.join(files)}: cannot train on corpus ({reason})") from None

    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    generation_config = {
        "bos_token_id": ids[ENDOFTEXT],
        # Chat turns end with <|im_end|>, plain documents with <|endoftext|>: either stops.
        "eos_token_id": [ids[IM_END], ids[ENDOFTEXT]],
        "pad_token_id": ids[PAD],
    }
    with atomic_directory(out_dir) as tmp:
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(tokenizer_config(model_max_length), indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )
        (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    return out_dir


# ---- loading ----

def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: ByteLevel vocab characters back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    byte_values, code_points = list(printable), list(printable)
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + len(code_points) - len(printable))
    return {chr(c): b for b, c in zip(byte_values, code_points, strict=True)}


def _is_byte_level(tokenizer: Any) -> bool:
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and isinstance(backend.decoder, decoders.ByteLevel)


def _token_bytes_table(tokenizer: Any) -> list[bytes]:
    """UTF-8 bytes of every token id, as the ByteLevel decoder would produce them."""
    to_byte = _unicode_to_byte()
    added = tokenizer.get_added_vocab()
    vocab = tokenizer.get_vocab()
    table = [b""] * (max(vocab.values()) + 1)
    for piece, token_id in vocab.items():
        if piece in added or any(ch not in to_byte for ch in piece):
            table[token_id] = piece.encode("utf-8")  # added tokens decode to their literal text
        else:
            table[token_id] = bytes(to_byte[ch] for ch in piece)
    return table


class ByteLevelStreamingDetokenizer:
    """Exact streaming detokenizer for byte-level BPE: ``text`` equals ``tokenizer.decode(tokens)``
    once finalized, and grows by whole characters (an incremental UTF-8 decoder holds back
    incomplete ones). mlx-lm's ``BPEStreamingDetokenizer`` instead drops a leading space (" world"
    streams as "world") and turns NUL into "Ā". Same interface as mlx-lm's
    ``StreamingDetokenizer``; not a subclass, so importing this module does not load transformers.
    """

    def __init__(self, token_bytes: list[bytes]):
        self._token_bytes = token_bytes
        self.reset()

    def reset(self):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.tokens = []
        self.offset = 0

    def add_token(self, token):
        self.tokens.append(token)
        # Ids past the tokenizer's vocabulary (a model vocab padded beyond it) decode to nothing,
        # as tokenizer.decode does.
        data = self._token_bytes[token] if 0 <= token < len(self._token_bytes) else b""
        self.text += self._utf8.decode(data)

    def finalize(self):
        self.text += self._utf8.decode(b"", final=True)

    @property
    def last_segment(self) -> str:
        """Text added since the previous access."""
        segment = self.text[self.offset:]
        self.offset = len(self.text)
        return segment


# Per-tokenizer byte tables (building one for a 150k vocabulary takes ~0.1 s); None: not ByteLevel.
_BYTE_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def streaming_detokenizer(tokenizer: Any):
    """A fresh streaming detokenizer for ``tokenizer`` (an mlx-lm TokenizerWrapper or an HF
    tokenizer): the exact byte-level one when the tokenizer is byte-level BPE, else mlx-lm's."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    if tokenizer not in _BYTE_TABLES:
        byte_level = _is_byte_level(tokenizer)
        _BYTE_TABLES[tokenizer] = _token_bytes_table(tokenizer) if byte_level else None
    table = _BYTE_TABLES[tokenizer]
    if table is not None:
        return ByteLevelStreamingDetokenizer(table)
    if isinstance(tokenizer, TokenizerWrapper):
        return tokenizer.detokenizer
    return TokenizerWrapper(tokenizer).detokenizer


def _read_eos_token_ids(tokenizer_dir: Path) -> list[int] | None:
    # Same precedence as mlx_lm.load: generation_config.json overrides config.json.
    for name in ("generation_config.json", "config.json"):
        path = tokenizer_dir / name
        if not path.exists():
            continue
        try:
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise TokenizerError(f"{path}: invalid JSON ({exc})") from None
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return None


def load_tokenizer(path: str | os.PathLike):
    """Load a local Hugging Face tokenizer directory (a tokenizer dir or a checkpoint dir).

    Returns mlx-lm's ``TokenizerWrapper`` (transformers' fast tokenizer underneath): ``encode``,
    ``decode``, ``apply_chat_template`` (with ``tools=``), ``eos_token_ids`` (from
    ``generation_config.json`` when present) and ``detokenizer`` (streaming; exact for
    byte-level BPE, see :class:`ByteLevelStreamingDetokenizer`). Never touches the network.
    """
    path = Path(path)
    # mlx-lm treats a path that does not exist as a Hub repo id and would try to download it.
    if not path.is_dir():
        raise TokenizerError(f"{path}: tokenizer directory not found")
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise TokenizerError(f"{path}: no tokenizer.json or tokenizer_config.json")
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    try:
        wrapper = mlx_lm_load_tokenizer(path, eos_token_ids=_read_eos_token_ids(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenizerError(f"{path}: cannot load tokenizer ({reason})") from None
    if _is_byte_level(wrapper) and hasattr(wrapper, "_detokenizer"):
        # Also give mlx-lm code paths (stream_generate, server) the exact detokenizer.
        wrapper._detokenizer = streaming_detokenizer(wrapper)
    return wrapper


# ---- command line ----

def _cmd_train(args: argparse.Namespace) -> int:
    out = train_tokenizer(
        args.corpus, args.vocab_size, args.out, model_max_length=args.model_max_length
    )
    from tokenizers import Tokenizer

    trained = Tokenizer.from_file(str(out / "tokenizer.json"))
    size = trained.get_vocab_size()
    short = f" (requested {args.vocab_size}: the corpus has no more merges)"
    print(f"vocab size: {size}{short if size < args.vocab_size else ''}")
    specials = ", ".join(f"{t}={trained.token_to_id(t)}" for t in SPECIAL_TOKENS)
    print(f"special tokens: {specials}")
    print(f"eos: {IM_END}, {ENDOFTEXT}; pad: {PAD}")
    print(f"wrote {out} ({', '.join(TOKENIZER_OUTPUT_FILES)})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tokenizer",
        help="train a byte-level BPE tokenizer",
        description="Tokenizer tools. `mlx-distill tokenizer train --help` for details.",
    )
    actions = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    train = actions.add_parser(
        "train",
        help="train a byte-level BPE tokenizer on text files",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train a byte-level BPE tokenizer (any UTF-8 text round-trips) on plain-text corpus\n"
            "files and write a Hugging Face tokenizer directory: tokenizer.json,\n"
            "tokenizer_config.json (ChatML chat template with tools and tool calls, Qwen2.5\n"
            "style) and generation_config.json (eos ids). Special tokens, with fixed ids 0-9:\n  "
            + " ".join(SPECIAL_TOKENS)
            + "\n\nThe directory is written atomically and works with transformers, mlx-lm and\n"
            "`mlx-distill generate` once copied into a checkpoint."
        ),
        epilog="example: mlx-distill tokenizer train --corpus a.txt --corpus b.txt "
        "--vocab-size 8192 --out tok/",
    )
    train.add_argument(
        "--corpus", action="append", required=True, metavar="FILE",
        help="UTF-8 text file to train on; repeat for several files",
    )
    train.add_argument(
        "--vocab-size", type=int, required=True, metavar="N",
        help=f"target vocabulary size including special tokens (at least {MIN_VOCAB_SIZE}); "
        "a small corpus may yield fewer tokens",
    )
    train.add_argument(
        "--out", required=True, metavar="DIR",
        help="output directory (new, or one holding only tokenizer files; it is replaced)",
    )
    train.add_argument(
        "--model-max-length", type=int, default=DEFAULT_MODEL_MAX_LENGTH, metavar="N",
        help="model_max_length recorded in tokenizer_config.json (default %(default)s)",
    )
    train.set_defaults(func=_cmd_train)

    def show_help(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=show_help)
