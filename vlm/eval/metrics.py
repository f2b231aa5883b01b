"""Evaluation metrics: VQAv2 accuracy, COCO-style BLEU-4 and CIDEr-D.

The caption metrics follow the scorers of the COCO caption evaluation
(pycocoevalcap) so numbers are comparable with published results, except for
tokenisation: the COCO code uses the Java PTB tokenizer, here captions are
lower-cased, stripped of punctuation and split on whitespace.  The
pycocoevalcap wheel is ~100 MB (it bundles Java jars for METEOR/SPICE) and
needs Java for tokenisation, so it is not a dependency.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence

__all__ = [
    "normalize_vqa_answer",
    "vqa_accuracy",
    "bleu4",
    "cider_d",
    "compute_metrics",
    "infer_task",
]

# ---------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------

# Rules and tables of the official VQA evaluation (vqaEval.py, VQA API).
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\",
                "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The official pattern has a typo'd look-behind "(?!<=\d)", so in effect any
# period not followed by a digit is removed ("2.5" keeps it, "2." does not).
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
# The official contraction map, minus its capitalised keys ("Im", "Ive", ...),
# which can never match because words are lower-cased first.  The odd entry
# "somebody'd" -> "somebodyd" is in the official map and is kept for parity.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}


def normalize_vqa_answer(answer: str) -> str:
    """Normalise an answer with the official VQAv2 rules.

    Predictions and ground-truth answers must go through the same rules so that
    surface differences ("Two." vs "2", "dont" vs "don't") do not count as errors
    and scores stay comparable with the official leaderboard.
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    # A punctuation mark touching a space, or any "digit,digit" in the answer,
    # means the mark is deleted ("1,000" -> "1000"); otherwise it becomes a
    # space ("black/white" -> "black white").  Both tests look at the input.
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    out = _PERIOD_STRIP.sub("", out)

    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(
    prediction: str, references: Sequence[str], *, leave_one_out: bool = False
) -> float:
    """VQA accuracy of one prediction against its reference answers.

    With one reference the answer is simply right (1.0) or wrong (0.0).  With
    several (VQAv2 has 10 annotators) an answer counts as fully correct once at
    least 3 annotators gave it: ``min(matches / 3, 1)``, so 2 matches give 2/3.

    ``leave_one_out=True`` reproduces the official script exactly: it averages
    ``min(matches / 3, 1)`` over the subsets that leave out one annotator each,
    so 2 matches out of 10 give 0.6 and 3 give 0.9.  Use it to compare with
    published VQAv2 numbers.
    """
    if isinstance(references, str):
        references = [references]
    if not references:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    hits = [normalize_vqa_answer(ref) == pred for ref in references]
    matches = sum(hits)
    if len(hits) == 1:
        return float(matches)
    if leave_one_out:
        return sum(min(1.0, (matches - hit) / 3.0) for hit in hits) / len(hits)
    return min(1.0, matches / 3.0)


def infer_task(references: Sequence[str]) -> str:
    """Guess the task of a sample that does not state it: "vqa" when every
    reference is a short answer (at most 3 words), otherwise "caption"."""
    if isinstance(references, str):
        references = [references]
    return "vqa" if all(len(ref.split()) <= 3 for ref in references) else "caption"


# ---------------------------------------------------------------------------
# Captioning
# ---------------------------------------------------------------------------

_NON_WORD = re.compile(r"[^\w\s]|_")


def _tokenize(text: str) -> list[str]:
    return _NON_WORD.sub("", text.lower()).split()


def _ngram_counts(tokens: list[str], max_n: int = 4) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i : i + n])] += 1
    return counts


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} reference lists"
        )
    if any(isinstance(refs, str) or len(refs) == 0 for refs in references):
        raise ValueError("every prediction needs a non-empty list of reference captions")


