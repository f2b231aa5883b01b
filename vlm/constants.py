"""File names that mark saved folders: defined once, imported by whatever writes or reads them."""

WEIGHTS_NAME = "model.safetensors"
"""Every weight of a saved VLM folder (`VLM.save_pretrained`), beside its config.json."""
ADAPTER_META = "vlm_adapter.json"
"""Marks an adapter-only folder (`vlm.train.lora.save_adapter`): LoRA weights over a base VLM."""
