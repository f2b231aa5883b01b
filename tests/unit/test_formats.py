"""Every supported format reads into the same internal samples."""

import io
import json
import tarfile

import datasets
import numpy as np
import pytest
from PIL import Image

from vlm.config import DataConfig, DataFile, load_config
from vlm.data.validation import check_sample
from vlm.data.formats import read_samples
from vlm.data.images import load_images
from vlm.data.mixture import read_files
from vlm.data.sample import IMAGE_TAG

COLOURS = {"a.png": (200, 20, 20), "b.png": (20, 200, 20), "c.png": (20, 20, 200)}
CAPTION = DataConfig.caption_prompt
ROWS = [
    {"id": "cap-1", "image": "a.png", "caption": "a red square"},
    {"id": "vqa-1", "image": "b.png", "question": "What colour?", "answers": ["green", "green", "blue"]},
    {"id": "vqa-2", "image": "c.png", "question": "Where is it?", "answers": ["left"]},
]


def turns(row):
    """The conversation each table row stands for, with the default prompt templates."""
    if "caption" in row:
        return CAPTION, row["caption"]
    return f"{IMAGE_TAG}\n{row['question']}", row["answers"][0]


def write_images(root):
    for name, colour in COLOURS.items():
        Image.new("RGB", (16, 16), colour).save(root / name)


def png(name):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), COLOURS[name]).save(buf, format="PNG")
    return buf.getvalue()


def table_dataset(image_feature: bool) -> datasets.Dataset:
    cols = {k: [r.get(k) for r in ROWS] for k in ("id", "caption", "question", "answers")}
    if image_feature:
        cols["image"] = [{"bytes": png(r["image"]), "path": None} for r in ROWS]
        features = datasets.Features({
            "id": datasets.Value("string"), "caption": datasets.Value("string"),
            "question": datasets.Value("string"), "answers": datasets.List(datasets.Value("string")),
            "image": datasets.Image(),
        })
        return datasets.Dataset.from_dict(cols, features=features)
    cols["image"] = [r["image"] for r in ROWS]
    return datasets.Dataset.from_dict(cols)


