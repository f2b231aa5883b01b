"""Publishing: the real huggingface_hub client against a loopback stand-in for the hub's HTTP API
(tests/hub_standin.py)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoTokenizer

from vlm.cli import main
from vlm.config import Config, DataFile, config_to_dict
from vlm.data.collator import Collator
from vlm.data.sample import Sample
from vlm.factory import processor_for, save
from vlm.hub.model_card import write_model_card
from vlm.hub.push import BackgroundPusher, PushError, push_folder
from vlm.model import VLM

from hub_standin import REPO, TOKEN, hub  # noqa: F401  (hub: the loopback hub fixture)


@pytest.fixture(scope="module")
def saved(backbones, tmp_path_factory):
    """A saved VLM (non-trivial fusion weights) whose card was written from a training config."""
    torch.manual_seed(0)
    config = Config()
    config.model.vision, config.model.lm = str(backbones["vit"]), str(backbones["lm"])
    config.data.train_files = ["hf:acme/shapes-vqa", "/data/my_shapes/train.json", DataFile("/data/charts", 2.0)]
    model = VLM.from_config(config.model).eval()
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("push") / "final"
    save(model, processor_for(model), folder)
    write_model_card(folder, config_to_dict(config), {"eval_loss": 0.4321, "vqa": {"accuracy": 0.875}}, repo_id=REPO)
    return model, folder


def logits(model: VLM, image: Path) -> torch.Tensor:
    sample = Sample("s", [{"role": "user", "content": "<image>\nWhat colour is it?"}], [str(image)])
    batch = Collator(model.tokenizer.pad_token_id, "left")([processor_for(model)(sample, for_generation=True)])
    with torch.no_grad():
        return model(batch.input_ids, batch.attention_mask, batch.pixel_values).logits


def test_pushed_folder_is_complete_loads_with_equal_logits_and_never_carries_the_token(
    hub, saved, tmp_path, capsys, caplog, monkeypatch
):
    model, folder = saved
    caplog.set_level(logging.DEBUG)
    url = push_folder(folder, REPO, private=True, commit_message="Final model", endpoint=hub.url, token=TOKEN)
    assert url.startswith(f"{hub.url}/{REPO}/commit/")
    assert hub.unexpected == [] and hub.auth_headers == {f"Bearer {TOKEN}"}
    assert hub.repos[REPO]["visibility"] == "private"
    assert [c["summary"] for c in hub.commits] == ["Final model"]

    received = hub.files()
    local = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert set(received) == local
    assert {
        "model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
        "generation_config.json", "README.md", "vision/config.json", "lm/config.json",
    } <= set(received)
    assert not [name for name in received if name.endswith((".bin", ".pt", ".pkl", ".pth"))]
    out = hub.write(tmp_path / "received")
    assert AutoTokenizer.from_pretrained(out).chat_template == model.tokenizer.chat_template
    assert model.tokenizer.chat_template and "{%" in model.tokenizer.chat_template

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["vit", "lm"]  # local backbones: their folders' names
    assert card.data.pipeline_tag == "image-text-to-text" and card.data.library_name == "vlm"
    assert {"vision-language", "image-text-to-text", "fusion-projector", "projector-mlp2x_gelu"} <= set(card.data.tags)
    assert card.data.datasets == ["acme/shapes-vqa", "my_shapes", "charts"]
    assert "| eval_loss | 0.4321 |" in card.text and "| vqa.accuracy | 0.875 |" in card.text
    assert "```yaml\nmodel:\n" in card.text and "train_files:" in card.text
    assert "--format llava-hf" not in card.text  # timm tower: not LLaVA-shaped

    image = tmp_path / "picture.jpg"
    Image.new("RGB", (64, 64), (30, 160, 40)).save(image)
    reloaded = VLM.from_pretrained(out).eval()
    assert torch.equal(logits(reloaded, image), logits(model, image))

    # The card's snippet runs as written, with the download answered by the received files.
    snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **_: str(out) if repo_id == REPO else None)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "model-card-snippet", "exec"), namespace)
    printed = capsys.readouterr()
    assert isinstance(namespace["pipe"].model, VLM) and printed.out.endswith("\n")  # loaded, and printed an answer

    seen = printed.out + printed.err + caplog.text + "".join(data.decode("latin-1") for data in received.values())
    assert TOKEN not in seen


def test_token_comes_from_hf_token_and_a_refusal_names_repo_not_token(hub, saved, monkeypatch):
    _, folder = saved
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_folder(folder, REPO, endpoint=hub.url)  # no token argument: huggingface_hub finds HF_TOKEN
    assert hub.auth_headers == {f"Bearer {TOKEN}"} and len(hub.commits) == 1

    wrong = "hf_WrongTokenThatMustNotLeak42"
    with pytest.raises(PushError) as err:
        push_folder(folder, REPO, endpoint=hub.url, token=wrong)
    message = str(err.value)
    assert REPO in message and "HF_TOKEN" in message and "401" in message
    assert wrong not in message and TOKEN not in message


def test_background_pushes_return_at_once_keep_order_and_snapshot_the_folder(hub, saved, tmp_path):
    model, folder = saved
    work = tmp_path / "checkpoint"
    save(model, processor_for(model), work)
    first_weights = (work / "model.safetensors").read_bytes()
    hub.hold_commits.clear()  # the stand-in sits on every commit until released
    with BackgroundPusher(REPO, revision="training", endpoint=hub.url, token=TOKEN) as pusher:
        first = pusher.push(work, "step 1")
        assert hub.commit_arrived.wait(60) and not first.done()  # push() returned while its commit is pending
        with torch.no_grad():
            model.fusion.proj[0].bias.add_(1.0)
        save(model, processor_for(model), work)  # the trainer overwrites the folder while the first push is in flight
        second = pusher.push(work, "step 2")
        assert not second.done()
        hub.hold_commits.set()
        urls = pusher.wait()
    assert len(urls) == 2 and urls[0] != urls[1]
    assert [(c["summary"], c["revision"]) for c in hub.commits] == [("step 1", "training"), ("step 2", "training")]
    assert hub.commits[0]["files"]["model.safetensors"] == first_weights
    assert hub.commits[1]["files"]["model.safetensors"] == (work / "model.safetensors").read_bytes() != first_weights
    assert hub.files(revision="main") == {} and "README.md" in hub.files(revision="training")
    with torch.no_grad():
        model.fusion.proj[0].bias.sub_(1.0)


def test_background_failure_is_reported_by_wait(hub, saved):
    _, folder = saved
    pusher = BackgroundPusher(REPO, endpoint=hub.url, token="hf_NotTheRightOne")
    pusher.push(folder, "final")
    with pytest.raises(PushError, match=r"1 of 1 push\(es\) failed:\n.*acme/tiny-vlm.*HF_TOKEN") as err:
        pusher.wait()
    assert "hf_NotTheRightOne" not in str(err.value) and str(folder) in str(err.value)
    pusher.close()


def test_cli_push_uses_hf_endpoint_hf_token_branch_and_writes_a_missing_card(hub, saved, tmp_path, monkeypatch, capsys):
    model, _ = saved
    folder = tmp_path / "plain"
    save(model, processor_for(model), folder)  # no README.md yet
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    args = ["push", "--model", str(folder), "--repo-id", "acme/cli-vlm", "--private", "--revision", "dev",
            "--commit-message", "From the CLI"]
    assert main(args) == 0
    assert hub.repos["acme/cli-vlm"]["visibility"] == "private"
    assert hub.files("acme/cli-vlm", "main") == {}
    files = hub.files("acme/cli-vlm", "dev")
    assert [c["summary"] for c in hub.commits] == ["From the CLI"]
    card = ModelCard(files["README.md"].decode())
    assert card.data.pipeline_tag == "image-text-to-text" and 'snapshot_download("acme/cli-vlm")' in card.text
    out = capsys.readouterr()
    assert "acme/cli-vlm" in out.out and TOKEN not in out.out + out.err

    assert main(["push", "--model", str(tmp_path / "missing"), "--repo-id", "acme/cli-vlm"]) == 2
    assert "is not a saved VLM folder" in capsys.readouterr().err
    assert main(["push", "--model", str(folder), "--repo-id", "acme//bad"]) == 2
    assert "--repo-id / hub.repo_id" in capsys.readouterr().err and len(hub.commits) == 1


def test_training_publisher_pushes_every_save_then_final_with_card(hub, saved, tmp_path, monkeypatch):
    from vlm.config import load_config
    from vlm.hub.training_publisher import TrainingPublisher

    model, _ = saved
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    config = load_config(None, [f"output_dir={tmp_path}", "hub.push=true", f"hub.repo_id={REPO}",
                                "hub.strategy=every_save", f"hub.endpoint={hub.url}"])
    publisher = TrainingPublisher(config)
    save(model, processor_for(model), tmp_path / "hub-latest")
    publisher.on_save(tmp_path / "hub-latest", 5)
    publisher.on_save(tmp_path / "hub-latest", 10)
    save(model, processor_for(model), tmp_path / "final")
    urls = publisher.on_end(tmp_path / "final", {"eval_loss": 0.25, "history": [1.0, 0.5]})
    assert len(urls) == 3
    assert [c["summary"] for c in hub.commits] == [
        "Training in progress, step 5", "Training in progress, step 10", "Final model"]
    card = hub.files()["README.md"].decode()
    assert "| eval_loss | 0.25 |" in card and "history" not in card.split("## Training configuration")[0]
    assert f"repo_id: {REPO}" in card and 'snapshot_download("acme/tiny-vlm")' in card

    quiet = TrainingPublisher(load_config(None, [f"output_dir={tmp_path}"]))
    quiet.on_save(tmp_path / "hub-latest", 15)
    (tmp_path / "final" / "README.md").unlink()  # the card above: the publisher that never pushes writes its own
    assert quiet.on_end(tmp_path / "final", None) == [] and len(hub.commits) == 3
    card = (tmp_path / "final" / "README.md").read_text()
    assert "No evaluation metrics were recorded" in card and "snapshot_download" not in card  # no repo, no metrics


def test_lora_adapter_folder_gets_a_card_that_loads_adapters_and_is_pushed(hub, tmp_path):
    """`export.merge_lora: false` leaves final/ as an adapter folder (vlm_adapter.json, no config.json)."""
    from safetensors.torch import save_file

    from vlm.config import ModelConfig

    folder = tmp_path / "final"
    folder.mkdir()
    model_config = config_to_dict(ModelConfig(vision="hf:google/siglip-base-patch16-224", lm="Qwen/Qwen2-0.5B"))
    (folder / "vlm_adapter.json").write_text(json.dumps({"base": None, "model": model_config}))
    save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))
    push_folder(folder, REPO, endpoint=hub.url, token=TOKEN)
    card = ModelCard(hub.files()["README.md"].decode())
    assert card.data.base_model == ["google/siglip-base-patch16-224", "Qwen/Qwen2-0.5B"]
    assert "lora" in card.data.tags and f'load_adapter_folder(snapshot_download("{REPO}"))' in card.text
    assert set(hub.files()) == {"README.md", "vlm_adapter.json", "adapter_model.safetensors"}
