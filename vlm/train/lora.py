"""LoRA / QLoRA on the LM through peft, and how a LoRA model is saved and loaded.

Saving, decided once here:
- `final/` with `export.merge_lora: true` (default): the adapters are merged into the LM's weights
  and the folder is a plain VLM folder (`VLM.from_pretrained`, no peft needed).
- `export.merge_lora: false`, and checkpoints during training: an adapter folder — peft's
  `adapter_model.safetensors` + `adapter_config.json`, the trained non-LM weights (fusion, and the
  vision tower when it trains) in `non_lm.safetensors`, and `vlm_adapter.json` naming the base
  model. `load_adapter_folder` rebuilds the base and puts both back; `vlm export --merge-lora`
  turns such a folder into a plain one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_directory
from ..config import LoraConfig, config_to_dict, saved_model_config
from ..constants import ADAPTER_META
from ..factory import save
from ..folder import saved_tiling
from ..processor import VLMProcessor
from ..lm import new_token_ids

logger = logging.getLogger(__name__)

NON_LM_WEIGHTS = "non_lm.safetensors"


def default_targets(model: nn.Module) -> list[str]:
    """Every linear layer of the LM (names relative to `model.lm`) except its output head and
    anything that belongs to the fusion (e.g. cross-attention blocks inserted between its layers)."""
    fusion_modules = {id(m) for m in model.fusion.modules()}
    head = model.lm.get_output_embeddings()
    return [
        name for name, module in model.lm.named_modules()
        if isinstance(module, nn.Linear) and module is not head and id(module) not in fusion_modules
    ]


def trainable_token_indices(model: nn.Module, lora: LoraConfig) -> dict[str, list[int]] | None:
    """peft's `trainable_token_indices`: the rows that train in the LM's input embedding and, when
    untied, its output head (a tied head follows the embedding: peft ties the two wrappers).

    The tokens the project brought (`vlm.lm.new_token_ids`) when `lora.train_new_tokens`, plus
    `lora.trainable_tokens`; None when there are none.
    """
    tokenizer = model.tokenizer
    ids = set(new_token_ids(tokenizer, model.config.image_token)) if lora.train_new_tokens else set()
    for token in lora.trainable_tokens:
        if token not in tokenizer.get_vocab():
            raise ValueError(
                f"train.lora.trainable_tokens names '{token}', which is not one token of this LM's vocabulary; "
                "list single tokens (e.g. the special tokens of your chat template)."
            )
        ids.add(tokenizer.convert_tokens_to_ids(token))
    if not ids:
        return None
    logger.info("LoRA: the rows of %s train; the rest of the vocabulary stays frozen.",
                ", ".join(tokenizer.convert_ids_to_tokens(sorted(ids))))
    names = {id(module): name for name, module in model.lm.named_modules()}
    embed, head = model.lm.get_input_embeddings(), model.lm.get_output_embeddings()
    layers = {names[id(embed)]: sorted(ids)}
    if head is not None and head.weight is not embed.weight:
        layers[names[id(head)]] = sorted(ids)
    return layers


def apply_lora(model: nn.Module, lora: LoraConfig, quantize_weights: bool = True) -> None:
    """Wrap `model.lm` in a peft model with LoRA adapters; its own weights are frozen, except the
    rows of `trainable_token_indices` (new tokens), which train as peft's trainable-token deltas.

    `lora.target_modules`: names or name suffixes inside the LM (peft's matching); the vision
    tower is never adapted (train it with `train.freeze.vision: false` instead).
    quantize_weights=False runs QLoRA's whole path except the NF4 swap itself, which needs CUDA
    (how its tests run on CPU).
    """
    if isinstance(model.lm, PeftModel):
        raise ValueError("The LM already carries LoRA adapters; apply_lora must run once per model.")
    targets = lora.target_modules or default_targets(model)
    vision_named = [t for t in targets if t.startswith("vision.")]
    if vision_named:
        raise ValueError(
            f"train.lora.target_modules names vision-tower modules {vision_named}; LoRA applies to the LM only. "
            "Train the tower itself with train.freeze.vision=false (and train.vision_lr)."
        )
    if lora.quantize == "4bit":
        if quantize_weights:
            quantize_lm_4bit(model, targets)
        prepare_for_kbit_training(model)
    config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none",
        trainable_token_indices=trainable_token_indices(model, lora),
    )
    try:
        model.lm = get_peft_model(model.lm, config)
    except ValueError as err:
        raise ValueError(f"train.lora.target_modules={lora.target_modules}: {err}") from None


def quantize_lm_4bit(model: nn.Module, targets: list[str]) -> None:
    """QLoRA: the LM's frozen linear layers in NF4 through bitsandbytes; needs a CUDA GPU."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "train.lora.quantize=4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit layers run on CUDA only, "
            "and this machine has none. Set train.lora.quantize=null to train plain LoRA here."
        )
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise RuntimeError(
            "train.lora.quantize=4bit needs bitsandbytes: pip install 'vlm[qlora]' (or pip install bitsandbytes)."
        ) from None

    names = set(targets)
    for name, module in list(model.lm.named_modules()):
        if name not in names or not isinstance(module, nn.Linear):
            continue
        quantized = bnb.nn.Linear4bit(
            module.in_features, module.out_features, bias=module.bias is not None,
            compute_dtype=torch.bfloat16, quant_type="nf4",
        )
        quantized.weight = bnb.nn.Params4bit(module.weight.data.cpu(), requires_grad=False, quant_type="nf4")
        if module.bias is not None:
            quantized.bias = nn.Parameter(module.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.lm.get_submodule(parent) if parent else model.lm, child, quantized)
    model.lm.cuda()  # bitsandbytes quantises the weights as they move to the GPU


