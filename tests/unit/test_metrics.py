import json
import math

import pytest

from vlm.eval.metrics import (
    bleu4,
    cider_d,
    compute_metrics,
    infer_task,
    normalize_vqa_answer,
    vqa_accuracy,
)


# --- VQA normalisation (official VQAv2 rules) ---------------------------------

@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),
        ("none", "0"),
        ("ten", "10"),
        ("a dog.", "dog"),
        ("The  Man  ", "man"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("Isnt", "isn't"),
        ("yes!", "yes"),
        ("2.5", "2.5"),
        ("2.", "2"),
        ("1,000", "1000"),            # a digit,digit comma deletes punctuation
        ("black/white", "black white"),  # punctuation not next to a space -> space
        ("yes , sir", "yes sir"),        # punctuation next to a space -> deleted
        ("it's a hat?", "it's hat"),
        ("line\nbreak", "line break"),
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


# --- VQA accuracy ----------------------------------------------------------------

def test_vqa_accuracy_single_reference_is_exact_match_after_normalisation():
    assert vqa_accuracy("Two.", ["2"]) == 1.0
    assert vqa_accuracy("three", ["2"]) == 0.0


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 1 / 3), (2, 2 / 3), (3, 1.0), (4, 1.0)])
def test_vqa_accuracy_multi_reference(matches, expected):
    refs = ["Yes"] * matches + ["no"] * (10 - matches)
    assert vqa_accuracy("yes", refs) == pytest.approx(expected)


