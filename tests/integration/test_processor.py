import pytest
import torch
from PIL import Image

from vlm.config import DataConfig
from vlm.data.collator import Collator
from vlm.data.dataset import ConversationDataset
from vlm.data.formats import read_samples
from vlm.data.sample import DataError, Sample, SampleError
from vlm.factory import processor_for
from vlm.loss import IGNORE_INDEX, count_supervised


@pytest.fixture()
def image_file(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (220, 20, 20)).save(path)
    return str(path)


def supervised_spans(processor, labels):
    """Decode each contiguous run of supervised tokens."""
    spans, current = [], []
    for token in labels.tolist() + [IGNORE_INDEX]:
        if token == IGNORE_INDEX:
            if current:
                spans.append(processor.tokenizer.decode(current, skip_special_tokens=True))
            current = []
        else:
            current.append(token)
    return spans


def test_only_assistant_turns_are_supervised(tiny_vlm, image_file):
    answers = ["a large red circle.", "red", "There is 1 shape, and it is on the left!"]
    sample = Sample("multi", [
        {"role": "system", "content": "You answer questions about images."},
        {"role": "user", "content": "<image>\nDescribe the image."},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": "What colour is it?"},
        {"role": "assistant", "content": answers[1]},
        {"role": "user", "content": "How many shapes, and where?"},
        {"role": "assistant", "content": answers[2]},
    ], [image_file])
    encoded = processor_for(tiny_vlm)(sample)
    assert supervised_spans(processor_for(tiny_vlm), encoded["labels"]) == answers
    # The end-of-turn marker is supervised too, so the model learns to stop.
    end = tiny_vlm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (encoded["labels"] == end).sum() == 3


def test_image_tag_expands_to_the_fusion_token_count(tiny_vlm, image_file):
    sample = Sample("two", [{"role": "user", "content": "<image> and <image>?"}, {"role": "assistant", "content": "x"}],
                    [image_file, image_file])
    encoded = processor_for(tiny_vlm)(sample)
    n = tiny_vlm.fusion.tokens_per_image
    assert (encoded["input_ids"] == tiny_vlm.image_token_id).sum() == 2 * n
    assert encoded["pixel_values"].shape[0] == 2
    assert (encoded["labels"][encoded["input_ids"] == tiny_vlm.image_token_id] == IGNORE_INDEX).all()


def test_generation_prompt_stops_at_last_user_turn(tiny_vlm, image_file):
    sample = Sample("q", [{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "red"}],
                    [image_file])
    text = tiny_vlm.tokenizer.decode(processor_for(tiny_vlm)(sample, for_generation=True)["input_ids"])
    assert text.endswith("<|im_start|>assistant\n") and "red" not in text


@pytest.mark.parametrize("messages, images, category, words", [
    ([{"role": "user", "content": "<image> <image>"}, {"role": "assistant", "content": "a"}], 1,
     "image_tag_mismatch", "2 <image> tag(s) but 1 image"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}], 1, "image_tag_mismatch", "0 <image>"),
    ([{"role": "user", "content": "<image>"}, {"role": "user", "content": "again"}], 1, "alternation", "message 1"),
    ([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "see <image>"}], 2,
     "image_in_answer", "assistant message 1"),
    ([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "  "}], 1, "empty_turn", "message 1"),
])
def test_bad_samples_name_the_sample_and_the_problem(tiny_vlm, image_file, messages, images, category, words):
    with pytest.raises(SampleError) as err:
        processor_for(tiny_vlm)(Sample("sample-42", messages, [image_file] * images))
    assert err.value.category == category
    assert "sample-42" in str(err.value) and words in str(err.value)


