"""The fusion zoo: early, resampler and late fusion, and image (modality) dropout."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from PIL import Image

from vlm.data.collator import Collator
from vlm.data.dataset import ConversationDataset
from vlm.data.dropout import drop_images, dropout_generator
from vlm.data.sample import Sample
from vlm.factory import processor_for, save
from vlm.image_positions import ImagePositions
from vlm.model import VLM

STRATEGIES = ["early", "resampler", "late"]


def _image(colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    image.paste(colour, (16, 16, 48, 48))
    return image


def _samples() -> list[Sample]:
    red, blue = _image((255, 0, 0)), _image((0, 0, 255))
    return [
        Sample("red", [{"role": "user", "content": "<image>\nWhat colour is it?"},
                       {"role": "assistant", "content": "red"}], [red]),
        Sample("blue", [{"role": "user", "content": "<image>\nWhat colour is it?"},
                        {"role": "assistant", "content": "blue"}], [blue]),
        Sample("text", [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello there"}]),
    ]


def _build(model_config, fusion: str) -> VLM:
    torch.manual_seed(0)
    return VLM.from_config(model_config.with_fusion("resampler", latents=4).with_fusion(fusion))


def _batch(model: VLM, samples: list[Sample], side: str = "right") -> dict:
    return Collator(model.tokenizer.pad_token_id, side)([processor_for(model)(s) for s in samples])


def _forward(model: VLM, batch: dict):
    """Loss and logits at every position (with labels, the model's default is logits where the loss reads)."""
    return model(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.labels, full_logits=True)


@pytest.mark.parametrize("fusion", STRATEGIES)
def test_forward_backward_save_load_and_loss_falls(model_config, fusion, tmp_path):
    model = _build(model_config, fusion)
    batch = _batch(model, _samples())
    vocab = model.lm.get_output_embeddings().weight.shape[0]
    tokens = model.fusion.tokens_per_image or 1
    assert int((batch.input_ids == model.image_token_id).sum()) == 2 * tokens
    out = _forward(model, batch)
    assert out.logits.shape == (*batch.input_ids.shape, vocab)
    out.loss.backward()
    grads = [p.grad for p in model.fusion.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)

    save(model, processor_for(model), tmp_path / "saved")
    loaded = VLM.from_pretrained(tmp_path / "saved").eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(_forward(model, batch).logits, _forward(loaded, batch).logits)

    model.train()
    model.vision.set_frozen(True)
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if not n.startswith("vision.")], lr=1e-3)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = _forward(model, batch).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_early_fusion_reads_pixels_not_the_tower(model_config):
    model = _build(model_config, "early")
    assert model.fusion.tokens_per_image == model.vision.num_patches
    batch = _batch(model, _samples()[:1])
    pixels = batch.pixel_values
    patches = model.encode_images(pixels)
    ph, pw = model.fusion.patch
    assert torch.equal(patches[0, 0], pixels[0, :, :ph, :pw].reshape(-1))  # top-left patch, channels first
    assert torch.equal(patches[0, 1], pixels[0, :, :ph, pw:2 * pw].reshape(-1))

    def refuse(*args, **kwargs):
        raise AssertionError("early fusion must not run the vision tower")

    model.vision.forward = refuse
    _forward(model, batch)  # no AssertionError: the tower is bypassed
    with pytest.raises(ValueError, match="data.cache_features"):
        model(batch.input_ids, batch.attention_mask, image_features=torch.zeros(1, 4, 4))


