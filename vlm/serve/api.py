"""An OpenAI chat-completions request -> a checked `ChatRequest` (a `Sample` plus generation settings).

Everything a client sends is untrusted: each problem is an `ApiError` with the HTTP status and a
message that names the field and what to do, never an exception from deeper down.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.content import content_text
from ..data.sample import IMAGE_TAG, ROLES, Sample

REQUEST_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
    "stream", "stream_options", "n",
}
"""Fields a request may carry; any other is refused (400) rather than silently ignored."""


class ApiError(Exception):
    """A request problem: HTTP status, OpenAI-style error type, and a one-line message for the client."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "code": self.status}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the defaults fit a laptop, each is a `vlm serve` option."""

    max_body_bytes: int = 20 * 1024 * 1024
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 16_777_216
    max_images: int = 8
    max_tokens: int = 512
    image_folder: Path | None = None
    """Image paths (and file:// URLs) are read only inside this folder; None: never read a path."""


@dataclass
class ChatRequest:
    """What the batcher needs: the conversation as a `Sample` (images as bytes) and how to generate."""

    sample: Sample
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"The request body is not valid JSON ({err}).") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"The request body must be a JSON object, got {type(body).__name__}.")
    return body


def parse_chat_request(body: dict[str, Any], limits: Limits, default_max_tokens: int) -> ChatRequest:
    """Check every field of a chat-completions body and build the `ChatRequest`."""
    unknown = sorted(set(body) - REQUEST_FIELDS)
    if unknown:
        raise ApiError(400, f"Unknown field(s) {unknown}; this server accepts {sorted(REQUEST_FIELDS)}.")
    if body.get("n", 1) != 1:
        raise ApiError(400, "'n' must be 1: one answer per request.")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = default_max_tokens if max_tokens is None else _int(max_tokens, "max_tokens", 1, limits.max_tokens)
    temperature = _number(body.get("temperature", 0.0), "temperature", 0.0, 2.0)
    top_p = _number(body.get("top_p", 1.0), "top_p", 0.0, 1.0)
    if top_p == 0.0:
        raise ApiError(400, "'top_p' must be above 0.")
    seed = body.get("seed")
    if seed is not None:
        seed = _int(seed, "seed", -(2**63), 2**63 - 1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false.")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, "'stream_options' may only hold 'include_usage'.")
    return ChatRequest(
        sample=_sample(body.get("messages"), limits), max_tokens=max_tokens, temperature=temperature, top_p=top_p,
        seed=seed, stop=_stop(body.get("stop")), stream=stream, include_usage=bool(options.get("include_usage")),
    )


def openai_messages(sample: Sample) -> list[dict[str, Any]]:
    """A data sample's prompt as an OpenAI client sends it (for tests and benchmarks): each image tag that
    starts a turn becomes a base64 data: URL part before the turn's text, which `parse_chat_request`
    joins back into the same text. Images are file paths."""
    images = iter(sample.images)
    messages = []
    for message in sample.prompt_messages():
        text, parts = message["content"], []
        while text.startswith(IMAGE_TAG + "\n"):
            data = base64.b64encode(Path(next(images)).read_bytes()).decode()
            parts.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}})
            text = text[len(IMAGE_TAG) + 1:]
        if IMAGE_TAG in text:
            raise ValueError(f"sample '{sample.id}': an image tag inside a turn's text has no OpenAI form here.")
        messages.append({"role": message["role"], "content": [*parts, {"type": "text", "text": text}] if parts else text})
    return messages


def _sample(messages: Any, limits: Limits) -> Sample:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required: a non-empty list of {\"role\", \"content\"} objects.")
    turns, images = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content", "name"}:
            raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content' only.")
        role = message.get("role")
        if role == "developer":  # what newer OpenAI clients call the system turn
            role = "system"
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role is {role!r}; use one of {list(ROLES)}.")
        text = _content(message.get("content"), f"messages[{i}].content", role, images, limits)
        turns.append({"role": role, "content": text})
    if turns[-1]["role"] != "user":
        raise ApiError(400, "The last message must be from the user: it is the turn to answer.")
    return Sample(id="request", messages=turns, images=images)


