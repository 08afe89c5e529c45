"""``mlx-distill teacher serve MODEL_DIR``: an OpenAI-compatible server for a local MLX checkpoint
(ours or an mlx-lm Llama-family directory with tokenizer files), built for distillation.

Unlike ``mlx_lm.server`` (FIELD-NOTES), every logprob is that of the token actually sampled, top-k
lists are sorted and go up to 20 (``--max-top-logprobs``), streamed chunks carry their logprobs,
and prompts and given completions can be scored.

Logprobs are of the model's raw distribution: float32 ``log_softmax`` of the logits at temperature
1, before temperature and top-p, which only shape the sampler (as OpenAI reports them).
Tokens are described as ``{token, logprob, bytes, id}``: ``bytes`` are the token's exact UTF-8
bytes; ``token`` is their text, or ``"bytes:\\xNN…"`` (OpenAI's spelling) when the token is only
part of a character; ``id`` (an extension) is the token id, useful when tokenizers match.

Endpoints (errors are ``{"error": {message, type, param, code}}`` with status 400/404/405/500;
``param`` names the offending field; any ``model`` is accepted and the served id reported):

``GET /v1/models``
    The one served model: ``{id, object: "model", created, owned_by, max_model_len}``.
``GET /health``
    ``{"status": "ok", "model": id}``.
``POST /v1/chat/completions``
    ``messages`` (text content, roles system/developer/user/assistant/tool) and ``tools`` are
    rendered with the checkpoint's chat template (generation prompt added). Options: max_tokens
    (or max_completion_tokens; default: the rest of the context window), temperature (0 =
    greedy), top_p, seed, stop, logprobs, top_logprobs (0..20), stream, stream_options.
    include_usage, tool_choice ("auto"/"none"), and vLLM's ``prompt_logprobs: k`` (not with
    stream), returned as top-level ``prompt_logprobs``: ``[null, {"<id>": {logprob, rank,
    decoded_token}}, …]`` holding each prompt token and its top-k. n must be 1; penalties,
    logit_bias and non-text response_format are refused.
    ``choices[0].logprobs.content`` lists the tokens of the returned text: a token whose text
    lies wholly inside a cut-off stop string is left out, and so is the end-of-turn token
    (which ``usage.completion_tokens`` does count); other special tokens appear in the text
    as written. Streaming sends each piece of text with its tokens' logprobs; joined, the
    chunks equal the plain response for the same seed.
    Tool calls: when ``tools`` are given, generation ends on its own, and the text from the first
    ``<tool_call>`` on is only ``<tool_call>{"name": …, "arguments": {…}}</tool_call>`` blocks
    (the template's format), they are returned as ``message.tool_calls`` (arguments: the JSON
    text as generated), ``content`` is the text before them (null when empty) and
    ``finish_reason`` is ``"tool_calls"``. Otherwise the text is returned as content.
    While tools are on, streamed content holds back whitespace and a possible ``<tool_call>``
    start until it is known not to begin a call; calls arrive in one ``delta.tool_calls`` chunk.
``POST /v1/completions``
    Raw ``prompt`` (string, or a list of token ids), the same sampling options, legacy
    ``logprobs: k`` → ``{tokens, token_logprobs, top_logprobs: [{text: logprob}], text_offset,
    token_ids}`` and ``echo``. ``echo: true, max_tokens: 0, logprobs: k`` scores the prompt:
    the first token's logprob and top_logprobs are null, as OpenAI's were.
``POST /v1/score``
    ``{model?, messages, tools?, completion: "assistant text" | completion_ids: [int],
    top_logprobs: k}`` → ``{object: "score", model, system_fingerprint, tokens: [{token, id,
    logprob, bytes, top_logprobs: [{token, id, logprob, bytes}]}], logprob (their sum),
    usage}``: scores exactly the completion tokens after the templated prompt (generation
    prompt added). Text is tokenized on its own; pass ``completion_ids`` to score the ids a
    student sampled, an end-of-turn id included if it should be scored.

Every generation or scoring response carries ``usage`` (prompt tokens counted after templating)
and ``system_fingerprint`` = ``fp_`` + the first 16 hex digits of the weights' sha256. Each
request samples from its own random key (from ``seed``, else a fresh one), so the same ``seed``
and request give the same tokens, streamed or not, whatever else the server is doing. Requests
are served one at a time on one model thread; ``/v1/models`` and ``/health`` answer meanwhile.
"""

from __future__ import annotations

