"""`vlm serve`: an OpenAI-compatible HTTP server for a saved VLM folder, and the chat page at `/`.

Standard library HTTP (ThreadingHTTPServer): each connection is a thread that parses and checks its
request and runs the processor; the one `Batcher` thread generates. Every failure a client can cause
is a 4xx with an OpenAI-style JSON error; anything else is a 500 without details, logged in one line.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..config import DataConfig
from ..data.sample import DataError, SampleError
from ..factory import load
from .api import ApiError, ChatRequest, Limits, parse_body, parse_chat_request
from .batcher import Batcher
from .stream import Job

logger = logging.getLogger(__name__)
CHAT_PAGE = Path(__file__).with_name("chat.html")
ROUTES = {"/": "GET", "/health": "GET", "/v1/models": "GET", "/v1/chat/completions": "POST"}


class VLMServer:
    """A loaded model behind HTTP; `start()` serves in a background thread, `serve_forever()` in this one."""

    def __init__(
        self, model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
        api_key: str | None = None, max_batch: int = 16, wait_ms: float = 10.0, default_max_tokens: int = 64,
    ) -> None:
        self.limits = limits or Limits()
        self.model, self.processor = load(model_dir, DataConfig(max_image_pixels=self.limits.max_image_pixels))
        self.model_id = Path(model_dir).resolve().name
        self.api_key = api_key.encode() if api_key else None
        self.default_max_tokens = min(default_max_tokens, self.limits.max_tokens)
        self.context = getattr(self.model.lm.config.get_text_config(), "max_position_embeddings", None)
        self.batcher = Batcher(self.model, max_batch=max_batch, wait_ms=wait_ms)
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def describe(self) -> dict[str, Any]:
        """The `/v1/models` entry: OpenAI's fields plus what the chat page shows (fusion, backbones)."""
        config = self.model.config
        return {
            "id": self.model_id, "object": "model", "created": 0, "owned_by": "vlm",
            "fusion": config.fusion, "vision": _short(config.vision), "lm": _short(config.lm),
            "tokens_per_image": self.model.fusion.tokens_per_image,
        }

    def start(self) -> "VLMServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="vlm-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.close()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
        self.httpd.server_close()
        self.batcher.close()

    def prepare(self, request: ChatRequest) -> Job:
        """The processor's tokens and pixels for a request, checked against the model's context."""
        try:
            item = self.processor(request.sample, for_generation=True)
        except SampleError as err:
            status = 413 if err.category == "image_too_large" else 400
            detail = err.detail.replace("data.max_image_pixels", "the server's --max-image-pixels")
            raise ApiError(status, f"The request's {detail}" if detail.startswith("image") else detail) from None
        except DataError as err:
            raise ApiError(400, str(err)) from None
        length = int(item["input_ids"].shape[0]) + request.max_tokens
        if self.context is not None and length > self.context:
            raise ApiError(400, f"The prompt ({int(item['input_ids'].shape[0])} tokens, images included) plus "
                                f"max_tokens={request.max_tokens} is over the model's {self.context}-token context.")
        return Job(request, item)


def _short(name: str) -> str:
    """A backbone as people know it: a hub id or timm name as is, a local folder by its own name."""
    return Path(name).name if os.path.isabs(name) else name


def _handler(server: VLMServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        app = server

    return Handler


class _Handler(BaseHTTPRequestHandler):
    app: VLMServer
    timeout = 30  # seconds a client may take to send its request: a slow sender cannot hold a thread forever
    server_version = "vlm-serve"
    sys_version = ""

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.info("%s %s", self.address_string(), format % args)  # the request line and status: no headers

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path not in ROUTES:
                raise ApiError(404, f"No route {path}; this server has {sorted(ROUTES)}.", "not_found_error")
            if ROUTES[path] != method:
                raise ApiError(405, f"{path} takes {ROUTES[path]}, not {method}.")
            if path == "/":
                return self._send(200, CHAT_PAGE.read_bytes(), "text/html; charset=utf-8")
            if path == "/health":
                return self._json(200, {"status": "ok"})
            self._authorize()
            if path == "/v1/models":
                return self._json(200, {"object": "list", "data": [self.app.describe()]})
            self._chat()
        except ApiError as err:
            self._json(err.status, err.body())
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as err:  # noqa: BLE001 - the server answers and lives on, whatever went wrong
            logger.error("%s %s failed: %s: %s", method, path, type(err).__name__, err)
            self._json(500, ApiError(500, "Internal server error; see the server's log.", "server_error").body())

    def _authorize(self) -> None:
        if self.app.api_key is None:
            return
        given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip().encode()
        if not hmac.compare_digest(given, self.app.api_key):
            raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.", "authentication_error")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "Send the body with a Content-Length header, not chunked.")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411, "A Content-Length header is required.") from None
        if length < 0:
            raise ApiError(400, "Content-Length is negative.")
        if length > self.app.limits.max_body_bytes:
            self.close_connection = True  # the unread body must not be parsed as the next request
            raise ApiError(413, f"The body is {length:,} bytes, over this server's {self.app.limits.max_body_bytes:,}.")
        return self.rfile.read(length)

    def _chat(self) -> None:
        request = parse_chat_request(parse_body(self._body()), self.app.limits, self.app.default_max_tokens)
        job = self.app.batcher.submit(self.app.prepare(request))
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not request.stream:
            event = job.events.get()
            if event[0] == "error":
                raise ApiError(event[1], event[2], "server_error" if event[1] >= 500 else "invalid_request_error")
            _, text, reason, completion = event
            return self._json(200, {
                "id": reply_id, "object": "chat.completion", "created": created, "model": self.app.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
                "usage": _usage(job.prompt_tokens, completion),
            })
        self._stream(job, reply_id, created)

    def _stream(self, job: Job, reply_id: str, created: int) -> None:
        """Server-sent events as OpenAI's clients read them: chunks, then `data: [DONE]`."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

        def chunk(delta: dict[str, Any], reason: str | None = None, **extra: Any) -> dict[str, Any]:
            return {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": self.app.model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}], **extra}

        try:
            self._event(chunk({"role": "assistant", "content": ""}))
            while True:
                event = job.events.get()
                if event[0] == "delta":
                    self._event(chunk({"content": event[1]}))
                    continue
                if event[0] == "error":
                    self._event(ApiError(event[1], event[2], "server_error").body())
                else:
                    self._event(chunk({}, event[2]))
                    if job.request.include_usage:
                        self._event({**chunk({}), "choices": [], "usage": _usage(job.prompt_tokens, event[3])})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                return
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            job.cancelled.set()  # the batcher stops generating for a client that left

    def _event(self, payload: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