def test_missing_and_corrupt_images_are_skipped_and_counted(tiny_vlm, image_file, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    turns = [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}]
    samples = [Sample("good", turns, [image_file]), Sample("gone", turns, [str(tmp_path / "missing.png")]),
               Sample("bad", turns, [str(corrupt)]), Sample("mismatch", turns, [])]
    dataset = ConversationDataset(samples, processor_for(tiny_vlm))
    assert dict(dataset.problems) == {"missing_image": 1, "image_tag_mismatch": 1}
    assert len(dataset) == 2
    batch = Collator(tiny_vlm.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert batch.ids == ["good"]
    assert [(s["skipped"], s["category"]) for s in batch.skipped] == [("bad", "corrupt_image")]
    with pytest.raises(SampleError, match="sample 'gone'.*missing.png"):
        ConversationDataset(samples, processor_for(tiny_vlm), strict=True)


def test_training_and_eval_datasets_put_the_next_readable_sample_in_an_unreadable_ones_place(tiny_vlm, image_file,
                                                                                          tmp_path):
    """`replace` (training) and `stand_in` (evaluation): a micro-batch is never empty, so every rank runs the
    same forwards; the failed sample is still reported (and counted once), and an eval stand-in weighs nothing."""
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    turns = [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}]
    samples = [Sample("bad-0", turns, [str(corrupt)]), Sample("bad-1", turns, [str(corrupt)]),
               Sample("good", turns, [image_file])]
    pad = tiny_vlm.tokenizer.pad_token_id
    report = ConversationDataset(samples, processor_for(tiny_vlm))
    assert report[0] == {"skipped": "bad-0", "category": "corrupt_image", "detail": report[0]["detail"]}
    assert not Collator(pad)([report[0], report[1]]).has_inputs

    train = ConversationDataset(samples, processor_for(tiny_vlm), unreadable="replace")
    batch = Collator(pad)([train[0], train[1]])
    assert batch.ids == ["good", "good"]  # the next sample that loads, wrapping round
    assert [s["skipped"] for s in batch.skipped] == ["bad-0", "bad-1"]  # each reported once, by its own index
    assert count_supervised(batch.labels) == 2 * count_supervised(Collator(pad)([train[2]]).labels) > 0

    evaluation = ConversationDataset(samples, processor_for(tiny_vlm), unreadable="stand_in")
    batch = Collator(pad)([evaluation[0], evaluation[2]])
    assert batch.ids == ["good", "good"] and [s["skipped"] for s in batch.skipped] == ["bad-0"]
    assert (batch.labels[0] == IGNORE_INDEX).all() and count_supervised(batch.labels[1:]) > 0

    only_bad = ConversationDataset(samples[:2], processor_for(tiny_vlm), unreadable="replace")
    with pytest.raises(DataError, match="None of the 2 samples could be loaded"):
        only_bad[0]


def test_too_long_sample_is_reported(tiny_vlm, image_file):
    processor = processor_for(tiny_vlm, DataConfig(max_length=8))
    sample = Sample("long", [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}], [image_file])
    with pytest.raises(SampleError, match="sample 'long'.*data.max_length=8"):
        processor(sample)


def test_llava_and_messages_formats_read_the_same_conversation(tmp_path, image_file):
    import json

    (tmp_path / "llava.json").write_text(json.dumps([{"id": "a", "image": image_file, "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]}]))
    (tmp_path / "msgs.jsonl").write_text(json.dumps({"id": "a", "images": [image_file], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "red"}]}) + "\n{broken\n")
    (llava,), _ = read_samples(tmp_path / "llava.json")
    (messages,), errors = read_samples(tmp_path / "msgs.jsonl")
    assert llava.messages == messages.messages and llava.images == messages.images == [image_file]
    assert len(errors) == 1 and "line 2" in str(errors[0])


def test_collator_pads_left_for_generation(tiny_vlm, image_file):
    short = {"id": "s", "input_ids": torch.tensor([5, 6]), "labels": torch.tensor([5, 6]), "pixel_values": None}
    long = {"id": "l", "input_ids": torch.tensor([7, 8, 9]), "labels": torch.tensor([7, 8, 9]), "pixel_values": None}
    batch = Collator(0, "left")([short, long])
    assert batch.input_ids.tolist() == [[0, 5, 6], [7, 8, 9]]
    assert batch.attention_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert batch.pixel_values is None
