"""Fixtures of the server tests: a tiny model that carries SmolLM2's tokenizer, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import build_tiny_with_tokenizer


@pytest.fixture(scope="session")
def tiny_tok_folder(tmp_path_factory, smollm2_folder) -> Path:
    return build_tiny_with_tokenizer(tmp_path_factory.mktemp("tiny-tok"), smollm2_folder)