def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 as computed by the COCO caption evaluation.

    Clipped n-gram matches and lengths are summed over the whole corpus before
    taking the geometric mean of the 1..4-gram precisions, and the brevity
    penalty uses, per sample, the reference length closest to the prediction
    (the shorter one on ties).  The same tiny smoothing constants as the COCO
    code are used, so a corpus without any 4-gram match scores ~0, not 0.
    """
    _check_inputs(predictions, references)
    if not predictions:
        return 0.0
    max_n = 4
    correct = [0] * max_n
    guessed = [0] * max_n
    hyp_len = ref_len = 0
    for prediction, refs in zip(predictions, references):
        hyp = _tokenize(prediction)
        ref_tokens = [_tokenize(ref) for ref in refs]
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in ref_tokens)[1]

        max_ref_counts: Counter[tuple[str, ...]] = Counter()
        for tokens in ref_tokens:
            max_ref_counts |= _ngram_counts(tokens, max_n)
        for ngram, count in _ngram_counts(hyp, max_n).items():
            correct[len(ngram) - 1] += min(count, max_ref_counts[ngram])
        for n in range(max_n):
            guessed[n] += max(0, len(hyp) - n)

    tiny, small = 1e-15, 1e-9
    precision_product = 1.0
    for n in range(max_n):
        precision_product *= (correct[n] + tiny) / (guessed[n] + small)
    score = precision_product ** (1.0 / max_n)
    ratio = (hyp_len + tiny) / (ref_len + small)
    if ratio < 1.0:
        score *= math.exp(1.0 - 1.0 / ratio)
    return float(score)


def cider_d(
    predictions: Sequence[str], references: Sequence[Sequence[str]], *, sigma: float = 6.0
) -> float:
    """Corpus CIDEr-D as computed by the COCO caption evaluation.

    Each caption becomes a TF-IDF vector per n-gram order (n = 1..4), with
    document frequencies taken from the reference captions of the evaluated
    set (one document per sample).  The score of a sample averages, over its
    references and over n, a cosine similarity in which the prediction's
    weights are clipped at the reference's (repeating words does not pay),
    times a Gaussian penalty on the length difference; the result is scaled
    by 10 and averaged over samples.  Because the IDF comes from the evaluated
    set, a single-sample corpus always scores 0.
    """
    _check_inputs(predictions, references)
    if not predictions:
        return 0.0
    max_n = 4
    hyp_counts = [_ngram_counts(_tokenize(p), max_n) for p in predictions]
    ref_counts = [[_ngram_counts(_tokenize(r), max_n) for r in refs] for refs in references]

    doc_freq: Counter[tuple[str, ...]] = Counter()
    for refs in ref_counts:
        doc_freq.update({ngram for counts in refs for ngram in counts})
    log_num_docs = math.log(len(ref_counts))

    def tfidf(counts: Counter[tuple[str, ...]]) -> tuple[list[dict], list[float], int]:
        vectors: list[dict[tuple[str, ...], float]] = [defaultdict(float) for _ in range(max_n)]
        for ngram, tf in counts.items():
            idf = log_num_docs - math.log(max(1.0, doc_freq[ngram]))
            vectors[len(ngram) - 1][ngram] = tf * idf
        norms = [math.sqrt(sum(w * w for w in vec.values())) for vec in vectors]
        length = sum(tf for ngram, tf in counts.items() if len(ngram) == 1)
        return vectors, norms, length

    per_sample = []
    for hyp, refs in zip(hyp_counts, ref_counts):
        hyp_vecs, hyp_norms, hyp_len = tfidf(hyp)
        total = 0.0
        for ref in refs:
            ref_vecs, ref_norms, ref_len = tfidf(ref)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2.0 * sigma**2))
            for n in range(max_n):
                dot = sum(
                    min(w, ref_vecs[n].get(g, 0.0)) * ref_vecs[n].get(g, 0.0)
                    for g, w in hyp_vecs[n].items()
                )
                if hyp_norms[n] and ref_norms[n]:
                    dot /= hyp_norms[n] * ref_norms[n]
                total += dot * penalty / max_n
        per_sample.append(10.0 * total / len(refs))
    return float(sum(per_sample) / len(per_sample))


# ---------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------


def compute_metrics(records: Sequence[dict]) -> dict:
    """Score a list of prediction records and return a JSON-serialisable report.

    A record is ``{"id", "prediction", "references", "task", "type"}``; "task"
    ("vqa" or "caption") is inferred from the references when missing, and
    "type" (optional, e.g. the VQA answer type) drives the per-type breakdown,
    which only covers records that have one.  A section is left out when no
    record belongs to its task.
    """
    vqa_scores: list[float] = []
    vqa_by_type: dict[str, list[float]] = defaultdict(list)
    cap_predictions: list[str] = []
    cap_references: list[list[str]] = []

    for record in records:
        references = record["references"]
        references = [references] if isinstance(references, str) else list(references)
        task = record.get("task") or infer_task(references)
        if task == "vqa":
            score = vqa_accuracy(record["prediction"], references)
            vqa_scores.append(score)
            if record.get("type") is not None:
                vqa_by_type[str(record["type"])].append(score)
        elif task == "caption":
            cap_predictions.append(record["prediction"])
            cap_references.append(references)
        else:
            raise ValueError(f"record {record.get('id')!r}: unknown task {task!r}")

    result: dict = {"num_samples": len(records)}
    if vqa_scores:
        result["vqa"] = {
            "accuracy": sum(vqa_scores) / len(vqa_scores),
            "count": len(vqa_scores),
            "per_type": {
                name: {"accuracy": sum(scores) / len(scores), "count": len(scores)}
                for name, scores in sorted(vqa_by_type.items())
            },
        }
    if cap_predictions:
        result["caption"] = {
            "bleu4": bleu4(cap_predictions, cap_references),
            "cider_d": cider_d(cap_predictions, cap_references),
            "count": len(cap_predictions),
        }
    return result
