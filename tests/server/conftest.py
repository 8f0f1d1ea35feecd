"""Fixtures of the server tests: a tiny model that carries SmolLM2's tokenizer, built once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from processes import stale_leftovers, wait_until

from .helpers import build_tiny_with_tokenizer


@pytest.fixture(scope="session")
def tiny_tok_folder(tmp_path_factory, smollm2_folder) -> Path:
    return build_tiny_with_tokenizer(tmp_path_factory.mktemp("tiny-tok"), smollm2_folder)


@pytest.fixture(autouse=True)
def _nothing_left_behind():
    """Every test of real instances leaves no instance directory and no shared memory of a gone process."""
    since = time.time() - 1
    yield
    wait_until(lambda: not stale_leftovers(since), 10)
    assert stale_leftovers(since) == []
