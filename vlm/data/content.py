"""One conversation, one prompt text: how a turn's content becomes the text the chat template renders.

Content arrives as a string (LLaVA data, table templates, `Pipeline` prompts) or as a list of parts
(`messages` data, OpenAI clients, transformers' processors): `{"type": "text", "text": ...}` and an image
part (`{"type": "image"}`, or `image_url` from an OpenAI client). Every place that turns content into
text calls `content_text` here: the data readers, `vlm serve`, `Pipeline` (through `prompt_messages`)
and, for templates that take string content only, the exported chat template (`parts_template`), so a
conversation trains, serves and exports as the same token ids.
"""

from __future__ import annotations

from typing import Any, Callable

from .sample import IMAGE_TAG

PART_SEPARATOR = "\n"
"""Between a turn's parts: `[image, "What is it?"]` reads `<image>\\nWhat is it?`, as LLaVA's data writes it."""

IMAGE_PART_TYPES = ("image", "image_url")

TextCheck = Callable[[Any, str], str]
"""(value, where) -> the text to use, or raise naming `where` (each caller raises its own error type)."""


def content_text(
    content: Any, where: str, text: TextCheck, image: Callable[[dict[str, Any], str], None],
    bad_part: Callable[[str, Any], Exception], part_where: str = "{where}[{k}]",
) -> str:
    """A string (checked by `text`) as is; a list of parts as their texts and one `IMAGE_TAG` per image part
    (`image(part, where)` accepts it or raises), joined by `PART_SEPARATOR`. Any other part raises
    `bad_part(where, part)`. `part_where` names part k of `where` in messages."""
    if not isinstance(content, list):
        return text(content, where)
    parts = []
    for k, part in enumerate(content):
        here = part_where.format(where=where, k=k)
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append(text(part.get("text"), here))
        elif kind in IMAGE_PART_TYPES:
            image(part, here)
            parts.append(IMAGE_TAG)
        else:
            raise bad_part(here, part)
    return PART_SEPARATOR.join(parts)


def with_image_tags(prompt: str, num_images: int, image_tag: str = IMAGE_TAG) -> str:
    """A prompt with fewer image tags than images gets the missing ones first, one line each, as an image
    part before the text would render."""
    missing = num_images - prompt.count(image_tag)
    return f"{image_tag}{PART_SEPARATOR}" * max(missing, 0) + prompt


# For a chat template that reads `message['content']` as a string only (SmolLM2's, many base LMs'): a preamble
# that rewrites list content into the string `content_text` makes, then the template as it was. transformers'
# processors send list content, so the exported model renders it exactly as training did.
_PARTS_PREAMBLE = (
    "{%- set ns = namespace(turns=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set ns.turns = ns.turns + [m] -%}"
    "{%- else -%}{%- set pieces = namespace(text=[]) -%}"
    "{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'text' -%}{%- set pieces.text = pieces.text + [part['text']] -%}"
    "{%- elif part['type'] in ['image', 'image_url'] -%}{%- set pieces.text = pieces.text + [@IMAGE@] -%}"
    "{%- else -%}{{ raise_exception('Content parts of type ' + part['type'] + ' are not supported; "
    "use text and image parts.') }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set ns.turns = ns.turns + [{'role': m['role'], 'content': pieces.text | join(@SEP@)}] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set messages = ns.turns -%}"
)


def _literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def parts_template(template: str, image_token: str) -> str:
    """`template` preceded by the preamble that renders list content as `content_text` does (once only)."""
    preamble = _PARTS_PREAMBLE.replace("@IMAGE@", _literal(image_token)).replace("@SEP@", _literal(PART_SEPARATOR))
    return template if template.startswith(preamble) else preamble + template


def accepts_parts(tokenizer: Any, image_token: str) -> bool:
    """Whether the tokenizer's chat template renders `[image, text]` parts as `content_text` renders them."""
    probe = [{"type": "image"}, {"type": "text", "text": "Hi"}]
    as_text = PART_SEPARATOR.join([image_token, "Hi"])
    try:
        parts = tokenizer.apply_chat_template([{"role": "user", "content": probe}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that fails on parts is one that does not take them
        return False
    return parts == tokenizer.apply_chat_template([{"role": "user", "content": as_text}], tokenize=False)


def ensure_parts_template(tokenizer: Any, image_token: str) -> bool:
    """Give a string-only chat template the parts preamble (`parts_template`); True when it was changed."""
    if not tokenizer.chat_template or accepts_parts(tokenizer, image_token):
        return False
    tokenizer.chat_template = parts_template(tokenizer.chat_template, image_token)
    return True
