"""`gqsa-gguf serve`: llama-cpp-python's OpenAI-compatible server on the GQSA-patched llama.cpp.

In:  a GGUF path; the listen address (127.0.0.1:8000 by default: only this machine can connect),
     the context size, threads and the model's name in the API (default: the file's name).
Out: an HTTP server until Ctrl-C (then serve() returns) or SIGTERM, with llama-cpp-python's routes (llama_cpp.server,
     the `[server]` extra of llama-cpp-python 0.3.36): /v1/chat/completions (streamed token by
     token with "stream": true), /v1/completions, /v1/models, /docs, ...

The conversation is formatted with the file's own chat template (`tokenizer.chat_template`, which
`export` writes): llama-cpp-python takes it from the GGUF metadata when no chat format is given,
and falls back to its "llama-2" format when the file has none (`serve` says so at start).

Order of start-up, so that a file llama.cpp refuses never gets a listening socket:
  1. runtime.import_llama_cpp() binds `llama_cpp` to the patched libraries; only then is
     llama_cpp.server imported (it imports llama_cpp itself);
  2. the address is bound (not yet listening): a port in use is refused before the model loads;
  3. the model is loaded by llama_cpp.server's own code inside runtime.explained_load_errors: a
     refused file raises runtime.ModelLoadError with llama.cpp's reason and gqsa-gguf's diagnosis,
     the same message as `chat` and `eval` give;
  4. uvicorn starts listening on the bound socket.

Requests whose body does not match the API (a missing or mistyped field, a body that is not JSON)
are answered 400 with an OpenAI-style error naming the field; llama_cpp.server 0.3.36 alone
answers them 500 ("internal_server_error") and prints a traceback.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
from pathlib import Path
from typing import Callable

from . import runtime
from .errors import GQSAError

__all__ = ["ServeError", "serve", "DEFAULT_HOST", "DEFAULT_PORT", "SERVER_MODULES"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# What llama_cpp.server imports beyond llama_cpp (llama-cpp-python's `server` extra), by the
# distribution that provides it: gqsa-gguf's `serve` extra pins them (pyproject.toml).
SERVER_MODULES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "sse_starlette": "sse-starlette",
                  "starlette_context": "starlette-context", "pydantic_settings": "pydantic-settings"}
INSTALL_HINT = ("install them with `pip install 'gqsa-gguf[serve]'` (or `bash scripts/setup.sh` in the "
                "repository)")


class ServeError(GQSAError, RuntimeError):
    """The server cannot start: missing dependencies, an address that cannot be bound."""


def _import_server():
    """llama_cpp.server's pieces, imported after runtime.import_llama_cpp()."""
    runtime.import_llama_cpp()
    missing = []
    for module, dist in SERVER_MODULES.items():
        try:
            __import__(module)
        except ImportError:
            missing.append(dist)
    if missing:
        raise ServeError(f"the server needs {', '.join(missing)} (llama-cpp-python's [server] extra): "
                         + INSTALL_HINT)
    import uvicorn
    from llama_cpp.server import app as server_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings
    return uvicorn, server_app, ModelSettings, ServerSettings


def _bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, not listening yet (uvicorn listens on it)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ServeError(f"cannot resolve --host {host!r}: {e.strerror}") from e
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # as uvicorn does
        sock.bind(addr)
    except OSError as e:
        sock.close()
        hint = " (is another server running there? choose another --port)" if port else ""
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from e
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_PATCHED = "_gqsa_bad_request_400"
CHAT_PATH = "/v1/chat/completions"


def _error(message: str, param: str | None = None) -> dict:
    """An OpenAI-style error body."""
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}


