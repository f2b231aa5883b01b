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

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import slice_logits_to_keep

from ..config import ConfigError, FusionOptions
from ..image_positions import ImagePositions
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
        self, image_features: torch.Tensor | None, images: ImagePositions | None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per position, the vision log-probs of its sample's most recent image: ([batch, seq, vocab]
        log-probs, [batch, seq] has-an-image); None when the batch has no images."""
        if image_features is None or image_features.shape[0] == 0:
            return None
        if images is None:
            raise ValueError("The late fusion needs the batch's image positions (where each marker sits).")
        if images.placeholder:
            # A text-only training batch's stand-in: every position is text-only, the head still runs so
            # all its parameters take part (with zero effect).
            vision_logp = self.embed_images(image_features)[:, 0]
            return vision_logp.expand(*images.markers.shape, -1), torch.zeros_like(images.markers)
        images.check(image_features.shape[0] if images.views is None else images.views.shape[0])
        vision_logp = self.embed_images(image_features, images.views)[:, 0]  # [n, vocab]
        return vision_logp[images.seen.clamp(min=0)], images.seen >= 0

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

    def attach(self, lm: nn.Module, image_token_id: int) -> None:
        """Hook the LM's output head, so every LM call made while a mixing state is active (`_active`)
        returns the mixed logits: transformers' own `generate` then decodes late fusion like any other
        strategy (sampling, beams, streamers, stopping criteria). Idempotent; creates no parameters."""
        head = lm.get_output_embeddings()
        if not any(hook is _mix_at_head for hook in head._forward_hooks.values()):
            head.register_forward_hook(_mix_at_head)

    def lm_forward(
        self, lm: nn.Module, *, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
        image_features: torch.Tensor | None, images: ImagePositions | None = None, **kwargs: Any,
    ) -> Any:
        """The LM's own call when the batch has no image; otherwise its logits mixed with the vision
        head's (at the `logits_to_keep` positions only, when given), with the LM's own as `aux_logits`."""
        vision = self._image_of_position(image_features, images)
        if vision is None:
            return lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        vision_logp, has_image = vision
        kept = kwargs.get("logits_to_keep")
        if kept is not None:  # the head sees only these positions: align with transformers' own slicing
            vision_logp = slice_logits_to_keep(vision_logp, kept)
            has_image = slice_logits_to_keep(has_image.unsqueeze(-1), kept).squeeze(-1)
        state = _HeadState(self, vision_logp, has_image, per_row=False)
        with _active(state):
            out = lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        # The loss reads the LM's own logits too (aux_logits): without them the gate saturates towards the
        # vision head early (which soon beats a not-yet-adapted LM), the LM then gets no gradient and never
        # learns the text (measured: g -> 1.0000 everywhere, empty answers, after 200 quickstart steps).
        return FusionOutput(logits=out.logits, aux_logits=state.lm_logits, past_key_values=out.past_key_values)

    def lm_generate(
        self, lm: nn.Module, *, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
        image_features: torch.Tensor | None, images: ImagePositions | None = None, **kwargs: Any,
    ) -> torch.Tensor:
        """`lm.generate` with every step's logits mixed at the output head: new tokens see their sample's
        last image (the prompt's last position already does), so the state is one row per sample."""
        vision = self._image_of_position(image_features, images)
        if vision is None:
            return lm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        vision_logp, has_image = vision
        with _active(_HeadState(self, vision_logp[:, -1], has_image[:, -1], per_row=True)):
            return lm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)


@dataclass
class _HeadState:
    """One LM call's mixing inputs, handed to the output-head hook through a context variable (never
    stored on a module). vision_logp [*, vocab] and has_image [*] are aligned with the head's input
    positions (* = [batch, q] or [num_kept]), or with `per_row` one row per sample ([batch]) for every
    position (generation: beams and num_return_sequences repeat each sample's rows, so they are repeated
    to match). lm_logits: the LM's own logits, recorded by the hook (the loss's `aux_logits`)."""

    fusion: LateFusion
    vision_logp: torch.Tensor
    has_image: torch.Tensor
    per_row: bool
    lm_logits: torch.Tensor | None = None

    def aligned(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(vision_logp, has_image) shaped as hidden [*, dim]."""
        if not self.per_row:
            if hidden.shape[:-1] != self.has_image.shape:
                raise RuntimeError(f"Late fusion's state covers positions {tuple(self.has_image.shape)} but the "
                                   f"LM's head ran on {tuple(hidden.shape[:-1])}; call the LM once per state.")
            return self.vision_logp, self.has_image
        repeat = hidden.shape[0] // self.has_image.shape[0]
        logp, has = self.vision_logp.repeat_interleave(repeat, 0), self.has_image.repeat_interleave(repeat, 0)
        queries = hidden.shape[1:-1]  # (q,) for [rows, q, dim]
        return (logp.view(logp.shape[0], *[1] * len(queries), -1).expand(*hidden.shape[:-1], -1),
                has.view(has.shape[0], *[1] * len(queries)).expand(hidden.shape[:-1]))


_ACTIVE: contextvars.ContextVar[_HeadState | None] = contextvars.ContextVar("vlm_late_state", default=None)


@contextlib.contextmanager
def _active(state: _HeadState) -> Iterator[None]:
    token = _ACTIVE.set(state)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _mix_at_head(head: nn.Module, args: tuple, logits: torch.Tensor) -> torch.Tensor | None:
    """Forward hook on the LM's output head: the head's input is the LM's last hidden state (after its
    final norm), which the gate reads; outside a late-fusion call (`_active`) the logits pass unchanged."""
    state = _ACTIVE.get()
    if state is None:
        return None
    hidden = args[0]
    vision_logp, has_image = state.aligned(hidden)
    state.lm_logits = logits
    return state.fusion.mix(logits, hidden, vision_logp, has_image)
