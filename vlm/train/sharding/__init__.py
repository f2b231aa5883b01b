"""Training strategies by name: `single`, `ddp`, `fsdp2`, `zero2`, `zero3` (see `train.strategy`)."""

from __future__ import annotations

import logging

from ...config import Config, ConfigError
from ..distributed import DistEnv
from .base import Strategy

logger = logging.getLogger(__name__)

STRATEGIES = ("single", "ddp", "fsdp2", "zero2", "zero3")


def resolve_strategy(config: Config, env: DistEnv) -> str:
    """`train.strategy`; `auto` (still auto after `launch_env.apply_launcher_settings` found no FSDP or
    DeepSpeed launcher setting) is `ddp` with several processes, `single` with one."""
    name = config.train.strategy
    if name != "auto":
        return name
    return "ddp" if env.distributed else "single"


def build_strategy(config: Config, env: DistEnv) -> Strategy:
    name = resolve_strategy(config, env)
    if config.train.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision=fp16 is not supported; use bf16 (or no).")
    for key in ("offload_optimizer", "offload_params"):  # honoured by DeepSpeed only: never silently ignored
        if getattr(config.train, key) and name not in ("zero2", "zero3"):
            raise ConfigError(f"train.{key}=true needs train.strategy=zero2 or zero3 (DeepSpeed CPU offload), "
                              f"but this run uses {name}; drop it or switch strategy.")
    if name in ("single", "ddp"):
        from .ddp import DDPStrategy

        strategy: Strategy = DDPStrategy(config, env)
    elif name == "fsdp2":
        from .fsdp2 import FSDP2Strategy

        strategy = FSDP2Strategy(config, env)
    elif name in ("zero2", "zero3"):
        _require_deepspeed(name)
        from .deepspeed import DeepSpeedStrategy

        strategy = DeepSpeedStrategy(config, env, stage=int(name[-1]))
    else:  # pragma: no cover - the config's Literal type rejects other names
        raise ValueError(f"train.strategy='{name}' is unknown; choose one of {STRATEGIES} or auto.")
    strategy.name = name
    logger.info("Strategy %s on %d process(es), device %s.", name, env.world_size, env.device)
    return strategy


def _require_deepspeed(name: str) -> None:
    """Fail before any model is built, in one line that says what to install, rather than with an
    import traceback from inside the strategy's setup."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        missing = isinstance(err, ModuleNotFoundError) and (err.name or "deepspeed").split(".")[0] == "deepspeed"
        what = "DeepSpeed is not installed" if missing else f"DeepSpeed cannot be imported ({err})"
        raise ConfigError(
            f"train.strategy={name} needs DeepSpeed, but {what}; install it with "
            "`pip install -e \".[deepspeed]\"`, or choose train.strategy=fsdp2 / ddp."
        ) from None


__all__ = ["Strategy", "STRATEGIES", "build_strategy", "resolve_strategy"]
