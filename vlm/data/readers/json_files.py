"""LLaVA JSON (one list of samples) and JSON Lines (one sample per line): the default for any path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from ..describe import describe
from ..sample import DataError
from . import Records, register_reader


@register_reader(lambda path: True, priority=-1)
def read_json(path: Path) -> tuple[Records, None]:
    return _json_records(path), None


def _json_records(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"Data file '{path}' cannot be read ({err.strerror or err}).") from None
    if path.suffix == ".jsonl":
        for index, line in enumerate(raw.split(b"\n")):
            if not line.strip():
                continue
            try:
                yield index, json.loads(line.decode("utf-8-sig" if index == 0 else "utf-8"))
            except UnicodeDecodeError:
                yield index, {"id": f"{path.name}:line {index + 1}", "__error__": "is not UTF-8 text."}
            except json.JSONDecodeError as err:
                yield index, {"id": f"{path.name}:line {index + 1}", "__error__": f"invalid JSON ({err.msg})"}
        return
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"Data file '{path}' is not UTF-8 text (bad byte at line {line}); save it as UTF-8.") from None
    except json.JSONDecodeError as err:
        hint = " It looks like JSON Lines (one sample per line): name it .jsonl." if err.msg == "Extra data" else ""
        raise DataError(
            f"Data file '{path}' is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}.{hint}"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"Data file '{path}' must hold a JSON list of samples (LLaVA format), got {describe(data)}.")
    yield from enumerate(data)
