"""MuxServe: serve many LLMs on shared GPUs."""

__version__ = "0.1.0"
