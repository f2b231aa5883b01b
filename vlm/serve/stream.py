"""One generate call's new tokens, followed per request: incremental text, stop strings, token limits.

`BatchStream` is both the streamer `lm.generate` hands each step's tokens to (`put` gets the whole
batch's new tokens; transformers' TextStreamer allows batch 1 only) and the stopping criterion that
ends a row when its request is answered, so a batch stops as soon as every request in it is done.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.stopping_criteria import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from .api import ChatRequest


@dataclass
class Job:
    """A request on its way through the batcher; the handler reads `events` (delta / done / error)."""

    request: ChatRequest
    item: dict[str, Any]
    """The processor's output for the request's sample (input_ids, pixel_values)."""
    events: "queue.Queue[tuple]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    emitted: str = ""
    finished: bool = False

    @property
    def prompt_tokens(self) -> int:
        return int(self.item["input_ids"].shape[0])

    def finish(self, text: str, reason: str) -> None:
        if not self.finished:
            self.finished = True
            self.events.put(("done", text, reason, len(self.tokens)))

    def fail(self, status: int, message: str) -> None:
        if not self.finished:
            self.finished = True
            self.events.put(("error", status, message))


def visible_text(text: str, stops: list[str], final: bool) -> tuple[str, bool]:
    """What a client may see of the decoded text so far, and whether a stop string ended it.

    The answer is stripped as `VLMProcessor.decode` strips it (so it equals `vlm predict`'s). Until
    the row is final, trailing whitespace, an incomplete UTF-8 character and any tail that could still
    grow into a stop string are held back, so streamed pieces never need taking back."""
    text = text.lstrip()
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut].rstrip(), True
    if final:
        return text.rstrip(), False
    text = text.rstrip().rstrip("\ufffd")
    held = max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[: len(text) - held], False


class BatchStream(BaseStreamer, StoppingCriteria):
    """Streamer and stopping criterion of one generate call over `jobs` (one row each, in batch order)."""

    def __init__(self, tokenizer: Any, jobs: list[Job], eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.jobs = jobs
        self.eos_ids = eos_ids

    def put(self, value: torch.Tensor) -> None:
        if value.dim() != 1:  # the prompt's ids (none, when generating from embeddings)
            return
        for job, token in zip(self.jobs, value.tolist()):
            if job.finished:
                continue
            if job.cancelled.is_set():
                job.fail(499, "The client went away.")
                continue
            job.tokens.append(token)
            ended = token in self.eos_ids
            self._advance(job, final=ended or len(job.tokens) >= job.request.max_tokens, eos=ended)

    def end(self) -> None:
        """Rows still open when generation ends ran out of tokens."""
        for job in self.jobs:
            self._advance(job, final=True, eos=False)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = [job.finished or job.cancelled.is_set() for job in self.jobs]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _advance(self, job: Job, final: bool, eos: bool) -> None:
        if job.finished:
            return
        decoded = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        text, stopped = visible_text(decoded, job.request.stop, final)
        if job.request.stream and text.startswith(job.emitted) and len(text) > len(job.emitted):
            job.events.put(("delta", text[len(job.emitted):]))
            job.emitted = text
        if stopped or final:
            job.finish(text, "stop" if stopped or eos else "length")
