"""What a run has done so far, as typed values: the checkpoint's `trainer_state.json` is exactly this.

`TrainState` is everything besides weights, optimizer and random generators that an exact resume
needs (and what the summary reports); `DataPosition` is where in the data the next step starts.
`DataPosition` is an immutable value the step replaces. `TrainState` is a mutable record with three
writers: `train_step` and `Trainer.step` (position, step, history), `Updater.skip` (bad_steps) and
`Trainer.setup` / `evaluate` (skipped samples, evaluations); a checkpoint saves it as it stands.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class DataPosition:
    """Epoch, and micro-batches of this epoch already read by each process."""

    epoch: int = 0
    batches_in_epoch: int = 0

    def after(self, batches: int) -> "DataPosition":
        """The position once `batches` more micro-batches of this epoch are read."""
        return replace(self, batches_in_epoch=self.batches_in_epoch + batches)

    def next_epoch(self) -> "DataPosition":
        return DataPosition(self.epoch + 1, 0)


@dataclass
class TrainState:
    """Optimizer steps applied, data position, per-step history, skipped (bad) steps, skipped samples and
    evaluations."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    history: list[dict[str, Any]] = field(default_factory=list)
    """One entry per applied step: step, loss, lr, grad_norm."""
    bad_steps: list[dict[str, Any]] = field(default_factory=list)
    """One entry per skipped step: `after_step` (the last applied one) and the sample ids it read."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples skipped, by category (`vlm data check` names)."""
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    """One entry per evaluation: step, loss; early stopping's counters are derived from it, so a resumed
    run continues counting."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; flat keys (`epoch`, `batches_in_epoch`), as checkpoints have always had."""
        out = {
            "step": self.step, "epoch": self.position.epoch, "batches_in_epoch": self.position.batches_in_epoch,
            "history": self.history, "bad_steps": self.bad_steps, "skipped": self.skipped,
        }
        if self.eval_history:  # absent without evaluations, so older checkpoints round-trip unchanged
            out["eval_history"] = self.eval_history
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainState":
        """Inverse of `to_dict`; keys it does not know (e.g. `scheduler`, `world_size`) are the caller's."""
        return cls(
            step=int(raw["step"]),
            position=DataPosition(int(raw.get("epoch", 0)), int(raw.get("batches_in_epoch", 0))),
            history=list(raw.get("history", [])), bad_steps=list(raw.get("bad_steps", [])),
            skipped=dict(raw.get("skipped", {})), eval_history=list(raw.get("eval_history", [])),
        )

    def count_skipped(self, category: str) -> None:
        self.skipped[category] = self.skipped.get(category, 0) + 1
