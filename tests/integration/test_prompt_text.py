"""One conversation, one prompt: the same question reaches the LM as the same token ids whether it comes as
a string or as parts in a data file, through the OpenAI-style API, through `Pipeline`, or through the saved
tokenizer's own chat template (what transformers users and the llava-hf export apply), with the project's
ChatML and with an LM's own string-only template.

Before vlm/data/content.py, parts in a data file were joined by "" (`<image>What colour ...`) while the server
and the chat template joined them by "\\n": a model trained on one was served on the other.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoTokenizer

from vlm.config import Config
from vlm.data.formats import read_samples
from vlm.factory import processor_for, save
from vlm.model import VLM
from vlm.pipeline import Pipeline
from vlm.serve.api import Limits, parse_chat_request

QUESTION = "What colour is the shape?"
# The shape of SmolLM2's template: string content only, a default system prompt when none is given.
OWN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module", params=["project_chatml", "lm_own_template"])
def saved(request, backbones, tmp_path_factory) -> Path:
    """A saved VLM whose LM has no chat template (the project's ChatML) or a string-only one of its own."""
    root = tmp_path_factory.mktemp(request.param)
    lm = backbones["lm"]
    if request.param == "lm_own_template":
        lm = shutil.copytree(backbones["lm"], root / "lm")
        tokenizer = AutoTokenizer.from_pretrained(lm)
        tokenizer.chat_template = OWN_TEMPLATE
        tokenizer.save_pretrained(lm)
    config = Config()
    config.model.vision, config.model.lm = str(backbones["vit"]), str(lm)
    model = VLM.from_config(config.model)
    save(model, processor_for(model), root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def forms(saved, tmp_path_factory) -> dict[str, object]:
    """The one conversation in each form a user can send it, as the `Sample` each path builds."""
    root = tmp_path_factory.mktemp("forms")
    image = root / "shape.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    answer = {"role": "assistant", "content": "red"}
    (root / "string.json").write_text(json.dumps([{"id": "s", "image": "shape.png", "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "red"}]}]))
    (root / "parts.jsonl").write_text(json.dumps({"id": "p", "image": "shape.png", "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}, answer]}))
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}]}
    pipe = Pipeline.from_pretrained(saved)
    return {
        "data file, string": read_samples(root / "string.json")[0][0],
        "data file, parts": read_samples(root / "parts.jsonl")[0][0],
        "API, parts": parse_chat_request(body, Limits(), 16).sample,
        "Pipeline": pipe.prompt_sample([Image.open(image)], QUESTION),
    }


def test_every_form_gives_the_same_input_ids(saved, forms):
    processor = processor_for(VLM.from_pretrained(saved))
    ids = {name: processor(sample, for_generation=True)["input_ids"].tolist() for name, sample in forms.items()}
    reference = ids["data file, string"]
    assert all(got == reference for got in ids.values()), {k: len(v) for k, v in ids.items()}
    # What the ids say: the image on its own line before the question, in the LM's template.
    text = processor.render(forms["data file, parts"].prompt_messages(), add_generation_prompt=True)
    assert f"<image>\n{QUESTION}" in text
    assert ("You are a helpful assistant." in text) == (saved.parent.name.startswith("lm_own_template"))


def test_the_saved_tokenizer_renders_parts_as_training_did(saved, forms):
    """transformers' own `apply_chat_template` on list-of-parts content, as a transformers user (or the llava-hf
    export's processor) sends it, gives the training ids, before image expansion."""
    processor = processor_for(VLM.from_pretrained(saved))
    tokenizer = AutoTokenizer.from_pretrained(saved)
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    rendered = tokenizer.apply_chat_template(parts, tokenize=False, add_generation_prompt=True)
    trained, _ = processor.tokenize(forms["data file, string"].prompt_messages(), add_generation_prompt=True)
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == trained
