"""Everything `datasets` reads: save_to_disk folders, parquet / arrow / csv files, imagefolder, webdataset."""

from __future__ import annotations

from pathlib import Path

from ..hf_datasets import hf_records, is_hf_source, load_hf_dataset
from . import Records, register_reader


@register_reader(is_hf_source)
def read_dataset(path: Path) -> tuple[Records, str]:
    dataset, loader = load_hf_dataset(path)
    return hf_records(dataset), loader