@pytest.mark.parametrize("matches, expected", [(2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out_matches_official_averaging(matches, expected):
    refs = ["yes"] * matches + ["no"] * (10 - matches)
    assert vqa_accuracy("yes", refs, leave_one_out=True) == pytest.approx(expected)


def test_vqa_accuracy_rejects_empty_references():
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


# --- BLEU-4 ----------------------------------------------------------------------

def test_bleu4_identical_captions_score_one():
    captions = ["a man riding a horse on the beach", "two dogs play in the snow"]
    assert bleu4(captions, [[c] for c in captions]) == pytest.approx(1.0)


def test_bleu4_hand_computed_precisions():
    # clipped precisions 5/6, 4/5, 3/4, 2/3 ("the" counts once), equal lengths
    score = bleu4(["a cat sat on the mat"], [["the cat sat on the mat"]])
    assert score == pytest.approx((1 / 3) ** 0.25, rel=1e-6)


def test_bleu4_brevity_penalty():
    score = bleu4(["cat sat on the mat"], [["the cat sat on the mat"]])
    assert score == pytest.approx(math.exp(1 - 6 / 5), rel=1e-6)


def test_bleu4_is_a_corpus_statistic_not_a_mean_of_sentences():
    preds = ["a cat sat on the mat", "cat sat on the mat"]
    refs = [["the cat sat on the mat"], ["the cat sat on the mat"]]
    precisions = (10 / 11) * (8 / 9) * (6 / 7) * (4 / 5)
    expected = precisions ** 0.25 * math.exp(1 - 12 / 11)
    assert bleu4(preds, refs) == pytest.approx(expected, rel=1e-6)


def test_bleu4_uses_closest_reference_length_shorter_on_ties():
    pred = ["cat sat on the mat"]  # 5 tokens
    assert bleu4(pred, [["the cat sat on the mat", "cat sat on the mat in the sun"]]) == pytest.approx(
        math.exp(1 - 6 / 5), rel=1e-6
    )
    # references of 4 and 6 tokens are equally close; the shorter wins -> no penalty
    assert bleu4(pred, [["cat sat on mat", "the cat sat on the mat"]]) == pytest.approx(1.0)


def test_bleu4_ignores_case_and_punctuation():
    assert bleu4(["A cat, sat on the mat."], [["the cat sat on the mat"]]) == pytest.approx(
        (1 / 3) ** 0.25, rel=1e-6
    )


def test_bleu4_no_four_gram_match_is_near_zero():
    assert bleu4(["the cat sat on the mat"], [["the cat is on the mat"]]) < 1e-3


def test_caption_metrics_reject_mismatched_inputs():
    with pytest.raises(ValueError):
        bleu4(["a", "b"], [["a"]])
    with pytest.raises(ValueError):
        cider_d(["a"], [[]])


# --- CIDEr-D ---------------------------------------------------------------------
# Two-image corpus: "a" occurs in every image's references, so its IDF is 0;
# every other n-gram has IDF log(2).  Vectors for n=3,4 are empty and add 0.

def test_cider_d_hand_computed():
    # image 1: identical -> cosine 1 for n=1,2 -> 10 * (1+1+0+0)/4 = 5; image 2: no overlap -> 0
    score = cider_d(["a cat", "a bird"], [["a cat"], ["a dog"]])
    assert score == pytest.approx(2.5)


def test_cider_d_length_penalty():
    # image 2: unigram cosine 1/sqrt(2), no bigram match, length 3 vs 2 -> exp(-1/72)
    score = cider_d(["a cat", "a big dog"], [["a cat"], ["a dog"]])
    expected = (5.0 + 10 * (math.exp(-1 / 72) / math.sqrt(2)) / 4) / 2
    assert score == pytest.approx(expected)


def test_cider_d_clips_repeated_words():
    # "dog dog" has twice the reference's weight for "dog": clipped cosine is 1/2, not 1
    score = cider_d(["a cat", "dog dog"], [["a cat"], ["a dog"]])
    assert score == pytest.approx((5.0 + 10 * 0.5 / 4) / 2)


def test_cider_d_prefers_the_right_caption():
    refs = [
        ["a man riding a horse on a beach", "a person rides a horse along the shore"],
        ["two dogs playing in the snow", "a pair of dogs run through snow"],
        ["a plate of pasta with tomato sauce", "spaghetti with red sauce on a plate"],
    ]
    right = ["a man rides a horse on the beach", "two dogs play in the snow", "a plate of spaghetti with sauce"]
    wrong = ["a plate of spaghetti with sauce", "a man rides a horse on the beach", "two dogs play in the snow"]
    assert cider_d(right, refs) > 1.0 > cider_d(wrong, refs)


def test_cider_d_single_image_corpus_is_zero():
    # IDF is computed over the evaluated set: with one image every n-gram has IDF 0
    assert cider_d(["a cat"], [["a cat"]]) == 0.0


# --- task inference and aggregation -----------------------------------------------

def test_infer_task():
    assert infer_task(["yes", "no"]) == "vqa"
    assert infer_task(["red and white"]) == "vqa"
    assert infer_task(["yes", "a dog runs on the beach"]) == "caption"


def test_compute_metrics_breakdown():
    records = [
        {"id": "1", "prediction": "yes", "references": ["yes"] * 10, "task": "vqa", "type": "yes/no"},
        {"id": "2", "prediction": "no", "references": ["yes"] * 10, "task": "vqa", "type": "yes/no"},
        {"id": "3", "prediction": "two", "references": ["2", "2", "3"], "task": "vqa", "type": "number"},
        # no task: short references -> inferred as vqa; no type -> not in per_type
        {"id": "4", "prediction": "red", "references": ["red"]},
        {"id": "5", "prediction": "a cat", "references": ["a cat"], "task": "caption"},
        # no task: long references -> inferred as caption
        {"id": "6", "prediction": "a bird", "references": ["a dog sits on the grass"]},
    ]
    result = compute_metrics(records)
    json.dumps(result)
    assert result["num_samples"] == 6

    vqa = result["vqa"]
    assert vqa["count"] == 4
    assert vqa["accuracy"] == pytest.approx((1 + 0 + 2 / 3 + 1) / 4)
    assert vqa["per_type"] == {
        "number": {"accuracy": pytest.approx(2 / 3), "count": 1},
        "yes/no": {"accuracy": 0.5, "count": 2},
    }

    caption = result["caption"]
    assert caption["count"] == 2
    assert caption["bleu4"] == pytest.approx(
        bleu4(["a cat", "a bird"], [["a cat"], ["a dog sits on the grass"]])
    )
    assert caption["cider_d"] == pytest.approx(
        cider_d(["a cat", "a bird"], [["a cat"], ["a dog sits on the grass"]])
    )


def test_compute_metrics_omits_empty_sections():
    only_vqa = compute_metrics([{"id": "1", "prediction": "yes", "references": ["yes"], "task": "vqa"}])
    assert "caption" not in only_vqa and only_vqa["vqa"]["per_type"] == {}
    only_caption = compute_metrics(
        [{"id": "1", "prediction": "a cat", "references": ["a cat on a mat"], "task": "caption"}]
    )
    assert "vqa" not in only_caption and only_caption["caption"]["count"] == 1
    assert compute_metrics([]) == {"num_samples": 0}


def test_compute_metrics_rejects_unknown_task():
    with pytest.raises(ValueError):
        compute_metrics([{"id": "x", "prediction": "a", "references": ["a"], "task": "ocr"}])
