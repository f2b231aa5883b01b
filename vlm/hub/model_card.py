"""The model card (README.md) of a saved VLM folder, built with huggingface_hub's `ModelCard`.

The card is what a stranger sees first on the hub: its YAML metadata makes the model findable
(`base_model`, `datasets`, `tags`, `pipeline_tag`, `library_name`), and its text says what the
model is made of, how it was trained, how well it did, and how to load it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..atomic import write_text_atomic
from ..config import saved_model_config
from ..constants import ADAPTER_META

CARD_NAME = "README.md"
LIBRARY_NAME = "vlm"
PIPELINE_TAG = "image-text-to-text"
LOCAL_PLACEHOLDER = "path/to/this/folder"
"""Stands in the loading snippet for a card written before the repository id is known."""

_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A vision-language model trained with `vlm`: a frozen **{{ vision }}** vision tower, **{{ fusion_text }}** fusion,
and the **{{ lm }}** language model. It answers questions about images and describes them
(`{{ pipeline_tag }}`).

| part | what |
|---|---|
| vision tower | `{{ vision_spec }}` ({{ vision_library }}) |
| fusion | {{ fusion_text }}; {{ tokens_per_image }} text positions per image |
| language model | `{{ lm_spec }}` |
| files | `model.safetensors` (all weights), `config.json`, tokenizer with its chat template, `preprocessor_config.json`, `generation_config.json`, backbone configs in `vision/` and `lm/` |

## How to use

Needs the `vlm` package (the project this model was trained with: `pip install .` in its checkout).
The weights are plain safetensors; nothing is unpickled and no remote code runs.

```python
{{ snippet }}
```
{% if llava_note %}
This model is LLaVA-shaped, so it can also be exported to transformers' own
`LlavaForConditionalGeneration` and used without this package:

```bash
{{ llava_commands }}
```
{% endif %}
{% if preference %}
## Preference tuning

This model was preference-tuned with **{{ preference }}** on {{ preference_data }}, starting from
`{{ preference_start }}` (the reference model).
{% endif %}
## Evaluation
{% if metrics %}
Measured on this checkpoint:

| metric | value |
|---|---|
{% for name, value in metrics %}| {{ name }} | {{ value }} |
{% endfor %}{% else %}
No evaluation metrics were recorded for this checkpoint.
{% endif %}
## Training configuration
{% if train_config %}
```yaml
{{ train_config }}```
{% else %}
The training configuration was not recorded for this checkpoint.
{% endif %}"""


def build_model_card(
    folder: str | Path,
    train_config: Optional[dict[str, Any]] = None,
    metrics: Optional[dict[str, Any]] = None,
    repo_id: Optional[str] = None,
    datasets: Optional[list[str]] = None,
) -> ModelCard:
    """The card of the saved VLM in `folder` (reads its config.json; writes nothing).

    `train_config` is the run's config as a dict (`config_to_dict(config)`), `metrics` the final
    eval results; `repo_id` makes the loading snippet download from the hub. `datasets` overrides
    the dataset names derived from `train_config["data"]["train_files"]`.
    """
    folder = Path(folder)
    meta_path, adapter_path = folder / "config.json", folder / ADAPTER_META
    adapter = not meta_path.is_file() and adapter_path.is_file()  # LoRA kept separate (export.merge_lora: false)
    if not meta_path.is_file() and not adapter:
        raise FileNotFoundError(
            f"'{folder}' is not a saved VLM folder (no config.json or {ADAPTER_META}); save the model first."
        )
    meta = json.loads((adapter_path if adapter else meta_path).read_text())
    model = meta.get("model", {})
    vision_spec, lm_spec = model.get("vision", ""), model.get("lm", "")
    vision, lm = base_model_name(vision_spec, folder / "vision"), base_model_name(lm_spec, folder / "lm")
    config = saved_model_config(model)
    fusion = config.fusion
    projector = config.options["projector"].type if fusion == "projector" else None
    fusion_text = f"`{fusion}`" + (f" (`{projector}`)" if projector else "")
    tags = ["vision-language", PIPELINE_TAG, "vlm", f"fusion-{fusion}"]
    if projector:
        tags.append(f"projector-{projector}")
    if adapter:
        tags.append("lora")
    preference = _preference(train_config)
    if preference:
        tags.append("dpo")
    data = ModelCardData(
        base_model=[name for name in (vision, lm) if name],
        datasets=datasets if datasets is not None else dataset_names(train_config),
        tags=tags,
        pipeline_tag=PIPELINE_TAG,
        library_name=LIBRARY_NAME,
        model_name=repo_id.split("/")[-1] if repo_id else folder.resolve().name,
    )
    return ModelCard.from_template(
        data,
        template_str=_TEMPLATE,
        vision=vision or "(unknown)",
        lm=lm or "(unknown)",
        vision_spec=vision_spec,
        lm_spec=lm_spec,
        vision_library=meta.get("vision_library", "unknown library"),
        fusion_text=fusion_text,
        tokens_per_image=meta.get("tokens_per_image", "?"),
        snippet=loading_snippet(repo_id, adapter),
        llava_commands=llava_commands(repo_id),
        llava_note=meta.get("vision_library") == "transformers" and projector == "mlp2x_gelu",
        metrics=_metric_rows(metrics),
        **preference,
        train_config=yaml.safe_dump(train_config, sort_keys=False) if train_config else "",
    )


