"""Container readers: a file or folder -> (records, container name). One file per container in this
package, registered with `register_reader`; every module here is imported, so adding a container is one
file plus its test. The first reader whose `matches(path)` is true reads it (highest `priority` first).

A reader yields `(position, record)` pairs; a record that cannot be parsed is yielded as
`{"id": ..., "__error__": "what is wrong"}` (it becomes a named, skipped sample), and a file that cannot
be read at all raises one `DataError` naming it.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, Callable, Iterable

Records = Iterable[tuple[int, Any]]
Reader = Callable[[Path], tuple[Records, "str | None"]]
_READERS: list[tuple[int, Callable[[Path], bool], Reader]] = []


def register_reader(matches: Callable[[Path], bool], priority: int = 0) -> Callable[[Reader], Reader]:
    """Register `reader` for the paths `matches` accepts."""
    def decorator(reader: Reader) -> Reader:
        _READERS.append((priority, matches, reader))
        _READERS.sort(key=lambda entry: -entry[0])
        return reader

    return decorator


def reader_for(path: Path) -> Reader:
    for _, matches, reader in _READERS:
        if matches(path):
            return reader
    raise ValueError(f"No reader accepts '{path}'.")  # the JSON reader accepts every path


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