import argparse
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mlx_distill.cli import UserError

# uvicorn, starlette and the MLX engine load on first use: `mlx-distill teacher generate` and
# `merge` register this parser too and shouldn't pay ~3 s of imports for it.
if TYPE_CHECKING:
    import uvicorn
    from starlette.applications import Starlette

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_TOP_LOGPROBS = 20
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def make_app(
    model_dir: str | Path,
    model_id: str | None = None,
    max_top_logprobs: int = DEFAULT_MAX_TOP_LOGPROBS,
) -> Starlette:
    """Load the checkpoint and return the ASGI app serving it (raises CheckpointError /
    TokenizerError with a one-line message for a bad directory)."""
    from mlx_distill.teacher.server_app import TeacherApp
    from mlx_distill.teacher.server_infer import Engine

    return TeacherApp(Engine(model_dir, model_id), max_top_logprobs).starlette()


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so a busy port is one clear error and port 0 is known."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, socket.gaierror) as exc:
        raise UserError(f"--host {host}: cannot listen there ({exc})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UserError(f"--port {port}: cannot listen on {host}:{port} "
                        f"({exc.strerror or exc})") from None
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1"


def _server(app, log_level: str, on_started: Callable[[], None]) -> uvicorn.Server:
    """uvicorn's server, calling ``on_started`` once it accepts connections."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                on_started()

    return Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))


def serve_app_in_thread(
    app: Starlette, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning"
) -> tuple[str, Callable[[], None]]:
    """Serve ``app`` from a background thread: returns (base URL ending in /v1, stop function).
    ``port=0`` picks a free port."""
    sock = _listen(host, port)
    started = threading.Event()
    server = _server(app, log_level, started.set)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="mlx-teacher-http")
    thread.start()
    while not started.wait(0.05):
        if not thread.is_alive():
            sock.close()
            raise RuntimeError(f"teacher server on {host}:{port} failed to start")

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()

    return _url(host, sock.getsockname()[1]), stop


def serve_in_thread(
    model_dir: str | Path,
    host: str = DEFAULT_HOST,
    port: int = 0,
    model_id: str | None = None,
    max_top_logprobs: int = DEFAULT_MAX_TOP_LOGPROBS,
) -> tuple[str, Callable[[], None]]:
    """Load ``model_dir`` and serve it from a background thread: (base URL, stop function)."""
    return serve_app_in_thread(make_app(model_dir, model_id, max_top_logprobs), host, port)


def _cmd_serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port: expected 0..65535, got {args.port}")
    if args.max_top_logprobs < 0:
        raise UserError(f"--max-top-logprobs: expected >= 0, got {args.max_top_logprobs}")
    from mlx_distill.teacher.server_app import TeacherApp
    from mlx_distill.teacher.server_infer import Engine

    engine = Engine(args.model_dir, args.model_id)
    app = TeacherApp(engine, args.max_top_logprobs).starlette()
    sock = _listen(args.host, args.port)
    url = _url(args.host, sock.getsockname()[1])

    def announce() -> None:
        print(f"serving {args.model_dir} as {engine.model_id} at {url}", flush=True)

    server = _server(app, args.log_level, announce)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


def add_serve_parser(teacher_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``serve`` under ``mlx-distill teacher``."""
    parser = teacher_subparsers.add_parser(
        "serve",
        help="serve a local MLX checkpoint as an OpenAI-compatible teacher",
        description="Serve an MLX checkpoint (mlx-distill's or mlx-lm's Llama-family format, "
        "with tokenizer files) over the OpenAI wire format: /v1/models, /v1/chat/completions, "
        "/v1/completions, and /v1/score for scoring a given completion. Logprobs are those of "
        "the sampled tokens under the model's own distribution, with sorted top-k up to "
        "--max-top-logprobs, also when streaming. Prints 'serving MODEL_DIR as MODEL_ID at URL' "
        "once it accepts connections.",
        epilog="example: mlx-distill teacher serve runs/teacher --port 8080",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="checkpoint directory")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port to listen on; 0 picks a free one (default %(default)s)")
    parser.add_argument("--model-id", default=None, metavar="ID",
                        help="model id to report (default: the directory's name)")
    parser.add_argument("--max-top-logprobs", type=int, default=DEFAULT_MAX_TOP_LOGPROBS,
                        metavar="K", help="largest top_logprobs accepted (default %(default)s)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                        help="uvicorn log level (default %(default)s)")
    parser.set_defaults(func=_cmd_serve)
    return parser

