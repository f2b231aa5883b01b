"""`vlm serve` as a client sees it: the real `openai` client against a server on a free loopback port.

Its answers must be `vlm predict`'s (streamed or not, alone or 64 at once from 8 threads), sampling
settings must act, and every bad request must get its own 4xx with a JSON error, the server living on.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI
from PIL import Image

from captions import PROJECTOR, write_questions_file
from hostile import png_header
from serving import chat_requests, predictions
from vlm.serve import Limits, VLMServer

KEY = "test-key-123"


@pytest.fixture(scope="module")
def model_dir(train_captioner):
    return train_captioner(PROJECTOR) / "final"


@pytest.fixture(scope="module")
def questions(captions_file, tmp_path_factory):
    return write_questions_file(captions_file, tmp_path_factory.mktemp("serve") / "test.json")


@pytest.fixture(scope="module")
def server(model_dir):
    server = VLMServer(model_dir, port=0, max_batch=16, wait_ms=20).start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def expected(model_dir, questions, tmp_path_factory):
    answers = predictions(model_dir, questions, tmp_path_factory.mktemp("predict") / "preds.jsonl")
    # Otherwise a server that lost the image could still match.
    assert len(set(answers.values())) >= 8, answers
    return answers


@pytest.fixture(scope="module")
def requests_(questions):
    return chat_requests(questions)


def _ask(client, messages, stream=False, **kwargs):
    if not stream:
        return client.chat.completions.create(model="vlm", messages=messages, max_tokens=32, **kwargs) \
            .choices[0].message.content
    chunks = client.chat.completions.create(model="vlm", messages=messages, max_tokens=32, stream=True, **kwargs)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_health_and_models(server, client):
    connection = http.client.HTTPConnection(*server.httpd.server_address[:2])
    connection.request("GET", "/health")
    assert json.loads(connection.getresponse().read()) == {"status": "ok"}
    (model,) = client.models.list().data
    assert model.id == "final" and model.fusion == "projector" and model.lm == "lm" and model.vision == "vit"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_answers_equal_vlm_predict(client, requests_, expected, stream):
    answers = {sample_id: _ask(client, messages, stream) for sample_id, messages in requests_.items()}
    assert answers == expected


def test_64_concurrent_requests_from_8_threads_match_one_at_a_time(server, client, requests_, expected):
    jobs = [(sample_id, i % 2 == 1) for i in range(4) for sample_id in requests_]
    before = len(server.batcher.batch_sizes)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: _ask(client, requests_[job[0]], job[1]), jobs))
    assert len(answers) == 64
    assert [(sample_id, a) for (sample_id, _), a in zip(jobs, answers)] == [(s, expected[s]) for s, _ in jobs]
    sizes = server.batcher.batch_sizes[before:]
    assert sum(sizes) == 64 and max(sizes) > 1, sizes  # every request answered, some in shared generate calls


def test_generation_settings(client, requests_, expected):
    sample_id = max(expected, key=lambda s: len(expected[s].split()))  # the longest answer (a caption)
    messages, answer = requests_[sample_id], expected[sample_id]
    assert len(answer.split()) >= 2, answer
    first_word = answer.split()[0]
    for stream in (False, True):
        assert _ask(client, messages, stream, stop=[" "]) == first_word
    short = client.chat.completions.create(model="vlm", messages=messages, max_tokens=1)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 1
    assert answer.startswith(short.choices[0].message.content)
    whole = client.chat.completions.create(model="vlm", messages=messages, max_tokens=32)
    assert whole.choices[0].finish_reason == "stop" and whole.usage.prompt_tokens > 16  # image tokens counted
    sampled = [_ask(client, messages, temperature=1.5, top_p=0.95, seed=seed) for seed in (1, 1, 2, 3, 4, 5)]
    assert sampled[0] == sampled[1], "the same seed gives the same answer"
    assert len(set(sampled)) > 1, sampled


@pytest.fixture(scope="module")
def strict(model_dir, tmp_path_factory):
    """A server with small limits, an API key and an allowed image folder holding one image."""
    folder = tmp_path_factory.mktemp("allowed")
    Image.new("RGB", (32, 32), (200, 20, 20)).save(folder / "red.png")
    limits = Limits(max_body_bytes=200_000, max_image_bytes=60_000, max_image_pixels=512 * 512, max_images=2,
                    max_tokens=64, image_folder=folder)
    server = VLMServer(model_dir, port=0, limits=limits, api_key=KEY).start()
    yield server
    server.close()


def _png(size=(32, 32)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (20, 20, 200)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _with(*images, **fields):
    content = [*({"type": "image_url", "image_url": {"url": url}} for url in images), {"type": "text", "text": "Hi?"}]
    return json.dumps({"model": "vlm", "messages": [{"role": "user", "content": content}], **fields}).encode()


def _data(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


NOISE = base64.b64encode(bytes(range(256)) * 400).decode()  # ~100 kB of base64: over the image-byte limit
# (name, method, path, body, headers, status, words the error message must contain)
BAD_INPUTS = [
    ("invalid JSON", "POST", "/v1/chat/completions", b"{not json", {}, 400, "not valid JSON"),
    ("body not an object", "POST", "/v1/chat/completions", b"[1, 2]", {}, 400, "JSON object"),
    ("missing messages", "POST", "/v1/chat/completions", b'{"model": "vlm"}', {}, 400, "'messages' is required"),
    ("unknown field", "POST", "/v1/chat/completions", _with(frobnicate=1), {}, 400, "frobnicate"),
    ("bad role", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "robot", "content": "hi"}]}', {}, 400, "robot"),
    ("last turn not user", "POST", "/v1/chat/completions", json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}).encode(), {}, 400, "last message"),
    ("literal image tag", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "<image> hi"}]}', {}, 400, "image_url parts"),
    ("bad base64", "POST", "/v1/chat/completions", _with("data:image/png;base64,@@@@"), {}, 400, "invalid base64"),
    ("not an image", "POST", "/v1/chat/completions", _with(_data(b"hello, not a picture")), {}, 400,
     "cannot be decoded"),
    ("decompression bomb", "POST", "/v1/chat/completions", _with(_data(png_header(100_000, 100_000))), {}, 413,
     "pixels"),
    ("image over the byte limit", "POST", "/v1/chat/completions", _with("data:image/png;base64," + NOISE), {}, 413,
     "byte image limit"),
    ("too many images", "POST", "/v1/chat/completions", _with(_png(), _png(), _png()), {}, 400, "More than 2 images"),
    ("max_tokens over the limit", "POST", "/v1/chat/completions", _with(_png(), max_tokens=10_000), {}, 400,
     "max_tokens"),
    ("temperature not a number", "POST", "/v1/chat/completions", _with(_png(), temperature="hot"), {}, 400,
     "temperature"),
    ("n above 1", "POST", "/v1/chat/completions", _with(_png(), n=2), {}, 400, "'n' must be 1"),
    ("http URL", "POST", "/v1/chat/completions", _with("https://example.com/cat.png"), {}, 400, "never fetches"),
    ("path outside the allowed folder", "POST", "/v1/chat/completions", _with("/etc/passwd"), {}, 400,
     "not a file inside the allowed image folder"),
    ("path escaping the allowed folder", "POST", "/v1/chat/completions", _with("../../../../etc/hostname"), {}, 400,
     "not a file inside the allowed image folder"),
    # Refused from the headers alone, before any of the body is read: so these send none.
    ("body too large", "POST", "/v1/chat/completions", None, {"Content-Length": "300000"}, 413, "over this server"),
    ("no content length", "POST", "/v1/chat/completions", None, {"Transfer-Encoding": "chunked"}, 411,
     "Content-Length"),
    ("wrong API key", "POST", "/v1/chat/completions", _with(_png()), {"Authorization": "Bearer wrong"}, 401, "API key"),
    ("no API key", "GET", "/v1/models", None, {"Authorization": ""}, 401, "API key"),
    ("unknown route", "GET", "/v1/completions", None, {}, 404, "No route"),
    ("wrong method", "GET", "/v1/chat/completions", None, {}, 405, "takes POST"),
    ("prompt over the context", "POST", "/v1/chat/completions",
     json.dumps({"messages": [{"role": "user", "content": "hello " * 600}]}).encode(), {}, 400, "context"),
]


def _send(server, method, path, body=None, headers=None):
    connection = http.client.HTTPConnection(*server.httpd.server_address[:2], timeout=60)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    if body is None and {"Transfer-Encoding", "Content-Length"} & set(headers):
        connection.putrequest(method, path)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
    else:
        connection.request(method, path, body=body, headers={k: v for k, v in headers.items() if v})
    response = connection.getresponse()
    return response.status, response.getheader("Content-Type"), response.read()


@pytest.mark.parametrize("name,method,path,body,headers,status,words", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_gets_its_status_and_a_json_error(strict, name, method, path, body, headers, status, words):
    got, content_type, raw = _send(strict, method, path, body, headers)
    assert content_type == "application/json", raw[:200]
    error = json.loads(raw)["error"]
    assert (got, words in error["message"]) == (status, True), error
    assert error["type"] and "Traceback" not in raw.decode() and KEY not in raw.decode()


def test_server_lives_on_and_allowed_files_are_read(strict):
    """After every bad request of the table (sent here, so this holds run alone or in any order), a good one
    is still answered, and an image named by a path inside the allowed folder is read."""
    for _, method, path, body, headers, status, _ in BAD_INPUTS:
        assert _send(strict, method, path, body, headers)[0] == status
    for url in (_png(), "red.png"):
        status, _, raw = _send(strict, "POST", "/v1/chat/completions", _with(url, max_tokens=4))
        assert status == 200, raw
        assert json.loads(raw)["choices"][0]["message"]["role"] == "assistant"


def test_a_client_that_leaves_mid_stream_does_not_stop_the_others(server, client, requests_, expected):
    sample_id = next(iter(requests_))
    body = json.dumps({"model": "vlm", "messages": requests_[sample_id], "stream": True, "max_tokens": 32}).encode()
    leavers = []
    for _ in range(4):
        connection = http.client.HTTPConnection(*server.httpd.server_address[:2], timeout=60)
        connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        leavers.append(connection)
    threading.Thread(target=lambda: [c.close() for c in leavers]).start()
    assert _ask(client, requests_[sample_id], stream=True) == expected[sample_id]
