"""The batcher on the fusions that change `lm.generate` (late: logits mixed at the output head; cross_attention:
visual state around it): streamed pieces join to the whole answer, which is the model's own
`generate` answer (decoded by its processor); `max_tokens` and `stop` end each row on its own. The caption models the
generation tests train (one session fixture), so this adds no training to the suite."""

from __future__ import annotations

import pytest

from captions import SCENES, STRATEGIES
from vlm.data.collator import Collator
from vlm.data.sample import Sample
from vlm.embedded.synthetic import render_scene
from vlm.factory import processor_for
from vlm.model import VLM
from vlm.serve.api import ChatRequest
from vlm.serve.batcher import Batcher
from vlm.serve.stream import Job


def _sample(i: int) -> Sample:
    image = render_scene(SCENES[i])
    return Sample(f"s{i}", [{"role": "user", "content": "<image>\nDescribe the image."}], [image])


def _result(job: Job) -> tuple[str, str, int, str]:
    pieces = []
    while True:
        event = job.events.get(timeout=120)
        if event[0] == "delta":
            pieces.append(event[1])
        else:
            assert event[0] == "done", event
            return event[1], event[2], event[3], "".join(pieces)


@pytest.mark.parametrize("fusion", ["late", "cross_attention"])
def test_batched_rows_stream_and_end_on_their_own(train_captioner, fusion):
    model = VLM.from_pretrained(train_captioner(STRATEGIES[fusion]) / "final").eval()
    processor = processor_for(model)
    samples = [_sample(i) for i in range(3)]
    batch = Collator(model.tokenizer.pad_token_id, "left")([processor(s, for_generation=True) for s in samples])
    reference = processor.decode(model.generate(**batch.generation_inputs(), max_new_tokens=12))
    assert all(len(answer.split()) >= 3 for answer in reference), reference

    stop = reference[1].split()[-1][-2:]  # a piece of row 1's last word: it must end that row there
    requests = [ChatRequest(samples[0], max_tokens=12, stream=True), ChatRequest(samples[1], max_tokens=12, stop=[stop]),
                ChatRequest(samples[2], max_tokens=3, stream=True)]
    batcher = Batcher(model, max_batch=3, wait_ms=200)
    jobs = [batcher.submit(Job(r, processor(r.sample, for_generation=True))) for r in requests]
    results = [_result(job) for job in jobs]
    batcher.close()
    assert batcher.batch_sizes == [3]

    text, reason, tokens, streamed = results[0]
    assert (text, streamed) == (reference[0], reference[0])
    assert reason in ("stop", "length") and tokens <= 12
    text, reason, _, streamed = results[1]
    assert (text, reason, streamed) == (reference[1][: reference[1].find(stop)].rstrip(), "stop", "")
    text, reason, tokens, streamed = results[2]
    assert (reason, tokens, streamed) == ("length", 3, text) and reference[2].startswith(text)