def prepare_for_kbit_training(model: nn.Module) -> None:
    """peft's preparation of a quantised LM: frozen weights, fp32 norms, inputs that carry gradients."""
    from peft import prepare_model_for_kbit_training

    model.lm = prepare_model_for_kbit_training(model.lm, use_gradient_checkpointing=False)


def has_lora(model: nn.Module) -> bool:
    return isinstance(model.lm, PeftModel)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the LM's weights (in place) so the model is a plain VLM again."""
    if has_lora(model):
        model.lm = model.lm.merge_and_unload()
    return model


def save_adapter(model: nn.Module, directory: str | Path, base: str | None = None,
                 processor: VLMProcessor | None = None) -> Path:
    """Adapter-only folder: peft's adapter files, the trained non-LM weights and `vlm_adapter.json`.

    base: the saved VLM folder training started from (`model.init_from`), if any; otherwise the
    base is rebuilt from the backbones named in the model config. processor: its files too (tokenizer,
    image preprocessing and tiling), so what loads the adapters processes images as training did.
    """
    if not has_lora(model):
        raise ValueError("save_adapter needs a model with LoRA adapters (train.lora.enabled).")
    with atomic_directory(directory) as tmp:
        # adapter_model.safetensors + adapter_config.json. The added tokens' rows travel as peft's
        # trainable-token deltas; the rest of the (resized) vocabulary is rebuilt with the base,
        # so peft need not copy whole embedding matrices into every adapter.
        model.lm.save_pretrained(tmp, save_embedding_layers=False)
        trained = {
            name: tensor.detach().cpu().clone().contiguous()
            for name, tensor in model.state_dict().items()
            if name.startswith("fusion.") or (name.startswith("vision.") and not model.vision.frozen)
        }
        save_file(trained, str(tmp / NON_LM_WEIGHTS))
        meta = {"base": base, "model": config_to_dict(model.config)}
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2))
        if processor is not None:
            processor.save_pretrained(tmp)
    return Path(directory)


def adapter_max_tiles(directory: str | Path) -> int:
    """The tiling an adapter folder's processor was saved with (0: none, or a folder saved without it)."""
    return int(saved_tiling(Path(directory), {}).get("max_tiles", 0))


def load_adapter_folder(directory: str | Path, is_trainable: bool = False) -> nn.Module:
    """Rebuild the base VLM, attach the saved adapters and restore the non-LM weights."""
    from ..model import VLM

    directory = Path(directory)
    if not (directory / ADAPTER_META).is_file():
        raise FileNotFoundError(f"'{directory}' is not a LoRA adapter folder (no {ADAPTER_META}).")
    meta = json.loads((directory / ADAPTER_META).read_text())
    if meta["base"]:
        model = VLM.from_pretrained(meta["base"])
    else:
        config = saved_model_config(meta["model"])
        config.pretrained = config.init_from = None
        model = VLM.from_config(config)
    model.lm = PeftModel.from_pretrained(model.lm, str(directory), is_trainable=is_trainable)
    non_lm = load_file(str(directory / NON_LM_WEIGHTS))
    result = model.load_state_dict(non_lm, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"'{directory}/{NON_LM_WEIGHTS}' holds weights this model lacks: {result.unexpected_keys[:5]}")
    logger.info("Loaded LoRA adapters and %d non-LM tensors from %s", len(non_lm), directory)
    return model


def save_final(model: nn.Module, processor: VLMProcessor, directory: str | Path, merge: bool = True,
               base: str | None = None) -> Path:
    """What the loop writes to `final/`: a plain VLM folder (model and processor), merging LoRA first when
    `merge` (`export.merge_lora`), or an adapter folder when LoRA is kept separate."""
    if has_lora(model) and not merge:
        return save_adapter(model, directory, base, processor)
    return save(merge_lora(model), processor, directory)
