from pathlib import Path

import pytest

from vlm.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"Unknown config key 'train\.lrr'.*Did you mean 'train\.lr'"):
        load_config(write(tmp_path, "train:\n  lrr: 0.1\n"))


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"Unknown config key 'trian'.*'train'"):
        load_config(write(tmp_path, "trian:\n  lr: 0.1\n"))


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"'train\.max_steps' must be an integer, got 'ten'"):
        load_config(write(tmp_path, "train:\n  max_steps: ten\n"))
    with pytest.raises(ConfigError, match=r"'train\.stage' must be one of \['align', 'finetune', 'custom'\]"):
        load_config(None, ["train.stage=pretrain"])
    with pytest.raises(ConfigError, match=r"'data\.strict' must be true or false"):
        load_config(None, ["data.strict=1"])


def test_overrides_are_typed_and_applied(tmp_path):
    cfg = load_config(
        write(tmp_path, "model:\n  fusion: projector\ntrain:\n  lr: 1e-4\n"),
        ["train.max_steps=7", "model.projector=linear", "data.train_files=[a.json, b.json]", "train.fusion_lr=1e-3"],
    )
    assert cfg.train.lr == pytest.approx(1e-4)  # YAML reads 1e-4 as a string; it must still be a float
    assert cfg.train.max_steps == 7
    assert cfg.model.projector == "linear"
    assert cfg.data.train_files == ["a.json", "b.json"]
    assert cfg.train.fusion_lr == pytest.approx(1e-3)


def test_malformed_override_explains_the_form():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.lr"])


def test_shipped_configs_validate():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize("yaml_value, expected", [
    ("tensorboard", ["tensorboard"]), ("none", ["none"]), ("[]", []), ("[tensorboard, wandb]", ["tensorboard", "wandb"]),
])
def test_report_to_takes_a_name_or_a_list_like_transformers(tmp_path, yaml_value, expected):
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  report_to: {yaml_value}\n")
    assert load_config(path).train.report_to == expected
    assert load_config(None, [f"train.report_to={yaml_value}"]).train.report_to == expected


def test_report_to_list_starts_each_tracker_and_rejects_unknown_names(tmp_path):
    from vlm.train.trackers import Trackers

    assert Trackers(load_config(None, ["train.report_to=[]"]), tmp_path, enabled=True).trackers == []
    assert Trackers(load_config(None, ["train.report_to=none"]), tmp_path, enabled=True).trackers == []
    started = Trackers(load_config(None, ["train.report_to=[tensorboard, tensorboard]"]), tmp_path, enabled=True)
    assert [type(t).__name__ for t in started.trackers] == ["TensorBoardTracker"]
    started.finish()
    with pytest.raises(ConfigError, match=r"train.report_to\[1\]' must be one of"):
        load_config(None, ["train.report_to=[tensorboard, mlflow]"])
    with pytest.raises(ConfigError, match="mixes 'none' with trackers"):
        load_config(None, ["train.report_to=[none, wandb]"])
