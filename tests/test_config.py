from pathlib import Path

import pytest

from vlm.config import Config, ConfigError, config_to_dict, from_dict, load_config, saved_model_config

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
        ["train.max_steps=7", "model.projector.type=linear", "data.train_files=[a.json, b.json]", "train.fusion_lr=1e-3"],
    )
    assert cfg.train.lr == pytest.approx(1e-4)  # YAML reads 1e-4 as a string; it must still be a float
    assert cfg.train.max_steps == 7
    assert cfg.model.options["projector"].type == "linear"
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


def test_each_fusion_strategy_has_its_own_section(tmp_path):
    cfg = load_config(write(tmp_path, (
        "model:\n  fusion: cross_attention\n  cross_attention: {every_n_layers: 2, resampler_depth: 1}\n"
        "  projector: {type: pixel_shuffle, pixel_shuffle_factor: 4}\n"
    )), ["model.resampler.latents=16"])
    assert cfg.model.fusion_options() is cfg.model.options["cross_attention"]
    assert (cfg.model.fusion_options().every_n_layers, cfg.model.fusion_options().resampler_depth) == (2, 1)
    assert cfg.model.fusion_options().resampler_latents == 64  # defaults fill what is not given
    assert cfg.model.options["projector"].pixel_shuffle_factor == 4
    assert (cfg.model.options["resampler"].depth, cfg.model.options["resampler"].latents) == (2, 16)
    saved = config_to_dict(cfg)
    assert saved["model"]["cross_attention"]["every_n_layers"] == 2 and "options" not in saved["model"]
    assert from_dict(Config, saved) == cfg  # what is saved loads back as it was


def test_keys_inside_a_fusion_section_are_checked():
    with pytest.raises(ConfigError, match=r"Unknown config key 'model\.cross_attention\.every_n'.*every_n_layers"):
        load_config(None, ["model.cross_attention.every_n=2"])
    with pytest.raises(ConfigError, match=r"model\.cross_attention\.every_n_layers must be >= 1, got 0"):
        load_config(None, ["model.cross_attention.every_n_layers=0"])
    with pytest.raises(ConfigError, match=r"'model\.projector\.type' must be one of"):
        load_config(None, ["model.projector.type=mlp3"])
    with pytest.raises(ConfigError, match=r"model.fusion='nope' is not a registered strategy"):
        load_config(None, ["model.fusion=nope"])


@pytest.mark.parametrize("flat, moved", [
    ("cross_attn_every_n_layers=1", "model.cross_attention.every_n_layers"),
    ("cross_attn_heads=2", "model.cross_attention.heads"),
    ("projector=linear", "model.projector.type"),
    ("pixel_shuffle_factor=2", "model.projector.pixel_shuffle_factor"),
    ("resampler_depth=1", "model.cross_attention.resampler_depth / model.resampler.depth"),
    ("resampler_latents=8", "model.cross_attention.resampler_latents / model.resampler.latents"),
])
def test_old_flat_fusion_keys_name_their_new_place(flat, moved):
    key = flat.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"^model\.{key} moved to {moved}; rename it"):
        load_config(None, [f"model.{flat}"])


def test_a_saved_folders_flat_model_config_is_translated():
    old = {"vision": "v", "lm": "l", "fusion": "resampler", "projector": "linear", "pixel_shuffle_factor": 2,
           "cross_attn_every_n_layers": 4, "cross_attn_heads": None, "resampler_depth": 0, "resampler_latents": 16}
    cfg = saved_model_config(old)
    assert cfg.fusion == "resampler" and cfg.options["projector"].type == "linear"
    assert (cfg.options["resampler"].depth, cfg.options["resampler"].latents) == (2, 16)  # 0 meant 2 here
    xattn = cfg.options["cross_attention"]
    assert (xattn.every_n_layers, xattn.heads, xattn.resampler_depth, xattn.resampler_latents) == (4, None, 0, 16)
    assert saved_model_config(config_to_dict(cfg)) == cfg  # the new shape passes through unchanged
