"""Hugging Face `datasets` as a data source: save_to_disk folders, parquet / arrow / CSV files,
imagefolder with metadata, webdataset tar shards.

Everything is loaded by the `datasets` library itself (Arrow, memory-mapped). Rows are read
without their image columns, so building the sample list decodes no image; each image stays a
`DatasetImage` reference whose encoded bytes the processor reads, size-checks and decodes itself
(the same safe path as image files). A source `datasets` cannot read is one `DataError` naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import datasets
import pyarrow.compute as pc
from .sample import DataError

HF_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".tar": "webdataset"}
WEBDATASET_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "image")


@dataclass(frozen=True, eq=False)
class DatasetImage:
    """One image cell of a loaded dataset, decoded on demand (the table itself is memory-mapped)."""

    view: datasets.Dataset
    """The dataset restricted to this image's column, in arrow format (cells stay encoded)."""
    row: int
    column: str
    position: int | None = None
    """Index in a list-of-images cell; None for a single-image column."""

    def encoded(self) -> bytes | str:
        """The cell's encoded image: its bytes, or the file path it points to. Nothing is decoded here."""
        value = self.view[self.row].column(self.column)[0].as_py()
        value = value if self.position is None else value[self.position]
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            return value.get("bytes") or value["path"]
        raise ValueError("the dataset cell holds no image bytes or path")

    def __repr__(self) -> str:
        where = "" if self.position is None else f"[{self.position}]"
        return f"DatasetImage(row {self.row}, column '{self.column}'{where})"


def is_hf_source(path: Path) -> bool:
    """A folder, or a file suffix that `datasets` reads (parquet / arrow / csv / tar)."""
    return path.is_dir() or path.suffix in HF_SUFFIXES


def load_hf_dataset(path: Path) -> tuple[datasets.Dataset, str]:
    """Load with the matching `datasets` builder; returns the dataset and the loader's name.

    Whatever `datasets` or Arrow raise on a broken source becomes one `DataError` naming the path."""
    try:
        return _load(path)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - pyarrow / datasets raise many types on unreadable files
        detail = (str(err).strip().splitlines() or [""])[0][:300]
        raise DataError(f"Data source '{path}' cannot be read by `datasets` ({type(err).__name__}: {detail}).") from None


def _load(path: Path) -> tuple[datasets.Dataset, str]:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            return _single_split(loaded, path), "save_to_disk"
        if any((path / f"metadata.{ext}").is_file() for ext in ("jsonl", "csv", "parquet")):
            return datasets.load_dataset("imagefolder", data_dir=str(path), split="train"), "imagefolder"
        for suffix, builder in HF_SUFFIXES.items():
            files = sorted(str(p) for p in path.glob(f"*{suffix}"))
            if files:
                return datasets.load_dataset(builder, data_files=files, split="train"), builder
        raise DataError(
            f"'{path}' is a folder but not a dataset: expected a save_to_disk folder (dataset_info.json), "
            "an imagefolder with metadata.jsonl, or *.parquet / *.arrow / *.csv / *.tar files."
        )
    builder = HF_SUFFIXES[path.suffix]
    return datasets.load_dataset(builder, data_files=str(path), split="train"), builder


def _single_split(loaded: Any, path: Path) -> datasets.Dataset:
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            return loaded["train"]
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise DataError(f"'{path}' holds splits {list(loaded)}; save the one to use as its own folder.")
    return loaded


def hf_records(dataset: datasets.Dataset) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows as plain dicts; image-feature columns become `DatasetImage` references (not decoded)."""
    image_columns = {}
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            image_columns[name] = None
        elif isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)) and isinstance(
            getattr(feature, "feature", None), datasets.Image
        ):
            image_columns[name] = pc.list_value_length(dataset.data.column(name)).to_pylist()
    views = {name: dataset.select_columns([name]).with_format("arrow") for name in image_columns}
    text = dataset.remove_columns(list(image_columns)) if image_columns else dataset
    for index, row in enumerate(text):
        record = dict(row)
        for name, lengths in image_columns.items():
            if lengths is None:
                record[name] = DatasetImage(views[name], index, name)
            else:
                record[name] = [DatasetImage(views[name], index, name, k) for k in range(lengths[index] or 0)]
        if "__key__" in record:
            record = _from_webdataset(record)
        yield index, record


def _from_webdataset(record: dict[str, Any]) -> dict[str, Any]:
    """webdataset shards key columns by file extension: `png`/`jpg` image, `json` fields, `txt` caption."""
    out: dict[str, Any] = {"id": record["__key__"]}
    extra = record.get("json")
    if isinstance(extra, (str, bytes)):
        try:
            extra = json.loads(extra)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return {"id": out["id"], "__error__": f"its .json member is not valid JSON ({err})."}
    if extra is not None and not isinstance(extra, dict):
        return {"id": out["id"], "__error__": f"its .json member is a {type(extra).__name__}, not an object."}
    out.update(extra or {})
    for key in WEBDATASET_IMAGE_KEYS:
        if record.get(key) is not None:
            out.setdefault("image", record[key])
            break
    if record.get("txt") is not None:
        out.setdefault("caption", record["txt"])
    return out
