"""DPO's reference model: the policy as training starts, in the cheapest form that is exact.

- `AdaptersOff`: with LoRA, when only the adapters (and peft's trainable token rows) train, the policy with its
  adapters disabled *is* the initial policy: no second copy in memory (what peft and TRL do).
- `FrozenCopy`: otherwise (the fusion or the LM trains), a frozen copy taken before training, unsharded, in
  eval mode: one more model's weights per rank.
- `Precomputed` (`train.dpo.precompute_reference`): every training pair scored once before step 1, each
  rank a share, gathered; no reference model during training.

Every form returns, for a pair batch, the log-probabilities of its rows [chosen..., rejected...] (`sequence_logps`).
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from ..config import Config
from ..data.batch import Batch
from ..data.collator import Collator
from ..data.dataset import ConversationDataset
from .distributed import DistEnv, gather_objects
from .dpo import sequence_logps
from .lora import has_lora
from .sharding.base import Strategy

logger = logging.getLogger(__name__)

ADAPTER_PARAMETERS = ("lora_", "trainable_tokens_")
"""Name parts of the parameters peft adds (LoRA matrices, trainable token rows): all that trains under `AdaptersOff`."""


class Reference(ABC):
    name = "reference"

    @abstractmethod
    def logps(self, strategy: Strategy, batch: Batch, inputs: dict[str, Any]) -> torch.Tensor:
        """[2 x pairs] sequence log-probabilities of the batch's rows under the initial policy (no gradient)."""


class AdaptersOff(Reference):
    name = "the policy with its LoRA adapters disabled"

    def logps(self, strategy: Strategy, batch: Batch, inputs: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad(), strategy.unwrapped().lm.disable_adapter(), strategy.autocast():
            logits = strategy.model(**inputs, num_items_in_batch=1).logits
        return sequence_logps(logits, inputs["labels"])[0]


class FrozenCopy(Reference):
    name = "a frozen copy of the initial model"

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = copy.deepcopy(model).requires_grad_(False).eval().to(device)

    def logps(self, strategy: Strategy, batch: Batch, inputs: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad(), strategy.autocast():
            logits = self.model(**inputs, num_items_in_batch=1).logits
        return sequence_logps(logits, inputs["labels"])[0]


class Precomputed(Reference):
    name = "log-probabilities precomputed before step 1"

    def __init__(self, table: dict[str, tuple[float, float]]) -> None:
        self.table = table

    def logps(self, strategy: Strategy, batch: Batch, inputs: dict[str, Any]) -> torch.Tensor:
        chosen = [self.table[i][0] for i in batch.ids]
        rejected = [self.table[i][1] for i in batch.ids]
        return torch.tensor(chosen + rejected, dtype=torch.float32, device=inputs["labels"].device)

    @classmethod
    def score(cls, model: nn.Module, datasets: list[ConversationDataset], pad_token_id: int, batch_size: int,
              strategy: Strategy, env: DistEnv, cached: bool) -> "Precomputed":
        """Collective: each rank scores every world_size-th pair of `datasets` (training, evaluation) with
        `model` (the initial policy, before sharding); then every rank has the table {sample id: (chosen, rejected)}."""
        collate, table = Collator(pad_token_id), {}
        mine = [(d, i) for d in datasets for i in range(len(d))][env.rank::env.world_size]
        was_training = model.training
        model.eval().to(env.device)
        for start in range(0, len(mine), batch_size):
            items = [d.load_or_report(i) for d, i in mine[start:start + batch_size]]
            batch = collate([item for item in items if "skipped" not in item])
            if not batch.has_inputs:
                continue
            inputs = batch.forward_inputs(model.vision, cached, env.device)
            with torch.no_grad(), strategy.autocast():
                logps = sequence_logps(model(**inputs, num_items_in_batch=1).logits, inputs["labels"])[0].tolist()
            pairs = len(batch.ids)
            table.update({sid: (logps[k], logps[pairs + k]) for k, sid in enumerate(batch.ids)})
        model.train(was_training)
        merged = {k: v for part in gather_objects(table, env) for k, v in part.items()}
        logger.info("Reference log-probabilities precomputed for %d pair(s).", len(merged))
        return cls(merged)


def only_adapters_train(model: nn.Module) -> bool:
    """True when every trainable parameter is one peft added (so disabling them gives the initial policy)."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    return has_lora(model) and all(any(part in name for part in ADAPTER_PARAMETERS) for name in trainable)


def frozen_reference(config: Config, model: nn.Module, env: DistEnv) -> Reference | None:
    """The reference that needs the untouched model (called right after it is built, before anything wraps it);
    None when `choose_reference` decides later (adapters, precomputed)."""
    if config.train.dpo.precompute_reference or only_adapters_train(model):
        return None
    if has_lora(model):
        logger.warning("train.objective=dpo with LoRA: more than the adapters trains (e.g. the fusion), so the LM "
                       "with adapters disabled is not the initial policy; the reference is a frozen copy. Freeze the "
                       "rest (train.stage=custom with train.freeze.fusion=true, train.lora.train_new_tokens=false) "
                       "or set train.dpo.precompute_reference=true to keep no copy.")
    return FrozenCopy(model, env.device)


def describe(reference: Reference) -> str:
    """One log line: which reference, and what it costs in memory."""
    extra = ""
    if isinstance(reference, FrozenCopy):
        size = sum(p.numel() * p.element_size() for p in reference.model.parameters())
        extra = f" ({size / 2**20:.1f} MiB more per rank)"
    return f"DPO reference: {reference.name}{extra}."
