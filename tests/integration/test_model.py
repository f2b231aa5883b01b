import pytest
import torch
from PIL import Image

from vlm.data.collator import Collator
from vlm.data.sample import Sample
from vlm.factory import build_processor, processor_for, save
from vlm.model import VLM
from vlm.pipeline import Pipeline
from vlm.processor import VLMProcessor


@pytest.fixture()
def images(tmp_path):
    paths = []
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (64, 64), colour).save(path)
        paths.append(str(path))
    return paths


def mixed_batch(model: VLM, images: list[str], padding_side: str = "right") -> dict:
    """Two images in the first sample, none in the second, one in the third."""
    samples = [
        Sample("two", [{"role": "user", "content": "<image> vs <image>?"}, {"role": "assistant", "content": "red"}],
               images),
        Sample("text", [{"role": "user", "content": "just text, longer than the others"},
                        {"role": "assistant", "content": "ok"}]),
        Sample("one", [{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "blue"}],
               images[1:]),
    ]
    return Collator(model.tokenizer.pad_token_id, padding_side)([processor_for(model)(s) for s in samples])


def test_image_features_are_scattered_in_order_and_text_is_untouched(tiny_vlm, images):
    batch = mixed_batch(tiny_vlm, images)
    embeds, features = tiny_vlm.embed(batch.input_ids, batch.pixel_values)
    assert features.shape[0] == 3
    projected = tiny_vlm.fusion.embed_images(features)
    mask = batch.input_ids == tiny_vlm.image_token_id
    n = tiny_vlm.fusion.tokens_per_image
    torch.testing.assert_close(embeds[0][mask[0]], projected[:2].reshape(2 * n, -1))
    torch.testing.assert_close(embeds[2][mask[2]], projected[2])
    assert not mask[1].any()
    text = tiny_vlm.lm.get_input_embeddings()(batch.input_ids)
    torch.testing.assert_close(embeds[~mask], text[~mask])


def test_text_only_sample_gets_exactly_the_language_model_logits(tiny_vlm, images):
    tiny_vlm.eval()
    batch = mixed_batch(tiny_vlm, images)
    with torch.no_grad():
        ours = tiny_vlm(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
        lm_only = tiny_vlm.lm(input_ids=batch.input_ids[1:2], attention_mask=batch.attention_mask[1:2]).logits
    torch.testing.assert_close(ours[1:2], lm_only)


def test_mismatched_image_count_is_an_error(tiny_vlm, images):
    batch = mixed_batch(tiny_vlm, images)
    with pytest.raises(ValueError, match="image-token positions but 2 image"):
        tiny_vlm(batch.input_ids, batch.attention_mask, batch.pixel_values[:2])


def test_loss_backpropagates_into_the_projector_only_in_align(tiny_vlm, images):
    from vlm.train.freezing import apply_stage

    table = apply_stage(tiny_vlm, "align")
    assert "fusion" in table and "lm" in table
    batch = mixed_batch(tiny_vlm, images)
    tiny_vlm(**{k: getattr(batch, k) for k in ("input_ids", "attention_mask", "pixel_values", "labels")}).loss.backward()
    assert all(p.grad is not None for p in tiny_vlm.fusion.parameters())
    assert all(p.grad is None for p in tiny_vlm.lm.parameters())
    assert all(p.grad is None for p in tiny_vlm.vision.parameters())


def test_save_load_round_trip_gives_identical_logits(tiny_vlm, images, tmp_path):
    tiny_vlm.eval()
    with torch.no_grad():
        for p in tiny_vlm.fusion.parameters():  # make the weights differ from any fresh initialisation
            p.add_(0.01)
    batch = mixed_batch(tiny_vlm, images)
    save(tiny_vlm, processor_for(tiny_vlm), tmp_path / "saved")
    loaded = VLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        expected = tiny_vlm(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
        got = loaded(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert loaded.tokenizer.chat_template == tiny_vlm.tokenizer.chat_template
    assert (tmp_path / "saved" / "preprocessor_config.json").is_file()
    assert not list(tmp_path.glob(".saved.*"))  # no temporary folder left behind


def test_batched_generation_matches_one_by_one(tiny_vlm, images):
    tiny_vlm.eval()
    samples = [
        Sample("a", [{"role": "user", "content": "<image>\nWhat colour is the shape?"}], images[:1]),
        Sample("b", [{"role": "user", "content": "<image>\nDescribe it in detail please."}], images[1:]),
    ]
    collate = Collator(tiny_vlm.tokenizer.pad_token_id, "left")
    encoded = [processor_for(tiny_vlm)(s, for_generation=True) for s in samples]
    def answers(batch) -> list[str]:
        return processor_for(tiny_vlm).decode(tiny_vlm.generate(**batch.generation_inputs(), max_new_tokens=6,
                                                                min_new_tokens=6))

    together = answers(collate(encoded))
    alone = [answers(collate([e]))[0] for e in encoded]
    assert together == alone
    assert all(text for text in together)
    api = Pipeline(tiny_vlm).generate(images=[Image.open(images[0])], prompt="What colour is the shape?",
                                      max_new_tokens=6, min_new_tokens=6)
    assert api == together[0]


def test_processor_alone_matches_the_model_processor(tiny_vlm, model_config, images, tmp_path):
    """From a config (no LM weights) or a saved folder (no weights at all), the processor `build` gives."""
    from vlm.config import ModelConfig

    sample = Sample("s", [{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "red"}],
                    images[:1])
    expected = processor_for(tiny_vlm)(sample)
    save(tiny_vlm, processor_for(tiny_vlm), tmp_path / "saved")
    (tmp_path / "saved" / "model.safetensors").rename(tmp_path / "weights")  # read no weights
    processors = [build_processor(model_config), build_processor(ModelConfig(pretrained=str(tmp_path / "saved"))),
                  VLMProcessor.from_pretrained(tmp_path / "saved")]
    for processor in processors:
        got = processor(sample)
        assert got["input_ids"].tolist() == expected["input_ids"].tolist()
        torch.testing.assert_close(got["pixel_values"], expected["pixel_values"])
