"""Sharing checkpoints: push to a model hub with a model card (`push`, `model_card`, `publish`), export to transformers-native formats (`export`)."""
