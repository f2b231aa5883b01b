"""What `accelerate launch --config_file X` asked for, read in one place from the variables it exports.

accelerate's launcher turns its config file into environment variables (accelerate/utils/launch.py)
and starts our script; it does not run our loop (docs/architecture.md says why). So each setting it
may export is handled here, and only here, in one of three ways:

- taken into our config (`train.strategy`, `train.mixed_precision`, `train.grad_accum`, ...) when the
  YAML leaves that key at its default, and a one-line `ConfigError` when the YAML says otherwise;
- accepted because it is what the trainer does anyway (e.g. `fsdp_reshard_after_forward: true`);
- refused, in one line naming the accelerate setting and what to do instead.

accelerate exports some settings the file never wrote, at its defaults. Such a default counts when it
changes what runs (`mixed_precision: no` is fp32, `fsdp_version: 1`, `fsdp_cpu_ram_efficient_loading:
true`), and not otherwise: `fsdp_activation_checkpointing: false` does not turn
`train.gradient_checkpointing` off.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ..config import Config, ConfigError, TrainConfig

logger = logging.getLogger(__name__)

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

# (variable, accelerate config key, values we run exactly as asked, what to do instead). A variable
# that is unset passes; any value outside the set is refused. Checked only under the launcher that
# exports the variable (FSDP_* under ACCELERATE_USE_FSDP, DeepSpeed ones under ACCELERATE_USE_DEEPSPEED).
_COMMON = [
    ("ACCELERATE_USE_MEGATRON_LM", "distributed_type: MEGATRON_LM", {"false"},
     "use train.strategy fsdp2 / zero2 / zero3 (Megatron-LM is not supported)"),
    ("ACCELERATE_USE_PARALLELISM_CONFIG", "parallelism_config", {"false"},
     "remove it (tensor / context parallelism are not supported; data parallel only)"),
    ("ACCELERATE_DEBUG_MODE", "debug", {"false"}, "remove it"),
    ("ACCELERATE_CPU_AFFINITY", "enable_cpu_affinity", {"0"}, "remove it (pin processes with numactl / taskset)"),
    ("ACCELERATE_DYNAMO_MODE", "dynamo_config.dynamo_mode", {"default"},
     "remove it (train.compile uses torch.compile's default mode)"),
    ("ACCELERATE_DYNAMO_USE_FULLGRAPH", "dynamo_config.dynamo_use_fullgraph", {"false"}, "remove it"),
    ("ACCELERATE_DYNAMO_USE_DYNAMIC", "dynamo_config.dynamo_use_dynamic", {"false"}, "remove it"),
    ("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "dynamo_config.dynamo_use_regional_compilation", {"false"},
     "remove it (train.compile compiles the LM and the fusion)"),
]
_FSDP = [
    ("FSDP_VERSION", "fsdp_config.fsdp_version", {"2"},
     "set fsdp_version: 2 (train.strategy=fsdp2 is torch's fully_shard)"),
    ("FSDP_SHARDING_STRATEGY", "fsdp_config.fsdp_sharding_strategy", {"FULL_SHARD", "1"},
     "remove it (fsdp2 shards parameters, gradients and optimizer state)"),
    ("FSDP_RESHARD_AFTER_FORWARD", "fsdp_config.fsdp_reshard_after_forward", {"true"}, "remove it"),
    ("FSDP_OFFLOAD_PARAMS", "fsdp_config.fsdp_offload_params", {"false"},
     "for CPU offload use configs/accelerate/zero3_offload.yaml (train.strategy=zero3, train.offload_params=true)"),
    ("FSDP_AUTO_WRAP_POLICY", "fsdp_config.fsdp_auto_wrap_policy", {"TRANSFORMER_BASED_WRAP"},
     "remove it (fsdp2 puts each decoder layer and fusion block in its own unit)"),
    ("FSDP_TRANSFORMER_CLS_TO_WRAP", "fsdp_config.fsdp_transformer_layer_cls_to_wrap", set(),
     "remove it (the decoder layers are found in any supported LM)"),
    ("FSDP_BACKWARD_PREFETCH", "fsdp_config.fsdp_backward_prefetch", set(), "remove it (an FSDP1 setting)"),
    ("FSDP_FORWARD_PREFETCH", "fsdp_config.fsdp_forward_prefetch", {"false"}, "remove it (an FSDP1 setting)"),
    ("FSDP_USE_ORIG_PARAMS", "fsdp_config.fsdp_use_orig_params", {"true"}, "remove it (FSDP2 keeps the parameters)"),
    ("FSDP_STATE_DICT_TYPE", "fsdp_config.fsdp_state_dict_type", {"SHARDED_STATE_DICT"},
     "remove it (checkpoints are sharded, final/ is always full)"),
    ("FSDP_CPU_RAM_EFFICIENT_LOADING", "fsdp_config.fsdp_cpu_ram_efficient_loading", {"false"},
     "set fsdp_cpu_ram_efficient_loading: false (with it, transformers loads weights on rank 0 only and "
     "expects a broadcast that fsdp2 here does not do)"),
    ("FSDP_SYNC_MODULE_STATES", "fsdp_config.fsdp_sync_module_states", {"true", "false"}, ""),
    ("FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD", "fsdp_config.fsdp_activation_checkpointing_offload", {"false"},
     "remove it (train.gradient_checkpointing recomputes on the device)"),
    ("FSDP_IGNORED_MODULES", "fsdp_config.fsdp_ignored_modules", set(),
     "remove it (the frozen tower is left out of the shards unless train.shard_vision=true)"),
]
_DEEPSPEED = [
    ("ACCELERATE_DEEPSPEED_ZERO3_INIT", "deepspeed_config.zero3_init_flag", {"false"},
     "set zero3_init_flag: false (the model is built whole, then partitioned by deepspeed.initialize)"),
    ("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "deepspeed_config.zero3_save_16bit_model", {"true", "false"}, ""),
    ("ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES", "deepspeed_config.deepspeed_moe_layer_cls_names", set(),
     "remove it (no mixture-of-experts support)"),
]
# Exported by the launcher but no setting of ours: read by torch / the launcher itself, or only
# meaningful with a refused value (FSDP_MIN_NUM_PARAMS belongs to SIZE_BASED_WRAP).
_NOT_SETTINGS = {"ACCELERATE_CONFIG_DS_FIELDS", "FSDP_MIN_NUM_PARAMS", "ACCELERATE_DYNAMO_BACKEND",
                 "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED",
                 "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "ACCELERATE_GRADIENT_CLIPPING",
                 "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
                 "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "FSDP_ACTIVATION_CHECKPOINTING",
                 "ACCELERATE_LOG_LEVEL"}
# Keys of a DeepSpeed JSON that the trainer writes itself (DeepSpeedStrategy.ds_config).
_DS_FILLED = {"train_micro_batch_size_per_gpu": "train.batch_size", "train_batch_size": "train.batch_size",
              "gradient_accumulation_steps": "train.grad_accum", "gradient_clipping": "train.max_grad_norm",
              "bf16": "train.mixed_precision", "fp16": "train.mixed_precision",
              "optimizer": "train.lr / train.weight_decay (AdamW)", "scheduler": "train.warmup_steps (cosine)"}


def apply_launcher_settings(config: Config, environ: Mapping[str, str] | None = None) -> Config:
    """`config` with the accelerate launcher's settings applied (a copy; `config` is unchanged).

    Raises `ConfigError` naming the setting when one conflicts with the YAML or cannot be honoured."""
    environ = os.environ if environ is None else environ
    config = copy.deepcopy(config)
    train = config.train
    use_fsdp = _flag(environ, "ACCELERATE_USE_FSDP")
    use_deepspeed = _flag(environ, "ACCELERATE_USE_DEEPSPEED")
    _refuse(environ, _COMMON + (_FSDP if use_fsdp else []) + (_DEEPSPEED if use_deepspeed else []))
    _warn_unknown(environ, use_fsdp, use_deepspeed)

    if "ACCELERATE_MIXED_PRECISION" in environ:
        precision = environ["ACCELERATE_MIXED_PRECISION"].lower()
        if precision not in ("no", "bf16"):
            raise ConfigError(f"accelerate's mixed_precision={precision} (ACCELERATE_MIXED_PRECISION) is not "
                              "supported; set mixed_precision: bf16 or no in the accelerate config.")
        _take(train, "mixed_precision", precision, "mixed_precision", "ACCELERATE_MIXED_PRECISION")
    if _flag(environ, "ACCELERATE_USE_CPU") and torch.cuda.is_available():
        raise ConfigError("accelerate's use_cpu=true (ACCELERATE_USE_CPU) is not supported on a machine with GPUs; "
                          "hide them with CUDA_VISIBLE_DEVICES= instead.")
    backend = environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if backend == "inductor":
        _take(train, "compile", True, "dynamo_config.dynamo_backend", "ACCELERATE_DYNAMO_BACKEND", backend)
    elif backend != "no":
        raise ConfigError(f"accelerate's dynamo_backend={backend} (ACCELERATE_DYNAMO_BACKEND) is not supported; "
                          "use inductor (or train.compile=true), or no.")
    if use_fsdp:
        _take(train, "strategy", "fsdp2", "distributed_type: FSDP", "ACCELERATE_USE_FSDP", "true")
        if _flag(environ, "FSDP_ACTIVATION_CHECKPOINTING"):
            _take(train, "gradient_checkpointing", True, "fsdp_config.fsdp_activation_checkpointing",
                  "FSDP_ACTIVATION_CHECKPOINTING", "true")
    if use_deepspeed:
        _apply_deepspeed(train, environ)
    if train.deepspeed_config:
        _check_deepspeed_json(Path(train.deepspeed_config))
    return config


def _apply_deepspeed(train: TrainConfig, environ: Mapping[str, str]) -> None:
    """ZeRO stage (from the accelerate config or the DeepSpeed JSON), offload, accumulation, clipping."""
    ds_file = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if ds_file:
        _take(train, "deepspeed_config", ds_file, "deepspeed_config.deepspeed_config_file",
              "ACCELERATE_DEEPSPEED_CONFIG_FILE")
    stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if ds_file and Path(ds_file).is_file():
        json_stage = json.loads(Path(ds_file).read_text()).get("zero_optimization", {}).get("stage")
        if json_stage is not None and stage is not None and str(json_stage) != stage:
            raise ConfigError(f"accelerate's zero_stage={stage} disagrees with stage {json_stage} in '{ds_file}'; "
                              "remove zero_stage from the accelerate config.")
        stage = stage if json_stage is None else str(json_stage)
    stage = stage or "2"  # accelerate's default
    if stage not in ("2", "3"):
        raise ConfigError(f"DeepSpeed ZeRO stage {stage} (accelerate's zero_stage) is not supported; use 2 or 3.")
    _take(train, "strategy", f"zero{stage}", "DeepSpeed ZeRO stage (zero_stage, or the stage in deepspeed_config_file)",
          "ACCELERATE_USE_DEEPSPEED", f"true, stage {stage}")
    offload = (("offload_optimizer_device", "offload_optimizer", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"),
               ("offload_param_device", "offload_params", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"))
    for key, field, variable in offload:
        device = environ.get(variable, "none").lower()
        if device not in ("none", "cpu"):
            raise ConfigError(f"accelerate's {key}={device} ({variable}) is not supported; use cpu or none.")
        if device == "cpu":
            _take(train, field, True, f"deepspeed_config.{key}", variable, device)
    if "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" in environ:
        _take(train, "grad_accum", int(environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"]),
              "deepspeed_config.gradient_accumulation_steps", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if "ACCELERATE_GRADIENT_CLIPPING" in environ:
        _take(train, "max_grad_norm", float(environ["ACCELERATE_GRADIENT_CLIPPING"]),
              "deepspeed_config.gradient_clipping", "ACCELERATE_GRADIENT_CLIPPING")


def _take(train: TrainConfig, field: str, value: Any, key: str, variable: str, raw: str | None = None) -> None:
    """Set `train.<field>` from the launcher when the YAML left it at its default; refuse a disagreement.
    `key` / `variable` name the accelerate setting, `raw` its exported value (default: `value`)."""
    current = getattr(train, field)
    if current == _DEFAULTS[field]:
        setattr(train, field, value)
    elif current != value:
        shown = value if raw is None else raw
        raise ConfigError(f"train.{field}={current} disagrees with accelerate's {key} ({variable}={shown}); "
                          f"make them the same, or drop train.{field} from the training config.")


def _refuse(environ: Mapping[str, str], checks: list[tuple[str, str, set[str], str]]) -> None:
    for variable, key, accepted, instead in checks:
        value = environ.get(variable)
        if value is not None and value.lower() not in {a.lower() for a in accepted}:
            raise ConfigError(f"accelerate's {key}={value} ({variable}) is not supported by this trainer; {instead}.")


def _warn_unknown(environ: Mapping[str, str], use_fsdp: bool, use_deepspeed: bool) -> None:
    """A variable accelerate may add in a later version: said once, so it is not ignored silently."""
    known = _NOT_SETTINGS | {c[0] for c in _COMMON + _FSDP + _DEEPSPEED}
    prefixes = ("ACCELERATE_",) + (("FSDP_",) if use_fsdp else ())
    unknown = sorted(k for k in environ if k.startswith(prefixes) and k not in known)
    if unknown:
        logger.warning("accelerate settings this trainer does not know, and does not apply: %s", ", ".join(unknown))


def _check_deepspeed_json(path: Path) -> None:
    """The JSON's ZeRO settings are used; keys the trainer fills in itself must be absent or "auto"."""
    if not path.is_file():
        raise ConfigError(f"train.deepspeed_config: '{path}' does not exist.")
    ds = json.loads(path.read_text())
    for key, ours in _DS_FILLED.items():
        value = ds.get(key)
        if value is None or value == "auto" or (isinstance(value, dict) and value.get("enabled") in ("auto", False)
                                                  and key in ("bf16", "fp16")):
            continue
        raise ConfigError(f"'{path}' sets {key}, which the trainer fills in from {ours}; remove it or write \"auto\".")


def _flag(environ: Mapping[str, str], variable: str) -> bool:
    return environ.get(variable, "false").lower() in ("true", "1", "yes")
