"""Step-speed switches: `torch.compile` of the LM and fusion (`train.compile`) and activation
checkpointing per component (`train.gradient_checkpointing`, `train.gradient_checkpointing_components`).

Both change how the step runs, never what it computes: state-dict keys, saved folders and losses
are unchanged. Checkpointing is torch's composable API (hooks, no method replaced). Compilation falls back
to eager, with one warning, wherever it cannot work: that is why it puts a guard object in place of the
two compiled methods (`nn.Module.compile` has no such fallback, and the fusion's `embed_images` is not a
`forward`).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.distributed._composable import checkpoint as composable_checkpoint
from torch.distributed._composable.contract import _get_registry

logger = logging.getLogger(__name__)

CHECKPOINT_COMPONENTS = ("lm", "fusion", "vision")


def compile_unsupported_reason(backend: str = "inductor", device: torch.device | str = "cpu") -> str | None:
    """Why `torch.compile` cannot work here (None when it should): checked up front so the fallback's
    warning says what to install rather than a compiler traceback."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if sys.platform == "win32" and backend == "inductor":
        return "the inductor backend is not supported on Windows by this project"
    if backend == "inductor" and torch.device(device).type == "cpu":
        compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
        if not any(c and shutil.which(c) for c in compilers):
            return "no C++ compiler found (inductor's CPU backend needs one; install g++ or set CXX)"
    if backend == "inductor" and torch.device(device).type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "triton is not installed (inductor's GPU backend needs it)"
    return None


class _CompileGuard:
    """The eager and compiled versions of one method; after a failed first compiled call, eager for good."""

    def __init__(self, eager: Callable[..., Any], backend: str, label: str) -> None:
        self.eager = eager
        self.compiled = torch.compile(eager, backend=backend)
        self.label = label
        self.worked = False
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed:
            return self.eager(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any compiler failure means: run eagerly
            if self.worked:
                raise  # compilation works here; this is a real error
            out = self.eager(*args, **kwargs)  # if the inputs are at fault, this raises the real error
            self.failed = True
            cause = getattr(err, "inner_exception", None) or err.__cause__ or err  # dynamo wraps backend errors
            detail = (str(cause).strip().splitlines() or [""])[0][:200]
            warnings.warn(
                f"train.compile: compiling {self.label} failed ({type(cause).__name__}: {detail}); running it "
                "eagerly. Set train.compile=false to silence this.", RuntimeWarning, stacklevel=2,
            )
            return out
        self.worked = True
        return out


def _guard_method(module: nn.Module, name: str, backend: str, label: str) -> None:
    guard = _CompileGuard(getattr(module, name), backend, label)
    setattr(module, name, guard)


def compile_targets(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """What `maybe_compile` compiles: the LM's forward (fusion blocks run inside it are traced with it)
    and the fusion's `embed_images`, which every strategy runs outside the LM."""
    return {"lm": (model.lm, "forward"), "fusion": (model.fusion, "embed_images")}


def maybe_compile(model: nn.Module, enabled: bool, backend: str | None = None) -> nn.Module:
    """`train.compile`: compile the VLM's LM and fusion in place (same module, same state-dict keys).

    Where compilation is unsupported (no C++ compiler, no triton, ...) or fails on its first call,
    the model runs eagerly after one warning. `backend` defaults to `$VLM_COMPILE_BACKEND` or
    inductor (tests use `aot_eager`, which checks the traced graph without a C++ build).
    Call after freezing / checkpointing / LoRA set-up and before `accelerator.prepare`.
    """
    if not enabled:
        return model
    backend = backend or os.environ.get("VLM_COMPILE_BACKEND", "inductor")
    device = next(model.lm.parameters()).device
    reason = compile_unsupported_reason(backend, device)
    if reason:
        warnings.warn(f"train.compile: {reason}; training eagerly.", RuntimeWarning, stacklevel=2)
        return model
    for label, (module, name) in compile_targets(model).items():
        if isinstance(getattr(module, name), _CompileGuard):
            continue  # already compiled
        _guard_method(module, name, backend, f"the {label}")
    logger.info("train.compile: LM forward and fusion compiled with backend '%s' (first steps are slower).", backend)
    return model


def checkpoint_module(module: nn.Module) -> None:
    """Recompute `module`'s activations in the backward pass: torch's composable activation checkpointing,
    which works through forward hooks, so no method is replaced and state-dict keys stay as they are
    (idempotent). Outside autograd (eval, generation) nothing is saved, so nothing is recomputed."""
    if "checkpoint" not in (_get_registry(module) or {}):
        composable_checkpoint(module)


def apply_gradient_checkpointing(model: nn.Module, components: bool | Sequence[str]) -> list[str]:
    """Recompute activations in the backward pass for the chosen components; returns those applied.

    components: True (the LM, the old boolean `train.gradient_checkpointing`), False / [] (none), or
    names from `lm` (every decoder layer, transformers' own mechanism), `fusion` (what `Fusion.checkpointable_modules` names),
    `vision` (only when the tower trains: a frozen tower keeps no activations anyway).
    """
    if components is True:
        components = ["lm"]
    elif components is False or components is None:
        components = []
    unknown = sorted(set(components) - set(CHECKPOINT_COMPONENTS))
    if unknown:
        raise ValueError(
            f"train.gradient_checkpointing_components: unknown component(s) {unknown}; "
            f"choose from {list(CHECKPOINT_COMPONENTS)}."
        )
    applied = []
    if "lm" in components:
        model.lm.activation_checkpointing_enable({"use_reentrant": False})
        applied.append("lm")
    if "fusion" in components:
        for block in model.fusion.checkpointable_modules():
            checkpoint_module(block)
        applied.append("fusion")
    if "vision" in components:
        if getattr(model.vision, "frozen", True):
            logger.info("Gradient checkpointing: the vision tower is frozen (no activations kept); skipped.")
        else:
            model.vision.enable_gradient_checkpointing()
            applied.append("vision")
    if applied:
        logger.info("Gradient checkpointing on: %s.", ", ".join(applied))
    return applied