def _chat_body_problem(body: bytes) -> tuple[str, str | None] | None:
    """What makes a chat completion request body unusable before the schema is checked: not JSON,
    not an object, no `messages` or an empty one (llama_cpp.server's schema defaults `messages` to
    [] and would answer a request without any). None when the body is fine so far."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        return f"the request body is not valid JSON: {e}", None
    if not isinstance(doc, dict):
        return "the request body must be a JSON object", None
    if "messages" not in doc:
        return "'messages' is required: a list of {\"role\": ..., \"content\": ...} objects", "messages"
    if isinstance(doc["messages"], list) and not doc["messages"]:
        return "'messages' must not be empty", "messages"
    return None


class _CheckChatRequests:
    """ASGI middleware: a POST to /v1/chat/completions whose body _chat_body_problem refuses is
    answered 400 here; any other request, and a body that passes, go on unchanged (the body is
    replayed to the application)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith(CHAT_PATH):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = _chat_body_problem(body)
        if problem is not None:
            from starlette.responses import JSONResponse

            await JSONResponse(_error(*problem), status_code=400)(scope, receive, send)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _answer_bad_requests_with_400(app, server_app) -> None:
    """Malformed requests get 400 and an OpenAI-style error instead of llama_cpp.server's 500.

    llama_cpp.server's routes (class RouteErrorHandler) catch every exception of a handler,
    FastAPI's RequestValidationError included, and answer 500 with a traceback on stderr; a body
    that is not JSON even escapes that handler. The route class's error_message_wrapper is looked
    up per request, so wrapping it (once per process) changes the answer for the routes already
    built; a body that is not JSON gets an application exception handler, and chat requests are
    checked for `messages` first (_CheckChatRequests).
    """
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    route_class = server_app.RouteErrorHandler
    if not getattr(route_class, _PATCHED, False):
        original = route_class.error_message_wrapper

        def error_message_wrapper(self, error, body=None):
            if isinstance(error, RequestValidationError):
                problems, param = [], None
                for e in error.errors():
                    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
                    param = param or (loc[0] if loc else None)
                    problems.append(f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid')}")
                more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
                return 400, _error("invalid request: " + "; ".join(problems[:4]) + more, param)["error"]
            return original(self, error=error, body=body)

        route_class.error_message_wrapper = error_message_wrapper
        setattr(route_class, _PATCHED, True)

    async def not_json(request, exc):
        return JSONResponse(_error(f"the request body is not valid JSON: {exc}"), status_code=400)

    app.add_exception_handler(json.JSONDecodeError, not_json)
    app.add_middleware(_CheckChatRequests)


def serve(gguf, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, n_ctx: int = 2048,
          threads: int | None = None, model_alias: str | None = None, api_key: str | None = None,
          log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> None:
    """Serves `gguf` over HTTP until interrupted (see the module docstring); raises ServeError,
    FileNotFoundError or runtime.ModelLoadError when it cannot start."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file '{gguf}' does not exist")
    if n_ctx < 1:
        raise ServeError(f"--n-ctx {n_ctx} must be >= 1")
    uvicorn, server_app, ModelSettings, ServerSettings = _import_server()
    alias = model_alias or gguf.name

    model_kw = dict(model=str(gguf), model_alias=alias, n_ctx=n_ctx, n_batch=min(512, n_ctx),
                    n_ubatch=min(512, n_ctx), chat_format=None, verbose=False)
    if threads:
        model_kw.update(n_threads=threads, n_threads_batch=threads)
    model_settings = ModelSettings(**model_kw)
    server_settings = ServerSettings(host=host, port=port, api_key=api_key)
    if os.environ.pop("CONFIG_FILE", None) is not None:
        log("note: CONFIG_FILE (llama_cpp.server's configuration file) is ignored by gqsa-gguf serve")

    sock = _bind(host, port)
    try:
        with runtime.explained_load_errors(gguf):
            app = server_app.create_app(server_settings=server_settings, model_settings=[model_settings])
        _answer_bad_requests_with_400(app, server_app)
        llm = server_app._llama_proxy() if getattr(server_app, "_llama_proxy", None) else None
        if llm is not None and "tokenizer.chat_template" not in llm.metadata:
            log(f"note: {gguf.name} has no chat template (tokenizer.chat_template); chat requests use "
                f"llama-cpp-python's '{llm.chat_format}' format")
        bound_host, bound_port = sock.getsockname()[:2]
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        log(f"serving {gguf} as model '{alias}' at http://{url_host}:{bound_port}/v1 "
            f"(OpenAI API; Ctrl-C stops)")
        if not _is_loopback(host):
            log(f"warning: listening on {host}, not only this machine"
                + ("" if api_key else "; without --api-key anyone who can reach it can use the model"))
        config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:       # uvicorn shut down gracefully, then re-raised Ctrl-C
            log("stopped")
    finally:
        sock.close()