def _preference(train_config: Optional[dict[str, Any]]) -> dict[str, str]:
    """The card's preference-tuning facts (empty for an SFT run): the loss, beta and the pairs it learnt from."""
    train = (train_config or {}).get("train") or {}
    if train.get("objective") != "dpo":
        return {}
    dpo = train.get("dpo") or {}
    loss = {"sigmoid": "DPO", "ipo": "IPO"}.get(dpo.get("loss_type"), str(dpo.get("loss_type")))
    extra = f", RPO NLL weight {dpo['sft_weight']}" if dpo.get("sft_weight") else ""
    files = ((train_config or {}).get("data") or {}).get("train_files") or []
    names = [Path(f["path"] if isinstance(f, dict) else str(f)).name for f in files]
    model = (train_config or {}).get("model") or {}
    return {"preference": f"{loss} (beta {dpo.get('beta')}{extra})",
            "preference_data": ", ".join(f"`{n}`" for n in names) or "(unrecorded pairs)",
            "preference_start": model.get("init_from") or model.get("pretrained") or "the backbones"}


def write_model_card(
    folder: str | Path,
    train_config: Optional[dict[str, Any]] = None,
    metrics: Optional[dict[str, Any]] = None,
    repo_id: Optional[str] = None,
    datasets: Optional[list[str]] = None,
) -> Path:
    """Write `folder/README.md` (replacing any old one in a single rename) and return its path."""
    card = build_model_card(folder, train_config, metrics, repo_id, datasets)
    path = Path(folder) / CARD_NAME
    write_text_atomic(path, str(card))
    return path


def loading_snippet(repo_id: Optional[str], adapter: bool = False) -> str:
    """Python that loads the model and answers one question (from the hub when `repo_id` is known).

    `adapter`: the folder holds LoRA adapters over a base model, loaded by `load_adapter_folder`.
    """
    imports, loader = "from vlm import Pipeline", "Pipeline.from_pretrained({})"
    if adapter:
        imports = "from vlm import Pipeline\nfrom vlm.train.lora import load_adapter_folder"
        loader = "Pipeline(load_adapter_folder({}))"
    if repo_id:
        source = f'snapshot_download("{repo_id}")'
        load = f"from huggingface_hub import snapshot_download\nfrom PIL import Image\n{imports}\n\n"
    else:
        source = f'"{LOCAL_PLACEHOLDER}"'
        load = f"from PIL import Image\n{imports}\n\n"
    load += f"pipe = {loader.format(source)}\n"
    return load + 'print(pipe.generate(images=[Image.open("picture.jpg")], prompt="What is in the picture?"))'


def llava_commands(repo_id: Optional[str]) -> str:
    """Shell lines that export this model to transformers' Llava (after downloading it, for a hub repo)."""
    if not repo_id:
        return f"vlm export --model {LOCAL_PLACEHOLDER} --format llava-hf --out llava-hf"
    name = repo_id.split("/")[-1]
    return (
        f"hf download {repo_id} --local-dir {name}\n"
        f"vlm export --model {name} --format llava-hf --out {name}-llava-hf"
    )


