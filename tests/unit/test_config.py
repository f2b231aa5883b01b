from pathlib import Path

import pytest

from vlm.config import Config, ConfigError, config_to_dict, from_dict, load_config, saved_model_config

ROOT = Path(__file__).resolve().parents[2]


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


# -- accelerate launch: its config file's settings arrive as environment variables (vlm/train/launch_env.py) --

ACCELERATE_PREFIXES = ("ACCELERATE_", "FSDP_")


@pytest.fixture()
def launcher_env(monkeypatch):
    """A clean slate, then `setenv` as `accelerate launch` would."""
    import os

    for key in list(os.environ):
        if key.startswith(ACCELERATE_PREFIXES):
            monkeypatch.delenv(key)
    monkeypatch.chdir(ROOT)

    def setenv(**values: str) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, value)

    return setenv


def resolved(*overrides: str):
    from vlm.train.launch_env import apply_launcher_settings

    return apply_launcher_settings(load_config(None, list(overrides))).train


def test_accelerate_settings_fill_keys_the_config_leaves_at_their_default(launcher_env):
    launcher_env(ACCELERATE_MIXED_PRECISION="bf16", ACCELERATE_USE_FSDP="true", FSDP_VERSION="2",
                 FSDP_ACTIVATION_CHECKPOINTING="true", FSDP_CPU_RAM_EFFICIENT_LOADING="false",
                 ACCELERATE_DYNAMO_BACKEND="INDUCTOR")
    train = resolved()
    assert (train.strategy, train.mixed_precision, train.gradient_checkpointing, train.compile) == \
        ("fsdp2", "bf16", True, True)


def test_accelerate_deepspeed_settings_become_ours(launcher_env):
    launcher_env(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="3", ACCELERATE_MIXED_PRECISION="no",
                 ACCELERATE_GRADIENT_ACCUMULATION_STEPS="4", ACCELERATE_GRADIENT_CLIPPING="0.5",
                 ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="cpu", ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE="cpu")
    train = resolved()
    assert (train.strategy, train.mixed_precision, train.grad_accum, train.max_grad_norm) == ("zero3", "no", 4, 0.5)
    assert train.offload_optimizer and train.offload_params
    assert resolved("train.grad_accum=4", "train.strategy=zero3").grad_accum == 4  # agreeing is fine


@pytest.mark.parametrize(("env", "overrides", "message"), [
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"}, ["train.grad_accum=8"],
     r"^train.grad_accum=8 disagrees with accelerate's deepspeed_config.gradient_accumulation_steps "
     r"\(ACCELERATE_GRADIENT_ACCUMULATION_STEPS=2\)"),
    ({"ACCELERATE_MIXED_PRECISION": "no"}, ["train.mixed_precision=bf16"],
     r"^train.mixed_precision=bf16 disagrees with accelerate's mixed_precision \(ACCELERATE_MIXED_PRECISION=no\)"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"},
     ["train.strategy=zero3"], r"^train.strategy=zero3 disagrees with accelerate's distributed_type: FSDP"),
])
def test_accelerate_setting_that_contradicts_the_config_is_one_line_naming_both(launcher_env, env, overrides,
                                                                                 message):
    launcher_env(**env)
    with pytest.raises(ConfigError, match=message) as err:
        resolved(*overrides)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("env", "named"), [
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "mixed_precision=fp16 (ACCELERATE_MIXED_PRECISION)"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "fsdp_config.fsdp_version=1 (FSDP_VERSION)"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"},
     "fsdp_config.fsdp_cpu_ram_efficient_loading=true (FSDP_CPU_RAM_EFFICIENT_LOADING)"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
      "FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_config.fsdp_offload_params=true (FSDP_OFFLOAD_PARAMS)"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
      "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, "fsdp_config.fsdp_sharding_strategy=SHARD_GRAD_OP"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "nvme"},
     "offload_param_device=nvme (ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE)"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, "ZeRO stage 1"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"},
     "deepspeed_config.zero3_init_flag=true (ACCELERATE_DEEPSPEED_ZERO3_INIT)"),
    ({"ACCELERATE_DYNAMO_BACKEND": "EAGER"}, "dynamo_backend=eager (ACCELERATE_DYNAMO_BACKEND)"),
    ({"ACCELERATE_USE_MEGATRON_LM": "true"}, "MEGATRON_LM=true (ACCELERATE_USE_MEGATRON_LM)"),
])
def test_accelerate_setting_we_cannot_honour_is_refused_by_name(launcher_env, env, named):
    launcher_env(**env)
    with pytest.raises(ConfigError) as err:
        resolved()
    assert named in str(err.value) and "\n" not in str(err.value)


