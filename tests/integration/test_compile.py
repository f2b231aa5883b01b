"""`train.compile`: compiled training steps give the eager losses; where compiling fails, eager + one warning.

The backend is `aot_eager` unless VLM_TEST_COMPILE_BACKEND says otherwise (e.g. `inductor`): it traces
and partitions the LM and fusion exactly as inductor would, without inductor's C++ build, which takes
minutes for the first graph on a 2-core CPU.
"""

import copy
import os
import warnings

import pytest
import torch

from vlm.data.collator import Collator
from vlm.data.formats import read_samples
from vlm.factory import processor_for
from vlm.train import speed
from vlm.train.freezing import apply_stage
from vlm.train.speed import _CompileGuard, compile_unsupported_reason, maybe_compile

BACKEND = os.environ.get("VLM_TEST_COMPILE_BACKEND", "aot_eager")


def batch_of(model, synthetic, n: int = 2) -> dict:
    samples = read_samples(synthetic["train"])[0][:n]
    batch = Collator(model.tokenizer.pad_token_id, "right")([processor_for(model)(s) for s in samples])
    return {k: getattr(batch, k) for k in ("input_ids", "attention_mask", "pixel_values", "labels")}


def train_losses(model, batch, steps: int = 2) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.fixture()
def finetune_vlm(tiny_vlm):
    apply_stage(tiny_vlm, "finetune")
    return tiny_vlm


def test_compiled_steps_give_the_eager_losses(finetune_vlm, synthetic):
    reason = compile_unsupported_reason(BACKEND)
    if reason:
        pytest.skip(f"cannot compile here: {reason}")
    torch._dynamo.reset()
    batch = batch_of(finetune_vlm, synthetic)
    compiled = maybe_compile(copy.deepcopy(finetune_vlm), True, backend=BACKEND)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn: it must not happen here
        got = train_losses(compiled, batch)
    expected = train_losses(finetune_vlm, batch)
    for guard in (compiled.lm.forward, compiled.fusion.embed_images):
        assert isinstance(guard, _CompileGuard) and guard.worked and not guard.failed
    assert got[1] != got[0]  # the compiled backward produced gradients and the step applied them
    assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-4
    assert list(compiled.state_dict()) == list(finetune_vlm.state_dict())  # saved folders are unchanged


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(finetune_vlm, synthetic, monkeypatch):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("simulated: no working C++ compiler")

    # Only the fusion: tracing the LM just to watch it fail would cost the suite half a minute.
    monkeypatch.setattr(speed, "compile_targets", lambda model: {"fusion": (model.fusion, "embed_images")})
    torch._dynamo.reset()
    batch = batch_of(finetune_vlm, synthetic)
    model = maybe_compile(copy.deepcopy(finetune_vlm), True, backend=broken_backend)
    with pytest.warns(RuntimeWarning, match="compiling the fusion failed .RuntimeError: simulated") as record:
        got = train_losses(model, batch)
    assert sum("train.compile" in str(w.message) for w in record) == 1  # once, not every step
    assert model.fusion.embed_images.failed
    assert got == train_losses(finetune_vlm, batch)  # eager: bit-identical
    torch._dynamo.reset()


def test_disabled_or_unsupported_leaves_the_model_alone(finetune_vlm, monkeypatch):
    assert maybe_compile(finetune_vlm, False) is finetune_vlm
    assert "forward" not in vars(finetune_vlm.lm)
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        maybe_compile(finetune_vlm, True, backend="inductor")
    assert "forward" not in vars(finetune_vlm.lm)
