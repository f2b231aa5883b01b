"""Benchmarks that compare configurations end to end (`vlm bench ...`)."""