def test_deepspeed_json_keys_the_trainer_fills_in_are_refused(launcher_env, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4}')
    launcher_env(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=str(ds))
    with pytest.raises(ConfigError, match="sets gradient_accumulation_steps, which the trainer fills in from "
                                          "train.grad_accum"):
        resolved()
    ds.write_text('{"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": "auto"}')
    assert resolved().strategy == "zero3"


@pytest.mark.parametrize(("preset", "strategy"), [
    ("ddp.yaml", "auto"), ("fsdp2.yaml", "fsdp2"), ("zero2.yaml", "zero2"), ("zero3.yaml", "zero3"),
    ("zero3_offload.yaml", "zero3"),
])
def test_every_shipped_accelerate_preset_resolves(launcher_env, monkeypatch, preset, strategy):
    """What accelerate's own launcher exports for each preset (its env builders, not a copy of them)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ROOT / "configs/accelerate" / preset),
                                               "--main_process_port", "0", "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    exported = prepare_deepspeed_cmd_env(args)[1] if args.use_deepspeed else prepare_multi_gpu_env(args)
    launcher_env(**{k: v for k, v in exported.items() if k.startswith(ACCELERATE_PREFIXES)})
    train = resolved()
    assert (train.strategy, train.mixed_precision) == (strategy, "bf16")

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


@pytest.mark.parametrize("key", ["offload_params", "offload_optimizer"])
def test_offload_outside_deepspeed_is_refused_not_ignored(tmp_path, capsys, key):
    from vlm.cli import main

    config = tmp_path / "config.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\ntrain:\n  strategy: single\n  {key}: true\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"Config error: train.{key}=true needs train.strategy=zero2 or zero3" in err and "Traceback" not in err


# -- early stopping: train.early_stopping_patience / train.early_stopping_min_delta --

def test_early_stopping_keys_default_to_off_and_are_typed():
    train = load_config(None).train
    assert (train.early_stopping_patience, train.early_stopping_min_delta) == (0, 0.0)
    train = load_config(None, ["train.eval_every=50", "train.early_stopping_patience=3",
                               "train.early_stopping_min_delta=1e-3"]).train
    assert (train.early_stopping_patience, train.early_stopping_min_delta) == (3, pytest.approx(1e-3))


@pytest.mark.parametrize("overrides, message", [
    (["train.early_stopping_patience=-1"], r"train\.early_stopping_patience must be >= 0 \(0: never stop early\), got -1"),
    (["train.early_stopping_patience=2"], r"train\.eval_every is 0; set train\.eval_every"),
    (["train.eval_every=5", "train.early_stopping_patience=2", "train.early_stopping_min_delta=-0.1"],
     r"train\.early_stopping_min_delta must be >= 0, got -0\.1"),
])
def test_bad_early_stopping_settings_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_early_stopping_without_eval_files_is_refused_before_training():
    from vlm.train.early_stopping import check_early_stopping

    config = load_config(None, ["train.eval_every=5", "train.early_stopping_patience=2"])
    with pytest.raises(ConfigError, match=r"needs an eval set; set data\.eval_files"):
        check_early_stopping(config)
    check_early_stopping(load_config(None, ["train.eval_every=5", "train.early_stopping_patience=2",
                                            "data.eval_files=[eval.json]"]))
    check_early_stopping(load_config(None))  # off: no eval set needed


def test_an_unquoted_no_is_the_word_a_choice_key_offers(tmp_path):
    """YAML reads `mixed_precision: no` (the documented value) as false; it is the choice `no`, in a file or an override."""
    (tmp_path / "c.yaml").write_text("train:\n  mixed_precision: no\n")
    assert load_config(tmp_path / "c.yaml").train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(None, ["train.mixed_precision=yes"])  # no choice means yes: still an error naming the key