@pytest.fixture(scope="module")
def every_format(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    write_images(root)
    files = {}
    llava = [{"id": r["id"], "image": r["image"], "conversations": [
        {"from": "human", "value": turns(r)[0]}, {"from": "gpt", "value": turns(r)[1]}]} for r in ROWS]
    (root / "llava.json").write_text(json.dumps(llava))
    files["llava_json"] = root / "llava.json"
    lines = [{**{k: v for k, v in rec.items() if k != "image"}, "images": [rec["image"]]} for rec in llava]
    (root / "llava.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    files["llava_jsonl"] = root / "llava.jsonl"
    msgs = []
    for r in ROWS:
        user, answer = turns(r)
        assert user.startswith(IMAGE_TAG + "\n")  # parts are joined by a newline, as the chat template does
        parts = [{"type": "image"}, {"type": "text", "text": user[len(IMAGE_TAG) + 1:]}]
        msgs.append({"id": r["id"], "images": [r["image"]], "messages": [
            {"role": "user", "content": parts}, {"role": "assistant", "content": answer}]})
    (root / "messages.jsonl").write_text("\n".join(json.dumps(x) for x in msgs))
    files["messages_jsonl"] = root / "messages.jsonl"
    (root / "table.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    files["table_jsonl"] = root / "table.jsonl"
    csv_rows = [{"id": r["id"], "image": r["image"], "caption": r.get("caption"), "question": r.get("question"),
                 "answers": json.dumps(r["answers"]) if "answers" in r else None} for r in ROWS]
    datasets.Dataset.from_list(csv_rows).to_csv(root / "table.csv", index=False)
    files["table_csv"] = root / "table.csv"
    table_dataset(False).to_parquet(root / "paths.parquet")
    files["parquet_paths"] = root / "paths.parquet"
    table_dataset(True).to_parquet(root / "bytes.parquet")
    files["parquet_bytes"] = root / "bytes.parquet"
    table_dataset(True).save_to_disk(str(root / "saved"))
    files["save_to_disk"] = root / "saved"
    folder = root / "imagefolder"
    folder.mkdir()
    write_images(folder)
    (folder / "metadata.jsonl").write_text("\n".join(
        json.dumps({"file_name": r["image"], **{k: v for k, v in r.items() if k != "image"}}) for r in ROWS))
    files["imagefolder"] = folder
    with tarfile.open(root / "shard-0000.tar", "w") as tar:
        for r in ROWS:
            for name, data in ((f"{r['id']}.png", png(r["image"])),
                               (f"{r['id']}.json", json.dumps({k: v for k, v in r.items() if k not in ("id", "image")}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    files["webdataset"] = root / "shard-0000.tar"
    return files


def canonical(path):
    samples, errors = read_samples(path)
    assert errors == []
    out = {}
    for s in samples:
        check_sample(s, IMAGE_TAG)
        out[s.id] = (s.messages, [np.asarray(im).tolist() for im in load_images(s)])
    return out, {s.id: s.source_format for s in samples}


def test_every_format_reads_into_identical_samples(every_format):
    reference, _ = canonical(every_format["llava_json"])
    assert sorted(reference) == ["cap-1", "vqa-1", "vqa-2"]
    assert reference["vqa-1"][0][1]["content"] == "green"  # the most common of the answers
    kinds = {}
    for name, path in every_format.items():
        got, formats = canonical(path)
        assert got == reference, name
        kinds[name] = sorted(set(formats.values()))
    assert kinds["parquet_bytes"] == ["caption:parquet", "vqa:parquet"]
    assert kinds["imagefolder"] == ["caption:imagefolder", "vqa:imagefolder"]
    assert kinds["webdataset"] == ["caption:webdataset", "vqa:webdataset"]
    assert kinds["messages_jsonl"] == ["messages"]


def test_dataset_images_stay_undecoded_until_loaded(every_format):
    samples, _ = read_samples(every_format["save_to_disk"])
    assert all(type(im).__name__ == "DatasetImage" for s in samples for im in s.images)
    vqa = next(s for s in samples if s.id == "vqa-1")
    assert vqa.meta["answers"] == ["green", "green", "blue"]


def test_prompt_templates_and_image_root(every_format, tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps(ROWS[1]))
    samples, _ = read_samples(tmp_path / "t.jsonl", every_format["llava_json"].parent,
                              vqa_prompt="Q: {question} A:")
    assert samples[0].messages[0]["content"] == f"{IMAGE_TAG}\nQ: What colour? A:"
    assert load_images(samples[0])  # resolved against image_root, not the file's folder


def test_weighted_mixture_repeats_and_subsamples(every_format):
    config = load_config(None, [f"data.train_files=[{every_format['llava_json']},"
                                f" {{path: {every_format['table_jsonl']}, weight: 2}},"
                                f" {{path: {every_format['messages_jsonl']}, weight: 0.34}}]"])
    assert isinstance(config.data.train_files[1], DataFile)
    samples, errors = read_files(config.data.train_files, data=config.data, seed=1)
    assert errors == [] and len(samples) == 3 + 6 + 1
    again, _ = read_files(config.data.train_files, data=config.data, seed=1)
    assert [s.id for s in again] == [s.id for s in samples]  # the subset is fixed by the seed


def test_multi_image_multi_turn_and_text_only(tmp_path):
    write_images(tmp_path)
    record = {"id": "m", "images": ["a.png", "b.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
        {"role": "assistant", "content": "no"},
        {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "yes"}]}
    text_only = {"id": "t", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "m.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(text_only))
    samples, _ = read_samples(tmp_path / "m.jsonl")
    assert [len(s.images) for s in samples] == [2, 0] and len(samples[0].messages) == 4
    for s in samples:
        check_sample(s, IMAGE_TAG)


def test_dataset_cells_survive_pickling_for_dataloader_workers(every_format):
    import pickle

    samples, _ = read_samples(every_format["parquet_bytes"])
    copy = pickle.loads(pickle.dumps(samples))
    assert [np.asarray(im).tolist() for s in copy for im in load_images(s)] == \
        [np.asarray(im).tolist() for s in samples for im in load_images(s)]


def test_a_new_container_is_one_registered_reader(tmp_path, monkeypatch):
    """Adding a container format touches nothing but its reader: here a tab-separated caption file."""
    from vlm.data import readers

    monkeypatch.setattr(readers, "_READERS", list(readers._READERS))

    @readers.register_reader(lambda path: path.suffix == ".tsv")
    def read_tsv(path):
        rows = [line.split("\t") for line in path.read_text().splitlines() if line]
        return ((i, {"id": f"row{i}", "image": image, "caption": text}) for i, (image, text) in enumerate(rows)), "tsv"

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "captions.tsv").write_text("a.png\ta black square.\n")
    samples, errors = read_samples(tmp_path / "captions.tsv")
    assert errors == [] and [s.id for s in samples] == ["row0"]
    assert samples[0].messages[-1] == {"role": "assistant", "content": "a black square."}
    assert samples[0].source_format.endswith(":tsv")
