"""Nothing half-written: files and folders are written under a temporary name and renamed into place.

Every atomic write in the package goes through here: `atomic_directory` (a folder built whole),
`atomic_file` / `write_text_atomic` (one file), and `replace_directory`, the final rename, for a
folder whose temporary name must be known in advance (every rank writes into a checkpoint's).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        replace_directory(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def replace_directory(tmp: str | Path, target: str | Path) -> None:
    """Rename the finished folder `tmp` to `target` (same file system), removing any old `target` first."""
    target = Path(target)
    if target.exists():
        shutil.rmtree(target)
    Path(tmp).rename(target)


@contextmanager
def atomic_file(target: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary sibling path of `target` to write; on success it is given `mode` and renamed
    over `target` in one step (readers see the old file or the new one, never part of one); on error
    it is removed and `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)  # mkstemp makes it owner-only
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(target: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `target` atomically (`atomic_file`)."""
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