def test_late_fusion_without_image_is_exactly_the_text_lm(model_config):
    model = _build(model_config, "late").eval()
    with torch.no_grad():
        model.fusion.gate.bias.fill_(2.0)  # a strong vision weight where an image is present
        text_only = _batch(model, _samples()[2:])
        logits = _forward(model, text_only).logits
        bare = model.lm(input_ids=text_only.input_ids, attention_mask=text_only.attention_mask).logits
        assert torch.equal(logits, bare)

        mixed = _batch(model, _samples())  # an image in rows 0-1, none in row 2
        ids, mask = mixed.input_ids, mixed.attention_mask
        logits = _forward(model, mixed).logits
        bare = model.lm(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(logits[2], bare[2])
        marker = int((ids[0] == model.image_token_id).nonzero()[0])
        assert torch.equal(logits[0, :marker], bare[0, :marker])  # text before the image: the LM alone
        assert not torch.allclose(logits[0, marker:], bare[0, marker:])
        # After the image the logits are the mixture's log-probabilities.
        assert torch.allclose(logits[0, marker:].exp().sum(-1), torch.ones(ids.shape[1] - marker), atol=1e-4)

    # A placeholder image with no marker (distributed training's text-only batch), flagged as such: the LM,
    # unchanged, with every fusion parameter still in the graph. Unflagged, it is a mismatch, not a guess.
    pixels = _batch(model, _samples()[:1]).pixel_values
    with pytest.raises(ValueError, match="0 image marker.*1 image"):
        model(text_only.input_ids, text_only.attention_mask, pixels, text_only.labels)
    out = model(text_only.input_ids, text_only.attention_mask, pixels, text_only.labels, full_logits=True,
                image_placeholder=True)
    bare = model.lm(input_ids=text_only.input_ids, attention_mask=text_only.attention_mask)
    assert torch.equal(out.logits, bare.logits)
    out.loss.backward()
    assert all(p.grad is not None for p in model.fusion.parameters())


def test_late_fusion_generate_matches_forward_argmax(model_config):
    model = _build(model_config, "late").eval()
    model.lm.generation_config.eos_token_id = None  # decode the full length
    sample = _samples()[0]
    batch = Collator(model.tokenizer.pad_token_id, "left")([processor_for(model)(sample, for_generation=True)])
    ids, mask = batch.input_ids, batch.attention_mask
    with torch.no_grad():
        image_mask = ids == model.image_token_id
        embeds, features = model.embed(ids, batch.pixel_values, None, image_mask)
        new = model.fusion.lm_generate(model.lm, inputs_embeds=embeds, attention_mask=mask,
                                       image_features=features, images=ImagePositions.of_batch(image_mask),
                                       max_new_tokens=6)
        assert new.shape == (1, 6)
        full = torch.cat([ids, new[:, :-1]], dim=1)
        logits = model(full, torch.ones_like(full), batch.pixel_values).logits
    assert torch.equal(logits[0, ids.shape[1] - 1:].argmax(-1), new[0])


def test_resampler_occupies_resampler_latents_slots(model_config):
    model = _build(model_config, "resampler")
    assert model.fusion.tokens_per_image == 4
    item = processor_for(model)(_samples()[0])
    assert int((item["input_ids"] == model.image_token_id).sum()) == 4


def _two_image_sample() -> Sample:
    return Sample("two", [
        {"role": "user", "content": "<image>\nFirst <image> then: which is red?"},
        {"role": "assistant", "content": "the first"},
    ], [_image((255, 0, 0)), _image((0, 0, 255))])


def test_image_dropout_removes_tags_and_visual_tokens_together(model_config):
    model = _build(model_config, "resampler")
    sample = _two_image_sample()
    answer = processor_for(model)(sample)["labels"]

    dropped = drop_images(sample, 1.0, torch.Generator().manual_seed(0))
    assert dropped.images == [] and "<image>" not in dropped.messages[0]["content"]
    assert dropped.messages[0]["content"] == "First then: which is red?"
    item = processor_for(model)(dropped)  # a valid text-only sample
    assert item["pixel_values"] is None and not bool((item["input_ids"] == model.image_token_id).any())
    assert torch.equal(item["labels"][item["labels"] != -100], answer[answer != -100])  # the answer is kept

    assert drop_images(sample, 0.0, torch.Generator()) is sample
    seen = set()
    for seed in range(40):
        half = drop_images(sample, 0.5, torch.Generator().manual_seed(seed))
        item = processor_for(model)(half)
        n = len(half.images)
        assert int((item["input_ids"] == model.image_token_id).sum()) == 4 * n
        assert (0 if item["pixel_values"] is None else item["pixel_values"].shape[0]) == n
        seen.add(tuple(id(im) for im in half.images))
    assert len(seen) == 4  # none, either one alone (order kept), both


def test_blank_dropout_keeps_tags_and_puts_a_grey_image_in_place(model_config):
    model = _build(model_config, "resampler")
    processor = processor_for(model)
    sample = _two_image_sample()
    original = processor(sample)

    blank = drop_images(sample, 1.0, torch.Generator().manual_seed(0), mode="blank")
    assert blank.messages == sample.messages and len(blank.images) == 2
    assert all(im.getcolors() == [(32 * 32, (128, 128, 128))] for im in blank.images)
    item = processor(blank)
    assert torch.equal(item["input_ids"], original["input_ids"]) and torch.equal(item["labels"], original["labels"])
    grey = processor.image_transform(Image.new("RGB", (64, 64), (128, 128, 128)))
    torch.testing.assert_close(item["pixel_values"], torch.stack([grey, grey]))

    kinds = set()
    for seed in range(40):
        half = drop_images(sample, 0.5, torch.Generator().manual_seed(seed), mode="blank")
        assert len(half.images) == 2 and half.messages == sample.messages
        kinds.add(tuple(im is original_im for im, original_im in zip(half.images, sample.images)))
    assert len(kinds) == 4  # none, either one, both replaced
    with pytest.raises(ValueError, match="dropped_image"):
        ConversationDataset([sample], processor, image_dropout=0.5, dropped_image="zero")


def test_image_dropout_is_deterministic_per_seed_epoch_index(model_config):
    model = _build(model_config, "late")
    samples = [dataclasses.replace(_samples()[i % 2], id=str(i)) for i in range(24)]

    def kept(seed: int, epoch: int) -> list[bool]:
        dataset = ConversationDataset(samples, processor_for(model), image_dropout=0.5, seed=seed)
        dataset.set_epoch(epoch)
        return [dataset[i]["pixel_values"] is not None for i in range(len(dataset))]

    first = kept(0, 0)
    assert first == kept(0, 0)
    assert 0 < sum(first) < len(first)
    assert first != kept(0, 1) and first != kept(1, 0)
    expected = [bool(torch.rand(1, generator=dropout_generator(0, 0, i)) >= 0.5) for i in range(24)]
    assert first == expected


def test_image_corruption_is_a_test_time_corruption_drawn_per_seed_epoch_index(model_config):
    from vlm.config import ConfigError, TrainConfig
    from vlm.eval.corruptions import CORRUPTIONS, SEVERITIES, corrupt

    model = _build(model_config, "resampler")
    processor = processor_for(model)
    samples = [dataclasses.replace(_samples()[i % 2], id=str(i)) for i in range(12)]
    clean = ConversationDataset(samples, processor)

    def pixels(p: float, seed: int = 0, epoch: int = 0) -> list[torch.Tensor]:
        dataset = ConversationDataset(samples, processor, image_corruption=p, seed=seed)
        dataset.set_epoch(epoch)
        return [dataset[i]["pixel_values"] for i in range(len(dataset))]

    every, corrupted = pixels(1.0), ConversationDataset(samples, processor, image_corruption=1.0)
    for i, got in enumerate(every):
        assert torch.equal(corrupted[i]["input_ids"], clean[i]["input_ids"])  # the text is untouched
        generator = dropout_generator(0, 0, i)
        torch.rand(1, generator=generator)
        kind, severity, seed = torch.randint(0, 2**31 - 1, (1, 3), generator=generator)[0].tolist()
        expected = corrupt(samples[i].images[0], CORRUPTIONS[kind % 3], SEVERITIES[severity % 3], seed)
        torch.testing.assert_close(got, processor.image_transform(expected)[None])
        assert not torch.equal(got, clean[i]["pixel_values"])
    assert all(torch.equal(a, b) for a, b in zip(every, pixels(1.0)))  # a re-run draws the same
    assert not all(torch.equal(a, b) for a, b in zip(every, pixels(1.0, epoch=1)))
    half = [torch.equal(a, clean[i]["pixel_values"]) for i, a in enumerate(pixels(0.5))]
    assert 0 < sum(half) < len(half)

    cache = object()  # any cache: the check comes first
    with pytest.raises(ValueError, match="data.cache_features=false"):
        ConversationDataset(samples, processor, image_corruption=0.5, feature_cache=cache)
    with pytest.raises(ConfigError, match="train.image_corruption"):
        TrainConfig(image_corruption=1.5)


def test_late_fusion_beams_and_sampling_decode_the_mixed_distribution(model_config):
    """`VLM.generate` (tensors in, transformers' own `generate` inside) decodes late fusion (its logits are mixed at the LM's output head): a beam's
    reported score is the teacher-forced log-probability of its tokens under the mixed model, not under the LM
    alone, and sampling at top_k=1 picks the mixed argmax."""
    torch.manual_seed(0)
    model = VLM.from_config(model_config.with_fusion("late", combine="product")).eval()
    model.lm.generation_config.eos_token_id = None
    batch = Collator(model.tokenizer.pad_token_id, "left")([processor_for(model)(_samples()[0], for_generation=True)])
    ids, mask = batch.input_ids, batch.attention_mask
    with torch.no_grad():
        model.fusion.gate.bias.fill_(1.0)
        generate = functools.partial(model.generate, **batch.generation_inputs(), max_new_tokens=4)
        beams = generate(num_beams=3, length_penalty=0.0, do_sample=False, return_dict_in_generate=True,
                         output_scores=True)
        tokens = beams.sequences[:, -4:]
        full = torch.cat([ids, tokens[:, :-1]], dim=1)
        targets = tokens[0]
        at = slice(ids.shape[1] - 1, full.shape[1])
        mixed = model(full, torch.ones_like(full), batch.pixel_values, full_logits=True).logits[0, at]
        lm_only = model.lm(input_ids=full, attention_mask=torch.ones_like(full)).logits[0, at]
        score = lambda logits: float(logits.float().log_softmax(-1).gather(1, targets[:, None]).sum())  # noqa: E731
        assert abs(float(beams.sequences_scores[0]) - score(mixed)) < 1e-3
        assert abs(score(mixed) - score(lm_only)) > 0.1  # the mixing changes the scores the beams ranked

        greedy = generate(do_sample=False)
        sampled = generate(do_sample=True, top_k=1)
    assert torch.equal(sampled, greedy)
    assert greedy[0].tolist() != model.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                                                   do_sample=False)[0, ids.shape[1]:].tolist()
