"""Sharing checkpoints: export to transformers-native formats."""
