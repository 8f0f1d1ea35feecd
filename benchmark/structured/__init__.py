"""Structured outputs: grammar compile and per-step mask cost."""
