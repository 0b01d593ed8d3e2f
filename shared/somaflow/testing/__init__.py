"""Helpers for testing somaflow against misbehaving infrastructure (no heavy dependencies)."""
