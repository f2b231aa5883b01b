"""Dynamic batching: requests that arrive close together are answered by one generate call.

One worker thread owns the model. It takes the first waiting request, waits up to `wait_ms` for
more (up to `max_batch`), and runs each group of requests that can share a call: all greedy
requests together, sampled requests with the same temperature / top_p together, and a seeded
request alone (its seed then fixes its answer whatever else is waiting). Rows of a call may ask
for different `max_tokens` and `stop`: the call runs to the largest limit and each row ends on its own.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import torch
from transformers.generation.stopping_criteria import StoppingCriteriaList

from ..data.collator import Collator
from ..model import VLM
from .api import ApiError
from .stream import BatchStream, Job

logger = logging.getLogger(__name__)


class Batcher:
    """Queue of `Job`s answered in batches by one worker thread; `submit` never blocks on generation."""

    def __init__(self, model: VLM, max_batch: int = 16, wait_ms: float = 10.0, max_queue: int = 256) -> None:
        self.model = model.eval()
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1000
        self.queue: "queue.Queue[Job | None]" = queue.Queue(max_queue)
        self.collator = Collator(model.tokenizer.pad_token_id, "left")
        eos = model.lm.generation_config.eos_token_id
        self.eos_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        self.batch_sizes: list[int] = []
        """Rows of every generate call so far: how much batching happened."""
        self._worker = threading.Thread(target=self._loop, name="vlm-batcher", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> Job:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise ApiError(503, "The server is busy (request queue full); retry shortly.", "server_busy") from None
        return job

    def close(self) -> None:
        self.queue.put(None)
        self._worker.join(timeout=30)

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            jobs, deadline, closing = [first], time.monotonic() + self.wait_s, False
            while len(jobs) < self.max_batch:
                try:
                    job = self.queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if job is None:
                    closing = True
                    break
                jobs.append(job)
            for group in _groups([job for job in jobs if not job.cancelled.is_set()]):
                self._run(group)
            for job in jobs:
                job.fail(499, "The client went away.")  # no-op for answered jobs
            if closing:
                return

    def _run(self, jobs: list[Job]) -> None:
        request = jobs[0].request
        stream = BatchStream(self.model.tokenizer, jobs, self.eos_ids)
        kwargs: dict[str, Any] = {"streamer": stream, "stopping_criteria": StoppingCriteriaList([stream])}
        if request.temperature > 0:
            kwargs.update(do_sample=True, temperature=request.temperature, top_p=request.top_p)
        self.batch_sizes.append(len(jobs))
        try:
            batch = self.collator([job.item for job in jobs])
            device = self.model.lm.device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
                if request.seed is not None:
                    torch.manual_seed(request.seed)
                new_tokens = max(job.request.max_tokens for job in jobs)
                self.model.generate(**batch.generation_inputs(), max_new_tokens=new_tokens, **kwargs)
            stream.end()
        except Exception as err:  # noqa: BLE001 - one failed call must not take the server down
            logger.error("generation failed for %d request(s): %s: %s", len(jobs), type(err).__name__, err)
            for job in jobs:
                job.fail(500, "Generation failed on the server; see its log.")


def _groups(jobs: list[Job]) -> list[list[Job]]:
    """Jobs that can share one generate call, in arrival order of each group's first job."""
    groups: dict[Any, list[Job]] = {}
    for job in jobs:
        r = job.request
        key = ("greedy",) if r.temperature == 0 else ("seeded", id(job)) if r.seed is not None \
            else ("sampled", r.temperature, r.top_p)
        groups.setdefault(key, []).append(job)
    return list(groups.values())
