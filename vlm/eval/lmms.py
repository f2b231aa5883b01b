"""lmms-eval model type `vlm`: `lmms-eval --model vlm --model_args pretrained=DIR --tasks ...`.

lmms-eval finds it through the `lmms_eval.models` entry point in pyproject.toml (`manifests` below),
so nothing in lmms-eval's package is edited. Answers come from the same processor
(`for_generation=True`), left-padding Collator, `VLM.generate` and `VLMProcessor.decode` as `vlm predict`,
through `Pipeline.generate_batch`, so with the same batch size they are `vlm predict`'s answers.
`loglikelihood` (multiple-choice tasks scored by likelihood) scores a continuation after the same prompt.
This module imports lmms-eval; nothing else in `vlm` imports this module.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image

from ..data.sample import SampleError
from ..factory import load
from ..pipeline import Pipeline
from ..progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = ["VLMLmms", "manifests"]

# lmms-eval generation_kwargs passed on to `generate`; `until` and `max_new_tokens` are handled here.
_GENERATE_KEYS = ("do_sample", "temperature", "top_p", "top_k", "num_beams")


def manifests() -> list[ModelManifest]:
    """The `lmms_eval.models` entry point: model name `vlm` -> `VLMLmms`."""
    return [ModelManifest(model_id="vlm", simple_class_path="vlm.eval.lmms.VLMLmms")]


class VLMLmms(lmms):
    """A saved VLM folder as an lmms-eval "simple" model (context string + `doc_to_visual` images).

    model_args: `pretrained` (the folder), `max_new_tokens` (default 32, when the task's
    generation_kwargs do not set it), `device` (default: cuda when available). The batch size is
    lmms-eval's `--batch_size` (its default is 1; `vlm predict`'s is 16). Several processes
    (`accelerate launch -m lmms_eval`) each load the model and answer their share of the requests.
    """

    is_simple = True

    def __init__(self, pretrained: str, batch_size: int | str = 1, max_new_tokens: int | str = 32,
                 device: str | None = None, **unused: Any) -> None:
        super().__init__()
        from accelerate import PartialState

        if unused:
            logger.warning("vlm: ignoring model_args %s (known: pretrained, max_new_tokens, device).",
                           sorted(unused))
        state = PartialState()
        self._rank, self._world_size = state.process_index, state.num_processes
        model, processor = load(pretrained)
        self.device = torch.device(device) if device else state.device
        self.pipeline = Pipeline(model.to(self.device), processor)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in request order; consecutive requests with the same generation_kwargs share a batch."""
        answers: list[str] = []
        bar = progress_bar(total=len(requests), desc="vlm generate", unit="request", disable=self.rank != 0)
        for chunk in _chunks(requests, self.batch_size):
            settings = dict(chunk[0].args[1] or {})
            until = settings.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new_tokens = int(settings.pop("max_new_tokens", self.max_new_tokens))
            kwargs = {k: settings[k] for k in _GENERATE_KEYS if settings.get(k) is not None}
            if not kwargs.get("temperature"):  # lmms-eval's "temperature: 0" means greedy
                kwargs.pop("temperature", None)
                kwargs.pop("top_p", None)
                kwargs["do_sample"] = False
            texts = self.pipeline.generate_batch([self._inputs(r.args[0], *r.args[2:]) for r in chunk],
                                                  max_new_tokens, **kwargs)
            answers += [_cut(text, until) for text in texts]
            bar.update(len(chunk))
        bar.close()
        return answers

    def _inputs(self, context: str, doc_to_visual: Any, doc_id: int, task: str, split: str
                ) -> tuple[list[Image.Image], str]:
        """A request's (images, prompt), checked as `vlm predict` checks a sample."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        images = [v for v in visuals or [] if isinstance(v, Image.Image)]
        if len(images) != len(visuals or []):
            raise ValueError(f"{task} doc {doc_id}: the vlm model type takes images only (got "
                             f"{[type(v).__name__ for v in visuals]}); pick an image task.")
        try:
            self.pipeline.processor.check(self.pipeline.prompt_sample(images, context, f"{task}-{doc_id}"),
                                          for_generation=True)
        except SampleError as err:
            raise ValueError(f"{task} doc {doc_id}: {err.detail}") from None
        return images, context

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its prompt (chat template and generation prompt
        applied, as for generation), and whether greedy decoding would produce it; one request at a time."""
        model, tokenizer = self.pipeline.model, self.pipeline.processor.tokenizer
        results = []
        for request in progress_bar(requests, desc="vlm loglikelihood", unit="request", disable=self.rank != 0):
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            images, prompt = self._inputs(context, doc_to_visual, doc_id, task, split)
            sample = self.pipeline.prompt_sample(images, prompt, f"{task}-{doc_id}")
            item = self.pipeline.processor(sample, for_generation=True)
            target = torch.tensor(tokenizer(continuation, add_special_tokens=False)["input_ids"], dtype=torch.long)
            if len(target) == 0:  # nothing to predict: probability 1
                results.append((0.0, True))
                continue
            input_ids = torch.cat([item["input_ids"], target])[None].to(self.device)
            pixels = item["pixel_values"].to(self.device) if item["pixel_values"] is not None else None
            logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels,
                           full_logits=True).logits[0, -len(target) - 1 : -1].float()
            logprobs = torch.log_softmax(logits, dim=-1).cpu()
            picked = logprobs.gather(1, target[:, None]).sum()
            results.append((float(picked), bool((logprobs.argmax(-1) == target).all())))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("The vlm model type has no multi-round generation; pick a single-turn task.")


def _chunks(requests: list[Instance], size: int) -> list[list[Instance]]:
    """Consecutive runs of requests with equal generation_kwargs, cut into batches of `size`."""
    chunks = []
    for _, run in itertools.groupby(requests, key=lambda r: repr(sorted((r.args[1] or {}).items()))):
        run = list(run)
        chunks += [run[i : i + size] for i in range(0, len(run), size)]
    return chunks


def _cut(text: str, until: list[str]) -> str:
    """The answer up to the first stop string (lmms-eval's `until`)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text
