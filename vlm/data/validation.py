"""Structural checks of a `Sample` that need no image decoding: what training (and `vlm data check`) refuses."""

from __future__ import annotations

from pathlib import Path

from .sample import ROLES, Sample, SampleError


def check_sample(sample: Sample, image_token: str, needs_answer: bool = True) -> None:
    """Structural checks that need no image decoding; raise `SampleError` naming the sample.

    needs_answer: a training sample without an assistant turn has no token to learn from (`no_answer`)."""
    if not sample.messages:
        raise SampleError(sample.id, "empty", "has no messages.")
    expected = "user"
    for i, message in enumerate(sample.messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise SampleError(sample.id, "malformed", f"message {i} has role {role!r}; use one of {ROLES}.")
        if not isinstance(content, str) or not content.strip():
            raise SampleError(sample.id, "empty_turn", f"message {i} ({role}) is empty.")
        if role == "system":
            if i != 0:
                raise SampleError(sample.id, "alternation", "a system message may only come first.")
            continue
        if role != expected:
            raise SampleError(
                sample.id, "alternation", f"message {i} is from {role} but {expected} was expected; "
                "turns must alternate user / assistant, starting with user.",
            )
        if role == "assistant" and image_token in content:
            raise SampleError(sample.id, "image_in_answer", f"assistant message {i} contains {image_token}.")
        expected = "assistant" if role == "user" else "user"
    if needs_answer and not any(m["role"] == "assistant" for m in sample.messages):
        raise SampleError(
            sample.id, "no_answer", "has no assistant turn, so there is nothing to learn; add the answer or drop it.",
        )
    if sample.rejected is not None:
        check_pair(sample, image_token)
    tags = sum(m["content"].count(image_token) for m in sample.messages)
    if tags != len(sample.images):
        raise SampleError(
            sample.id, "image_tag_mismatch",
            f"has {tags} {image_token} tag(s) but {len(sample.images)} image(s); "
            f"put one {image_token} in the text for each image.",
        )
    for image in sample.images:
        if isinstance(image, str) and Path(image).is_dir():
            raise SampleError(sample.id, "missing_image", f"image path '{image}' is a folder, not an image file.")
        if isinstance(image, str) and not Path(image).is_file():
            raise SampleError(
                sample.id, "missing_image", f"image file '{image}' does not exist (check data.image_root)."
            )


def check_pair(sample: Sample, image_token: str) -> None:
    """A preference pair needs a prompt, a chosen and a rejected reply that differ (else there is no preference
    to learn: the DPO loss is constant)."""
    if sample.messages[-1]["role"] != "assistant":
        raise SampleError(sample.id, "no_answer", "is a preference pair without a chosen reply.")
    if not sample.rejected.strip():
        raise SampleError(sample.id, "empty_turn", "has an empty rejected reply.")
    if image_token in sample.rejected:
        raise SampleError(sample.id, "image_in_answer", f"its rejected reply contains {image_token}.")
    if sample.rejected.strip() == sample.messages[-1]["content"].strip():
        raise SampleError(sample.id, "identical_pair", "has the same chosen and rejected reply, so there is no "
                          "preference to learn; fix or drop the pair.")
