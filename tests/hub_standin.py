"""A loopback stand-in for the model hub's HTTP API, shared by the push tests (in-process and under torchrun).

The real hub cannot be reached from the machines this runs on, so this small server implements what
huggingface_hub's `create_repo`, `create_branch` and `upload_folder` call (create repo, create branch,
preupload, commit with base64 file contents) and keeps every file it receives.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit

import pytest

TOKEN = "hf_FakeTokenForTests0123456789abcdef"
REPO = "acme/tiny-vlm"


class HubStandIn:
    """What the hub keeps: repositories, their branches' files, and the commits in arrival order."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self.auth_headers: set[str] = set()
        self.unexpected: list[str] = []
        self.hold_commits = threading.Event()
        self.hold_commits.set()
        self.commit_arrived = threading.Event()

    def handle(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict]:
        self.requests.append((method, path))
        self.auth_headers.add(headers.get("Authorization", ""))
        if headers.get("Authorization") != f"Bearer {self.token}":
            return 401, {"error": "Invalid credentials in Authorization header"}
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}"
            if repo in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"/{repo}"}
            self.repos[repo] = {"visibility": payload.get("visibility"), "branches": {"main": {}}}
            return 200, {"url": f"{self.url}/{repo}"}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)", path)
        if method != "POST" or not match:
            self.unexpected.append(f"{method} {path}")
            return 404, {"error": f"not implemented by the stand-in: {method} {path}"}
        repo, action, revision = match.group(1), match.group(2), unquote(match.group(3))
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        branches = self.repos[repo]["branches"]
        if action == "branch":
            if revision in branches:
                return 409, {"error": "Branch already exists"}
            branches[revision] = dict(branches["main"])
            return 200, {}
        if revision not in branches:
            return 404, {"error": f"Invalid rev id: {revision}"}
        if action == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        self.commit_arrived.set()
        assert self.hold_commits.wait(30), "the test never released the held commit"
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = {}
        for line in lines:
            if line["key"] == "file":
                assert line["value"]["encoding"] == "base64"
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] != "header":
                return 400, {"error": f"the stand-in only takes regular files, got {line['key']}"}
        branches[revision].update(files)
        oid = hashlib.sha1(body).hexdigest()
        self.commits.append({"repo": repo, "revision": revision, "summary": header["summary"], "files": files})
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def files(self, repo: str = REPO, revision: str = "main") -> dict[str, bytes]:
        return self.repos[repo]["branches"][revision]

    def write(self, target: Path, repo: str = REPO, revision: str = "main") -> Path:
        for name, data in self.files(repo, revision).items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(data)
        return target


@contextmanager
def running_hub() -> Iterator[HubStandIn]:
    """A stand-in serving on a free loopback port (its address in `.url`) until the block ends."""
    state = HubStandIn(TOKEN)

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, payload = state.handle(self.command, urlsplit(self.path).path, self.headers, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_HEAD = do_PUT = _serve

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        state.hold_commits.set()
        server.shutdown()
        server.server_close()


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    """A running stand-in; huggingface_hub's own token lookup is pointed at an empty home."""
    with running_hub() as state:
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        yield state
