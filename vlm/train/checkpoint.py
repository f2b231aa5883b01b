"""`output_dir/checkpoint-<step>/`: everything needed to continue a run exactly.

Layout: `state/` (trainable weights + optimizer, sharded where the strategy shards, written by the
strategy), `trainer_state.json` (a `TrainState`, plus the scheduler and the world size),
`rng/rank-<r>.safetensors` + `.json` (every rank's random generators), `config.yaml`. Written
into `checkpoint-<step>.tmp` by all ranks and renamed by rank 0 once complete, so a crash mid-write
never leaves a half checkpoint under the final name.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from ..atomic import replace_directory
from ..config import Config, config_to_dict
from .distributed import DistEnv, barrier
from .sharding import Strategy
from .state import TrainState

PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def resolve_resume(resume_from: str | None, output_dir: Path) -> Path | None:
    """`latest` -> newest complete checkpoint in output_dir (None when there is none yet)."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"train.resume_from='{resume_from}' is not a complete checkpoint folder (no {STATE_FILE}); "
            "use 'latest' or a checkpoint-<step> folder."
        )
    return path


def save_checkpoint(
    strategy: Strategy, state: TrainState, scheduler: dict[str, Any], config: Config, env: DistEnv,
    output_dir: Path, save_total_limit: int | None,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    final = output_dir / f"checkpoint-{state.step}"
    tmp = output_dir / f"{final.name}.tmp"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    barrier(env)
    strategy.save_state(tmp / "state")
    _save_rng(tmp / "rng", env.rank)
    barrier(env)
    if env.is_main:
        (tmp / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        trainer_state = {**state.to_dict(), "scheduler": scheduler, "world_size": env.world_size}
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
        replace_directory(tmp, final)
        if save_total_limit:
            for old in list_checkpoints(output_dir)[:-save_total_limit]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def load_checkpoint(strategy: Strategy, path: Path, env: DistEnv) -> tuple[TrainState, dict[str, Any]]:
    """Restore weights, optimizer and this rank's generators; return the trainer state and the scheduler's."""
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("world_size") != env.world_size:
        raise ValueError(
            f"Checkpoint '{path}' was written by {state.get('world_size')} process(es); this run has "
            f"{env.world_size}. Resume on the same world size (exact continuation depends on it)."
        )
    strategy.load_state(path / "state")
    _load_rng(path / "rng", env.rank)
    return TrainState.from_dict(state), state["scheduler"]


def _save_rng(directory: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(directory / f"rank-{rank}.safetensors"))
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    (directory / f"rank-{rank}.json").write_text(json.dumps({
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }))


def _load_rng(directory: Path, rank: int) -> None:
    tensors = load_file(str(directory / f"rank-{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    saved = json.loads((directory / f"rank-{rank}.json").read_text())
    version, state, gauss = saved["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
