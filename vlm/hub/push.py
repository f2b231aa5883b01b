"""Publishing a saved VLM folder to a model hub, in the foreground (`vlm push`) or during training.

Everything network-facing is huggingface_hub's: `HfApi.create_repo` / `create_branch` /
`upload_folder`. The token is never handled here beyond being passed through: by default
huggingface_hub resolves it itself (`HF_TOKEN`, then the `hf auth login` cache), and it never
reaches a log line, an error message or a file.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..constants import ADAPTER_META, WEIGHTS_NAME
from .model_card import CARD_NAME, point_card_at_repo, write_model_card

logger = logging.getLogger(__name__)

IGNORE_PATTERNS = ["*.pkl", "*.pt", "*.pth", "*.bin", "*.ckpt", ".*", "*/.*"]
"""Never published: pickled objects (optimizer / RNG state, torch checkpoints) and hidden temporary files."""


class PushError(RuntimeError):
    """A push failed; the message names the folder, the repository and what to check (never the token)."""


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: str = "Upload VLM",
    endpoint: Optional[str] = None,
    token: Optional[str] = None,
    ignore_patterns: Optional[list[str]] = None,
) -> str:
    """Create `repo_id` if needed (and branch `revision`), upload `folder` in one commit, return the commit URL.

    A folder without a model card gets one first (its loading snippet downloads from `repo_id`).
    `endpoint` defaults to `HF_ENDPOINT`, then the public hub; `token` to what huggingface_hub finds.
    """
    folder = Path(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PushError(f"Repository id {repo_id!r} (--repo-id / hub.repo_id) is not valid: {err}") from None
    full = (folder / WEIGHTS_NAME).is_file() and (folder / "config.json").is_file()
    if not full and not (folder / ADAPTER_META).is_file():
        raise PushError(
            f"'{folder}' is not a saved VLM folder (needs {WEIGHTS_NAME} and config.json, or {ADAPTER_META} "
            "for LoRA adapters); push the folder training wrote, e.g. output_dir/final."
        )
    if not (folder / CARD_NAME).is_file():
        write_model_card(folder, repo_id=repo_id)
    else:
        point_card_at_repo(folder, repo_id)
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token)
    where = f"{api.endpoint.rstrip('/')}/{repo_id}" + (f" (branch {revision})" if revision else "")
    try:
        api.create_repo(repo_id, private=private or None, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message,
            ignore_patterns=list(ignore_patterns if ignore_patterns is not None else IGNORE_PATTERNS),
        )
    except Exception as err:  # HTTP, connection and validation errors all become one readable message
        raise PushError(_describe(err, folder, where, repo_id, token)) from None
    logger.info("Pushed %s to %s: %s", folder, where, info.commit_url)
    return info.commit_url


class BackgroundPusher:
    """Pushes during training without making it wait; one push at a time, in the order requested.

    `push` snapshots the folder (hard links, so it costs no copy) and returns at once, so the
    trainer may overwrite or delete the folder right after. `wait` blocks until every push is done
    and raises one `PushError` listing any that failed.
    """

    def __init__(
        self, repo_id: str, private: bool = False, revision: Optional[str] = None,
        endpoint: Optional[str] = None, token: Optional[str] = None,
    ) -> None:
        self.repo_id, self.private, self.revision, self.endpoint = repo_id, private, revision, endpoint
        self._token = token
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm-push")
        self._futures: list[Future] = []
        self._lock = threading.Lock()
        self._staging = Path(tempfile.mkdtemp(prefix="vlm-push-"))

    def push(self, folder: str | Path, message: str) -> Future:
        """Queue a push of `folder` as it is now, with commit message `message`; returns its future."""
        with self._lock:
            snapshot = self._staging / str(len(self._futures))
            _snapshot(Path(folder), snapshot)
            future = self._executor.submit(self._run, snapshot, Path(folder), message)
            self._futures.append(future)
        return future

    def wait(self) -> list[str]:
        """Block until every queued push has finished; return their commit URLs or raise `PushError`."""
        with self._lock:
            futures = list(self._futures)
        urls, failures = [], []
        for future in futures:
            try:
                urls.append(future.result())
            except PushError as err:
                failures.append(str(err))
        if failures:
            raise PushError(f"{len(failures)} of {len(futures)} push(es) failed:\n" + "\n".join(failures))
        return urls

    def close(self) -> None:
        """Wait for the queue to drain, then drop the snapshots (errors are left for `wait`)."""
        self._executor.shutdown(wait=True)
        shutil.rmtree(self._staging, ignore_errors=True)

    def _run(self, snapshot: Path, original: Path, message: str) -> str:
        try:
            return push_folder(
                snapshot, self.repo_id, self.private, self.revision, message, self.endpoint, self._token
            )
        except PushError as err:
            raise PushError(str(err).replace(str(snapshot), str(original))) from None
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)

    def __enter__(self) -> "BackgroundPusher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _snapshot(folder: Path, target: Path) -> None:
    """A copy of `folder` made of hard links (plain copies across file systems)."""
    if not folder.is_dir():
        raise PushError(f"Cannot push '{folder}': it is not a folder.")

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(folder, target, copy_function=link)


def _describe(err: Exception, folder: Path, where: str, repo_id: str, token: Optional[str]) -> str:
    """A message a person can act on, with every form of the token scrubbed out."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, HfHubHTTPError) and status in (401, 403):
        hint = (f"the hub refused the token (HTTP {status}): check HF_TOKEN or `hf auth login` gives write "
                f"access to '{repo_id}'")
    elif isinstance(err, HfHubHTTPError):
        hint = f"the hub answered HTTP {status}: {err}"
    else:
        hint = f"{type(err).__name__}: {err} (check the endpoint, hub.endpoint / HF_ENDPOINT, and the network)"
    message = f"Pushing '{folder}' to {where} failed: {hint}"
    for secret in {token, get_token()}:
        if secret:
            message = message.replace(secret, "***")
    return message