def point_card_at_repo(folder: str | Path, repo_id: str) -> bool:
    """Turn a card written before the repository id was known into one that loads from `repo_id`.

    Only the title, `model_name` and the snippets change; returns whether anything did.
    """
    path = Path(folder) / CARD_NAME
    try:
        card = ModelCard.load(path)
    except Exception:  # a card someone wrote by hand that huggingface_hub cannot parse: leave it alone
        return False
    if LOCAL_PLACEHOLDER not in card.text:
        return False
    old_name, new_name = card.data.model_name, repo_id.split("/")[-1]
    text = card.text.replace(loading_snippet(None), loading_snippet(repo_id))
    text = text.replace(loading_snippet(None, True), loading_snippet(repo_id, True))
    text = text.replace(llava_commands(None), llava_commands(repo_id))
    if old_name:
        text = text.replace(f"# {old_name}\n", f"# {new_name}\n", 1)
    card.text, card.data.model_name = text, new_name
    write_text_atomic(path, str(card))
    return True


def base_model_name(spec: str, saved: Optional[Path] = None) -> Optional[str]:
    """A backbone spec (`hf:org/name`, `timm:name`, a hub id or a local folder) as a hub model name.

    Local folders give the hub id their config.json records (or, once the folder is gone, the copy
    in the saved VLM's `saved` sub-folder), else the folder's name.
    """
    if not spec:
        return None
    if spec.startswith("hf:"):
        spec = spec[len("hf:") :]
    elif spec.startswith("timm:"):
        name = spec[len("timm:") :]
        if name.startswith("hf-hub:"):
            return name[len("hf-hub:") :]
        if not _is_local(name):
            return f"timm/{name}"
        spec = name
    if not _is_local(spec) and _is_repo_id(spec):
        return spec
    recorded = _recorded_hub_id(Path(spec).expanduser()) or (_recorded_hub_id(saved) if saved else None)
    return recorded or Path(spec.rstrip("/")).name or None


def dataset_names(train_config: Optional[dict[str, Any]]) -> list[str]:
    """`data.train_files` as card `datasets`: hub ids (`hf:org/name` or bare ids) as they are, local files
    and dataset folders by a short readable name (the folder's name for generic ones like train.json)."""
    files = ((train_config or {}).get("data") or {}).get("train_files") or []
    names: list[str] = []
    for item in files:
        item = str(item.get("path", "") if isinstance(item, dict) else item)  # `{path, weight}` mixture entries
        if item.startswith("hf:"):
            name = item[len("hf:") :]
        elif not _is_local(item) and _is_repo_id(item) and not Path(item).suffix:
            name = item
        else:
            path = Path(item)
            generic = path.stem.lower() in {"train", "training", "data", "dataset", "all"}
            name = path.parent.name if generic and path.parent.name else path.stem
        if name and name not in names:
            names.append(name)
    return names


def _is_local(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or os.path.exists(spec)


def _is_repo_id(spec: str) -> bool:
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def _recorded_hub_id(path: Path) -> Optional[str]:
    """The hub id a local checkpoint says it came from (transformers `_name_or_path`, timm `hf_hub_id`)."""
    config = path / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    candidates = [data.get("_name_or_path"), (data.get("pretrained_cfg") or {}).get("hf_hub_id")]
    for name in candidates:
        if isinstance(name, str) and name and not _is_local(name) and _is_repo_id(name):
            return name
    return None


def _metric_rows(metrics: Optional[dict[str, Any]], prefix: str = "") -> list[tuple[str, str]]:
    """Nested metrics flattened to (dotted name, formatted value) rows."""
    rows: list[tuple[str, str]] = []
    for key, value in (metrics or {}).items():
        if isinstance(value, dict):
            rows.extend(_metric_rows(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)):
            continue  # per-step histories belong in the run folder, not in a table
        elif isinstance(value, float):
            rows.append((f"{prefix}{key}", f"{value:.4g}"))
        else:
            rows.append((f"{prefix}{key}", str(value)))
    return rows
