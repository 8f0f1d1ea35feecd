"""Fixtures of the end-to-end launcher tests."""

import time

import pytest
from processes import stale_leftovers, wait_until

from .helpers import Setup, build_setup


@pytest.fixture(scope="session")
def setup(tmp_path_factory) -> Setup:
    return build_setup(tmp_path_factory.mktemp("launch"))


@pytest.fixture(autouse=True)
def _nothing_left_behind():
    """Every test of real instances leaves no instance directory and no shared memory of a gone process."""
    since = time.time() - 1
    yield
    wait_until(lambda: not stale_leftovers(since), 10)
    assert stale_leftovers(since) == []