def _content(content: Any, where: str, role: str, images: list[bytes], limits: Limits) -> str:
    """A string, or text / image_url parts, as the prompt text training reads (vlm/data/content.py: each image
    as the image tag in its place, parts joined by newlines, so `[image, "What colour?"]` reads
    `<image>\\nWhat colour?`, as LLaVA data does)."""
    if not isinstance(content, (str, list)) or content == []:
        raise ApiError(400, f"{where} must be a string or a non-empty list of content parts.")

    def text(value: Any, here: str) -> str:
        if not isinstance(value, str):
            raise bad_part(here)
        return _text(value, here)

    def image(part: dict[str, Any], here: str) -> None:
        if part.get("type") != "image_url" or role != "user" or set(part) - {"type", "image_url"}:
            raise bad_part(here)
        if len(images) >= limits.max_images:
            raise ApiError(400, f"More than {limits.max_images} images in one request; send fewer.")
        images.append(_image_bytes(part.get("image_url"), f"{here}.image_url", limits))

    def bad_part(here: str, part: Any = None) -> ApiError:
        return ApiError(400, f"{here} must be {{\"type\": \"text\", \"text\": ...}} or, in a user message, "
                             "{\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/...;base64,...\"}}.")

    if isinstance(content, list):
        for k, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text" and set(part) - {"type", "text"}:
                raise bad_part(f"{where}[{k}]")
    return content_text(content, where, text, image, bad_part)


def _text(text: str, where: str) -> str:
    if IMAGE_TAG in text:
        raise ApiError(400, f"{where} contains the literal text {IMAGE_TAG!r}; send images as image_url parts.")
    return text


def _image_bytes(image_url: Any, where: str, limits: Limits) -> bytes:
    """The bytes of a base64 `data:` URL, or of a file inside the allowed folder; never a fetched URL."""
    if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str) \
            or set(image_url) - {"url", "detail"}:
        raise ApiError(400, f"{where} must be {{\"url\": \"data:image/...;base64,...\"}}.")
    url = image_url["url"]
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, f"{where}.url is a data: URL without ';base64'; send base64-encoded image bytes.")
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise ApiError(413, f"{where} is over the {limits.max_image_bytes:,}-byte image limit.")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}.url holds invalid base64.") from None
    return _allowed_file(url, where, limits)


def _allowed_file(url: str, where: str, limits: Limits) -> bytes:
    if url.startswith(("http://", "https://")):
        raise ApiError(400, f"{where}.url is a web address; this server never fetches URLs. Send the image as a "
                            "base64 data: URL.")
    if limits.image_folder is None:
        raise ApiError(400, f"{where}.url is not a data: URL; reading files is off (start the server with "
                            "--allow-images-from FOLDER to allow paths inside FOLDER).")
    folder = limits.image_folder.resolve()
    path = Path(url.removeprefix("file://"))
    path = (path if path.is_absolute() else folder / path).resolve()
    if not path.is_relative_to(folder) or not path.is_file():
        raise ApiError(400, f"{where}.url is not a file inside the allowed image folder.")
    if os.path.getsize(path) > limits.max_image_bytes:
        raise ApiError(413, f"{where} is over the {limits.max_image_bytes:,}-byte image limit.")
    return path.read_bytes()


def _stop(stop: Any) -> list[str]:
    stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or a list of at most 4 of them.")
    return stops


def _int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer, got {json.dumps(value)[:40]}.")
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' is {value}; it must be between {low} and {high} on this server.")
    return value


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a number, got {json.dumps(value)[:40]}.")
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' is {value}; it must be between {low} and {high}.")
    return float(value)
