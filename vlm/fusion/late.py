"""Late (decision-level) fusion (`model.fusion: late`): two predictors, mixed at the output.

The LM reads only the text (each `<image>` stays one marker token, tokens_per_image = 0). A
separate vision head maps the frozen tower's mean-pooled features to next-token logits over the
vocabulary. At every position t after an image, the two next-token distributions are mixed with
a learned, input-dependent weight read from the LM's last hidden state h_t, by one of two rules
(`model.late.combine`):

    mixture: log p(x | ...) = logaddexp(log(1 - g_t) + log p_lm(x), log g_t + log p_vision(x)),
             g_t = sigmoid(w . h_t + b)
    product: log p(x | ...) = log p_lm(x) + a_t log p_vision(x) + const,  a_t = softplus(w . h_t + b)

A mixture can only move mass towards what the image alone predicts, so a question-blind head helps
where one answer fits the image whatever is asked. A product of experts lets the question-aware LM
pick the kind of answer (a colour, a count) and the image pick among those: the fair "late" model
for VQA (docs/fusion.md).

Positions before any image, and samples without one, get the LM's own logits untouched, so with
no image the model is exactly the text-only LM. Positions after an image return log-probabilities
(valid logits: softmax gives back the mixture). The training loss is the mixture's plus the LM's
own (so the text model keeps learning whatever the gate does): `lm_forward` returns the LM's own
logits as `aux_logits` and the model's one loss (vlm/loss.py) reads both. The vision head sees the image only,
never the question: that is what "late" means, and why it cannot answer what depends on both.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, FusionOptions
from ..image_slots import check_markers, image_index, is_placeholder
from ..tiling import mean_over_views
from .base import Fusion, FusionOutput, LMShape, VisionShape, register_fusion


@dataclass
class LateOptions(FusionOptions):
    """`model.late`: how the two predictors' next-token distributions are combined."""

    combine: Literal["mixture", "product"] = "mixture"
    """`mixture`: gated mixture of the two distributions; `product`: the LM's log-probs plus a gated
    multiple of the vision head's (a product of experts)."""

    def __post_init__(self) -> None:
        if self.combine not in ("mixture", "product"):
            raise ConfigError(f"model.late.combine must be 'mixture' or 'product', got '{self.combine}'.")


@register_fusion("late", LateOptions)
class LateFusion(Fusion):
    """Vision head (pooled features -> vocabulary logits) + gate on the LM's hidden state."""

    def __init__(self, options: LateOptions, vision: VisionShape, lm: LMShape) -> None:
        super().__init__(options, vision, lm)
        self.combine = options.combine
        self.pool_norm = nn.LayerNorm(self.vision_dim)
        self.hidden = nn.Linear(self.vision_dim, self.lm_dim)
        self.gate = nn.Linear(self.lm_dim, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.head = nn.Linear(self.lm_dim, lm.vocab_size)  # one row per LM output logit

    @property
    def tokens_per_image(self) -> int:
        return 0

    def embed_images(self, features: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        """features [n, patches, vision_dim] -> vision next-token log-probs [n, 1, vocab]. With tiling, features
        holds every view and views [num_images] how many belong to each image: an image's features are then
        pooled over all its views' patches (thumbnail and tiles alike), giving [num_images, 1, vocab]."""
        pooled = features.mean(1)
        if views is not None:
            pooled = mean_over_views(pooled, views)
        pooled = self.pool_norm(pooled.to(self.gate.weight.dtype))
        return F.log_softmax(self.head(F.gelu(self.hidden(pooled))).float(), dim=-1).unsqueeze(1)

    def _image_of_position(
        self, image_features: torch.Tensor | None, image_mask: torch.Tensor | None, views: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per position, the vision log-probs of its sample's most recent image: ([batch, seq, vocab]
        log-probs, [batch, seq] has-an-image); None when the batch has no images. position_ids: a packed
        batch's (vlm/packed.py)."""
        if image_features is None or image_features.shape[0] == 0:
            return None
        if image_mask is None:
            raise ValueError("The late fusion needs `image_mask` (where each image's marker sits).")
        n = image_features.shape[0] if views is None else views.shape[0]
        if is_placeholder(int(image_mask.sum()), n):
            # The placeholder image of a text-only training batch (vlm/image_slots.py): every position
            # is text-only, the head still runs so all its parameters take part (with zero effect).
            vision_logp = self.embed_images(image_features)[:, 0]
            return vision_logp.expand(*image_mask.shape, -1), torch.zeros_like(image_mask)
        check_markers(image_mask, n)
        vision_logp = self.embed_images(image_features, views)[:, 0]  # [n, vocab]
        index = image_index(image_mask, position_ids)  # [batch, seq]; -1 before the sample's first image
        return vision_logp[index.clamp(min=0)], index >= 0

    def mix(
        self, lm_logits: torch.Tensor, hidden: torch.Tensor, vision_logp: torch.Tensor, has_image: torch.Tensor
    ) -> torch.Tensor:
        """lm_logits [*, vocab], hidden [*, lm_dim], vision_logp [*, vocab], has_image [*] (* = [b, q], or
        [num_kept] under logits_to_keep) -> logits [*, vocab]: the combined log-probs (`combine`) where
        has_image, the LM's logits unchanged elsewhere."""
        z = self.gate(hidden.to(self.gate.weight.dtype)).float()
        lm_logp = F.log_softmax(lm_logits.float(), dim=-1)
        if self.combine == "product":
            mixed = lm_logp + F.softplus(z) * vision_logp  # unnormalised: softmax / argmax normalise it
        else:
            mixed = torch.logaddexp(F.logsigmoid(-z) + lm_logp, F.logsigmoid(z) + vision_logp)
        if not bool(has_image.any()):  # a placeholder image only: exactly the LM, the fusion still in the graph
            return lm_logits + 0 * mixed.sum().to(lm_logits.dtype)
        return torch.where(has_image.unsqueeze(-1), mixed.to(lm_logits.dtype), lm_logits)

    def lm_forward(
        self, lm: nn.Module, *, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
        image_features: torch.Tensor | None, image_mask: torch.Tensor | None = None,
        image_views: torch.Tensor | None = None, **kwargs: Any,
    ) -> Any:
        """The LM's own call when the batch has no image; otherwise its logits mixed with the vision
        head's (at the `logits_to_keep` positions only, when given), with the LM's own as `aux_logits`."""
        vision = self._image_of_position(image_features, image_mask, image_views, kwargs.get("position_ids"))
        if vision is None:
            return lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        kwargs["output_hidden_states"] = True
        out = lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        hidden, (vision_logp, has_image) = out.hidden_states[-1], vision
        kept = kwargs.get("logits_to_keep")
        if torch.is_tensor(kept):  # [batch, seq] bool: the LM returned logits [num_kept, vocab]
            hidden, vision_logp, has_image = hidden[kept], vision_logp[kept], has_image[kept]
        elif kept:  # an int: the last `kept` positions
            hidden, vision_logp, has_image = hidden[:, -kept:], vision_logp[:, -kept:], has_image[:, -kept:]
        # The loss reads the LM's own logits too (aux_logits): without them the gate saturates towards the
        # vision head early (which soon beats a not-yet-adapted LM), the LM then gets no gradient and never
        # learns the text (measured: g -> 1.0000 everywhere, empty answers, after 200 quickstart steps).
        return FusionOutput(
            logits=self.mix(out.logits, hidden, vision_logp, has_image), aux_logits=out.logits,
            past_key_values=out.past_key_values,
        )

    @torch.no_grad()
    def lm_generate(
        self, lm: nn.Module, *, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
        image_features: torch.Tensor | None, image_mask: torch.Tensor | None = None,
        image_views: torch.Tensor | None = None, max_new_tokens: int = 64, do_sample: bool = False,
        streamer: Any = None, stopping_criteria: Any = None, **kwargs: Any,
    ) -> torch.Tensor:
        """Greedy decoding with the LM's KV cache from a left-padded prompt -> new tokens [batch, new];
        each step's logits are mixed as in `lm_forward` (generated tokens see their sample's last image).
        `streamer` and `stopping_criteria` act as in `lm.generate` (`vlm serve` streams through them)."""
        if do_sample or kwargs.get("num_beams", 1) != 1:
            raise NotImplementedError("model.fusion='late' generates greedily only (do_sample=False, num_beams=1).")
        vision = self._image_of_position(image_features, image_mask, image_views)
        eos = lm.generation_config.eos_token_id
        eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), dtype=torch.long)
        pad = lm.generation_config.pad_token_id
        pad = pad if pad is not None else int(eos[0]) if len(eos) else 0
        batch = inputs_embeds.shape[0]
        mask = attention_mask.long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        step_inputs: dict[str, Any] = {"inputs_embeds": inputs_embeds}
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # under peft
        # transformers renamed the cache keyword (`past_key_values` -> `cache`); an unknown keyword would be
        # swallowed by **kwargs and every step would decode without its past, so ask the signature.
        cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        past, new_tokens = None, []
        finished = torch.zeros(batch, dtype=torch.bool, device=inputs_embeds.device)
        for _ in range(max_new_tokens):
            out = lm(
                **step_inputs, attention_mask=mask, position_ids=positions, **{cache_kw: past}, use_cache=True,
                output_hidden_states=vision is not None,
            )
            past, logits = out[cache_kw], out.logits[:, -1:]
            if vision is not None:
                # The prompt's last position already sees its sample's last image, as do all new tokens.
                logits = self.mix(logits, out.hidden_states[-1][:, -1:], vision[0][:, -1:], vision[1][:, -1:])
            token = torch.where(finished, pad, logits[:, 0].argmax(-1))
            new_tokens.append(token)
            finished |= torch.isin(token, eos.to(token.device))
            if streamer is not None:
                streamer.put(token.cpu())
            if stopping_criteria is not None:
                finished |= stopping_criteria(torch.stack(new_tokens, dim=1), None).to(finished.device)
            if bool(finished.all()):
                break
            step_inputs = {"input_ids": token.unsqueeze(1)}
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            positions = positions[:, -1:] + 1
        if streamer is not None:
            streamer.end()
        return torch.stack(new_tokens, dim=1)
